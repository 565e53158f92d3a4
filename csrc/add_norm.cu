// Fused residual add + RMSNorm / LayerNorm: forward and input-gradient backward, one block per row.
#include "common.cuh"
#include "ops.h"

namespace gradmem {
namespace {

constexpr int kMaxThreads = 512;
// Vectors per thread held in registers; wider rows re-read the remainder from global memory.
constexpr int kCap = 4;

// h = x + res rounded to T (the value stored as residual_out), as float
template <typename T, int VEC>
__device__ __forceinline__ void load_sum(const T* x, const T* res, float (&h)[VEC]) {
  load_vec<T, VEC>(x, h);
  if (res) {
    float b_r[VEC];
    load_vec<T, VEC>(res, b_r);
#pragma unroll
    for (int j = 0; j < VEC; ++j) h[j] = static_cast<float>(static_cast<T>(h[j] + b_r[j]));
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
add_norm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ res, const T* __restrict__ w,
                    const T* __restrict__ bias, T* __restrict__ y, T* __restrict__ res_out,
                    float* __restrict__ stats, int64_t d, float eps, bool rms) {
  __shared__ float smem[32];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * d;
  const int64_t nvec = d / VEC;
  const int64_t step = blockDim.x;
  const T* p_res = res ? res + base : nullptr;
  float b_h[kCap][VEC];
  float b_sum[1] = {0.0f};
#pragma unroll
  for (int k = 0; k < kCap; ++k) {
    const int64_t i = threadIdx.x + k * step;
    if (i < nvec) {
      load_sum<T, VEC>(x + base + i * VEC, p_res ? p_res + i * VEC : nullptr, b_h[k]);
      if (res) store_vec<T, VEC>(res_out + base + i * VEC, b_h[k]);
#pragma unroll
      for (int j = 0; j < VEC; ++j) b_sum[0] += b_h[k][j];
    }
  }
  for (int64_t i = threadIdx.x + kCap * step; i < nvec; i += step) {
    float b_v[VEC];
    load_sum<T, VEC>(x + base + i * VEC, p_res ? p_res + i * VEC : nullptr, b_v);
    if (res) store_vec<T, VEC>(res_out + base + i * VEC, b_v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) b_sum[0] += b_v[j];
  }

  float mean = 0.0f;
  if (!rms) {
    block_sum<1>(b_sum, smem);
    mean = b_sum[0] / static_cast<float>(d);
  }
  // centred second moment from the cached row (two passes: no cancellation)
  float b_sq[1] = {0.0f};
#pragma unroll
  for (int k = 0; k < kCap; ++k) {
    const int64_t i = threadIdx.x + k * step;
    if (i < nvec) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float c = b_h[k][j] - mean;
        b_sq[0] += c * c;
      }
    }
  }
  for (int64_t i = threadIdx.x + kCap * step; i < nvec; i += step) {
    float b_v[VEC];
    load_sum<T, VEC>(x + base + i * VEC, p_res ? p_res + i * VEC : nullptr, b_v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float c = b_v[j] - mean;
      b_sq[0] += c * c;
    }
  }
  block_sum<1>(b_sq, smem);
  const float rstd = rsqrtf(b_sq[0] / static_cast<float>(d) + eps);
  if (threadIdx.x == 0) {
    stats[2 * static_cast<int64_t>(blockIdx.x)] = mean;
    stats[2 * static_cast<int64_t>(blockIdx.x) + 1] = rstd;
  }

  for (int64_t i = threadIdx.x, k = 0; i < nvec; i += step, ++k) {
    float b_v[VEC], b_w[VEC], b_b[VEC];
    if (k < kCap) {
#pragma unroll
      for (int kk = 0; kk < kCap; ++kk)
        if (kk == k) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) b_v[j] = b_h[kk][j];
        }
    } else {
      load_sum<T, VEC>(x + base + i * VEC, p_res ? p_res + i * VEC : nullptr, b_v);
    }
    load_vec<T, VEC>(w + i * VEC, b_w);
    if (bias) {
      load_vec<T, VEC>(bias + i * VEC, b_b);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) b_b[j] = 0.0f;
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) b_v[j] = (b_v[j] - mean) * rstd * b_w[j] + b_b[j];
    store_vec<T, VEC>(y + base + i * VEC, b_v);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
