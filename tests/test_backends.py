"""The one backend-choice policy (gradmem_fast.backends) and the ops that use it."""
import warnings

import pytest
import torch

from gradmem_fast import backends


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(backends, "_warned", set())


def test_reference_never_takes_the_kernel_and_none_takes_it():
    assert backends.use_kernel("reference", "op", None) is False
    assert backends.use_kernel("auto", "op", None) is True
    assert backends.use_kernel("kernel", "op", None) is True


def test_kernel_raises_with_the_reason():
    with pytest.raises(RuntimeError, match="op: the csrc kernel cannot run: dtype torch.float64"):
        backends.use_kernel("kernel", "op", "dtype torch.float64", "csrc kernel")
    with pytest.raises(RuntimeError, match="on the CPU"):
        backends.use_kernel("kernel", "op", backends.on_host("on the CPU"))


def test_auto_warns_once_per_op_and_reason_and_never_by_design():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert backends.use_kernel("auto", "op", "head dim 24") is False
        assert backends.use_kernel("auto", "other op", "head dim 24") is False
        assert backends.use_kernel("auto", "op", backends.on_host("tensor on cpu")) is False
    messages = [str(w.message) for w in caught]
    assert messages == ["op: the kernel cannot run (head dim 24); using the PyTorch twin",
                        "other op: the kernel cannot run (head dim 24); using the PyTorch twin"]


@pytest.mark.parametrize("bad", ["fast", "", None, "Kernel"])
def test_unknown_backend_is_a_value_error(bad):
    with pytest.raises(ValueError, match="backend"):
        backends.use_kernel(bad, "op", None)


def test_resolve_op_backend(monkeypatch):
    monkeypatch.delenv(backends.ENV_OP_BACKEND, raising=False)
    assert backends.resolve_op_backend() == "auto"
    monkeypatch.setenv(backends.ENV_OP_BACKEND, "reference")
    assert backends.resolve_op_backend() == "reference"
    assert backends.resolve_op_backend("kernel") == "kernel"
    monkeypatch.setenv(backends.ENV_OP_BACKEND, "fastest")
    with pytest.raises(ValueError, match="GRADMEM_FAST_OP_BACKEND"):
        backends.resolve_op_backend()
    with pytest.raises(ValueError, match="op_backend"):
        backends.resolve_op_backend("fastest")


def test_csrc_ops_on_cpu_take_the_twin_silently_and_kernel_names_the_device():
    from gradmem_fast import _ext

    x = torch.randn(3, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _ext.use_kernel("auto", "add_norm_forward", x, why="mixed dtypes") is False
    with pytest.raises(RuntimeError, match="cpu"):
        _ext.use_kernel("kernel", "add_norm_forward", x)


def test_warn_once_points_at_the_caller():
    def op():
        backends.warn_once("k", "message")

    with pytest.warns(UserWarning, match="message") as caught:
        op()
        op()
    assert len(caught) == 1 and caught[0].filename == __file__
