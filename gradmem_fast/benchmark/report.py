"""Table, JSON and bar chart of a benchmark result."""
import json
import os
import re
import xml.etree.ElementTree as ET

from . import targets

WRITERS = (("plain", "plain loop"), ("compiled", "compiled loop"), ("reference", "reference"),
           ("fast", "fast"), ("floor", "FLOP floor"))


def card_slug(card):
    """A card name as a file-name part: lower case, runs of other characters as one '-'."""
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")
    return slug or "unknown"


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def format_table(result):
    head = (f"card: {result['card']}  torch {result['torch']}  triton {result['triton']}  "
            f"bf16 matmul: {_fmt(result['matmul_tflops'], '.1f')} TFLOP/s")
    cols = ("case", "plain ms", "compiled ms", "reference ms", "fast ms", "floor ms", "fast/floor",
            "plain/fast", "compiled/fast", "plain GB", "fast GB", "fast rel err")
    rows = [cols]
    for c in result["cases"]:
        rows.append((c["case"], _fmt(c["plain_ms"], ".2f"), _fmt(c["compiled_ms"], ".2f"),
                     _fmt(c["reference_ms"], ".2f"), _fmt(c["fast_ms"], ".2f"), _fmt(c["floor_ms"], ".2f"),
                     _fmt(c["fast_over_floor"], ".2f"), _fmt(c["plain_over_fast"], ".2f"),
                     _fmt(c["compiled_over_fast"], ".2f"), _fmt(c["plain_peak_gb"], ".2f"),
                     _fmt(c["fast_peak_gb"], ".2f"), _fmt(c["fast_rel_err"], ".2e")))
    lines = [head] + _table(rows)
    for c in result["cases"]:
        for name in ("plain", "compiled", "reference", "fast"):
            reason = c.get(f"{name}_reason")
            if c.get(f"{name}_ms") is None and reason:
                lines.append(f"{c['case']}: {name} not measured: {reason}")
    for c in result["cases"]:
        lines += targets.format_checks(c)
    lines += _meta_table(result.get("meta_cases") or [])
    lines += result.get("notes") or []
    tests = result.get("gpu_tests")
    if tests:
        lines.append(f"GPU tests: {tests['passed']} passed, {tests['failed']} failed, "
                     f"{tests['skipped']} skipped")
    return "\n".join(lines)


def _table(rows):
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]


def _meta_table(meta):
    """Lines for the meta-step cases: times, peaks, their ratios, the M0 gradient agreement, the targets."""
    if not meta:
        return []
    rows = [("meta case", "reference ms", "fast ms", "reference/fast", "reference GB", "fast GB",
             "fast/reference GB", "fast GB K=8 / K", "M0 grad rel err", "recompute nodes", "recompute MB")]
    for c in meta:
        rows.append((c["case"], _fmt(c["reference_ms"], ".2f"), _fmt(c["fast_ms"], ".2f"),
                     _fmt(c["reference_over_fast"], ".2f"), _fmt(c["reference_peak_gb"], ".2f"),
                     _fmt(c["fast_peak_gb"], ".2f"), _fmt(c["fast_peak_over_reference"], ".2f"),
                     _fmt(c["fast_peak_k8_over_k"], ".2f"), _fmt(c["m0_grad_rel_err"], ".2e"),
                     str(c["recompute_step_nodes"]), _fmt(c["recompute_step_saved_bytes"] / 1e6, ".1f")))
    lines = _table(rows)
    for c in meta:
        for name in ("reference", "fast"):
            if c.get(f"{name}_ms") is None and c.get(f"{name}_reason"):
                lines.append(f"{c['case']}: {name} not measured: {c[f'{name}_reason']}")
        lines += targets.format_checks(c)
    return lines


def write_json(result, out_dir):
    """Writes <card>-<date>.json and latest.json under out_dir; returns the dated path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{card_slug(result['card'])}-{result['date']}.json")
    text = json.dumps(result, indent=2, sort_keys=False) + "\n"
    for target in (path, os.path.join(out_dir, "latest.json")):
        with open(target, "w") as f:
            f.write(text)
    return path


def plot(result, png_path):
    """Bar chart of ms per case and writer (log scale). Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = result["cases"] + (result.get("meta_cases") or [])
    width = 0.8 / len(WRITERS)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases)), 4.5))
    for i, (key, label) in enumerate(WRITERS):
        xs, ys = [], []
        for j, c in enumerate(cases):
            value = c.get(f"{key}_ms")
            if value is not None:
                xs.append(j + (i - (len(WRITERS) - 1) / 2) * width)
                ys.append(value)
        ax.bar(xs, ys, width, label=label)
    ax.set_xticks(range(len(cases)), [c["case"] for c in cases], rotation=20, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("ms per write or meta step (median)")
    ax.set_title(f"{result['card']}, torch {result['torch']}, {result['date']}")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


def read_gpu_tests(path):
    """{"passed", "failed", "skipped"} from a pytest junit xml or a pytest summary text."""
    with open(path) as f:
        text = f.read()
    if text.lstrip().startswith("<"):
        root = ET.fromstring(text)
        suites = [root] if root.tag == "testsuite" else root.iter("testsuite")
        total = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        for suite in suites:
            for key in total:
                total[key] += int(suite.get(key, 0))
        failed = total["failures"] + total["errors"]
        return {"passed": total["tests"] - failed - total["skipped"], "failed": failed,
                "skipped": total["skipped"]}
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    summary = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    if not summary:
        raise ValueError(f"no pytest junit xml or summary line in {path!r}")
    for number, word in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", summary[-1]):
        if word in ("passed", "skipped"):
            counts[word] += int(number)
        elif word != "deselected":
            counts["failed"] += int(number)
    return counts


def sum_gpu_tests(paths):
    """read_gpu_tests over several files (one per parallel pytest run), counts summed."""
    total = {"passed": 0, "failed": 0, "skipped": 0}
    for path in paths:
        for key, value in read_gpu_tests(path).items():
            total[key] += value
    return total
