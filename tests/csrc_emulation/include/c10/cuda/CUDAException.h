// Stand-in for the emulated CPU build (see ../../../cuda_emu.h): emulated launches throw on error.
#pragma once

#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
