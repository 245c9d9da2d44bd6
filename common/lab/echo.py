"""The reference figure: a bare newline-JSON echo server on the same transport as saldo.

    python -m common.lab.echo --port 7999

Owns the yardstick of `make bench`. Each request line is decoded and its reply encoded, with the
same codec and asyncio transport every saldo process uses, and nothing else: no validation, no
state, no disk. A bench run drives it with the same clients and pipelining as the architecture it
measures, so "standalone reaches 0.6 of echo" means the same thing on any day and any machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from common import topology
from common.bank.errors import SaldoError, error_reply
from common.process import add_common_flags, run
from common.transport import aio, wire


async def handle_echo(stream: aio.MessageStream) -> None:
    encode = wire.encode
    while True:
        batch = await stream.read_batch()
        if batch is None:
            return
        lines = []
        for message in batch:
            if isinstance(message, SaldoError):
                lines.append(encode(error_reply(message.code, message.detail)))
            elif message.get("TASK") == "STATUS":
                lines.append(encode({"ID": message.get("ID"), "STATUS": "OK", "ROLE": "echo", "PID": os.getpid(),
                                     "LOOP": aio.LoopMonitor.snapshot()}))
            else:
                lines.append(encode({"ID": message.get("ID"), "STATUS": "OK", "ECHO": message.get("TASK")}))
        stream.send_bytes(b"".join(lines))
        if not await stream.drain():
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7999)
    args = topology.parse_args(parser, argv)

    async def serve(stop: asyncio.Event) -> int:
        server = await aio.start_server(handle_echo, args.host, args.port, name="echo")
        await stop.wait()
        await server.stop()
        return 0

    return run(serve, node_name=args.name or "echo", log_level=args.log_level)


if __name__ == "__main__":
    sys.exit(main())
