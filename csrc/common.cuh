// Shared pieces of the csrc kernels: dtype dispatch, checks, aligned vectors, block reductions.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

#include "ops.h"

namespace gradmem {

// The kernels take the three training dtypes; float64 goes to the PyTorch twins.
#define GM_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                     \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                     \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().type() == kOpsDevice, name, " must be a ", c10::DeviceTypeName(kOpsDevice),
              " tensor, got device ", t.device());
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous, got strides ", t.strides());
}

inline void check_kernel_dtype(const at::Tensor& t, const char* name) {
  auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, name,
              " must be float32, float16 or bfloat16, got ", s);
}

inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  check_cuda(t, name);
  check_contiguous(t, name);
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " dtype ", t.scalar_type(), " differs from ",
              ref_name, " dtype ", ref.scalar_type());
  TORCH_CHECK(t.sizes() == ref.sizes(), name, " shape ", t.sizes(), " differs from ", ref_name, " shape ",
              ref.sizes());
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), ", ", ref_name, " on ", ref.device());
}

inline bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0;
}

inline int round_up(int64_t n, int64_t to) { return static_cast<int>((n + to - 1) / to * to); }

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// N consecutive elements as float; p must be aligned to sizeof(T) * N.
template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[N]) {
  Vec<T, N> v = *reinterpret_cast<const Vec<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = static_cast<float>(v.v[i]);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[N]) {
  Vec<T, N> v;
#pragma unroll
  for (int i = 0; i < N; ++i) v.v[i] = static_cast<T>(in[i]);
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

template <int N>
__device__ __forceinline__ void warp_sum(float (&v)[N]) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] += __shfl_xor_sync(0xffffffffu, v[i], offset);
  }
}

// Sums v over the block and gives every thread the result. smem: 32 * N floats. blockDim.x is a
// multiple of 32. Safe to call repeatedly with the same smem.
template <int N>
__device__ __forceinline__ void block_sum(float (&v)[N], float* smem) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
  warp_sum(v);
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) smem[i * 32 + warp] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = lane < num_warps ? smem[i * 32 + lane] : 0.0f;
  warp_sum(v);
}

}  // namespace gradmem
