"""scripts/run_gpu_tests.py: the waves cover every test file once, the shards split the selected tests,
the engine wave waits for the extension's build, and the deadline's SIGINT still leaves junit xml."""
import glob
import os
import sys
import xml.etree.ElementTree as ET

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import pytest_shard  # noqa: E402
import run_gpu_tests  # noqa: E402


def _files_of(targets):
    ignored = {t.split("=", 1)[1] for t in targets if t.startswith("--ignore=")}
    files = set()
    for t in targets:
        if t.startswith("--"):
            continue
        found = glob.glob(os.path.join(ROOT, t, "**", "test_*.py"), recursive=True) if os.path.isdir(
            os.path.join(ROOT, t)) else [os.path.join(ROOT, t)]
        files |= {os.path.relpath(f, ROOT) for f in found}
    return {f for f in files if f not in ignored and not any(f.startswith(i + "/") for i in ignored)}


def test_the_waves_cover_every_test_file_once():
    waves = [_files_of(targets) for targets in run_gpu_tests.WAVES.values()]
    every = {os.path.relpath(f, ROOT) for f in glob.glob(os.path.join(ROOT, "tests", "**", "test_*.py"),
                                                        recursive=True)}
    assert set().union(*waves) == every
    assert sum(len(w) for w in waves) == len(every)  # no file in two waves
    assert set(run_gpu_tests.CSRC) <= waves[1]


def test_parse_shard():
    assert pytest_shard.parse_shard("2/5") == (2, 5)
    for bad in ("5/5", "1", "a/b", "0/0"):
        with pytest.raises(ValueError, match="--shard"):
            pytest_shard.parse_shard(bad)


TESTS = '''
import time
import pytest
pytestmark = pytest.mark.gpu
@pytest.mark.parametrize("i", range(4))
def test_quick(i):
    assert i < 4
def test_slow():
    time.sleep(300)
'''


def _counts(path):
    root = ET.parse(path).getroot()
    cases = [c for c in root.iter("testcase") if c.get("name")]  # the interrupted one is written nameless
    return len(cases), sum(1 for c in cases if len(c) == 0)


def test_shards_split_the_tests_and_the_deadline_keeps_their_xml(tmp_path, monkeypatch):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "test_kernels.py").write_text(TESTS)
    (tmp_path / "t" / "test_engine.py").write_text(TESTS.replace("time.sleep(300)", "pass"))
    monkeypatch.setattr(run_gpu_tests, "WAVES", {"kernels": [str(tmp_path / "t" / "test_kernels.py")],
                                                 "engine": [str(tmp_path / "t" / "test_engine.py")]})
    out = tmp_path / "out"
    lines = []
    codes = run_gpu_tests.run(str(out), seconds=40, shards=2, wait_file=str(tmp_path / "never"), wait_limit=1,
                              pytest_args=["-W", "ignore::pytest.PytestUnknownMarkWarning"], log=lines.append)
    assert any("engine wave starts" in line for line in lines)
    assert any("deadline" in line for line in lines)  # the slow test is interrupted
    assert not run_gpu_tests.passed(codes) and codes["engine-0"] == 0 and codes["engine-1"] == 0
    kernels = [_counts(out / f"kernels-{i}.xml") for i in range(2)]
    engine = [_counts(out / f"engine-{i}.xml") for i in range(2)]
    assert sorted(engine) == [(2, 2), (3, 3)]  # 5 tests split round-robin, all passed
    assert sum(passed for _, passed in kernels) == 4  # the quick ones, in both shards' xml despite SIGINT


def test_passed():
    assert run_gpu_tests.passed({"a": 0, "b": 5})
    assert not run_gpu_tests.passed({"a": 5, "b": 5}) and not run_gpu_tests.passed({"a": 0, "b": None})
    assert not run_gpu_tests.passed({"a": 0, "b": 1})
