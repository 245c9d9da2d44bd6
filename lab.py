#!/usr/bin/env python3
"""The saldo lab: run a bank workload against a live local cluster, break it, check it, report.

    python lab.py demo                                           (what `make demo` runs)
    python lab.py up --arch sequencer                            a cluster that stays up until Ctrl-C
    python lab.py run --arch standalone --clients 8 --duration 10
    python lab.py run --arch sequencer --faults kill-replica
    python lab.py bench --arch all --clients 1,8 --repeat 3     (what `make bench` runs)
    python lab.py chaos --arch standalone --faults kill-replica  (what `make chaos` runs)
    python lab.py farm-bench --store mysql://root@127.0.0.1:3306/saldo_bench  (what `make bench ARCH=farm` runs)
    python lab.py run --topology /etc/saldo/topology.json --arch sequencer --faults kill-replica
                                                                 (a deployed cluster: docs/deploy.md)

Each run writes results/<run>.json (and results/latest.json), a timeline picture
results/<run>.svg, and prints a table. Exit code: 0 when every verdict is valid, or invalid only for
anomalies its architecture does not promise to avoid (multicast's divergence, async
primary-backup's lost writes: "anomalies_expected" in the report); 1 otherwise; 64 on bad usage.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import textwrap
import time
from pathlib import Path

from common import topology
from common.cli import UsageParser
from common.lab import archs
from common.lab.cluster import REPO_ROOT, Cluster, PortInUse, RunDirInUse, StartFailed
from common.lab.faults import SCHEDULES
from common.lab.report import format_table
from common.lab.runner import MAX_HISTORY_FILES, MAX_RUN_DIRS, RunOptions, run_lab
from common.lab.workload import MIXES, describe_mix, parse_mix
from common.log import configure
from common.process import tune_gc


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; a flag's default after its help text, unless it says nothing
    (None, False, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        switch = isinstance(action, argparse.BooleanOptionalAction)  # its False is a choice, not "not given"
        says_nothing = default is None or (default is False and not switch) or default == [] or default is argparse.SUPPRESS
        if action.option_strings and "%(default)" not in text and not says_nothing:
            text += " (default: %(default)s)"
        return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _at_least_two(text: str) -> int:
    value = _positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 (a transfer needs two accounts): {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= 24 * 3600:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most a day: {text!r}")
    return value


def _int_list(text: str) -> list[int]:
    """ "1,8" -> [1, 8]: a count, or a comma list of them."""
    return [_positive_int(item.strip()) for item in str(text).split(",")]


def _mix(text: str) -> tuple[float, float, float, float]:
    try:
        return parse_mix(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


ARCHITECTURES = ", ".join(archs.BUILDERS)
KEEP_HELP = (f"keep the replicas' SQLite stores of a valid run in its var/lab directory (an invalid run's are always "
             f"kept; var/lab keeps its {MAX_RUN_DIRS} newest runs, results/ its {MAX_HISTORY_FILES} newest histories)")
LOG_LEVELS = ["debug", "info", "warning", "error"]


def _schedules_by_architecture() -> str:
    """The epilog of run and chaos: which fault schedules fit which architecture."""
    lines = ["fault schedules per architecture (a schedule names a role; the architecture says which node plays it):"]
    for architecture in archs.BUILDERS:
        lines += textwrap.wrap(", ".join(archs.schedules_for(architecture)), width=100,
                               initial_indent=f"  {architecture:<22}", subsequent_indent=" " * 24, break_on_hyphens=False)
    return "\n".join(lines)


def _add_run_flags(parser: argparse.ArgumentParser, *, default_faults: str, reference: bool, faults_help: str) -> None:
    parser.add_argument("--arch", default="standalone",
                        help=f"architecture, a comma list of them, or all (every one but farm): {ARCHITECTURES}")
    parser.add_argument("--clients", type=_int_list, default="8",
                        help="concurrent clients, or a comma list (e.g. 1,8): one run per count")
    parser.add_argument("--window", type=_int_list, default="16",
                        help="operations in flight per client, or a comma list (16,64 = moderate load and "
                             "saturation); a single client always has one at a time")
    parser.add_argument("--duration", type=_seconds, default=10.0, help="seconds of workload per run")
    parser.add_argument("--accounts", type=_at_least_two, default=8, help="bank accounts the workload moves money between")
    parser.add_argument("--mix", type=_mix, default="mixed",
                        help="the workload's kinds of operation: "
                             + ", ".join(f"{name} ({describe_mix(mix)})" for name, mix in MIXES.items()).replace("%", "%%")
                             + " (writes: only operations the replicas apply), or weights such as transfer=80,balance=20")
    parser.add_argument("--faults", choices=list(SCHEDULES), default=default_faults, metavar="SCHEDULE", help=faults_help)
    parser.add_argument("--ports", choices=["seed", "free"], default="seed",
                        help="the seed's port numbers (they clash with a running `lab.py up`), or ports the kernel says are free")
    parser.add_argument("--store", default="sqlite",
                        help="where replicas keep the bank: sqlite (a file per replica under var/lab/), or a MySQL "
                             "base URL mysql://user:pass@host:port/prefix")
    parser.add_argument("--option", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                        help="architecture option, repeatable (e.g. replicas=3, replication=async, workers=4)")
    parser.add_argument("--topology", type=Path, metavar="FILE",
                        help="a deployed cluster's topology file (/etc/saldo/topology.json, written by ansible/deploy.yml): "
                             "run against its processes, which the lab neither starts nor stops; faults go through the "
                             "commands the deployment wrote for each node (--ports, --store and --option do not apply)")
    parser.add_argument("--repeat", type=_positive_int, default=1, help="runs per combination; the summary shows medians")
    parser.add_argument("--seed", type=int, default=1, help="seed of the workload's random choices (run k uses seed+k)")
    parser.add_argument("--reference", action=argparse.BooleanOptionalAction, default=reference,
                        help="measure the echo reference (a bare echo server, same clients) in the same run")
    parser.add_argument("--keep-history", action="store_true",
                        help="write results/<run>.history.jsonl even when the verdict is valid (always written when invalid)")
    parser.add_argument("--keep", action="store_true", help=KEEP_HELP)
    parser.add_argument("--quiet", action="store_true", help="no progress line while a run goes")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="warning", help="the lab's own log events on stderr")


def _options(args: argparse.Namespace, architecture: str, clients: int, window: int, repeat_index: int,
             reference: bool) -> RunOptions:
    extra = dict(args.option)
    return RunOptions(
        architecture=architecture,
        clients=clients,
        window=window,
        duration_s=args.duration,
        accounts=args.accounts,
        mix=args.mix,
        faults=args.faults,
        ports=args.ports,
        store=args.store,
        reference=reference,
        reference_duration_s=min(5.0, args.duration),
        seed=args.seed + repeat_index,
        progress=not args.quiet,
        extra=extra,
        keep_history=args.keep_history,
        keep_stores=args.keep,
        topology=args.topology,
        run_name=f"{architecture}-{clients}c{window}w-{time.strftime('%Y%m%d-%H%M%S')}-{repeat_index}",
        hosts=args.hosts,
    )


def _windows(args: argparse.Namespace, clients: int) -> list[int]:
    """The in-flight depths to run with `clients` clients: one at a time for a single client."""
    if clients == 1:
        return [1]
    return args.window


def _architectures(arch: str) -> list[str]:
    """--arch as a list; "all": the bank's architectures (the worker farm runs on MariaDB with its
    own bench, make bench-farm). Raises ValueError naming an unknown one."""
    if arch == "all":
        return [a for a in archs.BUILDERS if a != "farm"]
    architectures = [a.strip() for a in arch.split(",")]
    for architecture in architectures:
        if architecture not in archs.BUILDERS:
            raise ValueError(f"unknown architecture {architecture!r}; choose from all, {ARCHITECTURES}")
    return architectures


def _run_all(args: argparse.Namespace, architectures: list[str]) -> int:
    client_counts = args.clients
    reference = args.reference
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
                _print_what_stays(result.report)
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
        "variant": runs[0].get("variant", ""),  # e.g. the farm's worker count: rows differ by it
        "clients": clients,
        "window": runs[0].get("window"),
        "mix": runs[0].get("mix", ""),
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
    mixes = sorted({row["mix"] for row in summary if row.get("mix")})
    print("\n== summary (medians" + (f"; mix {', '.join(mixes)})" if mixes else ")"))
    labels = [row["architecture"] + (f" ({row['variant']})" if row.get("variant") else "") for row in summary]
    width = max([len("architecture")] + [len(label) for label in labels]) + 2
    header = f"  {'architecture':<{width}}{'clients':>7}{'window':>7}{'acked ops/s':>13}{'applied/s':>11}{'p50 ms':>9}{'p99 ms':>9}{'echo ops/s':>12}{'ratio':>7}  verdicts"
    print(header)
    for label, row in zip(labels, summary):
        def fmt(value, spec):
            return format(value, spec) if value is not None else "-"
        print(f"  {label:<{width}}{row['clients']:>7}{row['window']:>7}{fmt(row['throughput_ops_s'], ',.0f'):>13}"
              f"{fmt(row['applied_ops_s'], ',.0f'):>11}{fmt(row['p50_ms'], '.3f'):>9}{fmt(row['p99_ms'], '.3f'):>9}"
              f"{fmt(row['echo_ops_s'], ',.0f'):>12}{fmt(row['ratio'], '.2f'):>7}  {','.join(row['verdicts'])}")


def _print_what_stays(report: dict) -> None:
    """Where a run's stores went, and what older runs were removed (the lab bounds what it keeps)."""
    if report["stores_deleted"]:
        print("  stores   deleted: the verdict is valid (--keep keeps them)")
    elif report["store"] == "sqlite":
        print(f"  stores   {report['run_dir']}/*.db")
    if report["older_runs_removed"]:
        print(f"  older    {report['older_runs_removed']} removed: var/lab keeps the {MAX_RUN_DIRS} newest run directories, "
              f"results/ the {MAX_HISTORY_FILES} newest histories")


