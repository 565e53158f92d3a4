"""Command line: `python -m gradmem_fast {demo,bench,train-kv} [options]`.

Each subcommand is one function taking its own argument list and returning an exit code, listed in
COMMANDS with its one-line help; its module is imported only when it runs.
"""
import argparse
import sys


def demo(argv):
    from .demo import main

    return main(argv)


def bench(argv):
    from .benchmark.cli import main

    return main(argv)


def train_kv(argv):
    from .train_kv import main

    return main(argv)


COMMANDS = {
    "demo": (demo, "write a context on a small seeded model and print the per-step loss"),
    "bench": (bench, "write latency on the standard cases against the plain loop and the FLOP floor"),
    "train-kv": (train_kv, "meta-train a writer on key-value retrieval and plot exact match against write steps"),
}


def parser():
    from . import __version__

    p = argparse.ArgumentParser(
        prog="python -m gradmem_fast",
        description="Write a context into a frozen causal LM's memory by test-time gradient descent.",
        epilog="commands:\n" + "\n".join(f"  {name:<8} {help}" for name, (_, help) in COMMANDS.items())
        + "\n\n`python -m gradmem_fast COMMAND --help` lists a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"gradmem_fast {__version__}")
    p.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help=", ".join(COMMANDS))
    p.add_argument("args", nargs=argparse.REMAINDER, help="the command's options")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = parser()
    try:
        if not argv:
            p.error("a COMMAND is required: " + ", ".join(COMMANDS))
        args = p.parse_args(argv)
    except SystemExit as exc:  # --help and --version exit 0 (stdout); usage errors exit 2 (stderr)
        return exc.code if isinstance(exc.code, int) else 2
    run, _ = COMMANDS[args.command]
    return run(args.args)


if __name__ == "__main__":
    sys.exit(main())
