"""pytest plugin: `-p pytest_shard --shard I/N` keeps every N-th selected test starting at the I-th.

Loaded from scripts/ (on PYTHONPATH) by run_gpu_tests.py, which starts N pytest processes on one
target list so that the Triton compiles of a GPU run spread over the machine's cores. It runs after
`-m` has deselected, so the N shards split the selected tests, not the whole collection.
"""
import pytest


def parse_shard(text):
    """'I/N' -> (I, N) with 0 <= I < N; ValueError naming the text otherwise."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must be I/N with integers, got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard I/N needs N >= 1 and 0 <= I < N, got {text!r}")
    return index, count


def pytest_addoption(parser):
    parser.addoption("--shard", default=None, metavar="I/N", help="keep every N-th selected test from the I-th")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    text = config.getoption("--shard")
    if text is None:
        return
    index, count = parse_shard(text)
    keep = [item for k, item in enumerate(items) if k % count == index]
    drop = [item for k, item in enumerate(items) if k % count != index]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
