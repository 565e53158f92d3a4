"""Stand-in for one step of scripts/gpu_check.py in a dry run: runs SECONDS, writes what the real
step would leave behind as it goes, and on SIGINT (the step's cap) keeps what it has written, adds
its partial results, and exits 130 as pytest does.

    python3 scripts/gpu_check_stub.py STEP SECONDS WORK OUT
"""
import json
import os
import signal
import sys
import time

CASES = ["gpt2-latency", "gpt2-batch", "llama1b-latency", "llama1b-batch", "kv-paper", "kv-latency"]


def junit(path, passed, failed=0, interrupted=False):
    cases = [f'<testcase classname="tests.stub" name="test_{i}" time="0.1"/>' for i in range(passed)]
    cases += ['<testcase time="0.000"/>'] if interrupted else []  # as pytest writes the test SIGINT stopped
    cases += [f'<testcase classname="tests.stub" name="test_bad_{i}" time="0.1"><failure message="stub failure">'
              f'x</failure></testcase>' for i in range(failed)]
    with open(path, "w") as f:
        f.write(f'<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="{passed + failed}">'
                + "".join(cases) + "</testsuite></testsuites>\n")


def bench(folder, cases):
    os.makedirs(folder, exist_ok=True)
    result = {"card": "stub", "torch": "stub", "triton": "stub", "matmul_tflops": None,
              "cases": [{"case": c, "plain_ms": 1.0, "fast_ms": 0.5} for c in cases]}
    with open(os.path.join(folder, "latest.json"), "w") as f:
        json.dump(result, f)


def main(step, seconds, work, out):
    seconds = float(seconds)
    tests = os.path.join(work, "tests")
    interrupted = []
    signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    start = time.monotonic()
    done = 0
    print(f"stub {step}: {seconds}s", flush=True)
    while time.monotonic() - start < seconds and not interrupted:
        time.sleep(0.05)
        tick = int((time.monotonic() - start) / 0.5)
        if tick > done:  # a result every half second, as the real steps write theirs
            done = tick
            print(f"stub {step}: {done} results", flush=True)
            if step.startswith("bench"):
                bench(os.path.join(work, step), CASES[:min(done, len(CASES))])
    if step == "tests":
        os.makedirs(tests, exist_ok=True)
        junit(os.path.join(tests, "kernels-0.xml"), passed=max(done, 1), interrupted=bool(interrupted))
        junit(os.path.join(tests, "engine-0.xml"), passed=1, failed=1)
    elif step.startswith("bench"):
        bench(os.path.join(work, step), CASES[:max(1, min(done, len(CASES)))])
    elif step == "micro":
        with open(os.path.join(work, "micro.json"), "w") as f:
            json.dump({"benchmarks": [{"name": "stub", "stats": {"median": 1e-4}}]}, f)
    elif step == "csrc":
        with open(os.path.join(work, "csrc.done"), "w") as f:
            f.write("done\n")
    elif step == "export":
        for name in ("triton-cache.tar.gz", "csrc-build.tar.gz"):
            with open(os.path.join(out, name), "wb") as f:
                f.write(b"stub")
    if interrupted:
        print(f"stub {step}: interrupted after {done} results", flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
