// SwiGLU and GELU, forward and input-gradient backward, elementwise with 16-byte vectors.
#include "common.cuh"
#include "ops.h"

namespace gradmem {
namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;
constexpr float kGeluC = 0.044715f;

__device__ __forceinline__ float sigmoid(float g) { return 1.0f / (1.0f + expf(-g)); }

struct SwigluFwd {
  __device__ void operator()(const float* in, float* out) const {
    out[0] = in[0] * sigmoid(in[0]) * in[1];  // in: gate, up
  }
};

struct SwigluBwd {
  __device__ void operator()(const float* in, float* out) const {
    const float dy = in[0], g = in[1], u = in[2], s = sigmoid(g);
    out[0] = dy * u * s * (1.0f + g * (1.0f - s));  // d_gate
    out[1] = dy * g * s;                             // d_up
  }
};

struct GeluFwd {
  bool tanh_approx;
  __device__ void operator()(const float* in, float* out) const {
    const float x = in[0];
    out[0] = tanh_approx ? 0.5f * x * (1.0f + tanhf(kSqrt2OverPi * (x + kGeluC * x * x * x)))
                         : 0.5f * x * (1.0f + erff(x * kInvSqrt2));
  }
};

struct GeluBwd {
  bool tanh_approx;
  __device__ void operator()(const float* in, float* out) const {
    const float dy = in[0], x = in[1];
    float grad;
    if (tanh_approx) {
      const float t = tanhf(kSqrt2OverPi * (x + kGeluC * x * x * x));
      grad = 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kGeluC * x * x);
    } else {
      grad = 0.5f * (1.0f + erff(x * kInvSqrt2)) + x * expf(-0.5f * x * x) * kInvSqrt2Pi;
    }
    out[0] = dy * grad;
  }
};

template <typename T, int NIN, int NOUT>
struct Ptrs {
  const T* in[NIN];
  T* out[NOUT];
};

// Vectors of VEC over the first nvec * VEC elements (nvec = 0 when a pointer is misaligned), then
// the remaining elements one by one.
template <typename T, int VEC, int NIN, int NOUT, typename Op>
__global__ void pointwise_kernel(Ptrs<T, NIN, NOUT> p, int64_t n, int64_t nvec, Op op) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t start = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  for (int64_t i = start; i < nvec; i += stride) {
    float b_in[NIN][VEC], b_out[NOUT][VEC];
#pragma unroll
    for (int k = 0; k < NIN; ++k) load_vec<T, VEC>(p.in[k] + i * VEC, b_in[k]);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float e_in[NIN], e_out[NOUT];
#pragma unroll
      for (int k = 0; k < NIN; ++k) e_in[k] = b_in[k][j];
      op(e_in, e_out);
#pragma unroll
      for (int k = 0; k < NOUT; ++k) b_out[k][j] = e_out[k];
    }
#pragma unroll
    for (int k = 0; k < NOUT; ++k) store_vec<T, VEC>(p.out[k] + i * VEC, b_out[k]);
  }
  for (int64_t i = nvec * VEC + start; i < n; i += stride) {
    float e_in[NIN], e_out[NOUT];
#pragma unroll
    for (int k = 0; k < NIN; ++k) e_in[k] = static_cast<float>(p.in[k][i]);
    op(e_in, e_out);
#pragma unroll
    for (int k = 0; k < NOUT; ++k) p.out[k][i] = static_cast<T>(e_out[k]);
  }
}

template <int NIN, int NOUT, typename Op>
void launch_pointwise(const at::Tensor* const (&ins)[NIN], const at::Tensor* const (&outs)[NOUT],
                      const char* const (&names)[NIN + NOUT], Op op) {
  const at::Tensor& ref = *ins[0];
  check_cuda(ref, names[0]);
  check_contiguous(ref, names[0]);
  check_kernel_dtype(ref, names[0]);
  for (int k = 1; k < NIN; ++k) check_like(*ins[k], names[k], ref, names[0]);
  for (int k = 0; k < NOUT; ++k) check_like(*outs[k], names[NIN + k], ref, names[0]);
  const int64_t n = ref.numel();
  if (n == 0) return;
  bool aligned = true;
  for (int k = 0; k < NIN; ++k) aligned = aligned && aligned16(*ins[k]);
  for (int k = 0; k < NOUT; ++k) aligned = aligned && aligned16(*outs[k]);
  const c10::cuda::CUDAGuard guard(ref.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  GM_DISPATCH_FLOAT_TYPES(ref.scalar_type(), "gradmem_fast_pointwise", [&] {
    using T = scalar_t;
    constexpr int kVec = 16 / sizeof(T);
    Ptrs<T, NIN, NOUT> p;
    for (int k = 0; k < NIN; ++k) p.in[k] = ins[k]->template data_ptr<T>();
    for (int k = 0; k < NOUT; ++k) p.out[k] = outs[k]->template data_ptr<T>();
    const int64_t nvec = aligned ? n / kVec : 0;
    const int64_t work = std::max<int64_t>(nvec, n - nvec * kVec);
    const int threads = 256;
    const int blocks = static_cast<int>(std::min<int64_t>((work + threads - 1) / threads, 65536));
    pointwise_kernel<T, kVec, NIN, NOUT, Op><<<blocks, threads, 0, stream>>>(p, n, nvec, op);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

void swiglu_fwd(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& y) {
  launch_pointwise<2, 1>({&gate, &up}, {&y}, {"gate", "up", "y"}, SwigluFwd{});
}

void swiglu_bwd(const at::Tensor& dy, const at::Tensor& gate, const at::Tensor& up, const at::Tensor& d_gate,
                const at::Tensor& d_up) {
  launch_pointwise<3, 2>({&dy, &gate, &up}, {&d_gate, &d_up}, {"dy", "gate", "up", "d_gate", "d_up"},
                         SwigluBwd{});
}

void gelu_fwd(const at::Tensor& x, bool tanh_approx, const at::Tensor& y) {
  launch_pointwise<1, 1>({&x}, {&y}, {"x", "y"}, GeluFwd{tanh_approx});
}

void gelu_bwd(const at::Tensor& dy, const at::Tensor& x, bool tanh_approx, const at::Tensor& dx) {
  launch_pointwise<2, 1>({&dy, &x}, {&dx}, {"dy", "x", "dx"}, GeluBwd{tanh_approx});
}

}  // namespace gradmem
