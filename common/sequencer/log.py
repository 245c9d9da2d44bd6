"""The sequencer's durable log: numbered entries in segment files.

Owns the files under the sequencer's log directory:

    ids-00000000000000000001.log   entries 1 .. 10000: truncated, kept for the ids they name
    seg-00000000000000010001.log   entries 10001 .. 20000, one ORDERED line each
    seg-00000000000000020001.log   entries 20001 .. (the active segment, appended to)

`append` writes a group of entries and fsyncs before it returns, so an entry the sequencer has
broadcast is on disk (a crash can never hand its number out again). `truncate_before(seq,
ids_from_seq)` takes whole segments that end before `seq` out of the log: the replicas no longer
need them, but the sequencer remembers the ids of its last operations beyond truncation and across
restarts (common/sequencer/core.py, OperationIds), so a segment is renamed `ids-...` and kept until the
ids remembered no longer reach into it (every entry below `ids_from_seq`), then deleted. The active
segment is never taken out, so the last number used is always known. `load` reads the log's
segments back, checks that the numbers run without a gap, and cuts off a torn last line (a crash in
the middle of a write: that entry was never acknowledged); `retired` reads the `ids-` segments.

Truncation does not sync the directory, so a crash may lose some of its renames and deletions, in
any order. `load` finishes a lost rename (a `seg-` segment below an `ids-` one was taken out of the
log too: truncation only moves forward), and `retired` reads the `ids-` segments that run without a
gap up to the log and deletes older ones (what a lost deletion left).

Appends run on one writer thread. `truncate_before` may run on another one at the same time: it
only renames and deletes segments below the active one, and never touches the writer's open file.
"""

from __future__ import annotations

import os
from pathlib import Path

from common.bank.errors import SaldoError
from common.log import get_logger
from common.sequencer.core import parse_logged_entry

log = get_logger("seqlog")

DEFAULT_SEGMENT_ENTRIES = 10_000
_PREFIX, _RETIRED_PREFIX, _SUFFIX = "seg-", "ids-", ".log"


def _segment_name(first_seq: int, prefix: str = _PREFIX) -> str:
    return f"{prefix}{first_seq:020d}{_SUFFIX}"


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

    def segments(self, prefix: str = _PREFIX) -> list[tuple[int, Path]]:
        """The log's segments (or, with the `ids-` prefix, the retired ones) by first seq."""
        found = []
        for path in self.directory.iterdir():
            name = path.name
            if name.startswith(prefix) and name.endswith(_SUFFIX):
                found.append((int(name[len(prefix) : -len(_SUFFIX)]), path))
        return sorted(found)

    def load(self) -> tuple[list[tuple[int, str, bytes]], int]:
        """Every entry still in the log as (seq, op id, line), and the first seq the log holds
        (1 for an empty log). Cuts a torn last line; raises LogCorrupt on a gap."""
        entries: list[tuple[int, str, bytes]] = []
        retired = self.segments(_RETIRED_PREFIX)
        for first_seq, path in self.segments():
            if retired and first_seq < retired[-1][0]:
                log.warning("lost_rename_finished", segment=path.name)
                path.rename(self.directory / _segment_name(first_seq, _RETIRED_PREFIX))
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
                entries.append(_read_entry(path, line, expected))
                expected += 1
        log_start_seq = segments[0][0] if segments else 1
        self._last_seq = (expected - 1) if expected is not None else 0
        if segments:
            self._active_first_seq = segments[-1][0]
            self._active_count = self._last_seq - self._active_first_seq + 1
        return entries, log_start_seq

    def retired(self, log_start_seq: int) -> list[tuple[int, str, bytes]]:
        """The entries of the retired (`ids-`) segments that run without a gap up to the log's
        start (call after load), oldest first, as (seq, op id, line). An older one, before a gap,
        was deleted by a truncation whose deletion a crash lost: it is deleted again."""
        runs: list[list[tuple[int, str, bytes]]] = []
        next_first = log_start_seq
        segments = self.segments(_RETIRED_PREFIX)
        while segments:
            first_seq, path = segments.pop()
            lines = path.read_bytes().split(b"\n")
            if lines[-1] or len(lines) - 1 != next_first - first_seq:
                segments.append((first_seq, path))
                break
            runs.append([_read_entry(path, line, first_seq + offset) for offset, line in enumerate(lines[:-1])])
            next_first = first_seq
        for _first_seq, path in segments:
            log.warning("lost_deletion_finished", segment=path.name)
            path.unlink()
        return [entry for run in reversed(runs) for entry in run]

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

    def truncate_before(self, seq: int, ids_from_seq: int) -> int:
        """Take the segments whose every entry is below `seq` out of the log, and delete those
        whose every entry is below `ids_from_seq` too (the others are kept as `ids-` segments);
        delete the `ids-` segments that end below `ids_from_seq`. The first seq the log holds."""
        segments = self.segments()
        retired = deleted = 0
        for index, (first_seq, path) in enumerate(segments[:-1]):  # never the active one
            next_first = segments[index + 1][0]
            if next_first <= seq:
                path.rename(self.directory / _segment_name(first_seq, _RETIRED_PREFIX))
                retired += 1
        kept = self.segments(_RETIRED_PREFIX)
        remaining = self.segments()
        log_start_seq = remaining[0][0] if remaining else self._last_seq + 1
        for index, (_first_seq, path) in enumerate(kept):
            next_first = kept[index + 1][0] if index + 1 < len(kept) else log_start_seq
            if next_first <= ids_from_seq:
                path.unlink()
                deleted += 1
        if retired or deleted:
            log.info("log_truncated", segments_retired=retired, retired_segments_deleted=deleted,
                     log_start_seq=log_start_seq, ids_from_seq=ids_from_seq)
        return log_start_seq

    def disk_bytes(self, retired: bool = False) -> int:
        """The log's segments' size, or the retired (`ids-`) ones' (for STATUS). Truncation may
        rename or delete one meanwhile, on its own thread."""
        total = 0
        for _first, path in self.segments(_RETIRED_PREFIX if retired else _PREFIX):
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                continue
        return total

    def close(self) -> None:
        if self._active_fd is not None:
            os.close(self._active_fd)
            self._active_fd = None


def _read_entry(path: Path, line: bytes, expected_seq: int) -> tuple[int, str, bytes]:
    """(seq, op id, line with its newline) of a segment's line, which must be entry `expected_seq`."""
    try:
        seq, op, _retry_of = parse_logged_entry(line)
    except SaldoError as error:
        raise LogCorrupt(f"{path.name}: unreadable entry after seq {expected_seq - 1}: {error}") from None
    if seq != expected_seq:
        raise LogCorrupt(f"{path.name}: entry {seq} where {expected_seq} was expected")
    return seq, op.op_id, line + b"\n"
