// Stand-in for the emulated CPU build (see ../../../cuda_emu.h): the stream is ignored by launches.
#pragma once

namespace c10::cuda {
struct CUDAStream {};
inline CUDAStream getCurrentCUDAStream() { return {}; }
}  // namespace c10::cuda
