"""Fixtures for the emulated csrc kernels (see emu_build.py and cuda_emu.h).

`emu_ops` builds csrc/ against the CPU emulator once per session (skipping with the reason when it
cannot be built); `emulated` makes the public ops' "kernel" backend run those emulated kernels on
CPU tensors, so the whole path (Python launcher, C++ launcher, kernel) is exercised.
"""
import pytest

import emu_build


@pytest.fixture(scope="session")
def emu_ops():
    reason = emu_build.missing_reason()
    if reason is not None:
        pytest.skip(f"emulated csrc build unavailable: {reason}")
    return emu_build.build()


@pytest.fixture
def emulated(emu_ops, monkeypatch):
    from gradmem_fast import _ext

    monkeypatch.setattr(_ext, "load", lambda: emu_ops)
    monkeypatch.setattr(_ext, "cuda_op_reason", lambda *tensors: None)
    return emu_ops
