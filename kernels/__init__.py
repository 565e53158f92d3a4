"""Triton kernels and their host launchers (installed as `gradmem_fast.kernels`).

Import nothing heavy here: each kernel module imports triton itself, so `import gradmem_fast`
never needs triton or a GPU.
"""
