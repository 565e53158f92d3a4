"""Build script.

The CUDA extension `gradmem_fast._C` (csrc/) is compiled when a CUDA toolkit and a CUDA build of
torch are present. `GRADMEM_FAST_BUILD_CUDA=0` skips it; `GRADMEM_FAST_BUILD_CUDA=1` makes a
failure to find the toolkit an error. Without the extension everything imports and the pure
PyTorch twins of the fused ops run.
"""
import glob
import os

from setuptools import setup

PACKAGES = [
    "gradmem_fast",
    "gradmem_fast.models",
    "gradmem_fast.ops",
    "gradmem_fast.reference",
    "gradmem_fast.engine",
    "gradmem_fast.benchmark",
    "gradmem_fast.tasks",
    "gradmem_fast.kernels",
]
PACKAGE_DIR = {"gradmem_fast.kernels": "kernels"}


def cuda_extensions():
    wanted = os.environ.get("GRADMEM_FAST_BUILD_CUDA", "auto")
    if wanted == "0":
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    if not sources:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if wanted == "1":
            raise
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        if wanted == "1":
            raise RuntimeError("GRADMEM_FAST_BUILD_CUDA=1 but no CUDA toolkit or CUDA torch found")
        return [], {}
    os.environ.setdefault("MAX_JOBS", "2")
    nvcc_flags = [
        "-O3",
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_90,code=compute_90",
    ]
    ext = CUDAExtension(
        name="gradmem_fast._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extensions()

setup(
    name="gradmem_fast",
    version="0.1.0",
    description="Fast GradMem writer: context written into memory vectors by test-time gradient descent",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    python_requires=">=3.10",
    install_requires=["torch>=2.11,<2.15", "transformers>=5.17,<5.25"],
    extras_require={"test": ["pytest", "pytest-benchmark", "accelerate", "matplotlib"], "bench": ["matplotlib"],
                    "train": ["accelerate", "matplotlib"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
