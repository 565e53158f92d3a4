"""scripts/csrc_prebuilt.py: a packed extension is reused only where torch, its CUDA, the Python ABI
and the sources match; otherwise install builds it, and --done is written either way."""
import os
import shutil
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import csrc_prebuilt  # noqa: E402


@pytest.fixture
def tree(tmp_path):
    """A copy of the sources the key hashes, with a stand-in built module."""
    shutil.copytree(os.path.join(ROOT, "csrc"), tmp_path / "csrc")
    shutil.copy(os.path.join(ROOT, "setup.py"), tmp_path / "setup.py")
    (tmp_path / "gradmem_fast").mkdir()
    (tmp_path / "gradmem_fast" / "_C.cpython-312-x86_64-linux-gnu.so").write_bytes(b"\x7fELF stand-in")
    return tmp_path


KEY = {"torch": "2.11.0+cu130", "cuda": "13.0", "ext_suffix": ".cpython-312-x86_64-linux-gnu.so"}


def test_reused_when_everything_matches(tree, tmp_path):
    key = {**KEY, "sources_sha256": csrc_prebuilt.sources_sha256(str(tree))}
    tar = tmp_path / "csrc.tar.gz"
    assert "packed _C.cpython-312" in csrc_prebuilt.pack(str(tree), str(tar), key=key)
    os.remove(tree / "gradmem_fast" / "_C.cpython-312-x86_64-linux-gnu.so")
    ok, text = csrc_prebuilt.reuse(str(tree), str(tar), key=key)
    assert ok, text
    assert (tree / "gradmem_fast" / "_C.cpython-312-x86_64-linux-gnu.so").read_bytes() == b"\x7fELF stand-in"


@pytest.mark.parametrize("field, value", [("torch", "2.14.1"), ("cuda", "12.8"),
                                          ("ext_suffix", ".cpython-311-x86_64-linux-gnu.so"), ("sources", None)])
def test_refused_when_one_thing_differs(tree, tmp_path, field, value):
    key = {**KEY, "sources_sha256": csrc_prebuilt.sources_sha256(str(tree))}
    tar = tmp_path / "csrc.tar.gz"
    csrc_prebuilt.pack(str(tree), str(tar), key=key)
    if field == "sources":
        with open(tree / "csrc" / "rotary.cu", "a") as f:
            f.write("// changed\n")
        here = {**key, "sources_sha256": csrc_prebuilt.sources_sha256(str(tree))}
    else:
        here = {**key, field: value}
    os.remove(tree / "gradmem_fast" / "_C.cpython-312-x86_64-linux-gnu.so")
    ok, text = csrc_prebuilt.reuse(str(tree), str(tar), key=here)
    assert not ok and (field if field != "sources" else "sources_sha256") in text
    assert not (tree / "gradmem_fast" / "_C.cpython-312-x86_64-linux-gnu.so").exists()


def test_install_builds_without_a_prebuilt_and_writes_done(tree, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(csrc_prebuilt.subprocess, "run",
                        lambda cmd, cwd: calls.append((cmd[1:], cwd)) or type("R", (), {"returncode": 0})())
    done = tmp_path / "csrc.done"
    assert csrc_prebuilt.install(str(tree), str(tmp_path / "missing.tar.gz"), str(done)) == 0
    assert calls == [(["setup.py", "build_ext", "--inplace"], str(tree))] and done.exists()
