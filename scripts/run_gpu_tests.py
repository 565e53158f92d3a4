"""Run the GPU tests (`pytest -m gpu`) as several pytest processes at once, under one deadline.

Most of their time is Triton compiling kernels on the CPU, and a GPU machine has cores to spare.
Each group writes OUT/gpu-tests-NAME.log and OUT/gpu-tests-NAME.xml (junit). At the deadline every
group still running gets SIGINT, so pytest stops as on Ctrl-C and still writes its summary and xml.

    python scripts/run_gpu_tests.py --out /tmp/out --seconds 180
"""
import argparse
import os
import signal
import subprocess
import sys
import time

CSRC = ["tests/ops/test_add_norm.py", "tests/ops/test_rotary.py", "tests/ops/test_activation.py",
        "tests/ops/test_memory_update.py"]
GROUPS = {  # name -> pytest arguments; together they cover tests/ once
    "csrc": CSRC,
    "triton": ["tests/ops"] + [f"--ignore={path}" for path in CSRC],
    "engine": ["tests/engine"],
    "rest": ["tests", "--ignore=tests/ops", "--ignore=tests/engine"],
}
GRACE_S = 20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the logs and junit xml files")
    p.add_argument("--seconds", type=float, required=True, help="deadline for all groups together")
    args = p.parse_args(argv)
    if args.seconds <= GRACE_S:
        raise SystemExit(f"--seconds must exceed {GRACE_S}, got {args.seconds}")
    os.makedirs(args.out, exist_ok=True)
    deadline = time.monotonic() + args.seconds - GRACE_S
    running = {}
    for name, targets in GROUPS.items():
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider",
               f"--junitxml={os.path.join(args.out, f'gpu-tests-{name}.xml')}", *targets]
        log = open(os.path.join(args.out, f"gpu-tests-{name}.log"), "w")
        running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log)
    codes = {}
    interrupted = False
    while running:
        for name, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                codes[name] = proc.returncode
                log.close()
                del running[name]
        if running and not interrupted and time.monotonic() > deadline:
            interrupted = True
            for name, (proc, _) in running.items():
                print(f"{name}: deadline reached, interrupting", flush=True)
                os.killpg(proc.pid, signal.SIGINT)
            deadline = time.monotonic() + GRACE_S
        elif running and interrupted and time.monotonic() > deadline:
            for proc, _ in running.values():
                os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(0.5)
    for name in GROUPS:
        with open(os.path.join(args.out, f"gpu-tests-{name}.log")) as f:
            lines = f.read().splitlines()
        print(f"{name}: exit {codes[name]}: {lines[-1] if lines else '(no output)'}", flush=True)
    # pytest exit 5 (nothing collected) is fine for a group only if the others ran something
    return 0 if all(code in (0, 5) for code in codes.values()) and any(c == 0 for c in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
