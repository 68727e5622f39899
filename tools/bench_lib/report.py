"""Medians, ratios to gocryptfs, target checks, and the Markdown / JSON report."""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from .system import MiB
from .workloads import METRICS

BASELINE = "gocryptfs"
# Each results section of docs/benchmarks.md sits between these markers, keyed by section name
# (tools/bench --section; "full" or "quick" by default).
BEGIN = "<!-- BEGIN RESULTS {} (written by tools/bench; edit the text outside these markers) -->"
END = "<!-- END RESULTS {} -->"


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "–"
    if unit in ("IOPS", "ops/s", "commits/s"):
        return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"
    if unit == "s":
        return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.0f}"
    return f"{value:,.1f}" if value < 1000 else f"{value:,.0f}"


@dataclass
class Target:
    text: str
    metrics: tuple[str, ...]
    kind: str  # "ratio_min" (value/goc >= x), "ratio_max" (value/goc <= x), "abs_max", "cryfs"
    limit: float = 0.0

    def check(self, med: dict[str, dict[str, float | None]], fs: str) -> tuple[str, bool | None]:
        """(detail, passed) for one filesystem; passed is None when there is nothing to judge."""
        parts, verdicts = [], []
        for key in self.metrics:
            m = METRICS[key]
            v = med.get(fs, {}).get(key)
            if v is None:
                continue
            if self.kind == "abs_max":
                ok = v < self.limit
                parts.append(f"{fmt(v, m.unit)} {m.unit}")
            elif self.kind == "cryfs":
                c = med.get("cryfs", {}).get(key)
                if c is None:
                    continue
                ok = v > c if m.higher_is_better else v < c
                if not ok:
                    parts.append(f"{key} {fmt(v, m.unit)} vs {fmt(c, m.unit)}")
            else:
                g = med.get(BASELINE, {}).get(key)
                if not g:
                    continue
                r = v / g
                ok = r >= self.limit if self.kind == "ratio_min" else r <= self.limit
                parts.append(f"{key} {r:.2f}x")
            verdicts.append(ok)
        if not verdicts:
            return "–", None
        passed = all(verdicts)
        if self.kind == "cryfs":
            detail = f"{sum(verdicts)}/{len(verdicts)} ahead" + (
                f" (behind: {'; '.join(parts)})" if parts else ""
            )
        else:
            detail = ", ".join(parts)
        return detail, passed


SMALL = ("small_create", "small_stat", "small_delete", "tree_total")
TARGETS = [
    Target(
        "seq write & read ≥ 0.8x gocryptfs (target at 1 GiB)",
        ("seq_write", "seq_read"),
        "ratio_min",
        0.8,
    ),
    Target(
        "seq write & read ≥ 0.5x gocryptfs (core target at 512 MiB)",
        ("seq_write", "seq_read"),
        "ratio_min",
        0.5,
    ),
    Target("sustained write cycle ≥ 1.0x gocryptfs (issue 15)", ("cycle",), "ratio_min", 1.0),
    Target("small-file workloads ≤ 2x gocryptfs's time", SMALL, "ratio_max", 2.0),
    Target(
        "untar + ls -lR + rm -rf ≤ 3x gocryptfs's time (core)", ("tree_total",), "ratio_max", 3.0
    ),
    Target("daemon RSS < 200 MiB during the big write", ("rss_peak",), "abs_max", 200.0),
    Target(
        "ahead of CryFS on every workload", tuple(k for k in METRICS if k != "rss_peak"), "cryfs"
    ),
]


def medians(results: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float | None]]:
    return {fs: {k: median(v) for k, v in per.items()} for fs, per in results.items()}


