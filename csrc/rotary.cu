// Rotary position embedding: cos/sin tables, and an in-place rotation of (B, S, H, D) or (B, S, H, G, D)
// tensors (any strides but the last; G: e.g. q and k of each head in a per-head fused projection).
#include "common.cuh"
#include "ops.h"

namespace gradmem {
namespace {

template <typename P>
__global__ void rotary_tables_kernel(const float* __restrict__ inv_freq, const P* __restrict__ positions,
                                     float scaling, float* __restrict__ cos_out, float* __restrict__ sin_out,
                                     int64_t half, int64_t n) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    // float32 product, as the model computes it; cos/sin of it in double so large angles stay exact
    const float angle = static_cast<float>(positions[idx / half]) * inv_freq[idx % half];
    cos_out[idx] = static_cast<float>(::cos(static_cast<double>(angle))) * scaling;
    sin_out[idx] = static_cast<float>(::sin(static_cast<double>(angle))) * scaling;
  }
}

// One block per (b, s). Work item = (head h, sub-head g, group of VEC pairs); a 4-D x has G = 1.
// Half-split: pairs (i, i + half), group j covers i in [j*VEC, j*VEC + VEC).
// Interleaved: pairs (2i, 2i + 1), group j covers elements [j*E, j*E + E), E = max(VEC, 2).
template <typename T, int VEC>
__global__ void rotary_kernel(T* __restrict__ x, const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                              int64_t S, int64_t H, int64_t G, int64_t stride_b, int64_t stride_s,
                              int64_t stride_h, int64_t stride_g, int64_t half, bool interleaved, float sign) {
  const int64_t b = blockIdx.x / S;
  const int64_t s = blockIdx.x % S;
  T* p_row = x + b * stride_b + s * stride_s;
  const float* p_cos = cos_t + s * half;
  const float* p_sin = sin_t + s * half;
  if (!interleaved) {
    const int64_t groups = half / VEC;
    for (int64_t item = threadIdx.x; item < H * G * groups; item += blockDim.x) {
      const int64_t hg = item / groups, j = item % groups;
      T* p_a = p_row + (hg / G) * stride_h + (hg % G) * stride_g + j * VEC;
      float b_a[VEC], b_b[VEC];
      load_vec<T, VEC>(p_a, b_a);
      load_vec<T, VEC>(p_a + half, b_b);
#pragma unroll
      for (int q = 0; q < VEC; ++q) {
        const float c = p_cos[j * VEC + q], sn = sign * p_sin[j * VEC + q];
        const float a = b_a[q], bb = b_b[q];
        b_a[q] = a * c - bb * sn;
        b_b[q] = bb * c + a * sn;
      }
      store_vec<T, VEC>(p_a, b_a);
      store_vec<T, VEC>(p_a + half, b_b);
    }
  } else {
    constexpr int E = VEC >= 2 ? VEC : 2;
    const int64_t groups = 2 * half / E;
    for (int64_t item = threadIdx.x; item < H * G * groups; item += blockDim.x) {
      const int64_t hg = item / groups, j = item % groups;
      T* p_a = p_row + (hg / G) * stride_h + (hg % G) * stride_g + j * E;
      float b_v[E];
      if constexpr (VEC >= 2) {
        load_vec<T, E>(p_a, b_v);
      } else {
        b_v[0] = static_cast<float>(p_a[0]);
        b_v[1] = static_cast<float>(p_a[1]);
      }
#pragma unroll
      for (int q = 0; q < E / 2; ++q) {
        const int64_t i = j * (E / 2) + q;
        const float c = p_cos[i], sn = sign * p_sin[i];
        const float a = b_v[2 * q], bb = b_v[2 * q + 1];
        b_v[2 * q] = a * c - bb * sn;
        b_v[2 * q + 1] = bb * c + a * sn;
      }
      if constexpr (VEC >= 2) {
        store_vec<T, E>(p_a, b_v);
      } else {
        p_a[0] = static_cast<T>(b_v[0]);
        p_a[1] = static_cast<T>(b_v[1]);
      }
    }
  }
}

void check_table(const at::Tensor& t, const char* name, int64_t S, int64_t half) {
  check_cuda(t, name);
  check_contiguous(t, name);
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == S && t.size(1) == half, name, " must have shape (", S, ", ", half,
              "), got ", t.sizes());
}

}  // namespace

