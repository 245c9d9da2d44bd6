"""The I/O side of each role: one module per kind of process, each with `add_flags(parser, mode)`,
`prepare(args)` and `async serve(args, stop)`. They run a protocol module of common/ (a state
machine without I/O) against sockets, stores and timers. The top-level scripts pick one by --mode."""
