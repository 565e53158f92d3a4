// Stand-in for the emulated CPU build (see ../../../cuda_emu.h): a device guard that does nothing.
#pragma once

#include <c10/core/Device.h>

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda
