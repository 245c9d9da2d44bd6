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
(run directories and histories beyond the lab's bounds, see common/lab/runner.py); outages (every
stretch of OUTAGE_MIN_BUCKETS timeline buckets or more in which writes waited and none was
acknowledged: from_s, to_s, lasted_s, to_end).

The timeline (`results/<run>.svg`) is drawn by hand (no plotting library), so a person can see what
a fault did: acknowledged operations per second above, the latency p50 and p99 of the operations
completed in each bucket below (log scale; no line where none completed, so an outage never looks
fast), each fault shaded and labelled with the role it hit and the node ("kill primary replica2"),
each outage hatched with its length, a legend, and the verdict in the title with the anomalies'
counts, "(expected)" when the architecture does not promise to avoid them.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from common.lab.workload import OpRecord
from common.transport.aio import LOOP_STALL_THRESHOLD_MS

# The timeline's time buckets: this many tile the run, unless that would make them shorter than
# MIN_BUCKET_S (a short run has fewer).
TIMELINE_BUCKETS = 100
MIN_BUCKET_S = 0.1
# An outage is marked when writes waited this many buckets or more with none acknowledged.
OUTAGE_MIN_BUCKETS = 2
# The latency axis is logarithmic: a latency below this (none is 0 but a clock's tick) is drawn at it.
LATENCY_FLOOR_MS = 0.001

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


def describe_fault_target(fault: dict) -> str:
    """"kill primary replica2", "pause sequencer", "kill replica1": the fault, the role it was
    aimed at (unless the node's name says it) and the node that played it when the fault began."""
    target = str(fault.get("target", ""))
    role = fault.get("role") or ""
    who = target if target.startswith(role) else f"{role} {target}"
    return f"{fault['action']} {who}".strip()


def _describe_fault(fault: dict, run_window_s: list[float] | None) -> str:
    """"kill primary replica1@2.936s until 5.819s (30% to 66% into the run)": times count from the
    lab's start (seeding included, as in the history); the shares from the workload's."""
    text = describe_fault_target(fault) + f"@{fault['at_s']}s"
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
    if "outages" in report:
        rows.append(("outages", "; ".join(
            f"no write acknowledged for {o['lasted_s']:.2f} s from {o['from_s']}s" + (" to the end" if o["to_end"] else "")
            for o in report["outages"]) or "none"))
    rows.append(("anomalies", ", ".join(f"{k} {v}" for k, v in anomalies.items()) or "none"))
    verdict = report["verdict"].upper()
    if report.get("anomalies_expected"):
        verdict += f" (expected: {report['architecture']} does not promise to avoid {', '.join(report['not_promised'])})"
    rows.append(("verdict", verdict))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def timeline_bucket_s(run_window_s: list[float]) -> float:
    """The length of the timeline's buckets: TIMELINE_BUCKETS of them tile the run, none shorter
    than MIN_BUCKET_S."""
    duration_s = max(run_window_s[1] - run_window_s[0], MIN_BUCKET_S)
    return duration_s / max(1, min(TIMELINE_BUCKETS, int(duration_s / MIN_BUCKET_S)))


def timeline(history: list[OpRecord], run_window_s: list[float]) -> list[dict]:
    """Per time bucket of the run (from `t_s` to `until_s`): operations acknowledged per second,
    and the latency p50 / p99 (ms) of those completed in it; None where none completed."""
    bucket_s = timeline_bucket_s(run_window_s)
    start_s = run_window_s[0]
    buckets: dict[int, list[float]] = {}
    for record in history:
        if record.outcome == "unknown" or record.client < 0:
            continue
        buckets.setdefault(int((record.complete_s - start_s) / bucket_s), []).append(record.latency_ms)
    if not buckets:
        return []
    points = []
    for index in range(min(buckets), max(buckets) + 1):
        latencies = sorted(buckets.get(index, []))
        points.append({
            "t_s": round(start_s + index * bucket_s, 3),
            "until_s": round(start_s + (index + 1) * bucket_s, 3),
            "ops_s": round(len(latencies) / bucket_s, 1),
            "p50_ms": round(percentile(latencies, 0.5), 3) if latencies else None,
            "p99_ms": round(percentile(latencies, 0.99), 3) if latencies else None,
        })
    return points


