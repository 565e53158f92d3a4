"""Run the GPU tests (`pytest -m gpu`) as many pytest processes at once, under one deadline.

Most of their time is Triton compiling kernels on the CPU, one kernel at a time per process, and a
GPU machine has cores to spare: each wave's targets are split into shards (scripts/pytest_shard.py,
every N-th selected test), one process each. Wave "kernels" (the Triton ops and the models) starts
at once; wave "engine" (the csrc ops, the engine, the API and the bench tests, which need the CUDA
extension) starts when --wait-file exists (the extension's build has ended) or at --wait-limit
seconds. Each shard writes OUT/WAVE-I.log and OUT/WAVE-I.xml (junit). At the deadline every shard
still running gets SIGINT, so pytest stops as on Ctrl-C and still writes its summary and xml.

    python3 scripts/run_gpu_tests.py --out /tmp/tests --seconds 130 [--shards 8] [--wait-file F]
"""
import argparse
import os
import signal
import subprocess
import sys
import time

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
CSRC = ["tests/ops/test_add_norm.py", "tests/ops/test_rotary.py", "tests/ops/test_activation.py",
        "tests/ops/test_memory_update.py"]
ROOT = os.path.dirname(SCRIPTS)


def _top_level_tests():
    return sorted(f"tests/{name}" for name in os.listdir(os.path.join(ROOT, "tests"))
                  if name.startswith("test_") and name.endswith(".py"))


# wave -> pytest targets; together they cover every test file under tests/ once
WAVES = {
    "kernels": ["tests/ops", "tests/models"] + [f"--ignore={path}" for path in CSRC],
    "engine": CSRC + ["tests/engine", "tests/benchmark", "tests/csrc_emulation", "tests/scripts", "tests/reference", "tests/tasks"] + _top_level_tests(),
}
GRACE_S = 15
POLL_S = 0.5


def default_shards():
    """Processes per wave: half the cores (two waves may overlap), at least 1, at most 8."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def shard_command(wave, index, count, out, python=sys.executable, pytest_args=()):
    return [python, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider", "-p", "pytest_shard",
            f"--shard={index}/{count}", f"--junitxml={os.path.join(out, f'{wave}-{index}.xml')}",
            *pytest_args, *WAVES[wave]]


class Shard:
    def __init__(self, wave, index, count, out, pytest_args):
        self.name = f"{wave}-{index}"
        self.log_path = os.path.join(out, f"{self.name}.log")
        self.cmd = shard_command(wave, index, count, out, pytest_args=pytest_args)
        self.proc = None
        self.code = None

    def start(self, env):
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                     start_new_session=True)
        log.close()  # the child holds its own descriptor

    def signal(self, sig):
        if self.proc is not None and self.code is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def poll(self):
        if self.proc is not None and self.code is None:
            self.code = self.proc.poll()
        return self.code

    def last_line(self):
        try:
            with open(self.log_path) as f:
                lines = [line for line in f.read().splitlines() if line.strip()]
        except OSError:
            return "(no log)"
        return lines[-1] if lines else "(no output)"


def run(out, seconds, shards, wait_file=None, wait_limit=None, pytest_args=(), log=print):
    """Every shard's exit code by name; SIGINT to all at `seconds`, SIGKILL GRACE_S later."""
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SCRIPTS, env.get("PYTHONPATH")) if p)
    start = time.monotonic()
    deadline = start + seconds
    waves = {wave: [Shard(wave, i, shards, out, pytest_args) for i in range(shards)] for wave in WAVES}
    engine_started = False
    interrupted = killed = False
    stop = []  # SIGINT or SIGTERM to this process: stop the shards as at the deadline

    def on_signal(signum, frame):
        stop.append(signum)

    # installed before any shard starts: a handled signal is reset to its default in the child, whereas an
    # ignored one (a background job's SIGINT) would stay ignored and the deadline's SIGINT would be lost
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    for shard in waves["kernels"]:
        shard.start(env)
    while True:
        now = time.monotonic()
        if stop and not interrupted:
            deadline = now - 1
            log(f"signal {stop[0]}: stopping the shards")
        if not engine_started and not interrupted:
            ready = wait_file is None or os.path.exists(wait_file)
            late = wait_limit is not None and now - start >= wait_limit
            if ready or late:
                log(f"engine wave starts after {now - start:.0f}s"
                    + ("" if ready else f" (no {wait_file} after {wait_limit}s)"))
                for shard in waves["engine"]:
                    shard.start(env)
                engine_started = True
        started = [s for wave in waves.values() for s in wave if s.proc is not None]
        running = [s for s in started if s.poll() is None]
        if not running and (engine_started or interrupted):
            break
        if not interrupted and now > deadline:
            interrupted = True
            log(f"deadline of {seconds:.0f}s reached: interrupting {', '.join(s.name for s in running)}")
            for shard in running:
                shard.signal(signal.SIGINT)
        elif interrupted and not killed and now > deadline + (GRACE_S if not stop else GRACE_S / 3):
            killed = True
            for shard in running:
                shard.signal(signal.SIGKILL)
        time.sleep(POLL_S)
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    codes = {}
    for wave in waves.values():
        for shard in wave:
            codes[shard.name] = shard.code
            state = "not started" if shard.proc is None else f"exit {shard.code}"
            log(f"{shard.name}: {state}: {shard.last_line() if shard.proc else ''}")
    return codes


def passed(codes):
    """pytest exit 5 (nothing selected) is fine for a shard as long as some shard ran and passed."""
    ran = [c for c in codes.values() if c is not None]
    return len(ran) == len(codes) and all(c in (0, 5) for c in ran) and any(c == 0 for c in ran)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the logs and junit xml files")
    p.add_argument("--seconds", type=float, required=True, help="deadline for all shards together")
    p.add_argument("--shards", type=int, default=default_shards(), help="pytest processes per wave")
    p.add_argument("--wait-file", help="start the engine wave once this file exists")
    p.add_argument("--wait-limit", type=float, help="start the engine wave after this many seconds anyway")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = p.parse_args(argv)
    if args.seconds <= 0:
        raise SystemExit(f"--seconds must be > 0, got {args.seconds}")
    if args.shards < 1:
        raise SystemExit(f"--shards must be >= 1, got {args.shards}")
    codes = run(args.out, args.seconds, args.shards, args.wait_file, args.wait_limit, args.pytest_args,
                log=lambda s: print(s, flush=True))
    return 0 if passed(codes) else 1


if __name__ == "__main__":
    sys.exit(main())
