"""scripts/gpu_check.py in a dry run (every step stubbed, no GPU): the step order, the caps inside one
budget, at most 8 files under OUT in names the device machine returns, and an interrupted step that
still leaves its results while the steps after it shrink or are skipped."""
import json
import os
import re
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import gpu_check  # noqa: E402

ORDER = ["info", "csrc", "install", "triton-cache", "tests", "bench-plain", "bench-meta", "bench-compiled", "export"]
WITH_MICRO = ORDER[:-1] + ["micro", "export"]
NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def _dry_run(tmp_path, *args):
    out, work = tmp_path / "out", tmp_path / "work"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_check.py"), "--dry-run",
                           "--out", str(out), "--work", str(work), *args],
                          capture_output=True, text=True, timeout=120)
    with open(out / "results.json") as f:
        return done, json.load(f), out


def _returned_files(out):
    """What the device machine would send back: plain files at most two folders down."""
    files = []
    for folder, dirs, names in os.walk(out):
        depth = len(os.path.relpath(folder, out).split(os.sep)) if folder != str(out) else 0
        assert depth <= 2, folder
        files += [os.path.join(folder, n) for n in names]
    return files


def test_dry_run_runs_every_step_in_order_and_returns_at_most_8_files(tmp_path):
    done, result, out = _dry_run(tmp_path, "--budget", "60", "--micro")
    assert done.returncode == 0, done.stdout + done.stderr
    assert [s["name"] for s in result["steps"]] == WITH_MICRO
    assert all(s["status"] == "ok" for s in result["steps"]), result["steps"]
    files = _returned_files(out)
    assert len(files) <= gpu_check.MAX_OUT_FILES
    assert all(NAME.match(os.path.basename(f)) and os.path.getsize(f) < gpu_check.MAX_OUT_BYTES for f in files)
    assert {os.path.basename(f) for f in files} == {"check.log", "summary.txt", "results.json", "logs.tar.gz",
                                                    "triton-cache.tar.gz", "csrc-build.tar.gz"}
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"logs/tests/kernels-0.xml", "logs/bench-plain/latest.json", "logs/micro.json"} <= names
    assert {f"logs/{step}.log" for step in WITH_MICRO} <= names
    assert result["tests"]["passed"] >= 2 and result["tests"]["failed"] == 1
    assert len(result["bench"]["bench-plain"]["cases"]) >= 1
    summary = (out / "summary.txt").read_text()
    assert "tests: " in summary and "FAIL tests.stub::test_bad_0" in summary
    starts = [line for line in (out / "check.log").read_text().splitlines() if "(at most" in line]
    assert [line.split("== ")[1].split(" ")[0] for line in starts] == WITH_MICRO


def test_an_interrupted_step_keeps_its_results_and_the_rest_fits_the_budget(tmp_path):
    budget = 24
    done, result, out = _dry_run(tmp_path, "--budget", str(budget), "--stub", "tests=60")
    steps = {s["name"]: s for s in result["steps"]}
    assert done.returncode == 1
    assert steps["tests"]["status"] == "interrupted" and steps["tests"]["rc"] == 130
    assert result["tests"]["passed"] >= 1 and result["tests"]["interrupted"] == 1  # the junit written at SIGINT
    assert steps["bench-plain"]["status"] == "skipped" and steps["bench-compiled"]["status"] == "skipped"
    assert steps["export"]["status"] == "ok" and (out / "triton-cache.tar.gz").exists()
    assert result["elapsed_s"] <= budget + gpu_check.GRACE_S
    for s in result["steps"]:
        if s["limit_s"] is not None and s["status"] != "skipped":
            assert s["seconds"] <= s["limit_s"] + gpu_check.GRACE_S, s
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert "interrupted" in tar.extractfile("logs/tests.log").read().decode()
    assert len(_returned_files(out)) <= gpu_check.MAX_OUT_FILES


def test_every_cap_fits_and_the_expected_times_fit_the_default_budget(tmp_path):
    steps = gpu_check.plan(str(tmp_path), str(tmp_path), str(tmp_path))
    assert [s.name for s in steps] == ORDER
    assert [s.name for s in gpu_check.plan(str(tmp_path), str(tmp_path), str(tmp_path), micro=True)] == WITH_MICRO
    assert steps[-1].name == "export" and steps[-1].cap_s == gpu_check.RESERVE_S
    foreground = sum(s.expect_s for s in steps if not s.background)
    assert foreground <= 285, foreground
    assert all(s.expect_s <= s.cap_s for s in steps), [(s.name, s.expect_s, s.cap_s) for s in steps]


def test_the_check_calls_python3_only():
    shell = open(os.path.join(ROOT, "scripts", "gpu_check.sh")).read()
    assert "python3 scripts/gpu_check.py" in shell and not re.search(r"(^|\s)python\s", shell)
    for step in gpu_check.plan("/w", "/c", "/o"):
        assert step.cmd[0] == "python3", step.name


def test_stub_durations_are_parsed():
    assert gpu_check.parse_stubs(["tests=3.5", "micro=0"]) == {"tests": 3.5, "micro": 0.0}
    with pytest.raises(SystemExit, match="NAME=SECONDS"):
        gpu_check.parse_stubs(["tests"])


def test_the_background_build_is_stopped_at_its_cap_while_the_tests_go_on(tmp_path):
    done, result, out = _dry_run(tmp_path, "--budget", "26", "--stub", "csrc=60", "--stub", "tests=3")
    steps = {s["name"]: s for s in result["steps"]}
    assert steps["csrc"]["status"] == "interrupted" and steps["csrc"]["seconds"] <= steps["csrc"]["limit_s"] + 1
    assert steps["tests"]["status"] == "ok" and steps["export"]["status"] == "ok"
    log = (out / "check.log").read_text()
    assert log.index("== tests (") < log.index("csrc: cap of")  # the tests did not wait for the build
