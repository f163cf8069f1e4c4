"""``make bench-compare``: a benchmark run against the committed results for the same GPU.

Records are matched by their key (kernels: op, mode, n, T, C; blocks: variant, n, T, C). The time compared is the
CUPTI kernel time when both runs have it, else the median per call. A record slower by more than ``threshold``
(default 10%) prints a ``FLAG`` line and makes the exit status 1; faster ones are listed as improvements; records
only in one run are counted. Runs on different devices are refused (the comparison would mean nothing).

Exit status: 0 when something was compared and nothing is slower, 1 when anything is slower, 2 when there is
nothing to compare: no committed results for this GPU, no CUDA GPU to make a current run on (the committed results
are GPU timings), or two runs without a record in common. Each of those says so on one line.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

THRESHOLD = 0.10
#: exit status of a comparison that compared nothing (module docstring)
NOTHING_TO_COMPARE = 2


@dataclass(frozen=True)
class Change:
    key: tuple
    metric: str
    before_us: float
    after_us: float

    @property
    def ratio(self) -> float:
        return self.after_us / self.before_us

    def describe(self) -> str:
        what = " ".join(str(k) for k in self.key)
        return f"{what}: {self.before_us:.1f} -> {self.after_us:.1f} µs ({100 * (self.ratio - 1):+.1f}%, {self.metric})"


def kernel_key(r: dict) -> tuple:
    return ("kernel", r["op"], r["mode"], f"n={r.get('n')}", f"T={r['T']}", f"C={r['C']}")


def block_key(r: dict) -> tuple:
    return ("block", r["variant"], f"n={r.get('n')}", f"T={r['T']}", f"C={r['C']}")


def _index(result: dict) -> dict[tuple, dict]:
    out = {kernel_key(r): r for r in result.get("records", [])}
    out.update({block_key(r): r for r in result.get("block", [])})
    return out


def _time(before: dict, after: dict) -> tuple[str, float, float] | None:
    for metric in ("kernel_us", "us"):
        b, a = before.get(metric), after.get(metric)
        if b is not None and a is not None and b > 0:
            return metric, float(b), float(a)
    return None


def compare(baseline: dict, current: dict, threshold: float = THRESHOLD) -> dict:
    """``{"slower": [Change], "faster": [Change], "same": int, "only_baseline": [key], "only_current": [key]}``."""
    dev_b, dev_c = baseline.get("meta", {}).get("device"), current.get("meta", {}).get("device")
    if dev_b != dev_c:
        raise ValueError(f"bench-compare: baseline ran on {dev_b!r}, current on {dev_c!r}: not comparable")
    old, new = _index(baseline), _index(current)
    report = {"slower": [], "faster": [], "same": 0, "only_baseline": sorted(set(old) - set(new)),
              "only_current": sorted(set(new) - set(old))}  # fmt: skip
    for key in sorted(set(old) & set(new)):
        t = _time(old[key], new[key])
        if t is None:
            continue
        change = Change(key, *t)
        if change.ratio > 1 + threshold:
            report["slower"].append(change)
        elif change.ratio < 1 / (1 + threshold):
            report["faster"].append(change)
        else:
            report["same"] += 1
    return report


def render(report: dict, threshold: float = THRESHOLD) -> str:
    lines = []
    lines += [f"FLAG slower by more than {threshold:.0%}: {c.describe()}" for c in report["slower"]]
    lines += [f"faster: {c.describe()}" for c in report["faster"]]
    lines.append(
        f"bench-compare: {len(report['slower'])} slower, {len(report['faster'])} faster, {report['same']} within "
        f"{threshold:.0%}; {len(report['only_baseline'])} only in the baseline, {len(report['only_current'])} only "
        "in this run"
    )
    return "\n".join(lines)


def load(path: pathlib.Path) -> dict:
    path = pathlib.Path(path)
    return json.loads((path / "bench.json" if path.is_dir() else path).read_text())


def main_compare(baseline_path, current_path, threshold: float = THRESHOLD) -> int:
    """Prints the comparison; 1 when anything is slower by more than ``threshold``, 2 when nothing was compared (no
    baseline, or no record in both runs)."""
    baseline_path = pathlib.Path(baseline_path)
    if not (baseline_path / "bench.json" if baseline_path.is_dir() else baseline_path).is_file():
        print(f"bench-compare: no committed results at {baseline_path}: nothing to compare against (exit 2)")
        return NOTHING_TO_COMPARE
    report = compare(load(baseline_path), load(current_path), threshold)
    print(render(report, threshold))
    if not (report["slower"] or report["faster"] or report["same"]):
        print("bench-compare: the two runs have no timed record in common: nothing was compared (exit 2)")
        return NOTHING_TO_COMPARE
    return 1 if report["slower"] else 0