def run_demo(args: argparse.Namespace) -> int:
    """A sequencer cluster (two replicas, SQLite) on the seed's three local hosts (or one), a short workload
    with a replica killed and restarted half-way, the report, and everything stopped."""
    real, seed_port = args.hosts.real, args.hosts.seed_port
    orchestrator, replica1, replica2 = archs.ORCHESTRATOR_HOST, *archs.REPLICA_HOSTS[:2]
    if args.ports == "seed":
        ports = topology.DEFAULT_PORTS
        clients, replicas = (seed_port(orchestrator, ports[key]) for key in ("sequencer_client", "sequencer_replica"))
        reads = ports["sequencer_replica_client"]
        layout = (f"  {real(orchestrator)}  sequencer (clients on :{clients}, replicas on :{replicas})\n"
                  f"  {real(replica1)}  replica1 (reads on :{seed_port(replica1, reads)})      "
                  f"{real(replica2)}  replica2 (reads on :{seed_port(replica2, reads)})\n")
    else:  # the ports are chosen at start: the run's topology.json names them
        layout = (f"  {real(orchestrator)}  sequencer      {real(replica1)}  replica1      {real(replica2)}  replica2   "
                  "(on free ports)\n")
    where = "one local host, each \"host\" on ports of its own" if args.hosts.one_host else "three local hosts"
    print(f"saldo demo: the sequencer architecture on {where}\n" + layout +
          f"  8 clients for {args.duration:g} s; replica1 is SIGKILLed at 30% of the run and restarted at 60%\n", flush=True)
    options = RunOptions(
        architecture="sequencer", clients=8, window=16, duration_s=args.duration, faults="kill-replica",
        ports=args.ports, progress=not args.quiet, run_name=f"demo-{time.strftime('%Y%m%d-%H%M%S')}", hosts=args.hosts,
        keep_stores=args.keep,
    )
    result = run_lab(options)
    print(format_table(result.report))
    print(f"  report   {result.report_path}\n  timeline {result.report['timeline_svg']}\n"
          f"  logs     {result.report['run_dir']}/*.log")
    _print_what_stays(result.report)
    print("\nEvery process was stopped. Next: `python3 lab.py up --arch sequencer` keeps a cluster running for client.py.")
    return 0 if result.report["verdict"] == "valid" else 1