add_norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ dres, const T* __restrict__ h,
                    const T* __restrict__ w, const float* __restrict__ stats, T* __restrict__ dx, int64_t d,
                    bool rms, int64_t dres_inner_rows, int64_t dres_stride_outer, int64_t dres_stride_inner) {
  __shared__ float smem[64];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * d;
  const int64_t nvec = d / VEC;
  const int64_t step = blockDim.x;
  const float mean = stats[2 * static_cast<int64_t>(blockIdx.x)];
  const float rstd = stats[2 * static_cast<int64_t>(blockIdx.x) + 1];
  // row r of dres is (r / inner, r % inner) of its (outer, inner, d) view
  const T* p_dres = dres ? dres + (blockIdx.x / dres_inner_rows) * dres_stride_outer +
                               (blockIdx.x % dres_inner_rows) * dres_stride_inner
                         : nullptr;

  float b_xhat[kCap][VEC], b_g[kCap][VEC];
  float b_acc[2] = {0.0f, 0.0f};  // sum(g * xhat), sum(g) with g = dy * w
  for (int64_t i = threadIdx.x, k = 0; i < nvec; i += step, ++k) {
    float b_x[VEC], b_dy[VEC], b_w[VEC];
    load_vec<T, VEC>(h + base + i * VEC, b_x);
    load_vec<T, VEC>(dy + base + i * VEC, b_dy);
    load_vec<T, VEC>(w + i * VEC, b_w);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      b_x[j] = (b_x[j] - mean) * rstd;
      b_dy[j] *= b_w[j];
      b_acc[0] += b_dy[j] * b_x[j];
      b_acc[1] += b_dy[j];
    }
#pragma unroll
    for (int kk = 0; kk < kCap; ++kk)
      if (kk == k) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          b_xhat[kk][j] = b_x[j];
          b_g[kk][j] = b_dy[j];
        }
      }
  }
  block_sum<2>(b_acc, smem);
  const float c_xhat = b_acc[0] / static_cast<float>(d);
  const float c_one = rms ? 0.0f : b_acc[1] / static_cast<float>(d);

  for (int64_t i = threadIdx.x, k = 0; i < nvec; i += step, ++k) {
    float b_x[VEC], b_gg[VEC], b_out[VEC];
    if (k < kCap) {
#pragma unroll
      for (int kk = 0; kk < kCap; ++kk)
        if (kk == k) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            b_x[j] = b_xhat[kk][j];
            b_gg[j] = b_g[kk][j];
          }
        }
    } else {
      float b_w[VEC];
      load_vec<T, VEC>(h + base + i * VEC, b_x);
      load_vec<T, VEC>(dy + base + i * VEC, b_gg);
      load_vec<T, VEC>(w + i * VEC, b_w);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        b_x[j] = (b_x[j] - mean) * rstd;
        b_gg[j] *= b_w[j];
      }
    }
    if (p_dres) {
      load_vec<T, VEC>(p_dres + i * VEC, b_out);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) b_out[j] = 0.0f;
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) b_out[j] += rstd * (b_gg[j] - c_one - b_x[j] * c_xhat);
    store_vec<T, VEC>(dx + base + i * VEC, b_out);
  }
}

// Widest vector (16 bytes) when the row width, every pointer and every row stride allow it, else scalar.
template <typename T>
bool can_vectorize(int64_t d, std::initializer_list<const at::Tensor*> ts) {
  constexpr int kVec = 16 / sizeof(T);
  if (d % kVec != 0) return false;
  for (const at::Tensor* t : ts) {
    if (!t || !t->defined() || t->numel() == 0) continue;
    if (!aligned16(*t)) return false;
    for (int64_t i = 0; i + 1 < t->dim(); ++i)
      if (t->size(i) > 1 && t->stride(i) % kVec != 0) return false;
  }
  return true;
}

