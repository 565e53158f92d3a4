// Host entry points of the csrc kernels; registered as torch.ops.gradmem_fast.* in bindings.cpp.
// Outputs are preallocated by the caller and passed in; every op returns nothing.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

// The ops take CUDA tensors and are registered as torch.ops.gradmem_fast. The CPU emulation build
// of these kernels (tests/csrc_emulation) defines GM_EMULATED_ON_CPU: CPU tensors, torch.ops.gradmem_fast_emu.
#ifdef GM_EMULATED_ON_CPU
#define GM_OPS_NAMESPACE gradmem_fast_emu
#define GM_DISPATCH_KEY CPU
#else
#define GM_OPS_NAMESPACE gradmem_fast
#define GM_DISPATCH_KEY CUDA
#endif

namespace gradmem {

constexpr c10::DeviceType kOpsDevice = c10::DeviceType::GM_DISPATCH_KEY;

void add_norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, double eps, bool rms, const at::Tensor& y,
                  const at::Tensor& residual_out, const at::Tensor& stats);
void add_norm_bwd(const at::Tensor& dy, const std::optional<at::Tensor>& d_residual_out,
                  const at::Tensor& residual_out, const at::Tensor& weight, const at::Tensor& stats, bool rms,
                  const at::Tensor& dx);

void rotary_tables(const at::Tensor& inv_freq, const at::Tensor& positions, double attention_scaling,
                   const at::Tensor& cos, const at::Tensor& sin);
void apply_rotary_(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t rotary_dim,
                   bool interleaved, bool inverse);

void swiglu_fwd(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& y);
void swiglu_bwd(const at::Tensor& dy, const at::Tensor& gate, const at::Tensor& up, const at::Tensor& d_gate,
                const at::Tensor& d_up);
void gelu_fwd(const at::Tensor& x, bool tanh_approx, const at::Tensor& y);
void gelu_bwd(const at::Tensor& dy, const at::Tensor& x, bool tanh_approx, const at::Tensor& dx);

void memory_update_(const at::Tensor& memory, const at::Tensor& grad, const at::Tensor& lr, double clip_value,
                    double clip_norm);

}  // namespace gradmem
