"""The lab's timeline picture (results/<run>.svg), read the way a person reads it.

A legend says which line is which, with units; where no operation completed there is no latency
line (an outage must not look like the fastest moment of the run); each fault is labelled with the
role it hit and the node that played it; every outage is marked, not only the first; the title's
verdict says "(expected)" for anomalies the architecture does not promise to avoid, with counts.
The pictures are checked from the SVG itself: its legend, its labels, and its lines' points placed
on the time axis by the axis' own tick labels.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from common.lab import report
from common.lab.faults import SCHEDULES
from common.lab.runner import RunOptions, run_lab
from common.lab.workload import OpRecord

SVG = "{http://www.w3.org/2000/svg}"
TICK = re.compile(r"(\d+(?:\.\d+)?) ?s")


class Picture:
    """An SVG timeline as its reader sees it: the legend, the texts, the lines' points in seconds."""

    def __init__(self, svg_text: str) -> None:
        self.root = ElementTree.fromstring(svg_text)  # raises if it is not well-formed XML
        self.texts = ["".join(element.itertext()) for element in self.root.iter(f"{SVG}text")]
        self.legend: dict[str, str] = {}  # label -> colour of its swatch
        for group in self.root.iter(f"{SVG}g"):
            label = group.find(f"{SVG}text")
            swatch = group.find(f"{SVG}line")
            if label is not None and swatch is not None:
                self.legend["".join(label.itertext())] = swatch.get("stroke")
        ticks = {}
        for element in self.root.iter(f"{SVG}text"):  # the time axis' ticks, centred under their time
            match = TICK.fullmatch("".join(element.itertext()))
            if match and element.get("text-anchor") == "middle":
                ticks[float(match.group(1))] = float(element.get("x"))
        assert len(ticks) >= 2, f"no time axis to read: {self.texts}"
        (t0, x0), (t1, x1) = sorted(ticks.items())[:2]
        self.seconds_per_px = (t1 - t0) / (x1 - x0)
        self._t0, self._x0 = t0, x0

    def colour_of(self, *words: str) -> str:
        found = [colour for label, colour in self.legend.items() if all(word in label for word in words)]
        assert len(found) == 1, f"one legend entry with {words} expected; the legend: {self.legend}"
        return found[0]

    def times_drawn(self, colour: str) -> list[float]:
        """The time of every point of every line (and lone dot) drawn in `colour`."""
        xs = []
        for line in self.root.iter(f"{SVG}polyline"):
            if line.get("stroke") == colour:
                xs += [float(pair.split(",")[0]) for pair in line.get("points").split()]
        xs += [float(dot.get("cx")) for dot in self.root.iter(f"{SVG}circle") if dot.get("fill") == colour]
        return [self._t0 + (x - self._x0) * self.seconds_per_px for x in xs]


# --- A real primary-backup run with its primary killed ---------------------------------------------


@pytest.mark.slow
def test_the_timeline_of_a_primary_kill_has_a_legend_no_latency_during_the_outage_and_names_the_role(tmp_path):
    result = run_lab(RunOptions(architecture="primary-backup", faults="kill-primary", duration_s=4.0, clients=4,
                                ports="free", progress=False, results_dir=tmp_path / "results", run_root=tmp_path / "runs"))
    [fault] = result.report["faults"]
    picture = Picture(Path(result.report["timeline_svg"]).read_text())
    # A legend for every line, with units.
    throughput = picture.colour_of("per second")
    latencies = [picture.colour_of("p50", "ms"), picture.colour_of("p99", "ms")]
    assert len({throughput, *latencies}) == 3
    # The kill is labelled with the role it was aimed at and the replica that played it.
    assert fault["role"] == "primary"
    assert f"kill primary {fault['target']}" in picture.texts
    # From the kill to the first write the new primary acknowledged (a lease at least), nothing
    # completed: no latency is drawn there (a bucket on either side may hold completions).
    outage_s = fault["first_ok_write_after_s"]
    assert outage_s is not None and outage_s > 0.5, fault
    bucket_s = report.MIN_BUCKET_S
    inside = (fault["at_s"] + bucket_s, fault["at_s"] + outage_s - bucket_s)
    for colour in latencies:
        drawn = picture.times_drawn(colour)
        assert drawn and not [t for t in drawn if inside[0] < t < inside[1]], (inside, drawn)
    # The outage is marked, with its length.
    assert [o["lasted_s"] for o in result.report["outages"] if o["from_s"] <= fault["at_s"] + bucket_s]
    assert any(text.startswith("no write acknowledged for") for text in picture.texts)


# --- The picture of a made-up history --------------------------------------------------------------


def op(invoke_s: float, complete_s: float, kind: str = "DEPOSIT", client: int = 0, outcome: str = "ok") -> OpRecord:
    return OpRecord(client, f"op-{invoke_s:.3f}-{kind}", kind, "acct-0", None, 100, invoke_s, complete_s, outcome)


