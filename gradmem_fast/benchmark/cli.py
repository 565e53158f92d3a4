"""`python -m gradmem_fast bench`: write latency of the standard cases, table + JSON + PNG."""
import argparse
import json
import os
import sys

from . import cases as cases_mod
from . import meta_cases
from . import report

DEFAULT_OUT = os.path.join("benchmarks", "results")


def _parser():
    p = argparse.ArgumentParser(prog="python -m gradmem_fast bench", description=__doc__)
    p.add_argument("--cases", help=f"comma-separated subset of the write cases {', '.join(cases_mod.CASE_NAMES)} "
                                   f"(default: all of them) and the meta-step cases "
                                   f"{', '.join(meta_cases.META_CASE_NAMES)} (second-order write, read loss, "
                                   "backward; only when named)")
    p.add_argument("--quick", action="store_true",
                   help="1 warm-up, 3 repeats; compiled loop for the two latency LM cases only")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="also time the loop under torch.compile(mode='reduce-overhead') for every case")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="never time the compiled loop")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (only with --quick: smoke run)")
    p.add_argument("--warmup", type=int, help="warm-up writes per writer (default 2, quick 1)")
    p.add_argument("--repeats", type=int, help="timed writes per writer (default 5, quick 3)")
    p.add_argument("--batch", type=int, help="override B of every selected case (smoke runs)")
    p.add_argument("--context", type=int, help="override T of every selected case (smoke runs)")
    p.add_argument("--out-dir", default=DEFAULT_OUT, help=f"where JSON and PNG go (default {DEFAULT_OUT})")
    p.add_argument("--gpu-tests", metavar="FILE", nargs="+",
                   help="pytest junit xml files or summaries whose counts, summed, fill gpu_tests")
    p.add_argument("--profile", action="store_true",
                   help="also profile one fast write per case (torch.profiler): busy time, launches, top kernels")
    p.add_argument("--plot", metavar="FILE.json", help="only draw the PNG of an existing result JSON")
    p.add_argument("--png", metavar="FILE.png", help="PNG path (default: beside the JSON)")
    return p


def _plot_only(json_path, png_path):
    with open(json_path) as f:
        result = json.load(f)
    png_path = png_path or os.path.splitext(json_path)[0] + ".png"
    try:
        report.plot(result, png_path)
    except ImportError:
        print("matplotlib is not importable: cannot draw the chart", file=sys.stderr)
        return 1
    print(f"wrote {png_path}")
    return 0


def _select(args, is_cuda):
    """(write cases, meta-step cases) selected by --cases, resized by --batch / --context."""
    if args.cases:
        names = [n.strip() for n in args.cases.split(",") if n.strip()]
    else:
        names = list(cases_mod.CASE_NAMES) if is_cuda else [cases_mod.SMALLEST]
    for value, flag in ((args.batch, "--batch"), (args.context, "--context")):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    meta = [meta_cases.get_meta_case(n).resized(B=args.batch, T=args.context)
            for n in names if n in meta_cases.META_CASE_NAMES]
    write = [cases_mod.get_case(n).resized(B=args.batch, T=args.context)
             for n in names if n not in meta_cases.META_CASE_NAMES]
    return write, meta


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        argv = argv[1:]
    args = _parser().parse_args(argv)
    if args.plot:
        return _plot_only(args.plot, args.png)

    import torch

    is_cuda = args.device.startswith("cuda")
    if is_cuda and not torch.cuda.is_available():
        print("no CUDA device: the write benchmark needs a GPU "
              "(use --device cpu --quick for a CPU smoke run of the smallest case)", file=sys.stderr)
        return 1
    if not is_cuda and not args.quick:
        print(f"--device {args.device} runs only as a smoke run: add --quick", file=sys.stderr)
        return 1
    try:
        case_list, meta_case_list = _select(args, is_cuda)
        gpu_tests = report.sum_gpu_tests(args.gpu_tests) if args.gpu_tests else None
    except (ValueError, OSError) as exc:
        print(str(exc), file=sys.stderr)
        return 2

    if args.compile is False or not is_cuda:
        compile_cases = ()
    elif args.compile:
        compile_cases = tuple(c.name for c in case_list)
    elif args.quick:
        from .runner import QUICK_COMPILE

        compile_cases = QUICK_COMPILE
    else:
        compile_cases = ()
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 5)

    from .profile import format_profile
    from .runner import run

    paths = {}

    def save(result):
        paths["json"] = report.write_json(result, args.out_dir)

    result = run(case_list, args.device, warmup=warmup, repeats=repeats, compile_cases=compile_cases,
                 gpu_tests=gpu_tests, profile=args.profile, on_case=save, log=lambda s: print(s, flush=True),
                 meta_case_list=meta_case_list)
    result["quick"] = args.quick
    save(result)
    print(report.format_table(result))
    for case in result["cases"]:
        if "fast_profile" in case:
            print(format_profile(case["case"], case["fast_profile"]))
    print(f"wrote {paths['json']} and latest.json")
    png = args.png or os.path.splitext(paths["json"])[0] + ".png"
    try:
        report.plot(result, png)
        print(f"wrote {png}")
    except ImportError:
        print(f"matplotlib is not importable: no chart; draw it later with "
              f"`python -m gradmem_fast bench --plot {paths['json']}`")
    baseline_missing = any(c["plain_ms"] is None for c in result["cases"])
    baseline_missing |= any(c["reference_ms"] is None for c in result["meta_cases"])
    return 1 if baseline_missing else 0
