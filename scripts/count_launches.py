"""Device launches per write step of the standard cases, counted on the CPU (gradmem_fast.engine.launches).

Runs every op on its kernel: Triton under the interpreter, the csrc ops through the CPU emulator of
tests/csrc_emulation (built on first use). Widths are tiny; layer counts, families, B and dtypes are the
cases' own. Usage: python scripts/count_launches.py [case ...] [--ops]
"""
import argparse
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "csrc_emulation"))


def use_emulated_csrc():
    """Points the csrc ops' loader at the emulated build (as tests/csrc_emulation/conftest.py does)."""
    import emu_build

    from gradmem_fast import _ext

    reason = emu_build.missing_reason()
    if reason is not None:
        raise SystemExit(f"emulated csrc build unavailable: {reason}")
    emu_ops = emu_build.build()
    _ext.load = lambda: emu_ops
    _ext.cuda_op_reason = lambda *tensors: None


def main(argv=None):
    from gradmem_fast.benchmark.cases import CASE_NAMES, get_case
    from gradmem_fast.benchmark.launch_counts import count_case

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", default=list(CASE_NAMES))
    parser.add_argument("--ops", action="store_true", help="list the launches of each phase by op")
    args = parser.parse_args(argv)
    use_emulated_csrc()
    print(f"{'case':16} {'B':>3} {'L':>3} {'plan':>5} {'step':>5} {'aten':>5} {'triton':>6} {'csrc':>5} "
          f"{'layer':>5} {'layer0':>6} {'head':>5} {'memory':>6} {'update':>6}")
    for name in args.cases:
        case = get_case(name)
        plan, step = count_case(case)
        kinds, phases, per_layer = step.by("kind"), step.by("phase"), step.per_layer()
        layer = per_layer[0] if per_layer and len(set(per_layer)) == 1 else per_layer
        print(f"{name:16} {case.B:>3} {len(per_layer) + 1:>3} {plan.total():>5} {step.total():>5} "
              f"{kinds['aten']:>5} {kinds['triton']:>6} {kinds['csrc']:>5} {str(layer):>5} {phases['layer0']:>6} "
              f"{phases['head']:>5} {phases['memory']:>6} {phases['update']:>6}")
        if args.ops:
            for phase in ("memory", "layer0", "layer 1", "head", "update", "other"):
                ops = sorted((f"{k}:{op}", n) for (p, k, op), n in step.counts.items() if p == phase)
                if ops:
                    print(f"    {phase:8} " + ", ".join(f"{op} x{n}" if n > 1 else op for op, n in ops))


if __name__ == "__main__":
    main()
