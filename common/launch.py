"""How a top-level script picks its role module by --mode and runs it.

Each mode names a driver module (a role's I/O, in its architecture's folder: common/farm/server.py,
common/sequencer/replica.py, ...) with `add_flags(parser, mode)`, `prepare(args)` and
`async serve(args, stop)`. A driver runs its architecture's core (a state machine without I/O)
against sockets, stores and timers.
"""

from __future__ import annotations

import argparse
import importlib

from common import topology
from common.cli import UsageParser
from common.process import add_common_flags, run


def main(description: str, modes: dict[str, str], default_mode: str, argv: list[str] | None) -> int:
    """Parse --mode first (from the flags or the topology entry), then the chosen module's flags."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--mode")
    early.add_argument("--topology")
    early.add_argument("--name")
    known, _rest = early.parse_known_args(argv)
    parser = UsageParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = known.mode
    if mode is None and known.topology and known.name:
        try:
            mode = topology.load(known.topology)["nodes"].get(known.name, {}).get("mode")
        except ValueError as error:
            parser.fail(str(error))
    mode = mode or default_mode
    add_common_flags(parser)
    parser.add_argument("--mode", choices=sorted(modes), default=default_mode, help=f"role (default {default_mode})")
    if mode not in modes:
        parser.fail(f"--mode must be one of {', '.join(sorted(modes))}")
    module = importlib.import_module(modes[mode])
    module.add_flags(parser, mode)  # the flags of this mode (a module may serve two)
    args = topology.parse_args(parser, argv)
    args.mode = mode
    module.prepare(args)
    return run(lambda stop: module.serve(args, stop), node_name=args.name, log_level=args.log_level)
