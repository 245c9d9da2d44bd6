"""The sequencer's durable log: numbered entries in segment files.

Owns the files under the sequencer's log directory:

    seg-00000000000000000001.log   entries 1 .. 10000, one ORDERED line each
    seg-00000000000000010001.log   entries 10001 .. (the active segment, appended to)

`append` writes a group of entries and fsyncs before it returns, so an entry the sequencer has
broadcast is on disk (a crash can never hand its number out again). `truncate_before(seq)` deletes
whole segments that end before `seq`; the active segment is never deleted, so the last number used
is always known. `load` reads every segment back, checks that the numbers run without a gap, and
cuts off a torn last line (a crash in the middle of a write: that entry was never acknowledged).

Appends run on one writer thread. `truncate_before` may run on another one at the same time: it
only deletes segments below the active one, and never touches the writer's open file.
"""

from __future__ import annotations

import os
from pathlib import Path

from common import wire
from common.log import get_logger
from common.sequencing import parse_entry

log = get_logger("seqlog")

DEFAULT_SEGMENT_ENTRIES = 10_000
_PREFIX, _SUFFIX = "seg-", ".log"


def _segment_name(first_seq: int) -> str:
    return f"{_PREFIX}{first_seq:020d}{_SUFFIX}"


class LogCorrupt(Exception):
    """The log's numbering has a gap or a line that is not an entry: refuse to start."""


class SequencerLog:
    def __init__(self, directory: str | Path, *, segment_entries: int = DEFAULT_SEGMENT_ENTRIES, fsync: bool = True) -> None:
        assert segment_entries > 0
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.segment_entries = segment_entries
        self.fsync = fsync
        self._active_fd: int | None = None
        self._active_first_seq = 0
        self._active_count = 0
        self._last_seq = 0
        self.bytes_written = 0

    def segments(self) -> list[tuple[int, Path]]:
        found = []
        for path in self.directory.iterdir():
            name = path.name
            if name.startswith(_PREFIX) and name.endswith(_SUFFIX):
                found.append((int(name[len(_PREFIX) : -len(_SUFFIX)]), path))
        return sorted(found)

    def load(self) -> tuple[list[tuple[int, str, bytes]], int]:
        """Every entry still in the log as (seq, op id, line), and the first seq the log holds
        (1 for an empty log). Cuts a torn last line; raises LogCorrupt on a gap."""
        entries: list[tuple[int, str, bytes]] = []
        segments = self.segments()
        expected: int | None = None
        for index, (first_seq, path) in enumerate(segments):
            data = path.read_bytes()
            last_newline = data.rfind(b"\n")
            complete = data[: last_newline + 1] if last_newline >= 0 else b""
            if len(complete) != len(data):
                if index != len(segments) - 1:
                    raise LogCorrupt(f"{path} ends mid-line but is not the last segment")
                log.warning("torn_entry_cut", segment=path.name, bytes_cut=len(data) - len(complete))
                with path.open("r+b") as handle:
                    handle.truncate(len(complete))
                    os.fsync(handle.fileno())
            if expected is not None and first_seq != expected:
                raise LogCorrupt(f"{path.name} starts at {first_seq}, expected {expected}")
            expected = first_seq
            for line in complete.split(b"\n")[:-1]:
                try:
                    message = wire.decode_line(line)
                    seq, op = parse_entry(message or {})
                except Exception as error:
                    raise LogCorrupt(f"{path.name}: unreadable entry after seq {expected - 1}: {error}") from None
                if seq != expected:
                    raise LogCorrupt(f"{path.name}: entry {seq} where {expected} was expected")
                entries.append((seq, op.op_id, line + b"\n"))
                expected += 1
        log_start_seq = segments[0][0] if segments else 1
        self._last_seq = (expected - 1) if expected is not None else 0
        if segments:
            self._active_first_seq = segments[-1][0]
            self._active_count = self._last_seq - self._active_first_seq + 1
        return entries, log_start_seq

    @property
    def last_seq(self) -> int:
        return self._last_seq

    def append(self, entries: list[tuple[int, str, bytes]]) -> None:
        """Write entries (consecutive, following the last one) and make them durable."""
        if not entries:
            return
        assert entries[0][0] == self._last_seq + 1, (entries[0][0], self._last_seq)
        start = 0
        while start < len(entries):
            self._ensure_segment(entries[start][0])
            room = self.segment_entries - self._active_count
            chunk = entries[start : start + room]
            data = b"".join(line for _seq, _op_id, line in chunk)
            view = memoryview(data)
            while view:
                written = os.write(self._active_fd, view)
                view = view[written:]
            if self.fsync:
                os.fsync(self._active_fd)
            self._active_count += len(chunk)
            self.bytes_written += len(data)
            start += len(chunk)
        self._last_seq = entries[-1][0]

    def _ensure_segment(self, next_seq: int) -> None:
        """An open active segment with room: the one found at load, or a new one at next_seq."""
        if self._active_fd is not None and self._active_count < self.segment_entries:
            return
        if self._active_fd is not None:
            os.close(self._active_fd)
            self._active_fd = None
        if self._active_first_seq and self._active_count < self.segment_entries:
            path = self.directory / _segment_name(self._active_first_seq)  # reopened after a restart
        else:
            path = self.directory / _segment_name(next_seq)
            self._active_first_seq = next_seq
            self._active_count = 0
        self._active_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if self.fsync:  # a new file's name must survive a crash as well as its content
            directory_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(directory_fd)
            finally:
                os.close(directory_fd)

    def truncate_before(self, seq: int) -> int:
        """Delete segments whose every entry is below `seq`; the first seq still held."""
        segments = self.segments()
        deleted = 0
        for index, (_first_seq, path) in enumerate(segments[:-1]):  # never the active one
            next_first = segments[index + 1][0]
            if next_first <= seq:
                path.unlink()
                deleted += 1
        remaining = self.segments()
        if deleted:
            log.info("log_truncated", segments_deleted=deleted, log_start_seq=remaining[0][0] if remaining else seq)
        return remaining[0][0] if remaining else self._last_seq + 1

    def disk_bytes(self) -> int:
        """The segments' size (for STATUS). Truncation may delete one meanwhile, on the log's thread."""
        total = 0
        for _first, path in self.segments():
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                continue
        return total

    def close(self) -> None:
        if self._active_fd is not None:
            os.close(self._active_fd)
            self._active_fd = None
