// CPU emulation of the CUDA execution model, enough to run the csrc kernels as plain C++.
//
// Force-included (g++ -include cuda_emu.h) when emu_build.py compiles csrc/*.cu as C++; the launches
// `kernel<<<grid, block, smem, stream>>>(args)` are rewritten to
// `gm_emu::launch(grid, block, smem, stream)(kernel, args)`.
//
// Model: every CUDA thread of a block is a fiber (ucontext) with its own stack, all on the calling
// OS thread. __syncthreads() waits for the whole block, each warp shuffle for its 32 lanes (values
// pass through a per-warp exchange slot between two warp barriers). The scheduler runs a ready
// fiber until it finishes or waits at a barrier. It draws a random priority order of the warps per
// block and mostly picks a fiber of the first warp that has one ready, else of a random warp, so
// warps run far ahead of one another in varying orders: a missing __syncthreads between a
// shared-memory write and another warp's read shows up as wrong results. The draws are seeded
// (GM_EMU_SEED, default 0, plus a launch counter), so a run is reproducible. The grid's blocks run
// one after another, so `__shared__` can be `static`. A barrier some threads never reach (a
// divergent __syncthreads, an early return) is reported as a deadlock instead of hanging. Launch
// limits (block <= 1024 threads, grid dims) and full warps for shuffles are checked.
//
// Limits: this checks the kernels' logic (indexing, vector widths, tails, reductions, launch
// configuration), not the hardware. Threads interleave only at barriers, so it cannot show races
// that need real concurrency (two threads writing one address between barriers, missing atomics),
// the GPU memory model, misaligned-access faults (x86 tolerates most), shared-memory or register
// limits, __launch_bounds__ violations, or the precision of device intrinsics (rsqrtf, expf, tanhf,
// erff are the host's libm). Launches are serialised by a mutex; the stream argument is ignored.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The current fiber's coordinates; the scheduler sets them before resuming a fiber.
inline uint3 threadIdx{0, 0, 0};
inline uint3 blockIdx{0, 0, 0};
inline dim3 blockDim{1, 1, 1};
inline dim3 gridDim{1, 1, 1};

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __fdividef(float a, float b) { return a / b; }

namespace gm_emu {

constexpr int kWarp = 32;
constexpr std::size_t kStackBytes = 64 * 1024;

struct Fiber;

struct Barrier {
  int expected = 0;
  std::vector<Fiber*> waiting;
};

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  uint3 tid{0, 0, 0};
  int warp = 0;
  bool done = false;
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<std::vector<Fiber*>> ready;  // by warp
  std::size_t num_ready = 0;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<std::uint64_t> exchange;  // one 8-byte slot per thread, indexed by linear thread id
  ucontext_t scheduler;
  Fiber* current = nullptr;
  std::mt19937 rng;
  std::exception_ptr error;
  std::function<void()> body;
};

inline Block*& current_block() {
  static Block* block = nullptr;
  return block;
}

inline int linear_tid() { return static_cast<int>(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)); }

// The last thread to arrive releases the others (ready again) and goes on; the others wait.
inline void arrive_and_wait(Barrier& bar) {
  Block* b = current_block();
  if (static_cast<int>(bar.waiting.size()) + 1 == bar.expected) {
    for (Fiber* f : bar.waiting) b->ready[f->warp].push_back(f);
    b->num_ready += bar.waiting.size();
    bar.waiting.clear();
    return;
  }
  bar.waiting.push_back(b->current);
  swapcontext(&b->current->ctx, &b->scheduler);
}

inline void fiber_entry() {
  Block* b = current_block();
  try {
    b->body();
  } catch (...) {
    if (!b->error) b->error = std::current_exception();
  }
  b->current->done = true;
  // returning resumes uc_link, the scheduler
}

inline void check_full_warps() {
  const unsigned n = blockDim.x * blockDim.y * blockDim.z;
  if (n % kWarp != 0)
    throw std::runtime_error("cuda_emu: warp shuffle in a block of " + std::to_string(n) +
                             " threads, not a multiple of 32 (partial warp)");
}

// Every lane deposits v, then reads lane `src` of its warp; both steps wait for the 32 lanes.
template <typename T>
T shuffle(unsigned mask, T v, int src) {
  static_assert(sizeof(T) <= sizeof(std::uint64_t), "shuffle of a type wider than 8 bytes");
  if (mask != 0xffffffffu) throw std::runtime_error("cuda_emu: only full-warp shuffles (mask 0xffffffff) are emulated");
  check_full_warps();
  Block* b = current_block();
  const int tid = linear_tid();
  const int warp = tid / kWarp;
  std::uint64_t slot = 0;
  std::memcpy(&slot, &v, sizeof(T));
  b->exchange[tid] = slot;
  arrive_and_wait(b->warp_barriers[warp]);
  T out;
  std::memcpy(&out, &b->exchange[warp * kWarp + (src & (kWarp - 1))], sizeof(T));
  arrive_and_wait(b->warp_barriers[warp]);  // the slots may be overwritten only after every lane read
  return out;
}

inline Fiber* pick_ready(Block& b, const std::vector<int>& warp_order) {
  std::size_t warp = 0;
  if (std::uniform_int_distribution<int>(0, 3)(b.rng) > 0) {
    for (int w : warp_order)
      if (!b.ready[w].empty()) {
        warp = w;
        break;
      }
  } else {
    std::size_t k = std::uniform_int_distribution<std::size_t>(0, b.num_ready - 1)(b.rng);
    while (k >= b.ready[warp].size()) k -= b.ready[warp++].size();
  }
  std::vector<Fiber*>& r = b.ready[warp];
  const std::size_t i = std::uniform_int_distribution<std::size_t>(0, r.size() - 1)(b.rng);
  Fiber* f = r[i];
  r[i] = r.back();
  r.pop_back();
  --b.num_ready;
  return f;
}

