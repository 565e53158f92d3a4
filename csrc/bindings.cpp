// Registers the csrc kernels as torch custom ops (torch.ops.gradmem_fast.*), CUDA only (see ops.h).
// Importing gradmem_fast._C runs the registration; the module itself is empty.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(GM_OPS_NAMESPACE, m) {
  m.def("add_norm_fwd(Tensor x, Tensor? residual, Tensor weight, Tensor? bias, float eps, bool rms, "
        "Tensor(a!) y, Tensor(b!) residual_out, Tensor(c!) stats) -> ()");
  m.def("add_norm_bwd(Tensor dy, Tensor? d_residual_out, Tensor residual_out, Tensor weight, Tensor stats, "
        "bool rms, Tensor(a!) dx) -> ()");
  m.def("rotary_tables(Tensor inv_freq, Tensor positions, float attention_scaling, Tensor(a!) cos, "
        "Tensor(b!) sin) -> ()");
  m.def("apply_rotary_(Tensor(a!) x, Tensor cos, Tensor sin, int rotary_dim, bool interleaved, bool inverse) -> ()");
  m.def("swiglu_fwd(Tensor gate, Tensor up, Tensor(a!) y) -> ()");
  m.def("swiglu_bwd(Tensor dy, Tensor gate, Tensor up, Tensor(a!) d_gate, Tensor(b!) d_up) -> ()");
  m.def("gelu_fwd(Tensor x, bool tanh_approx, Tensor(a!) y) -> ()");
  m.def("gelu_bwd(Tensor dy, Tensor x, bool tanh_approx, Tensor(a!) dx) -> ()");
  m.def("memory_update_(Tensor(a!) memory, Tensor grad, Tensor lr, float clip_value, float clip_norm) -> ()");
}

TORCH_LIBRARY_IMPL(GM_OPS_NAMESPACE, GM_DISPATCH_KEY, m) {
  m.impl("add_norm_fwd", &gradmem::add_norm_fwd);
  m.impl("add_norm_bwd", &gradmem::add_norm_bwd);
  m.impl("rotary_tables", &gradmem::rotary_tables);
  m.impl("apply_rotary_", &gradmem::apply_rotary_);
  m.impl("swiglu_fwd", &gradmem::swiglu_fwd);
  m.impl("swiglu_bwd", &gradmem::swiglu_bwd);
  m.impl("gelu_fwd", &gradmem::gelu_fwd);
  m.impl("gelu_bwd", &gradmem::gelu_bwd);
  m.impl("memory_update_", &gradmem::memory_update_);
}

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "CUDA kernels registered as torch.ops.gradmem_fast",
                                      -1, nullptr};
  return PyModule_Create(&module);
}
