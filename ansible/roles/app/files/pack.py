#!/usr/bin/env python3
"""Pack saldo's code into one archive named by its content, on the controller.

    pack.py SOURCE_DIR OUT_DIR   ->   prints {"path": ".../saldo-<sha256>.tar", "sha256": "<sha256>"}

Only what the hosts run goes in: the top-level scripts, common/, sql/ and requirements.txt. The
archive is byte for byte the same for the same files (sorted names, no times, no owners), so its
hash names the release and a second deployment of unchanged code copies nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

INCLUDED = ("*.py", "common/**/*.py", "sql/*.sql", "requirements.txt")


def files(source: Path) -> list[Path]:
    found = {path for pattern in INCLUDED for path in source.glob(pattern) if path.is_file()}
    return sorted(path for path in found if "__pycache__" not in path.parts)


def pack(source: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for path in files(source):
            info = tarfile.TarInfo(str(path.relative_to(source)))
            data = path.read_bytes()
            info.size = len(data)
            info.mode = 0o755 if path.stat().st_mode & 0o100 else 0o644
            info.mtime = 0
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def main(argv: list[str]) -> int:
    source, out_dir = Path(argv[1]).resolve(), Path(argv[2])
    data = pack(source)
    digest = hashlib.sha256(data).hexdigest()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"saldo-{digest}.tar"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    print(json.dumps({"path": str(path.resolve()), "sha256": digest}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
