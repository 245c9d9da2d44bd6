#!/usr/bin/env python3
"""The saldo lab: run a bank workload against a live local cluster, break it, check it, report.

    python lab.py demo                                           (what `make demo` runs)
    python lab.py up --arch sequencer                            a cluster that stays up until Ctrl-C
    python lab.py run --arch standalone --clients 8 --duration 10
    python lab.py run --arch sequencer --faults kill-replica
    python lab.py bench --arch all --clients 1,8 --repeat 3     (what `make bench` runs)
    python lab.py chaos --arch standalone --faults kill-replica  (what `make chaos` runs)

Each run writes results/<run>.json (and results/latest.json), a timeline picture
results/<run>.svg, and prints a table. Exit code: 0 when every verdict is valid, or invalid only for
anomalies its architecture does not promise to avoid (multicast's divergence, async
primary-backup's lost writes: "anomalies_expected" in the report); 1 otherwise.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import time

from common.lab import archs
from common.lab.cluster import REPO_ROOT, Cluster
from common.lab.faults import SCHEDULES
from common.lab.report import format_table
from common.lab.runner import RunOptions, run_lab
from common.log import configure
from common.process import tune_gc


def _add_run_flags(parser: argparse.ArgumentParser, *, default_faults: str) -> None:
    parser.add_argument("--arch", default="standalone", help=f"architecture, or 'all': {', '.join(archs.BUILDERS)}")
    parser.add_argument("--clients", default="8", help="client count, or a comma list for bench (e.g. 1,8)")
    parser.add_argument("--window", default="16",
                        help="operations in flight per client, or a comma list (bench: 16,64 = moderate load and "
                             "saturation); a single client always has one at a time")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of workload per run")
    parser.add_argument("--accounts", type=int, default=8)
    parser.add_argument("--faults", default=default_faults, help=f"fault schedule: {', '.join(SCHEDULES)}")
    parser.add_argument("--ports", choices=["seed", "free"], default="seed", help="the seed's port numbers, or free ones")
    parser.add_argument("--store", default="sqlite", help="sqlite, or a MySQL base URL mysql://user:pass@host:port/prefix")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="architecture option (repeatable)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per combination; the summary shows medians")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--reference", action=argparse.BooleanOptionalAction, default=None,
                        help="measure the echo reference in the same run (default: on for bench)")
    parser.add_argument("--keep-history", action="store_true", help="write the history even when the verdict is valid")
    parser.add_argument("--quiet", action="store_true", help="no progress line")


def _options(args: argparse.Namespace, architecture: str, clients: int, window: int, repeat_index: int,
             reference: bool) -> RunOptions:
    extra = {}
    for item in args.option:
        key, _, value = item.partition("=")
        extra[key] = value
    return RunOptions(
        architecture=architecture,
        clients=clients,
        window=window,
        duration_s=args.duration,
        accounts=args.accounts,
        faults=args.faults,
        ports=args.ports,
        store=args.store,
        reference=reference,
        reference_duration_s=min(5.0, args.duration),
        seed=args.seed + repeat_index,
        progress=not args.quiet,
        extra=extra,
        keep_history=args.keep_history,
        run_name=f"{architecture}-{clients}c{window}w-{time.strftime('%Y%m%d-%H%M%S')}-{repeat_index}",
    )


def _windows(args: argparse.Namespace, clients: int) -> list[int]:
    """The in-flight depths to run with `clients` clients: one at a time for a single client."""
    if clients == 1 and args.window_for_one:
        return [1]
    return [int(w) for w in str(args.window).split(",")]


def _run_all(args: argparse.Namespace, *, reference_default: bool) -> int:
    # "all": the bank's architectures; the worker farm runs on MariaDB with its own bench (make bench-farm).
    architectures = [a for a in archs.BUILDERS if a != "farm"] if args.arch == "all" else args.arch.split(",")
    client_counts = [int(c) for c in str(args.clients).split(",")]
    reference = reference_default if args.reference is None else args.reference
    summary = []
    all_valid = True
    combinations = [(clients, window) for clients in client_counts for window in _windows(args, clients)]
    for architecture in architectures:
        for clients, window in combinations:
            runs = []
            for repeat_index in range(args.repeat):
                options = _options(args, architecture, clients, window, repeat_index, reference)
                print(f"\n== {architecture}, {clients} client(s) x window {options.window}, "
                      f"{options.duration_s:g} s, faults {options.faults} (run {repeat_index + 1}/{args.repeat})", flush=True)
                result = run_lab(options)
                print(format_table(result.report))
                print(f"  report   {result.report_path}\n  timeline {result.report['timeline_svg']}")
                runs.append(result.report)
                all_valid = all_valid and (result.report["verdict"] == "valid" or result.report["anomalies_expected"])
            summary.append(_summarize(architecture, clients, runs))
    if len(summary) > 1 or args.repeat > 1:
        _print_summary(summary)
    return 0 if all_valid else 1


def _summarize(architecture: str, clients: int, runs: list[dict]) -> dict:
    def median(path: str) -> float | None:
        values = []
        for run in runs:
            value = run
            for key in path.split("."):
                value = value.get(key) if isinstance(value, dict) else None
            if isinstance(value, (int, float)):
                values.append(value)
        return statistics.median(values) if values else None

    return {
        "architecture": architecture,
        "clients": clients,
        "window": runs[0].get("window"),
        "runs": len(runs),
        "throughput_ops_s": median("throughput_ops_s"),
        "applied_ops_s": median("applied_ops_s"),
        "p50_ms": median("latency_ms.p50"),
        "p99_ms": median("latency_ms.p99"),
        "echo_ops_s": median("reference.echo_ops_s"),
        "ratio": median("reference.ratio"),
        "verdicts": [run["verdict"] + ("(expected)" if run.get("anomalies_expected") else "") for run in runs],
    }


def _print_summary(summary: list[dict]) -> None:
    print("\n== summary (medians)")
    header = f"  {'architecture':<21}{'clients':>8}{'window':>7}{'acked ops/s':>13}{'applied/s':>11}{'p50 ms':>9}{'p99 ms':>9}{'echo ops/s':>12}{'ratio':>7}  verdicts"
    print(header)
    for row in summary:
        def fmt(value, spec):
            return format(value, spec) if value is not None else "-"
        print(f"  {row['architecture']:<21}{row['clients']:>8}{row['window']:>7}{fmt(row['throughput_ops_s'], ',.0f'):>13}"
              f"{fmt(row['applied_ops_s'], ',.0f'):>11}{fmt(row['p50_ms'], '.3f'):>9}{fmt(row['p99_ms'], '.3f'):>9}"
              f"{fmt(row['echo_ops_s'], ',.0f'):>12}{fmt(row['ratio'], '.2f'):>7}  {','.join(row['verdicts'])}")


def run_demo(args: argparse.Namespace) -> int:
    """A sequencer cluster (two replicas, SQLite) on the seed's three local hosts, a short workload
    with a replica killed and restarted half-way, the report, and everything stopped."""
    print("saldo demo: the sequencer architecture on three local hosts\n"
          "  127.0.0.11  sequencer (clients on :6002, replicas on :6003)\n"
          "  127.0.0.12  replica1 (reads on :6007)      127.0.0.13  replica2 (reads on :6007)\n"
          f"  8 clients for {args.duration:g} s; replica1 is SIGKILLed at 30% of the run and restarted at 60%\n", flush=True)
    options = RunOptions(
        architecture="sequencer", clients=8, window=16, duration_s=args.duration, faults="kill-replica",
        ports=args.ports, progress=not args.quiet, run_name=f"demo-{time.strftime('%Y%m%d-%H%M%S')}",
    )
    result = run_lab(options)
    print(format_table(result.report))
    print(f"  report   {result.report_path}\n  timeline {result.report['timeline_svg']}\n"
          f"  logs     {result.report['run_dir']}/*.log")
    print("\nEvery process was stopped. Next: `python3 lab.py up --arch sequencer` keeps a cluster running for client.py.")
    return 0 if result.report["verdict"] == "valid" else 1


def run_up(args: argparse.Namespace) -> int:
    """Start a cluster and keep it up until Ctrl-C, for client.py and for poking at it by hand."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a TERM stops the cluster like Ctrl-C
    run_dir = REPO_ROOT / "var" / "up" / args.arch
    lab = archs.build(args.arch, archs.LayoutOptions(run_dir=run_dir, ports=args.ports, proxies=args.proxies, store=args.store))
    with Cluster(run_dir, lab.nodes, name=f"up-{args.arch}", architecture=args.arch) as cluster:
        try:
            cluster.start()
        except (RuntimeError, TimeoutError) as error:  # e.g. a port taken by a cluster left running
            print(f"the {args.arch} cluster did not start: {error}", file=sys.stderr)
            return 1
        print(f"saldo {args.arch} cluster is up (topology: {cluster.topology_path})")
        for node in lab.nodes:
            print(f"  {node.name:<28} {node.host}:{node.port:<6} pid {cluster.pid(node.name)}  log {cluster.log_path(node.name)}")
        topo = cluster.topology_path.relative_to(REPO_ROOT)
        print(f"\nTry, in another terminal:\n"
              f"  python3 client.py --topology {topo} deposit alice 100\n"
              f"  python3 client.py --topology {topo} transfer alice bob 25.50\n"
              f"  python3 client.py --topology {topo} balance bob\n"
              f"  python3 client.py --topology {topo} status\n"
              f"Ctrl-C stops every process.", flush=True)
        try:
            while all(cluster.is_running(node.name) for node in lab.nodes):
                time.sleep(0.5)
            print("a process exited; stopping the cluster", file=sys.stderr)
        except KeyboardInterrupt:
            print("\nstopping")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="a short sequencer run with a replica crash, then everything stops")
    demo_parser.add_argument("--duration", type=float, default=8.0)
    demo_parser.add_argument("--ports", choices=["seed", "free"], default="seed")
    demo_parser.add_argument("--quiet", action="store_true")
    demo_parser.add_argument("--log-level", default="warning")
    up_parser = commands.add_parser("up", help="start a cluster and keep it up until Ctrl-C")
    up_parser.add_argument("--arch", default="sequencer", help=f"one of {', '.join(archs.BUILDERS)}")
    up_parser.add_argument("--ports", choices=["seed", "free"], default="seed")
    up_parser.add_argument("--proxies", action="store_true", help="route replica links through fault proxies")
    up_parser.add_argument("--store", default="sqlite")
    up_parser.add_argument("--log-level", default="warning")
    run_parser = commands.add_parser("run", help="one or more runs, no echo reference unless asked")
    _add_run_flags(run_parser, default_faults="none")
    bench_parser = commands.add_parser("bench", help="runs without faults, with the echo reference")
    _add_run_flags(bench_parser, default_faults="none")
    chaos_parser = commands.add_parser("chaos", help="runs with a fault schedule")
    _add_run_flags(chaos_parser, default_faults="kill-replica")
    for sub in (run_parser, bench_parser, chaos_parser):
        sub.add_argument("--log-level", default="warning")
        sub.set_defaults(window_for_one=True)
    lending_parser = commands.add_parser("farm-lending", help="the worker farm: overload -> borrowed workers serving, underload -> returned")
    lending_parser.add_argument("--store", default="sqlite", help="sqlite, or a MySQL base URL mysql://user:pass@host:port/prefix")
    lending_parser.add_argument("--repeat", type=int, default=3, help="runs; the summary shows medians")
    lending_parser.add_argument("--load-s", type=float, default=5.0, help="seconds of overload on farm1")
    lending_parser.add_argument("--clients", type=int, default=8)
    lending_parser.add_argument("--window", type=int, default=256, help="tasks in flight per client (far above what 2 workers finish)")
    lending_parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    tune_gc()  # the clients of a run share this process with a history of every operation
    if args.command == "farm-lending":
        from common.lab import farm_lending

        configure("lab", args.log_level)
        summary = farm_lending.run(args.store, repeat=args.repeat, load_s=args.load_s, clients=args.clients, window=args.window)
        return 0 if all(verdict == "valid" for verdict in summary["verdicts"]) else 1
    configure("lab", args.log_level)
    if args.command == "demo":
        return run_demo(args)
    if args.command == "up":
        return run_up(args)
    if args.command == "bench" and args.faults != "none":
        parser.error("bench runs without faults; use chaos")
    return _run_all(args, reference_default=args.command == "bench")


if __name__ == "__main__":
    sys.exit(main())
