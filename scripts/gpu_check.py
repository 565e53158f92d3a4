"""The one command for a GPU machine without network (see scripts/GPU_CHECK.md for the time plan).

Steps, most valuable first, each under a time cap and all under one budget (default 285 s): machine
info; build (or reuse) the CUDA extension in the background; install the project without it; unpack
a carried Triton cache; the GPU tests (every kernel, then the engine once the
extension is there); the six bench cases with the plain loop; the two meta-step cases; the compiled-loop
baselines; with --micro the micro-benchmarks; export the Triton cache and the built extension for the
next run. A step still
running at its cap gets SIGINT (pytest then writes its summary and junit xml), then SIGKILL.

Under OUT, at most 8 files, each rewritten as results come: check.log (this script's log),
summary.txt, results.json, logs.tar.gz (every step's log, junit xml, bench json and png), and at the
end triton-cache.tar.gz and csrc-build.tar.gz. `--dry-run` runs the same plan with every step's
command replaced by scripts/gpu_check_stub.py (no GPU, no install), `--stub NAME=SECONDS` sets a
stub's duration.

    OUT=/tmp/out python3 scripts/gpu_check.py [--budget 285] [--dry-run [--stub tests=30]]
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = "python3"
RESERVE_S = 14  # kept back for the export step and the last packing
MIN_STEP_S = 5  # a step offered less than this is skipped
EXPORT_MIN_S = 8  # the export runs even when less than this is left
GRACE_S = 10  # from SIGINT to SIGKILL
REPACK_S = 20  # logs.tar.gz is refreshed this often during a step
MAX_OUT_FILES = 8
MAX_OUT_BYTES = 16 * 2 ** 20
MICRO = ["benchmarks/bench_attention.py", "benchmarks/bench_fused_ops.py", "benchmarks/bench_head_loss.py",
         "benchmarks/bench_qkv.py"]
LATENCY_CASES = "gpt2-latency,llama1b-latency"
META_CASES = "meta-kv,meta-gpt2"


class Step:
    """name, cap in seconds, command (list), expected seconds on an H200 (GPU_CHECK.md)."""

    def __init__(self, name, cap_s, cmd, expect_s, background=False, env=None):
        self.name, self.cap_s, self.cmd, self.expect_s = name, cap_s, cmd, expect_s
        self.background, self.env = background, env or {}
        self.status, self.rc, self.seconds, self.limit_s, self.proc = "pending", None, None, None, None
        self.deadline = None


def plan(work, cache, out, micro=False):
    """The steps in order. work: scratch folder; cache: carried caches; out: $OUT; micro: also run the
    micro-benchmarks (after the bench steps; they do not fit the default budget beside them)."""
    tests, csrc_tar, triton_tar = (os.path.join(work, "tests"), os.path.join(cache, "csrc-build.tar.gz"),
                                   os.path.join(cache, "triton-cache.tar.gz"))
    bench = [PY, "-m", "gradmem_fast", "bench", "--quick"]
    steps = [
        Step("info", 15, [PY, "scripts/gpu_check.py", "--info"], 4),
        Step("csrc", 150, [PY, "scripts/csrc_prebuilt.py", "install", "--prebuilt", csrc_tar,
                           "--done", os.path.join(work, "csrc.done")], 90, background=True,
             env={"GRADMEM_FAST_BUILD_CUDA": "1", "MAX_JOBS": "6"}),
        Step("install", 45, [PY, "-m", "pip", "install", "--use-pep517", "--no-build-isolation", "--no-deps",
                             "--no-index", "-e", "."], 12, env={"GRADMEM_FAST_BUILD_CUDA": "0"}),
        Step("triton-cache", 15, [PY, "scripts/triton_cache.py", "unpack", triton_tar], 3),
        Step("tests", 150, [PY, "scripts/run_gpu_tests.py", "--out", tests, "--seconds", "{tests_deadline}",
                            "--wait-file", os.path.join(work, "csrc.done"), "--wait-limit", "75"], 127),
        Step("bench-plain", 75, bench + ["--no-compile", "--out-dir", os.path.join(work, "bench-plain"),
                                         "{gpu_tests}"], 60),
        Step("bench-meta", 40, bench + ["--cases", META_CASES, "--out-dir", os.path.join(work, "bench-meta")], 18),
        Step("bench-compiled", 60, bench + ["--cases", LATENCY_CASES, "--compile", "--profile",
                                            "--out-dir", os.path.join(work, "bench-compiled")], 55),
    ]
    if micro:
        steps.append(Step("micro", 35, [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                        "--benchmark-max-time=0.05",
                                        f"--benchmark-json={os.path.join(work, 'micro.json')}", *MICRO], 15))
    return steps + [Step("export", RESERVE_S, [PY, "scripts/gpu_check.py", "--export", work, out], 5)]


def stubbed(steps, work, out, seconds):
    """The same plan, each command replaced by the stub (dry run)."""
    for step in steps:
        step.cmd = [PY, "scripts/gpu_check_stub.py", step.name, str(seconds.get(step.name, 0.2)), work, out]
    return steps


class Check:
    def __init__(self, out, work, budget_s, steps, dry_run):
        self.out, self.work, self.budget_s, self.steps, self.dry_run = out, work, budget_s, steps, dry_run
        self.start = time.monotonic()
        self.lock = threading.Lock()
        self.background = []
        os.makedirs(out, exist_ok=True)
        os.makedirs(work, exist_ok=True)
        self.log_file = open(os.path.join(out, "check.log"), "w")

    def log(self, text):
        line = f"[{time.monotonic() - self.start:6.1f}s] {text}"
        print(line, flush=True)
        with self.lock:
            self.log_file.write(line + "\n")
            self.log_file.flush()

    def left(self):
        return self.budget_s - (time.monotonic() - self.start)

    def env(self, step):
        env = dict(os.environ)
        env.update({"PYTHONUNBUFFERED": "1", "TORCHINDUCTOR_MAX_AUTOTUNE": "0",
                    "TORCHINDUCTOR_MAX_AUTOTUNE_GEMM": "0"})
        env.setdefault("GRADMEM_FAST_AUTOTUNE", "0")  # one Triton config per kernel: no sweep in the check
        env.setdefault("TRITON_CACHE_DIR", os.path.join(self.work, "triton-cache"))
        env.update(step.env)
        return env

    def expand(self, cmd, limit):
        """Placeholders known only at launch: the seconds a step's own deadline gets, the junit files."""
        out = []
        for a in cmd:
            if a == "{tests_deadline}":  # its shards get SIGINT then and SIGKILL 15 s later: inside the cap
                out.append(str(max(1, round(limit - GRACE_S - 15))))
            elif a == "{gpu_tests}":
                folder = os.path.join(self.work, "tests")
                xmls = sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".xml")) \
                    if os.path.isdir(folder) else []
                out += ["--gpu-tests", *xmls] if xmls else []
            else:
                out.append(a)
        return out

    def launch(self, step, limit):
        cmd = self.expand(step.cmd, limit)
        log = open(os.path.join(self.work, f"{step.name}.log"), "w")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env(step), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        log.close()
        return proc

    def wait(self, step, proc, limit, t0):
        """Wait for proc up to limit seconds, then SIGINT, then SIGKILL; fill step's result."""
        interrupted = False
        next_pack = time.monotonic() + REPACK_S
        while proc.poll() is None:
            now = time.monotonic()
            if not interrupted and now - t0 > limit:
                interrupted = True
                self.log(f"{step.name}: cap of {limit:.0f}s reached, SIGINT")
                _signal(proc, signal.SIGINT)
            elif interrupted and now - t0 > limit + GRACE_S:
                _signal(proc, signal.SIGKILL)
            if not step.background and now > next_pack:
                self.pack_logs()
                next_pack = now + REPACK_S
            time.sleep(0.2)
        step.rc, step.seconds = proc.returncode, time.monotonic() - t0
        step.status = "interrupted" if interrupted else "ok" if step.rc == 0 else "failed"
        self.log(f"== {step.name}: {step.status} (exit {step.rc}) after {step.seconds:.1f}s; "
                 f"{_tail(os.path.join(self.work, step.name + '.log'))}")

    def run_step(self, step):
        if step.name == "export":  # never skipped: an overrunning step may have eaten into the reserve
            limit = min(step.cap_s, max(self.left(), EXPORT_MIN_S))
        else:
            limit = min(step.cap_s, self.left() - RESERVE_S)
        step.limit_s = round(limit, 1)
        if limit < MIN_STEP_S:
            step.status = "skipped"
            self.log(f"== {step.name}: skipped, {max(limit, 0):.0f}s of the budget left for it")
            return
        self.log(f"== {step.name} (at most {limit:.0f}s, expected about {step.expect_s}s on an H200)")
        t0 = time.monotonic()
        proc = self.launch(step, limit)
        step.proc, step.deadline = proc, t0 + limit
        if step.background:
            thread = threading.Thread(target=self.wait, args=(step, proc, limit, t0), daemon=True)
            thread.start()
            self.background.append((step, thread))
            return
        self.wait(step, proc, limit, t0)

    def run(self):
        self.log(f"budget {self.budget_s:.0f}s, out {self.out}, work {self.work}"
                 + (" (dry run)" if self.dry_run else ""))
        for step in self.steps:
            if step.name == "export":
                for bg, thread in self.background:
                    # until its own cap has passed and SIGINT has had 2 s, within what the export leaves
                    until_cap = bg.deadline + 2 - time.monotonic()
                    thread.join(timeout=max(0.0, min(until_cap, self.left() - EXPORT_MIN_S)))
                    if thread.is_alive():
                        self.log(f"{bg.name}: still running at the export, stopped")
                        _signal(bg.proc, signal.SIGKILL)
                        thread.join(timeout=2)
            self.run_step(step)
            self.report()
        self.pack_logs()
        self.report()
        failed = [s.name for s in self.steps if s.status != "ok"]
        self.log(f"done in {time.monotonic() - self.start:.0f}s; not ok: {', '.join(failed) or 'none'}")
        self.log("files in OUT: " + ", ".join(sorted(os.listdir(self.out))))
        with open(os.path.join(self.out, "summary.txt")) as f:
            print(f.read(), flush=True)
        return 1 if failed else 0

    def pack_logs(self):
        """logs.tar.gz: the scratch folder without the Triton cache and the carried caches."""
        with self.lock:
            target = os.path.join(self.out, "logs.tar.gz")
            try:
                with tarfile.open(target + ".tmp", "w:gz") as tar:
                    tar.add(self.work, arcname="logs", filter=_skip_caches)
                os.replace(target + ".tmp", target)
            except OSError as exc:  # a file changed under the tar: keep the previous pack, retry later
                print(f"packing the logs failed ({exc}); the previous logs.tar.gz stays", flush=True)

    def report(self):
        result = {"dry_run": self.dry_run, "budget_s": self.budget_s,
                  "elapsed_s": round(time.monotonic() - self.start, 1),
                  "steps": [{"name": s.name, "status": s.status, "rc": s.rc, "limit_s": s.limit_s,
                             "seconds": None if s.seconds is None else round(s.seconds, 1),
                             "expected_h200_s": s.expect_s} for s in self.steps],
                  "tests": junit_summary(os.path.join(self.work, "tests")),
                  "bench": {name: _read_json(os.path.join(self.work, name, "latest.json"))
                            for name in ("bench-plain", "bench-compiled", "bench-meta")},
                  "micro": micro_summary(os.path.join(self.work, "micro.json"))}
        _write_atomic(os.path.join(self.out, "results.json"), json.dumps(result, indent=1) + "\n")
        _write_atomic(os.path.join(self.out, "summary.txt"), format_summary(result))


