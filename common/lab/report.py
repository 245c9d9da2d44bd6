"""The report of a lab run: the JSON contract, the printed table, the timeline picture.

Owns `results/<run>.json` (copied to `results/latest.json`), whose fields other tools read:
architecture, clients, duration_s, ops {ok, failed, unknown}, throughput_ops_s (acknowledged
operations per second as the clients saw them), applied_ops_s (operations applied at every replica
per second, from the replicas' own counts), latency_ms {p50, p95, p99}, faults (what was injected
and when), anomalies (type -> count), verdict ("valid" | "invalid") and reference (the echo figure
of the same run). Extra fields may be added; none of these is ever renamed or removed. Among them:
cpu_us_per_op (CPU microseconds per acknowledged operation, by process) and loop_stalls (by
process: how often its event loop ran LOOP_STALL_THRESHOLD_MS or more late during the run, for how
long in all, and the largest lag since the process started; null for a process that could not be
asked, e.g. still paused when the run ended): while a process stalls, every operation that needs it
waits; stores_deleted (a valid run's SQLite stores are deleted unless kept) and older_runs_removed
(run directories and histories beyond the lab's bounds, see common/lab/runner.py).

The timeline is an SVG drawn by hand (no plotting library): throughput and latency per time bucket,
with the fault windows shaded, so a person can see what a partition did.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from common.lab.workload import OpRecord
from common.transport.aio import LOOP_STALL_THRESHOLD_MS

REPORT_FIELDS = (
    "architecture", "clients", "duration_s", "ops", "throughput_ops_s", "applied_ops_s",
    "latency_ms", "faults", "anomalies", "verdict", "reference",
)


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values; 0.0 for none."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_summary(history: list[OpRecord]) -> dict:
    latencies = sorted(r.latency_ms for r in history if r.outcome != "unknown")
    return {
        "p50": round(percentile(latencies, 0.50), 3),
        "p95": round(percentile(latencies, 0.95), 3),
        "p99": round(percentile(latencies, 0.99), 3),
        "max": round(latencies[-1], 3) if latencies else 0.0,
    }


def write_report(report: dict, results_dir: Path) -> Path:
    for name in REPORT_FIELDS:
        assert name in report, f"report lacks {name}"
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{report['run']}.json"
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    shutil.copyfile(path, results_dir / "latest.json")
    return path


def _describe_fault(fault: dict, run_window_s: list[float] | None) -> str:
    """"kill replica1@2.936s until 5.819s (30% to 66% into the run)": times count from the lab's
    start (seeding included, as in the history); the shares from the workload's."""
    text = f"{fault['action']} {fault.get('target', '')}".strip() + f"@{fault['at_s']}s"
    until_s = fault.get("until_s")
    lasting = type(until_s) in (int, float) and until_s > fault["at_s"]
    if lasting:
        text += f" until {until_s}s"
    if run_window_s and run_window_s[1] > run_window_s[0]:
        start_s, end_s = run_window_s
        shares = [fault["at_s"]] + ([until_s] if lasting else [])
        text += " (" + " to ".join(f"{(t - start_s) / (end_s - start_s):.0%}" for t in shares) + " into the run)"
    return text


def _describe_stalls(loop_stalls: dict) -> str:
    parts = [f"{name} not read" if n is None else f"{name} {n['stalls']} ({n['stalled_ms']:,.0f} ms)"
             for name, n in loop_stalls.items() if n is None or n["stalls"]]
    return ", ".join(parts) or f"none of {LOOP_STALL_THRESHOLD_MS:g} ms or more"