def _watch(cluster: Cluster, names: list[str], poll_s: float = 0.5) -> None:
    """Until Ctrl-C or SIGTERM (KeyboardInterrupt): one line on stderr for each process of the
    cluster that exits, naming it, how it ended and how to start it again. The others keep running:
    killing one on purpose (the primary, to watch a failover) is what `up` is for."""
    running = set(names)
    while True:  # ends with KeyboardInterrupt only; each pass looks at each node once
        for name in names:
            if name in running and not cluster.is_running(name):
                running.discard(name)
                print(f"{name} {cluster.describe_exit(name)}; the rest of the cluster keeps running. "
                      f"To start it again by hand (then it is yours to stop): {cluster.command_line(name)}",
                      file=sys.stderr, flush=True)
        time.sleep(poll_s)


def _port_advice(command: str, error: PortInUse, ports: str) -> str:
    """The ways out of a clash on the ports a cluster needs, for `lab.py COMMAND`."""
    if error.pids:
        advice = (f"stop {'it' if len(error.pids) == 1 else 'them'} (kill {' '.join(map(str, error.pids))}; "
                  "Ctrl-C where `make up` or `lab.py up` runs stops its whole cluster)")
    else:
        advice = "stop that process (Ctrl-C where `make up` or `lab.py up` runs stops a whole cluster)"
    if ports == "seed":
        advice += ", or pass --ports free" + {"demo": " (make demo PORTS=free)",
                                              "up": " (with --run-dir DIR for a second cluster beside the first)"}.get(command, "")
    return advice