def _skip_caches(info):
    parts = info.name.split("/")
    return None if len(parts) > 1 and parts[1] in ("triton-cache", "cache") else info


def _signal(proc, sig):
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _tail(path, lines=2):
    try:
        with open(path, errors="replace") as f:
            text = [line for line in f.read().splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return " | ".join(line[:200] for line in text[-lines:]) or "(no output)"


def _write_atomic(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def junit_summary(folder):
    """Counts over every junit xml in folder, and the failed or erroring tests with their message."""
    total = {"files": 0, "tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "interrupted": 0,
             "failures": []}
    if not os.path.isdir(folder):
        return total
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".xml"):
            continue
        try:
            root = ET.parse(os.path.join(folder, name)).getroot()
        except (ET.ParseError, OSError):
            continue
        total["files"] += 1
        for case in root.iter("testcase"):
            if case.get("name") is None:  # the test running when SIGINT came: pytest writes it nameless
                total["interrupted"] += 1
                continue
            total["tests"] += 1
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            if bad is not None:
                total["failed" if bad.tag == "failure" else "errors"] += 1
                message = (bad.get("message") or "").strip().splitlines()
                total["failures"].append(f"{case.get('classname')}::{case.get('name')}: "
                                         f"{message[0][:300] if message else ''}")
            elif case.find("skipped") is not None:
                total["skipped"] += 1
            else:
                total["passed"] += 1
    return total


def micro_summary(path):
    data = _read_json(path)
    if not data:
        return None
    return [{"name": b.get("fullname") or b.get("name"), "median_ms": 1e3 * b["stats"]["median"],
             "extra_info": b.get("extra_info")} for b in data.get("benchmarks", [])]


def format_summary(result):
    lines = [f"gpu check{' (dry run)' if result['dry_run'] else ''}: {result['elapsed_s']}s of {result['budget_s']}s",
             f"{'step':16s} {'status':12s} {'seconds':>8s} {'limit':>6s} {'H200 est':>8s}"]
    for s in result["steps"]:
        lines.append(f"{s['name']:16s} {s['status']:12s} {s['seconds'] if s['seconds'] is not None else '-':>8} "
                     f"{s['limit_s'] if s['limit_s'] is not None else '-':>6} {s['expected_h200_s']:>8}")
    t = result["tests"]
    lines.append(f"tests: {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped, "
                 f"{t['interrupted']} interrupted ({t['files']} junit files)")
    lines += [f"  FAIL {f}" for f in t["failures"][:30]]
    for name, bench in result["bench"].items():
        if not bench:
            continue
        lines.append(f"{name}: {bench.get('card')} torch {bench.get('torch')} triton {bench.get('triton')}, "
                     f"matmul {bench.get('matmul_tflops')} TFLOP/s")
        for c in bench.get("cases", []):
            lines.append("  " + " ".join(f"{k}={_fmt(c.get(k))}" for k in (
                "case", "plain_ms", "compiled_ms", "fast_ms", "fast_over_floor", "plain_over_fast",
                "compiled_over_fast", "fast_peak_over_plain", "fast_rel_err")))
            if c.get("fast_reason"):
                lines.append(f"    fast: {c['fast_reason'][:300]}")
        for c in bench.get("meta_cases", []):
            lines.append("  " + " ".join(f"{k}={_fmt(c.get(k))}" for k in (
                "case", "reference_ms", "fast_ms", "reference_over_fast", "fast_peak_over_reference",
                "fast_peak_k8_over_k", "m0_grad_rel_err")))
            for writer in ("reference", "fast"):
                if c.get(f"{writer}_reason"):
                    lines.append(f"    {writer}: {c[f'{writer}_reason'][:300]}")
    for b in result["micro"] or []:
        lines.append(f"micro {b['name']}: {b['median_ms']:.3f} ms")
    return "\n".join(lines) + "\n"


def _fmt(value):
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def info():
    """Machine and package versions, and what a carried Triton cache must match."""
    if shutil.which("nvidia-smi"):
        subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    else:
        print("no nvidia-smi on PATH")
    import torch
    import transformers
    import triton

    print(f"python {sys.version.split()[0]} torch {torch.__version__} cuda {torch.version.cuda} "
          f"triton {triton.__version__} transformers {transformers.__version__} cpus {os.cpu_count()}")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import triton_cache

    print("triton cache key:", json.dumps(triton_cache.local_key()))
    print("CUDA_HOME", os.environ.get("CUDA_HOME"), "nvcc", shutil.which("nvcc"))
    return 0


def export(work, out):
    """triton-cache.tar.gz and csrc-build.tar.gz under out, for the next run to carry."""
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    import csrc_prebuilt
    import triton_cache

    cache = os.environ.get("TRITON_CACHE_DIR") or os.path.join(work, "triton-cache")
    print(triton_cache.pack(cache, os.path.join(out, "triton-cache.tar.gz"), max_bytes=MAX_OUT_BYTES - 2 ** 20))
    print(csrc_prebuilt.pack(ROOT, os.path.join(out, "csrc-build.tar.gz")))
    return 0


def find_cuda_home():
    """The toolkit root whose bin/ holds nvcc and lib64/ cudart (an nvcc on PATH may be a wrapper)."""
    nvcc = shutil.which("nvcc")
    roots = ["/usr/local/cuda"] + ([os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else [])
    for root in roots:
        if os.access(os.path.join(root, "bin", "nvcc"), os.X_OK) and os.path.isdir(os.path.join(root, "lib64")):
            return root
    return None


def parse_stubs(items):
    seconds = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            seconds[name] = float(value)
        except ValueError:
            raise SystemExit(f"--stub takes NAME=SECONDS, got {item!r}") from None
    return seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "/tmp/gradmem-gpu-check")
    p.add_argument("--work", default=os.environ.get("GPU_CHECK_WORK") or "/tmp/gradmem-gpu-check-work",
                   help="scratch folder for logs, junit xml, bench results and the Triton cache")
    p.add_argument("--cache", default=os.environ.get("GPU_CHECK_CACHE") or os.path.join(ROOT, ".gpu-check-cache"),
                   help="carried caches from an earlier run (triton-cache.tar.gz, csrc-build.tar.gz)")
    p.add_argument("--budget", type=float, default=float(os.environ.get("BUDGET_S", 285)))
    p.add_argument("--dry-run", action="store_true", help="stub every step (no GPU, nothing installed)")
    p.add_argument("--micro", action="store_true", help="also run the micro-benchmarks before the export")
    p.add_argument("--stub", action="append", default=[], metavar="NAME=SECONDS", help="a stub's duration")
    p.add_argument("--info", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--export", nargs=2, metavar=("WORK", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.info:
        return info()
    if args.export:
        return export(*args.export)
    if args.budget <= RESERVE_S + MIN_STEP_S:
        raise SystemExit(f"--budget must exceed {RESERVE_S + MIN_STEP_S}s, got {args.budget}")
    out, work = os.path.abspath(args.out), os.path.abspath(args.work)
    if not args.dry_run and os.environ.get("CUDA_HOME") is None and find_cuda_home():
        os.environ["CUDA_HOME"] = find_cuda_home()
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        # started as a background job: the steps would inherit an ignored SIGINT and outlive their caps
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    shutil.rmtree(work, ignore_errors=True)
    steps = plan(work, os.path.abspath(args.cache), out, micro=args.micro)
    if args.dry_run:
        steps = stubbed(steps, work, out, parse_stubs(args.stub))
    return Check(out, work, args.budget, steps, args.dry_run).run()


if __name__ == "__main__":
    sys.exit(main())