def steady_writes(start_s: float, end_s: float, outages: list[tuple[float, float]]) -> list[OpRecord]:
    """One write invoked every 10 ms taking 4 ms; one invoked within an outage completes at its end."""
    history = []
    t = start_s
    while t < end_s:
        complete = next((until for begin, until in outages if begin <= t < until), t + 0.004)
        history.append(op(t, complete))
        t = round(t + 0.01, 3)
    return history


def a_report(**fields) -> dict:
    base = {"architecture": "primary-backup", "variant": "sync", "clients": 1, "window": 1, "throughput_ops_s": 100.0,
            "latency_ms": {"p50": 4.0, "p95": 4.0, "p99": 4.0}, "faults": [], "verdict": "valid",
            "anomalies": {"lost_write": 0}, "not_promised": [], "run_window_s": [0.0, 10.0]}
    return {**base, **fields}


def test_two_outages_are_both_found_and_both_marked_and_no_latency_is_drawn_within_either():
    window = [0.0, 10.0]
    # Reads keep completing through the second outage: an outage is about writes.
    history = steady_writes(0.0, 10.0, [(3.0, 4.5), (7.0, 7.6)])
    history += [op(t / 100, t / 100 + 0.002, kind="BALANCE", client=1) for t in range(700, 760)]
    found = report.outages(history, window)
    assert [(o["from_s"], o["to_s"], o["to_end"]) for o in found] == [(3.0, 4.5, False), (7.0, 7.6, False)]
    picture = Picture(report.timeline_svg(a_report(outages=found), report.timeline(history, window)))
    assert len([text for text in picture.texts if text.startswith("no write acknowledged for")]) == 2
    assert "no write acknowledged for 1.50 s" in picture.texts and "no write acknowledged for 0.60 s" in picture.texts
    outage_rects = [r for r in picture.root.iter(f"{SVG}rect") if r.get("class") == "outage"]
    assert len(outage_rects) == 4  # each outage in both panels
    for colour in (picture.colour_of("p50", "ms"), picture.colour_of("p99", "ms")):
        assert not [t for t in picture.times_drawn(colour) if 3.1 < t < 4.4]


def test_an_outage_lasting_to_the_end_of_the_run_says_so_and_a_pause_in_the_writing_is_none():
    window = [0.0, 10.0]
    # Writes stop being acknowledged at 8 s: those waiting are given up on (outcome unknown) at the end.
    given_up = [op(8.0 + i / 100, 10.0, outcome="unknown") for i in range(10)]
    history = steady_writes(0.0, 8.0, []) + given_up
    assert [(o["from_s"], o["to_s"], o["to_end"]) for o in report.outages(history, window)] == [(8.0, 10.0, True)]
    # Two writes five seconds apart and nothing waiting in between: the bank was not down.
    assert report.outages([op(1.0, 1.004), op(6.0, 6.004)], window) == []


def test_the_title_says_which_anomalies_were_expected_with_their_counts():
    expected = a_report(architecture="primary-backup-async", verdict="invalid", not_promised=["failover_lost_write"],
                        anomalies={"lost_write": 0, "failover_lost_write": 12})
    title = Picture(report.timeline_svg(expected, [])).texts[0]
    assert "verdict invalid (expected): failover_lost_write 12" in title
    mixed = a_report(architecture="multicast", verdict="invalid", not_promised=["divergence"],
                     anomalies={"lost_write": 3, "divergence": 2, "money": 0})
    assert "verdict INVALID: lost_write 3; expected: divergence 2" in Picture(report.timeline_svg(mixed, [])).texts[0]
    assert Picture(report.timeline_svg(a_report(), [])).texts[0].endswith("verdict valid")


@pytest.mark.parametrize("fault, label", [
    ({"action": "kill", "role": "primary", "target": "replica2"}, "kill primary replica2"),
    ({"action": "pause", "role": "sequencer", "target": "sequencer"}, "pause sequencer"),
    ({"action": "partition", "role": "backup", "target": "replica1"}, "partition backup replica1"),
    ({"action": "kill", "role": "replica", "target": "replica1"}, "kill replica1"),
])
def test_a_fault_is_labelled_by_the_role_it_hit_and_the_node(fault, label):
    record = {**fault, "at_s": 3.0, "until_s": 6.0}
    assert label in Picture(report.timeline_svg(a_report(faults=[record]), [])).texts
    assert report._describe_fault(record, None).startswith(f"{label}@3.0s")


def test_the_schedules_name_the_role_a_label_needs():
    # The label comes from the fault's record, which carries the schedule's role (FaultInjector).
    assert {fault.role for fault in SCHEDULES["kill-primary"]} == {"primary"}
