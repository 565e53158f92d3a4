"""Builds csrc/ as plain C++ against the CUDA emulator in cuda_emu.h, for CPU tests of the kernels' logic.

Each csrc/*.cu is copied to the build folder as a .cpp with its launches
`kernel<...><<<grid, block, smem, stream>>>(args)` rewritten to
`::gm_emu::launch(grid, block, smem, stream)(kernel<...>, args)`, then compiled by g++ (C++20) with
cuda_emu.h force-included, include/ (stand-ins for the c10/cuda headers) searched first and
GM_EMULATED_ON_CPU defined, so the ops take CPU tensors and are registered as
torch.ops.gradmem_fast_emu.*, never clashing with the real extension's torch.ops.gradmem_fast.*.
selftest.cu, built alongside, holds kernels that check the emulator itself (torch.ops.gradmem_fast_emu_test).

This is a logic check, not a hardware check: see cuda_emu.h for what it cannot see.
"""
import glob
import os
import re
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.path.dirname(os.path.dirname(HERE)), "csrc")
NAME = "gradmem_fast_emu"
# `name` or `name<template args>` (no nested <>) directly followed by <<<config>>>(
LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;]*>)?)<<<(.*?)>>>\(")


def rewrite_launches(source):
    """(rewritten source, number of launches rewritten)."""
    return LAUNCH.subn(r"::gm_emu::launch(\2)(\1, ", source)


def build_dir():
    """One folder per torch version and Python: objects built against one torch never load into another."""
    import torch

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                  "torch_extensions")
    tag = f"torch{torch.__version__.split('+')[0]}-py{sys.version_info.major}{sys.version_info.minor}"
    return os.path.join(root, f"{NAME}-{tag}")


def missing_reason():
    """None when the emulated build can be attempted, else why not."""
    if not sys.platform.startswith("linux"):
        return f"the emulator's fibers (ucontext) are only used on Linux, not {sys.platform}"
    if shutil.which("g++") is None and shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler (g++) found"
    try:
        import torch.utils.cpp_extension  # noqa: F401
    except ImportError as exc:
        return f"torch.utils.cpp_extension unavailable ({exc})"
    if not glob.glob(os.path.join(CSRC, "*.cu")):
        return f"no CUDA sources under {CSRC}"
    return None


def _write_if_changed(path, text):
    """Keeps the file's timestamp when its text is unchanged, so ninja rebuilds only what changed."""
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return
    with open(path, "w") as f:
        f.write(text)


def sources():
    """The CUDA sources the emulated build compiles: csrc/*.cu and the emulator's own test kernels."""
    return sorted(glob.glob(os.path.join(CSRC, "*.cu"))) + [os.path.join(HERE, "selftest.cu")]


def build(verbose=False):
    """Compiles (incrementally) and loads the emulated ops; returns torch.ops.gradmem_fast_emu."""
    import torch
    from torch.utils.cpp_extension import load

    out = build_dir()
    src = os.path.join(out, "src")
    os.makedirs(src, exist_ok=True)
    compiled = []
    for path in sources():
        with open(path) as f:
            text = f.read()
        text, n = rewrite_launches(text)
        if "<<<" in text:
            raise RuntimeError(f"{path}: a kernel launch the emulator's rewrite does not recognise")
        target = os.path.join(src, os.path.basename(path)[:-3] + ".cpp")
        _write_if_changed(target, f'#line 1 "{path}"\n' + text)
        compiled.append(target)
    compiled += sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
    load(
        name=NAME,
        sources=compiled,
        extra_include_paths=[os.path.join(HERE, "include"), CSRC],
        # hidden visibility: these gradmem:: symbols never interpose on the real extension's, nor it on these
        extra_cflags=["-O1", "-include", os.path.join(HERE, "cuda_emu.h"), "-DGM_EMULATED_ON_CPU",
                      "-fno-strict-aliasing", "-fvisibility=hidden", "-fvisibility-inlines-hidden",
                      "-Wno-unknown-pragmas"],
        build_directory=out,
        is_python_module=False,
        with_cuda=False,
        verbose=verbose,
    )
    return torch.ops.gradmem_fast_emu