def run_up(args: argparse.Namespace) -> int:
    """Start a cluster and keep it up until Ctrl-C, for client.py and for poking at it by hand."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a TERM stops the cluster like Ctrl-C
    run_dir = args.run_dir.resolve() if args.run_dir else REPO_ROOT / "var" / "up" / args.arch
    # The cluster keeps its state between runs: its stores are what its last run left.
    lab = archs.build(args.arch, archs.LayoutOptions(run_dir=run_dir, ports=args.ports, proxies=args.proxies, store=args.store,
                                                     hosts=args.hosts, fresh_stores=False))
    try:
        cluster = Cluster(run_dir, lab.nodes, name=f"up-{args.arch}", architecture=args.arch)
    except RunDirInUse as error:
        print(f"lab.py up: the {args.arch} cluster did not start: {error} (--run-dir DIR)", file=sys.stderr)
        return 1
    with cluster:
        try:
            cluster.start()
        except PortInUse as error:
            print(f"lab.py up: the {args.arch} cluster did not start: {error}; {_port_advice('up', error, args.ports)}",
                  file=sys.stderr)
            return 1
        except (StartFailed, TimeoutError) as error:
            print(f"lab.py up: the {args.arch} cluster did not start: {error}", file=sys.stderr)
            return 1
        print(f"saldo {args.arch} cluster is up (topology: {cluster.topology_path})")
        for node in lab.nodes:
            print(f"  {node.name:<28} {node.host}:{node.port:<6} pid {cluster.pid(node.name)}  log {cluster.log_path(node.name)}")
        topo = cluster.topology_path.relative_to(REPO_ROOT) if cluster.topology_path.is_relative_to(REPO_ROOT) else cluster.topology_path
        print(f"\nTry, in another terminal:\n"
              f"  python3 client.py --topology {topo} deposit alice 100\n"
              f"  python3 client.py --topology {topo} transfer alice bob 25.50\n"
              f"  python3 client.py --topology {topo} balance bob\n"
              f"  python3 client.py --topology {topo} status\n"
              f"Kill any process above (kill -9 PID) to see what the others do: the cluster stays up.\n"
              f"Ctrl-C stops every process.", flush=True)
        try:
            _watch(cluster, [node.name for node in lab.nodes])
        except KeyboardInterrupt:
            print("\nstopping", flush=True)
    return 0


UP_DESCRIPTION = """\
Start one architecture's cluster on the seed's local hosts (127.0.0.11-14; on a machine without
those loopback addresses, 127.0.0.1 with ports of each "host"'s own) and keep it up, for
client.py (use the topology file it prints) and for breaking things by hand. When a process exits
(kill the primary and watch the failover), the others keep running: up prints one line naming the
process, how it ended (exit code or signal) and the exact command that starts it again by hand, and
does so for every exit. Ctrl-C or SIGTERM stops every process up started (not those you started by
hand)."""

DEMO_DESCRIPTION = """\
The first thing to run (make demo): a sequencer cluster (the sequencer on 127.0.0.11, two replicas
on 127.0.0.12 and .13, SQLite stores), 8 clients for a few seconds with replica1 SIGKILLed at 30% of
the run and restarted at 60%, the checker's verdict and the report; then every process is stopped.
It uses the seed's ports: stop a running `lab.py up` (make up) first, or pass --ports free."""

RUN_DESCRIPTION = """\
One run per architecture x client count x window: a bank workload against a live local cluster
(or, with --topology, against a deployed one), a fault schedule if asked (--faults), the checker's
verdict, a table, results/<run>.json and a timeline picture. No echo reference unless --reference.
Exit code 1 when a verdict is invalid for a reason its architecture promises to avoid."""

BENCH_DESCRIPTION = """\
Throughput and latency without faults (make bench): like run, but each run also measures the echo
reference (a bare echo server driven by the same clients), so a figure reads as a share of what this
machine and the client library allow. With several combinations or --repeat, a summary of medians
ends the output, one row per architecture (and variant, e.g. the farm's worker count)."""

CHAOS_DESCRIPTION = """\
Runs under a fault schedule (make chaos; --faults, default kill-replica): the injector kills,
pauses, partitions, delays or resets the node that plays the schedule's role in the architecture,
heals it, and the checker says whether anything acknowledged was lost or doubled. A schedule naming
a role the architecture does not have (kill-primary on sequencer) is refused before any run."""

FARM_BENCH_DESCRIPTION = """\
The worker farm's benchmark (make bench ARCH=farm): the bank workload without faults on the farm
with 1, 2 and 4 workers, then the lending measurement; one summary table (tasks/s, p50/p99, tasks
per worker batch, CPU per task, lending times) and why more workers were or were not faster here.
With a MySQL --store, the farm's database (<prefix>_farm) is dropped at the end, also on failure."""

LENDING_DESCRIPTION = """\
The worker farm's lending measurement (make bench-farm): farm1 is overloaded until farm2 lends it
workers, then the load stops until they return; prints how long each took (medians of --repeat),
and checks the load's history like any run."""


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The command line: the top parser, and each command's parser by name."""
    parser = UsageParser(prog="lab.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_command(name: str, summary: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=summary, description=description, epilog=epilog, formatter_class=_HelpFormatter)

    ports_help = "the seed's port numbers, or ports the kernel says are free (no clash with a running `lab.py up`)"
    demo_parser = add_command("demo", "a short sequencer run with a replica crash, then everything stops", DEMO_DESCRIPTION)
    demo_parser.add_argument("--duration", type=_seconds, default=8.0, help="seconds of workload")
    demo_parser.add_argument("--ports", choices=["seed", "free"], default="seed", help=ports_help)
    demo_parser.add_argument("--quiet", action="store_true", help="no progress line while the run goes")
    demo_parser.add_argument("--keep", action="store_true", help=KEEP_HELP)
    demo_parser.add_argument("--log-level", choices=LOG_LEVELS, default="warning", help="the lab's own log events on stderr")

    up_parser = add_command("up", "start a cluster and keep it up until Ctrl-C, whatever exits", UP_DESCRIPTION)
    up_parser.add_argument("--arch", choices=list(archs.BUILDERS), default="sequencer", metavar="ARCH",
                           help=f"architecture: {ARCHITECTURES}")
    up_parser.add_argument("--ports", choices=["seed", "free"], default="seed",
                           help="the seed's port numbers, or ports the kernel says are free")
    up_parser.add_argument("--proxies", action="store_true",
                           help="route the replicas' links through fault proxies (their control ports are in the topology)")
    up_parser.add_argument("--store", default="sqlite",
                           help="sqlite (a file per replica in the run directory), or a MySQL base URL "
                                "mysql://user:pass@host:port/prefix")
    up_parser.add_argument("--run-dir", type=Path, default=None,
                           help="where the topology file, the logs and the SQLite stores go (default: var/up/ARCH)")
    up_parser.add_argument("--log-level", choices=LOG_LEVELS, default="warning", help="the lab's own log events on stderr")

    schedules = _schedules_by_architecture()
    run_parser = add_command("run", "one or more runs; faults and the echo reference only when asked", RUN_DESCRIPTION, schedules)
    _add_run_flags(run_parser, default_faults="none", reference=False, faults_help="fault schedule: one of the list below")
    bench_parser = add_command("bench", "runs without faults, each with the echo reference; a summary of medians",
                               BENCH_DESCRIPTION)
    _add_run_flags(bench_parser, default_faults="none", reference=True,
                   faults_help="bench runs without faults: none only (use chaos for a schedule)")
    chaos_parser = add_command("chaos", "runs under a fault schedule", CHAOS_DESCRIPTION, schedules)
    _add_run_flags(chaos_parser, default_faults="kill-replica", reference=False, faults_help="fault schedule: one of the list below")

    lending_parser = add_command("farm-lending", "the worker farm: overload -> borrowed workers serving, underload -> returned",
                                 LENDING_DESCRIPTION)
    lending_parser.add_argument("--store", default="sqlite", help="sqlite, or a MySQL base URL mysql://user:pass@host:port/prefix")
    lending_parser.add_argument("--repeat", type=_positive_int, default=3, help="runs; the summary shows medians")
    lending_parser.add_argument("--load-s", type=_seconds, default=5.0, help="seconds of overload on farm1")
    lending_parser.add_argument("--clients", type=_positive_int, default=8, help="concurrent clients, all at farm1")
    lending_parser.add_argument("--window", type=_positive_int, default=256,
                                help="tasks in flight per client (far above what 2 workers finish)")
    lending_parser.add_argument("--log-level", choices=LOG_LEVELS, default="warning", help="the lab's own log events on stderr")
    farm_bench_parser = add_command("farm-bench", "the worker farm: 1, 2 and 4 workers, lending; one summary; its database dropped",
                                    FARM_BENCH_DESCRIPTION)
    farm_bench_parser.add_argument("--store", default="sqlite",
                                   help="sqlite, or a MySQL base URL mysql://user:pass@host:port/prefix")
    farm_bench_parser.add_argument("--duration", type=_seconds, default=10.0, help="seconds of workload per run")
    farm_bench_parser.add_argument("--repeat", type=_positive_int, default=3, help="runs per worker count; the summary shows medians")
    farm_bench_parser.add_argument("--lending-load-s", type=_seconds, default=5.0,
                                   help="seconds of overload in each lending measurement")
    farm_bench_parser.add_argument("--ports", choices=["seed", "free"], default="seed", help=ports_help)
    farm_bench_parser.add_argument("--log-level", choices=LOG_LEVELS, default="warning", help="the lab's own log events on stderr")
    return parser, {"demo": demo_parser, "up": up_parser, "run": run_parser, "bench": bench_parser,
                    "chaos": chaos_parser, "farm-lending": lending_parser, "farm-bench": farm_bench_parser}


def main(argv: list[str] | None = None) -> int:
    parser, subparsers = build_parser()
    args = parser.parse_args(argv)
    subparser = subparsers[args.command]
    architectures: list[str] = []
    if args.command in ("run", "bench", "chaos"):
        # Refused here, before any run: a bad name, or a schedule whose role the architecture lacks.
        try:
            architectures = _architectures(args.arch)
        except ValueError as error:
            subparser.error(f"argument --arch: {error}")
        if args.command == "bench" and args.faults != "none":
            subparser.error("bench runs without faults; use chaos")
        if args.topology is not None and args.option:
            subparser.error("argument --option: a deployed cluster (--topology) runs as it was deployed")
        for architecture in architectures:
            unfit = archs.unfit_schedule(architecture, args.faults, SCHEDULES[args.faults])
            if unfit:
                subparser.error(f"argument --faults: {unfit}")
            if args.topology is not None:
                from common.lab import deployed

                unfit = deployed.check(args.topology, architecture)
                if unfit is None and any(fault.kind in archs.PROXY_FAULTS for fault in SCHEDULES[args.faults]):
                    unfit = f"{args.faults} acts through fault proxies, which a deployed cluster does not have"
                if unfit:
                    subparser.error(f"argument --topology: {unfit}")
                continue
            try:  # the --option values: building the layout checks them (nothing starts, nothing is written)
                archs.build(architecture, archs.LayoutOptions(run_dir=Path("var/option-check"), ports="free",
                                                              store=args.store, extra=dict(args.option), fresh_stores=False))
            except ValueError as error:
                subparser.error(f"argument --option: {error}")
    tune_gc()  # the clients of a run share this process with a history of every operation
    configure("lab", args.log_level)
    args.hosts = archs.detect_hosts()
    if args.hosts.one_host:
        print(args.hosts.notice(), file=sys.stderr, flush=True)
    if args.command == "farm-bench":
        from common.lab import farm_bench

        return farm_bench.run(args.store, duration_s=args.duration, repeat=args.repeat, ports=args.ports,
                              lending_load_s=args.lending_load_s)
    if args.command == "farm-lending":
        from common.lab import farm_lending

        summary = farm_lending.run(args.store, repeat=args.repeat, load_s=args.load_s, clients=args.clients, window=args.window)
        return 0 if all(verdict == "valid" for verdict in summary["verdicts"]) else 1
    if args.command == "up":
        return run_up(args)
    try:
        return run_demo(args) if args.command == "demo" else _run_all(args, architectures)
    except PortInUse as error:
        print(f"lab.py {args.command}: the cluster did not start: {error}; {_port_advice(args.command, error, args.ports)}",
              file=sys.stderr)
        return 1
    except StartFailed as error:
        print(f"lab.py {args.command}: the cluster did not start: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