def outages(history: list[OpRecord], run_window_s: list[float], min_outage_s: float | None = None) -> list[dict]:
    """Every stretch of the run, `min_outage_s` or longer (default: OUTAGE_MIN_BUCKETS of the
    timeline's buckets), in which writes waited and none was acknowledged (outcome ok, as for a
    fault's first_ok_write_after_s): from the later of the last acknowledged write and the
    invocation of the oldest write then waiting, to the next acknowledged write, or to the end of
    the run (`to_end`). A stretch in which no write was waiting is none: the workload was reading."""
    if min_outage_s is None:
        min_outage_s = OUTAGE_MIN_BUCKETS * timeline_bucket_s(run_window_s)
    start_s, end_s = run_window_s
    writes = sorted((r.complete_s, r.invoke_s, r.outcome == "ok") for r in history if r.kind != "BALANCE" and r.client >= 0)
    if not writes:
        return []
    found = []
    next_ok_s, to_end = end_s, True
    waiting_since_s = math.inf  # the earliest invocation among the writes that completed after this point
    # Backwards from the end, the run's start counting as an acknowledgement.
    for complete_s, invoke_s, ok in writes[::-1] + [(start_s, math.inf, True)]:
        if ok:
            began_s = max(complete_s, waiting_since_s)
            if next_ok_s - began_s >= min_outage_s:
                found.append({"from_s": round(began_s, 3), "to_s": round(next_ok_s, 3),
                              "lasted_s": round(next_ok_s - began_s, 3), "to_end": to_end})
            next_ok_s, to_end = complete_s, False
        waiting_since_s = min(waiting_since_s, invoke_s)
    return found[::-1]


def describe_verdict(report: dict) -> str:
    """"valid"; "invalid (expected): failover_lost_write 12" when every anomaly is one the
    architecture does not promise to avoid; else "INVALID: lost_write 3" (and what was expected)."""
    counted = {kind: count for kind, count in report["anomalies"].items() if count}
    if not counted:
        return report["verdict"]
    not_promised = set(report.get("not_promised", ()))
    broken = ", ".join(f"{kind} {count}" for kind, count in counted.items() if kind not in not_promised)
    expected = ", ".join(f"{kind} {count}" for kind, count in counted.items() if kind in not_promised)
    if not broken:
        return f"{report['verdict']} (expected): {expected}"
    return f"{report['verdict'].upper()}: {broken}" + (f"; expected: {expected}" if expected else "")


# The timeline picture's colours. A fault window is a rect of class "fault", an outage one of class "outage".
THROUGHPUT_COLOR = "#1f77b4"
P50_COLOR = "#2ca02c"
P99_COLOR = "#d62728"
FAULT_SHADE = "#f4a582"
FAULT_OPACITY = 0.35
FAULT_TEXT = "#b2182b"
OUTAGE_COLOR = "#525252"
# The picture's geometry (pixels): the plot area between SVG_LEFT and SVG_WIDTH - SVG_RIGHT.
SVG_WIDTH, SVG_LEFT, SVG_RIGHT = 960, 70, 30
PANEL_PX, PANEL_GAP_PX = 170, 56
LEGEND_COLUMN_PX = 290
# Labels drawn over lines and shades keep a white outline, so they stay legible.
HALO = 'stroke="white" stroke-width="3" paint-order="stroke"'


def _polylines(points: list[tuple[float, float | None]], color: str) -> list[str]:
    """One polyline per run of points with a value; a point alone between gaps is a dot."""
    runs: list[list[tuple[float, float]]] = [[]]
    for x, y in points:
        if y is None:
            runs.append([])
        else:
            runs[-1].append((x, y))
    drawn = []
    for run in runs:
        if len(run) == 1:
            drawn.append(f'<circle cx="{run[0][0]:.1f}" cy="{run[0][1]:.1f}" r="2" fill="{color}"/>')
        elif run:
            coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in run)
            drawn.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{coords}"/>')
    return drawn


def _legend_item(x: float, y: float, swatch: str, label: str) -> str:
    text_x = x + 26 if swatch else x
    return f'<g class="legend">{swatch}<text x="{text_x:.1f}" y="{y + 4:.1f}">{_escape(label)}</text></g>'


def _line_swatch(x: float, y: float, color: str) -> str:
    return f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{x + 20:.1f}" y2="{y:.1f}" stroke="{color}" stroke-width="2"/>'


def _box_swatch(x: float, y: float, fill: str) -> str:
    opacity = FAULT_OPACITY if fill == FAULT_SHADE else 1.0
    return f'<rect x="{x:.1f}" y="{y - 5:.1f}" width="20" height="10" fill="{fill}" opacity="{opacity}" stroke="#999"/>'


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _latency_text(ms: float) -> str:
    return f"{ms / 1000:g} s" if ms >= 1000 else f"{ms:g} ms"