void rotary_tables(const at::Tensor& inv_freq, const at::Tensor& positions, double attention_scaling,
                   const at::Tensor& cos, const at::Tensor& sin) {
  check_cuda(inv_freq, "inv_freq");
  check_contiguous(inv_freq, "inv_freq");
  TORCH_CHECK(inv_freq.scalar_type() == at::kFloat, "inv_freq must be float32, got ", inv_freq.scalar_type());
  TORCH_CHECK(inv_freq.dim() == 1, "inv_freq must be 1-d, got shape ", inv_freq.sizes());
  check_cuda(positions, "positions");
  check_contiguous(positions, "positions");
  TORCH_CHECK(positions.dim() == 1, "positions must be 1-d (S,), got shape ", positions.sizes());
  TORCH_CHECK(positions.device() == inv_freq.device(), "positions is on ", positions.device(), ", inv_freq on ",
              inv_freq.device());
  const int64_t S = positions.size(0), half = inv_freq.size(0);
  check_table(cos, "cos", S, half);
  check_table(sin, "sin", S, half);
  const int64_t n = S * half;
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(inv_freq.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 4096));
  const float scaling = static_cast<float>(attention_scaling);
  switch (positions.scalar_type()) {
    case at::kLong:
      rotary_tables_kernel<int64_t><<<blocks, threads, 0, stream>>>(
          inv_freq.data_ptr<float>(), positions.data_ptr<int64_t>(), scaling, cos.data_ptr<float>(),
          sin.data_ptr<float>(), half, n);
      break;
    case at::kInt:
      rotary_tables_kernel<int32_t><<<blocks, threads, 0, stream>>>(
          inv_freq.data_ptr<float>(), positions.data_ptr<int32_t>(), scaling, cos.data_ptr<float>(),
          sin.data_ptr<float>(), half, n);
      break;
    case at::kFloat:
      rotary_tables_kernel<float><<<blocks, threads, 0, stream>>>(
          inv_freq.data_ptr<float>(), positions.data_ptr<float>(), scaling, cos.data_ptr<float>(),
          sin.data_ptr<float>(), half, n);
      break;
    default:
      TORCH_CHECK(false, "positions must be int64, int32 or float32, got ", positions.scalar_type());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void apply_rotary_(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t rotary_dim,
                   bool interleaved, bool inverse) {
  check_cuda(x, "x");
  check_kernel_dtype(x, "x");
  TORCH_CHECK(x.dim() == 4 || x.dim() == 5, "x must be (B, S, H, D) or (B, S, H, G, D), got shape ", x.sizes());
  const bool five = x.dim() == 5;
  const int64_t B = x.size(0), S = x.size(1), H = x.size(2), G = five ? x.size(3) : 1, D = x.size(-1);
  const int64_t stride_g = five ? x.stride(3) : 0;
  TORCH_CHECK(D <= 1 || x.stride(-1) == 1, "x's last dimension must be contiguous, got strides ", x.strides());
  TORCH_CHECK(rotary_dim > 0 && rotary_dim % 2 == 0 && rotary_dim <= D,
              "rotary_dim must be a positive even number <= head dim ", D, ", got ", rotary_dim);
  const int64_t half = rotary_dim / 2;
  check_table(cos, "cos", S, half);
  check_table(sin, "sin", S, half);
  TORCH_CHECK(cos.device() == x.device() && sin.device() == x.device(), "cos/sin must be on ", x.device());
  TORCH_CHECK(B * S < (int64_t{1} << 31), "B * S too large: ", B * S);
  if (B * S * H * G == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const float sign = inverse ? -1.0f : 1.0f;
  GM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "apply_rotary_", [&] {
    using T = scalar_t;
    constexpr int kVec = 16 / sizeof(T);
    const int64_t unit = interleaved ? rotary_dim : half;
    const bool vec = unit % kVec == 0 && x.stride(0) % kVec == 0 && x.stride(1) % kVec == 0 &&
                     x.stride(2) % kVec == 0 && stride_g % kVec == 0 && aligned16(x);
    const int64_t items = H * G * (vec ? unit / kVec : half);
    const int threads = static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(32, round_up(items, 32))));
    const unsigned blocks = static_cast<unsigned>(B * S);
    if (vec) {
      rotary_kernel<T, kVec><<<blocks, threads, 0, stream>>>(x.data_ptr<T>(), cos.data_ptr<float>(),
                                                              sin.data_ptr<float>(), S, H, G, x.stride(0),
                                                              x.stride(1), x.stride(2), stride_g, half,
                                                              interleaved, sign);
    } else {
      rotary_kernel<T, 1><<<blocks, threads, 0, stream>>>(x.data_ptr<T>(), cos.data_ptr<float>(),
                                                          sin.data_ptr<float>(), S, H, G, x.stride(0), x.stride(1),
                                                          x.stride(2), stride_g, half, interleaved, sign);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace gradmem
