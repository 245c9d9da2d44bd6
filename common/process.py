"""How a saldo process starts and stops: logging, signals, the event loop.

Owns the life cycle every top-level script shares: `run(main)` configures key=value logging with
the node's name, tunes the garbage collector, runs `main(stop)` on a fresh event loop beside the
loop monitor that STATUS reports (common/transport/aio.py), and turns SIGTERM / SIGINT into `stop` being set,
so the process closes its listeners, lets its last group commit reach the disk, and exits 0.
SIGKILL is the lab's business: nothing here is needed for a killed process to recover.
"""

from __future__ import annotations

import asyncio
import gc
import signal
from typing import Awaitable, Callable

from common import log as saldo_log
from common.transport import aio

log = saldo_log.get_logger("process")

# CPython's cyclic collector, by default, runs a young collection every 700 net allocations and
# now and then a full one that walks every object it tracks. saldo's hot paths make few reference
# cycles, so collections run far less often; they still run, and memory stays bounded. What a
# process keeps per operation is kept out of the collector's sight where it can be (the Bank's
# dedup window holds plain tuples, see common/bank/state.py): a walk over it was a pause of 10 to 90 ms.
GC_THRESHOLDS = (50_000, 20, 10)


def tune_gc() -> None:
    """Leave what exists at startup (modules, classes) out of every collection, and collect less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def add_common_flags(parser) -> None:
    parser.add_argument("--name", help="this node's name (logs, status, topology entry)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def run(main: Callable[[asyncio.Event], Awaitable[int | None]], *, node_name: str, log_level: str = "info") -> int:
    saldo_log.configure(node_name, log_level)
    tune_gc()

    async def runner() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        monitor = asyncio.create_task(aio.LoopMonitor.run(stop))
        try:
            code = await main(stop)
        finally:
            monitor.cancel()
        return 0 if code is None else code

    try:
        code = asyncio.run(runner())
    except KeyboardInterrupt:
        code = 130
    log.info("exited", code=code)
    return code
