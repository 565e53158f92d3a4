// Kernels that check the emulator itself (test_emu_selftest.py), registered as torch.ops.gradmem_fast_emu_test.
#include <torch/library.h>

#include "common.cuh"

namespace {

// out[t] = sum of v over the block, for every thread t of every block; calls block_sum twice
// (as add_norm's forward does) so a missing barrier between the calls can show.
__global__ void block_sum_kernel(const float* v, float* out, bool skip_first_barrier) {
  __shared__ float smem[32];
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  float b_v[1] = {v[t]};
  gradmem::block_sum<1>(b_v, smem);
  float b_w[1] = {v[t] * 2.0f};
  if (skip_first_barrier) {  // block_sum without its first __syncthreads
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    gradmem::warp_sum(b_w);
    if (lane == 0) smem[warp] = b_w[0];
    __syncthreads();
    b_w[0] = lane < static_cast<int>(blockDim.x >> 5) ? smem[lane] : 0.0f;
    gradmem::warp_sum(b_w);
  } else {
    gradmem::block_sum<1>(b_w, smem);
  }
  out[t] = b_v[0] + b_w[0];
}

// out (3, n): __shfl_xor_sync(v, xor_mask), __shfl_sync(v, src_lane), __shfl_down_sync(v, delta)
__global__ void shuffle_kernel(const float* v, float* out, int64_t n, int xor_mask, int src_lane, int delta) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  out[t] = __shfl_xor_sync(0xffffffffu, v[t], xor_mask);
  out[n + t] = __shfl_sync(0xffffffffu, v[t], src_lane);
  out[2 * n + t] = __shfl_down_sync(0xffffffffu, v[t], delta);
}

// Only threads below `waiting` reach the barrier.
__global__ void divergent_barrier_kernel(float* out, int waiting) {
  if (static_cast<int>(threadIdx.x) < waiting) __syncthreads();
  out[threadIdx.x] = 1.0f;
}

void block_sum(const at::Tensor& v, const at::Tensor& out, int64_t threads, bool skip_first_barrier) {
  block_sum_kernel<<<v.numel() / threads, threads, 0, 0>>>(v.data_ptr<float>(), out.data_ptr<float>(),
                                                           skip_first_barrier);
}

void shuffle(const at::Tensor& v, const at::Tensor& out, int64_t threads, int64_t xor_mask, int64_t src_lane,
             int64_t delta) {
  shuffle_kernel<<<v.numel() / threads, threads, 0, 0>>>(v.data_ptr<float>(), out.data_ptr<float>(), v.numel(),
                                                         xor_mask, src_lane, delta);
}

void divergent_barrier(const at::Tensor& out, int64_t waiting) {
  divergent_barrier_kernel<<<1, out.numel(), 0, 0>>>(out.data_ptr<float>(), waiting);
}

void reseed(int64_t seed) { gm_emu::reseed(seed); }

}  // namespace

TORCH_LIBRARY(gradmem_fast_emu_test, m) {
  m.def("block_sum(Tensor v, Tensor(a!) out, int threads, bool skip_first_barrier) -> ()", &block_sum);
  m.def("shuffle(Tensor v, Tensor(a!) out, int threads, int xor_mask, int src_lane, int delta) -> ()", &shuffle);
  m.def("divergent_barrier(Tensor(a!) out, int waiting) -> ()", &divergent_barrier);
  m.def("reseed(int seed) -> ()", &reseed);
}