def _header(report: dict) -> list[str]:
    """The title (architecture, clients, the verdict with the anomalies' counts) and the run's figures."""
    variant = f" ({report['variant']})" if report.get("variant") else ""
    latency = report["latency_ms"]
    outage_list = report.get("outages", [])
    title = (f"{report['architecture']}{variant}, {_count(report['clients'], 'client')} x window {report.get('window', 1)}: "
             f"verdict {describe_verdict(report)}")
    longest = f" (longest {max(o['lasted_s'] for o in outage_list):.2f} s)" if outage_list else ""
    figures = (f"{report['throughput_ops_s']:,.0f} ops/s acknowledged; latency p50 {latency['p50']:.2f} ms, "
               f"p99 {latency['p99']:.2f} ms; {_count(len(report['faults']), 'fault')}, "
               f"{_count(len(outage_list), 'outage')}{longest}")
    return [f'<text x="{SVG_LEFT}" y="20" font-size="14" font-weight="bold">{_escape(title)}</text>',
            f'<text x="{SVG_LEFT}" y="38" font-size="12">{_escape(figures)}</text>']


def _legend() -> list[str]:
    """Every line and shade of the picture, in three columns of two rows."""
    entries = [
        (_line_swatch, THROUGHPUT_COLOR, "operations acknowledged per second"),
        (_line_swatch, P50_COLOR, "latency p50 (ms)"),
        (_line_swatch, P99_COLOR, "latency p99 (ms)"),
        (_box_swatch, FAULT_SHADE, "fault, from its start to its end"),
        (_box_swatch, "url(#outage-hatch)", "outage: writes waiting, none acknowledged"),
        (None, None, "no latency line: nothing completed then"),
    ]
    drawn = []
    for index, (swatch, color, label) in enumerate(entries):
        x, y = SVG_LEFT + LEGEND_COLUMN_PX * (index % 3), 58 + 18 * (index // 3)
        drawn.append(_legend_item(x, y, swatch(x, y, color) if swatch else "", label))
    return drawn


class _TimeAxis:
    """Seconds on the lab's clock -> x in the picture."""

    def __init__(self, t_start: float, t_end: float) -> None:
        self.t_start, self.t_end = t_start, max(t_end, t_start + 1e-3)

    def __call__(self, t: float) -> float:
        return SVG_LEFT + (t - self.t_start) / (self.t_end - self.t_start) * (SVG_WIDTH - SVG_LEFT - SVG_RIGHT)


def _panel_ground(report: dict, x: _TimeAxis, panel_top: int, labelled: bool) -> list[str]:
    """What lies under a panel's lines: the faults shaded, the outages hatched (`labelled`: with
    their labels), the axes and the time ticks."""
    drawn = []
    bottom = panel_top + PANEL_PX
    min_width_s = (x.t_end - x.t_start) / 200  # an instant fault (a drop) stays visible
    for index, fault in enumerate(report["faults"]):
        x0, x1 = x(fault["at_s"]), x(max(fault.get("until_s", fault["at_s"]), fault["at_s"] + min_width_s))
        drawn.append(f'<rect class="fault" x="{x0:.1f}" y="{panel_top}" width="{x1 - x0:.1f}" height="{PANEL_PX}" '
                     f'fill="{FAULT_SHADE}" opacity="{FAULT_OPACITY}"/>')
        if labelled:
            drawn.append(f'<text x="{x0 + 2:.1f}" y="{panel_top + 12 + 12 * (index % 3)}" fill="{FAULT_TEXT}" {HALO}>'
                         f'{_escape(describe_fault_target(fault))}</text>')
    for index, outage in enumerate(report.get("outages", [])):
        x0, x1 = x(outage["from_s"]), x(outage["to_s"])
        drawn.append(f'<rect class="outage" x="{x0:.1f}" y="{panel_top}" width="{x1 - x0:.1f}" height="{PANEL_PX}" '
                     f'fill="url(#outage-hatch)" stroke="{OUTAGE_COLOR}" stroke-width="0.5"/>')
        if labelled:
            lasted = f"{outage['lasted_s']:.2f} s" + (", to the end of the run" if outage["to_end"] else "")
            drawn.append(f'<text x="{x0 + 2:.1f}" y="{bottom - PANEL_PX / 2 + 12 * (index % 2):.1f}" '
                         f'fill="{OUTAGE_COLOR}" {HALO}>no write acknowledged for {_escape(lasted)}</text>')
    drawn.append(f'<line x1="{SVG_LEFT}" y1="{bottom}" x2="{SVG_WIDTH - SVG_RIGHT}" y2="{bottom}" stroke="black"/>')
    drawn.append(f'<line x1="{SVG_LEFT}" y1="{panel_top}" x2="{SVG_LEFT}" y2="{bottom}" stroke="black"/>')
    drawn += [f'<text x="{x(t):.1f}" y="{bottom + 14}" text-anchor="middle">{t:g} s</text>' for t in _ticks(x.t_start, x.t_end)]
    return drawn


def timeline_svg(report: dict, points: list[dict]) -> str:
    """Two panels sharing the time axis: throughput above, latency (log scale) below; faults
    shaded and labelled by role and node, outages hatched and labelled by their length, a legend
    for every line and shade, the verdict in the title."""
    throughput_top = 112  # below the title, its figures and the legend
    latency_top = throughput_top + PANEL_PX + PANEL_GAP_PX
    height = latency_top + PANEL_PX + 50
    run_window_s = report.get("run_window_s") or [0.0, 1.0]
    x = _TimeAxis(min([p["t_s"] for p in points] + [run_window_s[0]]), max([p["until_s"] for p in points] + [run_window_s[1]]))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{SVG_WIDTH}" height="{height}" font-family="sans-serif" font-size="11">',
        '<defs><pattern id="outage-hatch" width="6" height="6" patternUnits="userSpaceOnUse" patternTransform="rotate(45)">'
        f'<line x1="0" y1="0" x2="0" y2="6" stroke="{OUTAGE_COLOR}" stroke-width="1.5" opacity="0.5"/></pattern></defs>',
        '<rect width="100%" height="100%" fill="white"/>',
        *_header(report),
        *_legend(),
        *_panel_ground(report, x, throughput_top, labelled=True),
        *_panel_ground(report, x, latency_top, labelled=False),
    ]
    # Throughput: a linear axis from 0.
    ops_max = max([p["ops_s"] for p in points] + [1.0]) * 1.1

    def y_ops(value: float) -> float:
        return throughput_top + PANEL_PX - min(value, ops_max) / ops_max * PANEL_PX

    bucket_s = points[0]["until_s"] - points[0]["t_s"] if points else timeline_bucket_s(run_window_s)
    parts.append(f'<text x="{SVG_LEFT}" y="{throughput_top - 6}">acknowledged operations per second, '
                 f'per {bucket_s:.2g} s bucket</text>')
    parts += [f'<text x="{SVG_LEFT - 6}" y="{y_ops(value) + 4:.1f}" text-anchor="end">{value:,.0f}</text>'
              for value in _ticks(0.0, ops_max)]
    # Latency: a logarithmic axis over whole decades, so a 1 s wait and a 4 ms p50 both read.
    latencies = [p[key] for p in points for key in ("p50_ms", "p99_ms") if p[key] is not None]
    decade_low = math.floor(math.log10(max(min(latencies, default=1.0), LATENCY_FLOOR_MS)))
    decade_high = max(math.ceil(math.log10(max(latencies, default=10.0))), decade_low + 1)

    def y_latency(ms: float | None) -> float | None:
        if ms is None:
            return None
        fraction = (math.log10(max(ms, LATENCY_FLOOR_MS)) - decade_low) / (decade_high - decade_low)
        return latency_top + PANEL_PX - fraction * PANEL_PX

    parts.append(f'<text x="{SVG_LEFT}" y="{latency_top - 6}">latency of the operations completed in each bucket (log scale)</text>')
    for decade in range(decade_low, decade_high + 1):
        y = y_latency(10.0 ** decade)
        parts.append(f'<line x1="{SVG_LEFT}" y1="{y:.1f}" x2="{SVG_WIDTH - SVG_RIGHT}" y2="{y:.1f}" stroke="#e0e0e0"/>')
        parts.append(f'<text x="{SVG_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_latency_text(10.0 ** decade)}</text>')
    mid_s = [(p["t_s"] + p["until_s"]) / 2 for p in points]
    parts += _polylines([(x(t), y_ops(p["ops_s"])) for t, p in zip(mid_s, points)], THROUGHPUT_COLOR)
    for key, color in (("p50_ms", P50_COLOR), ("p99_ms", P99_COLOR)):
        parts += _polylines([(x(t), y_latency(p[key])) for t, p in zip(mid_s, points)], color)
    parts.append(f'<text x="{(SVG_LEFT + SVG_WIDTH - SVG_RIGHT) / 2:.1f}" y="{height - 8}" text-anchor="middle">seconds '
                 f'since the lab started (the run: {run_window_s[0]:g} s to {run_window_s[1]:g} s)</text>')
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
