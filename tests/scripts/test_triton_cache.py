"""A Triton cache packed on one path and unpacked on another is hit there: the kernel is not compiled
again (no new cache files, and the stripped intermediate IR stays absent). Compiles one tiny kernel
for sm_90 on CPU (no GPU needed: Triton's own ptxas)."""
import json
import os
import subprocess
import sys
import tarfile

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))
import triton_cache  # noqa: E402

triton = pytest.importorskip("triton")


# runs in a fresh interpreter: tests/conftest.py turns the Triton interpreter on for this process
COMPILE = """
import hashlib, json
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

@triton.jit
def scale_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n) * 2.0, mask=offs < n)

src = ASTSource(fn=scale_kernel, signature={"X": "*fp32", "Y": "*fp32", "n": "i32", "BLOCK": "constexpr"},
                constexprs={"BLOCK": 128})
k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
print(json.dumps({"asm": sorted(k.asm), "cubin": hashlib.sha256(k.asm["cubin"]).hexdigest()}))
"""


def _compile(cache_dir):
    script = cache_dir.parent.parent / "compile_scale.py"  # @jit needs a file; one file for both compiles
    if not script.exists():
        script.write_text(COMPILE)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache_dir)
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def _files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def test_packed_cache_is_hit_after_unpacking_elsewhere(tmp_path, monkeypatch):
    first, second = tmp_path / "a" / "cache", tmp_path / "b" / "elsewhere"
    compiled = _compile(first)
    assert "ptx" in compiled["asm"] and "cubin" in compiled["asm"]
    tar = tmp_path / "cache.tar.gz"
    assert "packed 1 kernels" in triton_cache.pack(str(first), str(tar))
    with tarfile.open(tar) as t:
        names = t.getnames()
    assert triton_cache.MANIFEST in names and not any(n.endswith((".ptx", ".ttir", ".ttgir", ".llir")) for n in names)
    ok, text = triton_cache.unpack(str(tar), str(second))
    assert ok, text
    before = _files(second)
    again = _compile(second)
    assert _files(second) == before  # nothing compiled or written
    assert "cubin" in again["asm"] and "ptx" not in again["asm"]  # read from the stripped, relocated entry
    assert again["cubin"] == compiled["cubin"]


def test_a_cache_from_another_triton_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache" / "entry").mkdir(parents=True)
    (tmp_path / "cache" / "entry" / "k.cubin").write_bytes(b"cubin")
    tar = tmp_path / "cache.tar.gz"
    assert "packed" in triton_cache.pack(str(tmp_path / "cache"), str(tar))
    key = triton_cache.local_key()
    monkeypatch.setattr(triton_cache, "local_key", lambda: {**key, "triton_key_sha256": "0" * 64})
    ok, text = triton_cache.unpack(str(tar), str(tmp_path / "target"))
    assert not ok and "triton_key_sha256" in text and not (tmp_path / "target").exists()


def test_a_size_limit_leaves_out_torch_compile_kernels_first(tmp_path):
    for entry, name in (("aa", "triton_poi_fused_0"), ("bb", "_fwd_kernel"), ("cc", "_bwd_dq_kernel")):
        folder = tmp_path / "cache" / entry
        folder.mkdir(parents=True)
        (folder / f"{name}.cubin").write_bytes(os.urandom(6000))  # random bytes: they do not compress
        (folder / f"{name}.json").write_text("{}")
        (folder / f"__grp__{name}.json").write_text(json.dumps({"child_paths": {
            f"{name}.cubin": str(folder / f"{name}.cubin"), f"{name}.json": str(folder / f"{name}.json")}}))
    tar = tmp_path / "cache.tar.gz"
    text = triton_cache.pack(str(tmp_path / "cache"), str(tar), max_bytes=14000)
    assert "1 entries left out" in text
    with tarfile.open(tar) as t:
        names = t.getnames()
    assert "bb/_fwd_kernel.cubin" in names and not any(n.startswith("aa/") for n in names)