// Runs ready fibers, one at a time until it finishes or waits, until none is ready.
inline void run_block(Block& b) {
  std::vector<int> warp_order(b.ready.size());
  for (std::size_t w = 0; w < warp_order.size(); ++w) warp_order[w] = static_cast<int>(w);
  std::shuffle(warp_order.begin(), warp_order.end(), b.rng);
  for (Fiber& f : b.fibers) b.ready[f.warp].push_back(&f);
  b.num_ready = b.fibers.size();
  while (b.num_ready > 0) {
    Fiber* f = pick_ready(b, warp_order);
    b.current = f;
    threadIdx = f->tid;
    swapcontext(&b.scheduler, &f->ctx);
  }
  if (b.error) std::rethrow_exception(b.error);
  int waiting = 0;
  for (const Fiber& f : b.fibers) waiting += !f.done;
  if (waiting > 0)
    throw std::runtime_error("cuda_emu: deadlock in block (" + std::to_string(blockIdx.x) + ", " +
                             std::to_string(blockIdx.y) + ", " + std::to_string(blockIdx.z) + "): " +
                             std::to_string(waiting) + " of " + std::to_string(b.fibers.size()) +
                             " threads wait at a barrier the others never reach");
}

struct SeedState {
  std::uint64_t base = std::getenv("GM_EMU_SEED") ? std::strtoull(std::getenv("GM_EMU_SEED"), nullptr, 10) : 0;
  std::uint64_t launches = 0;
};

inline SeedState& seed_state() {
  static SeedState state;
  return state;
}

// Launch k of a process schedules with seed base + k; reseed() restarts the count.
inline void reseed(std::uint64_t base) { seed_state() = SeedState{base, 0}; }
inline std::uint64_t next_launch_seed() { return seed_state().base + seed_state().launches++; }

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

struct Launch {
  dim3 grid, block;
  std::size_t smem;

  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), Args&&... args) const {
    const std::uint64_t threads = std::uint64_t{block.x} * block.y * block.z;
    if (threads == 0 || threads > 1024 || block.z > 64)
      throw std::runtime_error("cuda_emu: invalid block (" + std::to_string(block.x) + ", " + std::to_string(block.y) +
                               ", " + std::to_string(block.z) + ")");
    if (grid.x == 0 || grid.x > 2147483647u || grid.y == 0 || grid.y > 65535 || grid.z == 0 || grid.z > 65535)
      throw std::runtime_error("cuda_emu: invalid grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) +
                               ", " + std::to_string(grid.z) + ")");
    if (smem != 0) throw std::runtime_error("cuda_emu: dynamic shared memory is not emulated");

    std::lock_guard<std::mutex> lock(launch_mutex());
    Block b;
    b.rng.seed(next_launch_seed());
    b.body = [&] { kernel(args...); };
    b.fibers.resize(threads);
    for (Fiber& f : b.fibers) f.stack.reset(new char[kStackBytes]);
    b.block_barrier.expected = static_cast<int>(threads);
    b.warp_barriers.resize((threads + kWarp - 1) / kWarp);
    for (std::size_t w = 0; w < b.warp_barriers.size(); ++w)
      b.warp_barriers[w].expected = static_cast<int>(std::min<std::uint64_t>(kWarp, threads - w * kWarp));
    b.exchange.assign(b.warp_barriers.size() * kWarp, 0);
    b.ready.resize(b.warp_barriers.size());
    current_block() = &b;
    gridDim = grid;
    blockDim = block;
    try {
      for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
          for (unsigned bx = 0; bx < grid.x; ++bx) {
            blockIdx = {bx, by, bz};
            std::size_t t = 0;
            for (unsigned tz = 0; tz < block.z; ++tz)
              for (unsigned ty = 0; ty < block.y; ++ty)
                for (unsigned tx = 0; tx < block.x; ++tx, ++t) {
                  Fiber& f = b.fibers[t];
                  f.tid = {tx, ty, tz};
                  f.warp = static_cast<int>(t / kWarp);
                  f.done = false;
                  getcontext(&f.ctx);
                  f.ctx.uc_stack.ss_sp = f.stack.get();
                  f.ctx.uc_stack.ss_size = kStackBytes;
                  f.ctx.uc_link = &b.scheduler;
                  makecontext(&f.ctx, fiber_entry, 0);
                }
            run_block(b);
          }
    } catch (...) {
      current_block() = nullptr;
      throw;
    }
    current_block() = nullptr;
  }
};

template <typename Stream>
Launch launch(dim3 grid, dim3 block, std::size_t smem, const Stream&) {
  return Launch{grid, block, smem};
}

}  // namespace gm_emu

inline void __syncthreads() { gm_emu::arrive_and_wait(gm_emu::current_block()->block_barrier); }

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane) {
  return gm_emu::shuffle(mask, v, src_lane);
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  return gm_emu::shuffle(mask, v, (gm_emu::linear_tid() % gm_emu::kWarp) ^ lane_mask);
}

template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta) {
  const int lane = gm_emu::linear_tid() % gm_emu::kWarp;
  const int src = lane + static_cast<int>(delta);
  return gm_emu::shuffle(mask, v, src < gm_emu::kWarp ? src : lane);  // lanes past the end keep their value
}
