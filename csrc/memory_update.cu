// In-place memory update with optional element and per-sample norm clipping; lr read on device.
#include "common.cuh"
#include "ops.h"

namespace gradmem {
namespace {

constexpr int kThreads = 512;
constexpr float kNormEps = 1e-6f;

// One block per sample b; n = m * d elements each. clip_value / clip_norm <= 0 means off.
template <typename T, typename G>
__global__ void __launch_bounds__(kThreads)
memory_update_kernel(T* __restrict__ memory, const G* __restrict__ grad, const float* __restrict__ lr, int64_t n,
                     float clip_value, float clip_norm) {
  __shared__ float smem[32];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * n;
  const bool clamp = clip_value > 0.0f;
  float scale = 1.0f;
  if (clip_norm > 0.0f) {
    float b_sq[1] = {0.0f};
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      float g = static_cast<float>(grad[base + i]);
      if (clamp) g = fminf(fmaxf(g, -clip_value), clip_value);
      b_sq[0] += g * g;
    }
    block_sum<1>(b_sq, smem);
    scale = fminf(1.0f, clip_norm / (sqrtf(b_sq[0]) + kNormEps));
  }
  const float step = *lr;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    float g = static_cast<float>(grad[base + i]);
    if (clamp) g = fminf(fmaxf(g, -clip_value), clip_value);
    memory[base + i] = static_cast<T>(static_cast<float>(memory[base + i]) - step * (g * scale));
  }
}

}  // namespace

void memory_update_(const at::Tensor& memory, const at::Tensor& grad, const at::Tensor& lr, double clip_value,
                    double clip_norm) {
  check_cuda(memory, "memory");
  check_contiguous(memory, "memory");
  check_kernel_dtype(memory, "memory");
  TORCH_CHECK(memory.dim() == 3, "memory must be (B, m, d), got shape ", memory.sizes());
  check_cuda(grad, "grad");
  check_contiguous(grad, "grad");
  TORCH_CHECK(grad.sizes() == memory.sizes(), "grad shape ", grad.sizes(), " differs from memory shape ",
              memory.sizes());
  TORCH_CHECK(grad.device() == memory.device(), "grad is on ", grad.device(), ", memory on ", memory.device());
  TORCH_CHECK(grad.scalar_type() == memory.scalar_type() || grad.scalar_type() == at::kFloat, "grad dtype ",
              grad.scalar_type(), " must be memory's dtype ", memory.scalar_type(), " or float32");
  check_cuda(lr, "lr");
  TORCH_CHECK(lr.scalar_type() == at::kFloat && lr.numel() == 1, "lr must be a float32 tensor with one element, got ",
              lr.scalar_type(), " of shape ", lr.sizes());
  TORCH_CHECK(lr.device() == memory.device(), "lr is on ", lr.device(), ", memory on ", memory.device());
  const int64_t B = memory.size(0), n = memory.size(1) * memory.size(2);
  if (B == 0 || n == 0) return;
  TORCH_CHECK(B < (int64_t{1} << 31), "memory has too many samples: ", B);
  const c10::cuda::CUDAGuard guard(memory.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int threads = static_cast<int>(std::min<int64_t>(kThreads, std::max<int64_t>(32, round_up(n, 32))));
  const float cv = static_cast<float>(clip_value), cn = static_cast<float>(clip_norm);
  GM_DISPATCH_FLOAT_TYPES(memory.scalar_type(), "memory_update_", [&] {
    using T = scalar_t;
    if (grad.scalar_type() == memory.scalar_type()) {
      memory_update_kernel<T, T><<<static_cast<unsigned>(B), threads, 0, stream>>>(
          memory.data_ptr<T>(), grad.data_ptr<T>(), lr.data_ptr<float>(), n, cv, cn);
    } else {
      memory_update_kernel<T, float><<<static_cast<unsigned>(B), threads, 0, stream>>>(
          memory.data_ptr<T>(), grad.data_ptr<float>(), lr.data_ptr<float>(), n, cv, cn);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace gradmem