def format_table(report: dict) -> str:
    ops = report["ops"]
    latency = report["latency_ms"]
    reference = report.get("reference") or {}
    anomalies = {k: v for k, v in report["anomalies"].items() if v}
    faults = ", ".join(_describe_fault(f, report.get("run_window_s")) for f in report["faults"]) or "none"
    rows = [
        ("architecture", report["architecture"] + (f" ({report['variant']})" if report.get("variant") else "")),
        ("clients", f"{report['clients']} x window {report.get('window', 1)}"),
        *([("mix", report["mix"])] if report.get("mix") else []),
        ("duration", f"{report['duration_s']:.1f} s"),
        ("operations", f"ok {ops['ok']}  failed {ops['failed']}  unknown {ops['unknown']}"),
        ("throughput", f"{report['throughput_ops_s']:,.0f} ops/s acknowledged, {report['applied_ops_s']:,.0f} ops/s applied at every replica"),
        ("latency", f"p50 {latency['p50']:.3f} ms  p95 {latency['p95']:.3f} ms  p99 {latency['p99']:.3f} ms"),
    ]
    if reference.get("echo_ops_s"):
        rows.append(("reference", f"echo {reference['echo_ops_s']:,.0f} ops/s; this run {reference['ratio']:.2f} of it"))
    if "loop_stalls" in report:
        rows.append(("loop stalls", _describe_stalls(report["loop_stalls"])))
    rows.append(("faults", faults))
    rows.append(("anomalies", ", ".join(f"{k} {v}" for k, v in anomalies.items()) or "none"))
    verdict = report["verdict"].upper()
    if report.get("anomalies_expected"):
        verdict += f" (expected: {report['architecture']} does not promise to avoid {', '.join(report['not_promised'])})"
    rows.append(("verdict", verdict))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def timeline(history: list[OpRecord], duration_s: float, bucket_s: float | None = None) -> list[dict]:
    """Per time bucket: acknowledged operations per second, and latency p50 / p99 (ms)."""
    if bucket_s is None:
        bucket_s = max(0.1, duration_s / 100)
    buckets: dict[int, list[float]] = {}
    for record in history:
        if record.outcome == "unknown" or record.client < 0:
            continue
        buckets.setdefault(int(record.complete_s / bucket_s), []).append(record.latency_ms)
    if not buckets:
        return []
    points = []
    for index in range(min(buckets), max(buckets) + 1):
        latencies = sorted(buckets.get(index, []))
        points.append({
            "t_s": round(index * bucket_s, 3),
            "ops_s": round(len(latencies) / bucket_s, 1),
            "p50_ms": round(percentile(latencies, 0.5), 3),
            "p99_ms": round(percentile(latencies, 0.99), 3),
        })
    return points


def _polyline(points: list[tuple[float, float]], color: str) -> str:
    coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    return f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{coords}"/>'


def timeline_svg(report: dict, points: list[dict]) -> str:
    """Two panels sharing the time axis: throughput above, latency below; faults shaded."""
    width, height, left, right, top = 900, 480, 70, 20, 40
    panel_h = 170
    gap = 50
    t_end = max([p["t_s"] for p in points] + [report.get("run_window_s", [0, 1])[1], 1.0])
    t_start = min([p["t_s"] for p in points] + [0.0])

    def x(t: float) -> float:
        return left + (t - t_start) / max(1e-9, t_end - t_start) * (width - left - right)

    ops_max = max([p["ops_s"] for p in points] + [1.0]) * 1.1
    lat_max = max([p["p99_ms"] for p in points] + [1.0]) * 1.1
    title = (f"{report['architecture']}: {report['clients']} clients, verdict {report['verdict']}, "
             f"{report['throughput_ops_s']:,.0f} ops/s, p99 {report['latency_ms']['p99']:.2f} ms")
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="{left}" y="20" font-size="13">{_escape(title)}</text>',
    ]
    panels = [(top, "acknowledged ops/s", ops_max, [("ops_s", "#1f77b4")]),
              (top + panel_h + gap, "latency ms (p50, p99)", lat_max, [("p50_ms", "#2ca02c"), ("p99_ms", "#d62728")])]
    for panel_top, label, y_max, series in panels:
        bottom = panel_top + panel_h
        for fault in report["faults"]:
            start = fault["at_s"]
            end = fault.get("until_s", start)
            x0, x1 = x(start), x(max(end, start + (t_end - t_start) / 200))
            parts.append(f'<rect x="{x0:.1f}" y="{panel_top}" width="{x1 - x0:.1f}" height="{panel_h}" fill="#f4a582" opacity="0.35"/>')
            if panel_top == top:
                parts.append(f'<text x="{x0 + 2:.1f}" y="{panel_top + 12}" fill="#b2182b">{_escape(fault["action"] + " " + str(fault.get("target", "")))}</text>')
        parts.append(f'<line x1="{left}" y1="{bottom}" x2="{width - right}" y2="{bottom}" stroke="black"/>')
        parts.append(f'<line x1="{left}" y1="{panel_top}" x2="{left}" y2="{bottom}" stroke="black"/>')
        parts.append(f'<text x="{left}" y="{panel_top - 6}">{label}</text>')
        for fraction in (0.0, 0.5, 1.0):
            value = y_max * fraction
            y = bottom - fraction * panel_h
            parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{value:,.0f}</text>' if y_max > 10
                         else f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{value:.2f}</text>')
        for key, color in series:
            parts.append(_polyline([(x(p["t_s"]), bottom - min(p[key], y_max) / y_max * panel_h) for p in points], color))
        for t in _ticks(t_start, t_end):
            parts.append(f'<text x="{x(t):.1f}" y="{bottom + 14}" text-anchor="middle">{t:g}s</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _ticks(start: float, end: float) -> list[float]:
    span = max(end - start, 1e-9)
    step = 10 ** math.floor(math.log10(span / 5))
    for multiple in (1, 2, 5, 10):
        if span / (step * multiple) <= 8:
            step *= multiple
            break
    first = math.ceil(start / step) * step
    return [round(first + i * step, 6) for i in range(int((end - first) / step) + 1)]


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
