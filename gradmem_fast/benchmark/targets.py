"""What each standard case must reach, and the plain loop as measured on an H200: data, not prose.

benchmarks/PERFORMANCE.md explains these numbers; a test keeps its tables and this file equal.
Every target is a ratio measured in one run on one card (absolute times move between cards of
the same model: the same plain loop took 67.9 ms on one H200 and 90.4 ms on another).
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    case: str
    fast_over_floor_max: float = None  # fast ms / FLOP-floor ms at most
    plain_over_fast_min: float = None  # plain-loop ms / fast ms at least
    compiled_over_fast_min: float = None  # reduce-overhead compiled loop ms / fast ms at least
    peak_over_plain_max: float = None  # fast peak memory / plain-loop peak memory at most


TARGETS = (
    Target("gpt2-latency", 3.0, 12.0, 2.0, 1.0),
    Target("gpt2-batch", 1.6, 3.5, None, 0.35),
    Target("llama1b-latency", 1.5, 3.0, 1.5, 1.0),
    Target("llama1b-batch", 1.4, 1.6, None, 0.35),
    Target("kv-paper", None, 15.0, None, 1.0),
    Target("kv-latency", None, 15.0, None, 1.0),
)

# The plain loop on one NVIDIA H200 (torch 2.11.0+cu130, transformers 5.17, CUDA events, median of 5
# after 2 warm-ups): case -> (plain ms, floor ms or None, peak GB or None).
PLAIN_LOOP_H200 = {
    "gpt2-latency": (67.9, 1.81, 0.9),
    "gpt2-batch": (336.0, 59.6, 17.8),
    "llama1b-latency": (167.0, 35.0, 5.3),
    "llama1b-batch": (1320.0, 581.0, 48.8),
    "kv-paper": (136.0, None, None),
    "kv-latency": (43.9, None, None),
}



@dataclass(frozen=True)
class MetaTarget:
    case: str
    reference_over_fast_min: float = None  # reference second-order meta step ms / fast ms at least
    peak_over_reference_max: float = None  # fast peak memory / reference peak memory at most
    peak_k8_over_k_max: float = None  # fast peak at K = 8 / fast peak at the case's K at most (flat in K)


META_TARGETS = (
    MetaTarget("meta-gpt2", 3.0, 0.5, 1.1),
    MetaTarget("meta-kv", 5.0, None, 1.1),
)

# The reference's second-order meta step (write with grad_mode="second", read loss, backward) on one
# NVIDIA H200: case -> (ms, peak GB); None where not measured.
REFERENCE_META_H200 = {
    "meta-gpt2": (209.0, 21.6),
    "meta-kv": (None, None),
}

_CHECKS = (("fast_over_floor", "fast_over_floor_max", "<="), ("plain_over_fast", "plain_over_fast_min", ">="),
           ("compiled_over_fast", "compiled_over_fast_min", ">="),
           ("fast_peak_over_plain", "peak_over_plain_max", "<="))
_META_CHECKS = (("reference_over_fast", "reference_over_fast_min", ">="),
                ("fast_peak_over_reference", "peak_over_reference_max", "<="),
                ("fast_peak_k8_over_k", "peak_k8_over_k_max", "<="))


def get_target(case):
    """The Target or MetaTarget of a case name, None for a case without targets."""
    for target in TARGETS + META_TARGETS:
        if target.case == case:
            return target
    return None


def check(entry):
    """[(measure, bound, op, value, met)] for one case's result entry; met is None when unmeasured."""
    target = get_target(entry["case"])
    if target is None:
        return []
    rows = []
    for measure, field, op in (_META_CHECKS if isinstance(target, MetaTarget) else _CHECKS):
        bound = getattr(target, field)
        if bound is None:
            continue
        value = entry.get(measure)
        met = None if value is None else (value <= bound if op == "<=" else value >= bound)
        rows.append((measure, bound, op, value, met))
    return rows


def format_checks(entry):
    """One line per target of the case: 'gpt2-latency: plain_over_fast 14.1 >= 12 met'."""
    lines = []
    for measure, bound, op, value, met in check(entry):
        shown = "-" if value is None else f"{value:.2f}"
        verdict = "unmeasured" if met is None else ("met" if met else "MISSED")
        lines.append(f"{entry['case']}: {measure} {shown} (target {op} {bound:g}) {verdict}")
    return lines