int threads_for(int64_t nvec) {
  return static_cast<int>(std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, round_up(nvec, 32))));
}

}  // namespace

void add_norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, double eps, bool rms, const at::Tensor& y,
                  const at::Tensor& residual_out, const at::Tensor& stats) {
  check_cuda(x, "x");
  check_contiguous(x, "x");
  check_kernel_dtype(x, "x");
  TORCH_CHECK(x.dim() == 2, "x must be (rows, d), got shape ", x.sizes());
  const int64_t rows = x.size(0), d = x.size(1);
  TORCH_CHECK(d > 0, "x must have a non-empty row, got shape ", x.sizes());
  TORCH_CHECK(rows < (int64_t{1} << 31), "x has too many rows: ", rows);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == d, "weight must have shape (", d, "), got ", weight.sizes());
  check_cuda(weight, "weight");
  check_contiguous(weight, "weight");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight dtype ", weight.scalar_type(), " differs from x dtype ",
              x.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), "weight is on ", weight.device(), ", x on ", x.device());
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) {
    check_like(*residual, "residual", x, "x");
    check_like(residual_out, "residual_out", x, "x");
  }
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) check_like(*bias, "bias", weight, "weight");
  check_like(y, "y", x, "x");
  check_cuda(stats, "stats");
  check_contiguous(stats, "stats");
  TORCH_CHECK(stats.scalar_type() == at::kFloat, "stats must be float32, got ", stats.scalar_type());
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == rows && stats.size(1) == 2, "stats must have shape (", rows,
              ", 2), got ", stats.sizes());
  TORCH_CHECK(eps > 0.0, "eps must be positive, got ", eps);
  if (rows == 0) return;

  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  GM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "add_norm_fwd", [&] {
    using T = scalar_t;
    const T* p_res = has_res ? residual->data_ptr<T>() : nullptr;
    T* p_res_out = has_res ? residual_out.data_ptr<T>() : nullptr;
    const T* p_bias = has_bias ? bias->data_ptr<T>() : nullptr;
    const at::Tensor* res_t = has_res ? &*residual : nullptr;
    const at::Tensor* res_out_t = has_res ? &residual_out : nullptr;
    const at::Tensor* bias_t = has_bias ? &*bias : nullptr;
    constexpr int kVec = 16 / sizeof(T);
    if (can_vectorize<T>(d, {&x, res_t, res_out_t, &weight, bias_t, &y})) {
      add_norm_fwd_kernel<T, kVec><<<rows, threads_for(d / kVec), 0, stream>>>(
          x.data_ptr<T>(), p_res, weight.data_ptr<T>(), p_bias, y.data_ptr<T>(), p_res_out, stats.data_ptr<float>(),
          d, static_cast<float>(eps), rms);
    } else {
      add_norm_fwd_kernel<T, 1><<<rows, threads_for(d), 0, stream>>>(
          x.data_ptr<T>(), p_res, weight.data_ptr<T>(), p_bias, y.data_ptr<T>(), p_res_out, stats.data_ptr<float>(),
          d, static_cast<float>(eps), rms);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void add_norm_bwd(const at::Tensor& dy, const std::optional<at::Tensor>& d_residual_out,
                  const at::Tensor& residual_out, const at::Tensor& weight, const at::Tensor& stats, bool rms,
                  const at::Tensor& dx) {
  check_cuda(residual_out, "residual_out");
  check_contiguous(residual_out, "residual_out");
  check_kernel_dtype(residual_out, "residual_out");
  TORCH_CHECK(residual_out.dim() == 2, "residual_out must be (rows, d), got shape ", residual_out.sizes());
  const int64_t rows = residual_out.size(0), d = residual_out.size(1);
  TORCH_CHECK(d > 0, "residual_out must have a non-empty row, got shape ", residual_out.sizes());
  TORCH_CHECK(rows < (int64_t{1} << 31), "residual_out has too many rows: ", rows);
  check_like(dy, "dy", residual_out, "residual_out");
  const bool has_dres = d_residual_out.has_value() && d_residual_out->defined();
  // d_residual_out: (rows, d) or (n, rows / n, d), any strides but the last (e.g. the first m rows of each
  // sample of a (B, S, d) buffer)
  int64_t dres_inner_rows = 1, dres_stride_outer = 0, dres_stride_inner = 0;
  if (has_dres) {
    const at::Tensor& t = *d_residual_out;
    check_cuda(t, "d_residual_out");
    TORCH_CHECK(t.scalar_type() == residual_out.scalar_type(), "d_residual_out dtype ", t.scalar_type(),
                " differs from residual_out dtype ", residual_out.scalar_type());
    TORCH_CHECK(t.device() == residual_out.device(), "d_residual_out is on ", t.device(), ", residual_out on ",
                residual_out.device());
    TORCH_CHECK((t.dim() == 2 || t.dim() == 3) && t.size(-1) == d && t.numel() == rows * d,
                "d_residual_out must be (", rows, ", ", d, ") or (n, ", rows, " / n, ", d, "), got shape ",
                t.sizes());
    TORCH_CHECK(d == 1 || t.stride(-1) == 1, "d_residual_out's last dimension must be contiguous, got strides ",
                t.strides());
    dres_inner_rows = t.dim() == 3 ? t.size(1) : rows;
    dres_stride_outer = t.dim() == 3 ? t.stride(0) : 0;
    dres_stride_inner = t.stride(-2);
  }
  check_like(dx, "dx", residual_out, "residual_out");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == d, "weight must have shape (", d, "), got ", weight.sizes());
  check_cuda(weight, "weight");
  check_contiguous(weight, "weight");
  TORCH_CHECK(weight.scalar_type() == residual_out.scalar_type(), "weight dtype ", weight.scalar_type(),
              " differs from residual_out dtype ", residual_out.scalar_type());
  check_cuda(stats, "stats");
  check_contiguous(stats, "stats");
  TORCH_CHECK(stats.scalar_type() == at::kFloat, "stats must be float32, got ", stats.scalar_type());
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == rows && stats.size(1) == 2, "stats must have shape (", rows,
              ", 2), got ", stats.sizes());
  if (rows == 0) return;

  const c10::cuda::CUDAGuard guard(residual_out.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  GM_DISPATCH_FLOAT_TYPES(residual_out.scalar_type(), "add_norm_bwd", [&] {
    using T = scalar_t;
    const T* p_dres = has_dres ? d_residual_out->data_ptr<T>() : nullptr;
    const at::Tensor* dres_t = has_dres ? &*d_residual_out : nullptr;
    constexpr int kVec = 16 / sizeof(T);
    if (can_vectorize<T>(d, {&dy, dres_t, &residual_out, &weight, &dx})) {
      add_norm_bwd_kernel<T, kVec><<<rows, threads_for(d / kVec), 0, stream>>>(
          dy.data_ptr<T>(), p_dres, residual_out.data_ptr<T>(), weight.data_ptr<T>(), stats.data_ptr<float>(),
          dx.data_ptr<T>(), d, rms, dres_inner_rows, dres_stride_outer, dres_stride_inner);
    } else {
      add_norm_bwd_kernel<T, 1><<<rows, threads_for(d), 0, stream>>>(
          dy.data_ptr<T>(), p_dres, residual_out.data_ptr<T>(), weight.data_ptr<T>(), stats.data_ptr<float>(),
          dx.data_ptr<T>(), d, rms, dres_inner_rows, dres_stride_outer, dres_stride_inner);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace gradmem
