"""Command line: `python -m gradmem_fast demo|bench [options]`."""
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    commands = {"demo": "gradmem_fast.demo", "bench": "gradmem_fast.benchmark.cli",
                "train-kv": "gradmem_fast.train_kv"}
    if not argv or argv[0] not in commands:
        print("usage: python -m gradmem_fast {demo,bench,train-kv} [options]\n"
              "  demo   write a context on a small seeded model and print the per-step loss\n"
              "  bench  write latency on the standard cases against the plain loop and the FLOP floor\n"
              "  train-kv  meta-train a writer on key-value retrieval (python -m gradmem_fast train-kv -h)",
              file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(commands[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
