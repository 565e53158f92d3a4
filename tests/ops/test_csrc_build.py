"""The CUDA extension must be built wherever a CUDA toolkit and a CUDA build of torch exist
(`pip install -e .` compiles csrc/ there), even on machines without a GPU, unless the build was switched
off with GRADMEM_FAST_BUILD_CUDA=0."""
import os

import pytest
import torch

OPS = ("add_norm_fwd", "add_norm_bwd", "rotary_tables", "apply_rotary_", "swiglu_fwd", "swiglu_bwd", "gelu_fwd",
       "gelu_bwd", "memory_update_")


def _toolkit_reason():
    if os.environ.get("GRADMEM_FAST_BUILD_CUDA") == "0":
        return "GRADMEM_FAST_BUILD_CUDA=0: the CUDA extension was not asked for"
    if torch.version.cuda is None:
        return "torch is not a CUDA build"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return "no CUDA toolkit found (CUDA_HOME unset and no nvcc)"
    return None


pytestmark = pytest.mark.skipif(_toolkit_reason() is not None, reason=str(_toolkit_reason()))


def test_extension_imports_and_registers_every_op():
    import gradmem_fast._C  # noqa: F401  (registration happens on import)
    from gradmem_fast import _ext

    assert _ext.reason() is None
    for name in OPS:
        op = getattr(torch.ops.gradmem_fast, name)
        schema = str(op.default._schema)
        assert schema.startswith(f"gradmem_fast::{name}(") and schema.endswith("-> ()")


def test_ops_have_cuda_kernels_only():
    import gradmem_fast._C  # noqa: F401

    for name in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gradmem_fast::{name}", "CUDA")
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"gradmem_fast::{name}", "CPU")


def test_mutated_arguments_are_declared():
    import gradmem_fast._C  # noqa: F401

    schema = torch.ops.gradmem_fast.apply_rotary_.default._schema
    assert [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write] == ["x"]
    schema = torch.ops.gradmem_fast.add_norm_fwd.default._schema
    written = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert written == ["y", "residual_out", "stats"]