def results_table(data: dict) -> str:
    """Markdown table: one row per metric, one column per filesystem, ratio to gocryptfs."""
    fss = data["filesystems"]
    med = data["medians"]
    errors = data["errors"]
    header = "| workload | unit | " + " | ".join(data["labels"][f] for f in fss) + " |"
    lines = [header, "|---|---|" + "---:|" * len(fss)]
    shown = [
        k
        for k in METRICS
        if any(med.get(f, {}).get(k) is not None for f in fss)
        or any(data["metric_workload"][k] in errors.get(f, {}) for f in fss)
    ]
    for key in shown:
        m = METRICS[key]
        arrow = "↑" if m.higher_is_better else "↓"
        cells = []
        for f in fss:
            v = med.get(f, {}).get(key)
            wl = data["metric_workload"][key]
            if v is None:
                if wl in errors.get(f, {}):
                    cells.append("failed")
                elif f in data.get("dead", ()) and wl in data["workloads"]:
                    cells.append("skipped")
                elif f == "plain" and key == "rss_peak":
                    cells.append("n/a")
                else:
                    cells.append("–")
                continue
            cell = fmt(v, m.unit)
            g = med.get(BASELINE, {}).get(key)
            if f != BASELINE and g and key != "rss_peak":
                cell += f" ({v / g:.2f}x)"
            cells.append(cell)
        lines.append(f"| {m.label} | {m.unit} {arrow} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets_table(data: dict) -> str:
    fss = [f for f in data["filesystems"] if f.startswith("sealfs")]
    med = data["medians"]
    if not fss or not any(med.get(f) for f in fss):
        return "_No sealfs figures yet._"
    lines = [
        "| target | " + " | ".join(data["labels"][f] for f in fss) + " |",
        "|---|" + "---|" * len(fss),
    ]
    for t in TARGETS:
        cells = []
        for f in fss:
            detail, ok = t.check(med, f)
            mark = "–" if ok is None else ("**pass**" if ok else "**FAIL**")
            cells.append(f"{mark} {detail}" if ok is not None else mark)
        lines.append(f"| {t.text} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def errors_text(data: dict) -> str:
    out = []
    for fs, per in data["errors"].items():
        for wl, msg in per.items():
            out.append(f"- {data['labels'].get(fs, fs)} / {wl}: {msg}")
    return "\n".join(out)


def sizes_text(data: dict) -> str:
    p, w = data["params"], set(data["workloads"])
    parts = []
    if w & {"seqwrite", "seqread"}:
        parts.append(f"sequential {p['seq_size'] // MiB} MiB")
    if "cycle" in w:
        parts.append(f"sustained cycle 2 × {p['cycle_size'] // MiB} MiB")
    if w & {"randread", "randwrite"}:
        parts.append(
            f"random I/O {p['rand_io'] // MiB} MiB of 4 KiB requests on a "
            f"{p['rand_file'] // MiB} MiB file"
        )
    if "smallfiles" in w:
        parts.append(f"{p['small_count']:,} small files of {p['small_size']} B")
    if "tree" in w:
        parts.append(f"source tree {p['tree_name']} ({p['tree_files']:,} files)")
    if "dd512" in w:
        parts.append(f"dd {p['dd_bytes'] / MiB:g} MiB in 512 B writes")
    if "appends" in w:
        parts.append(f"{p['append_count']:,} appends")
    if "sqlite" in w:
        parts.append(f"{p['sqlite_commits']:,} SQLite transactions of {p['sqlite_rows']} rows")
    return "; ".join(parts)


def markdown(data: dict) -> str:
    m = data["machine"]
    v = data["versions"]
    lines = [
        f"### Results of {data['started']} ({data.get('section', 'full')} run)",
        "",
        f"Command: `{data['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores (AES-NI: {m['aes_ni']}), {m['memory']} RAM, "
        f"kernel {m['kernel']}, {m['os']}; backing disk {m['backing_fs']}; "
        f"load average {m['loadavg']} at start, {data['loadavg_end']} at end.",
        "",
        "Versions: " + "; ".join(f"{k}: {val}" for k, val in v.items() if val) + ".",
        "",
        "Sizes: " + sizes_text(data) + ". "
        f"Median of {data['reps']} repetition(s); ratios are to gocryptfs in the same run "
        "(↑ higher is better, ↓ lower is better).",
        "",
        results_table(data),
        "",
        "Targets (sealfs, ratios to gocryptfs in this run):",
        "",
        targets_table(data),
    ]
    errs = errors_text(data)
    if errs:
        lines += ["", "Failures:", "", errs]
    if data.get("notes"):
        lines += ["", *data["notes"]]
    return "\n".join(lines) + "\n"


def write_doc(path: Path, key: str, section: str) -> None:
    """Replace the results section ``key`` of docs/benchmarks.md (between its markers); a new
    key gets a new section at the end of the file."""
    begin, end = BEGIN.format(key), END.format(key)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin not in text or end not in text:
        text = text.rstrip() + f"\n\n## Results: {key}\n\n{begin}\n{end}\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: f"{begin}\n{section.rstrip()}\n{end}", text, count=1)
    path.write_text(text)
