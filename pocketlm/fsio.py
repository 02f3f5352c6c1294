"""Files written so that a crash never leaves half of one where a good one was, and their hashes (a base
module: it imports only pocketlm.errors)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import CheckpointError


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, for provenance records."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write(path: str | Path, write) -> Path:
    """Call write(binary_file) on a temporary file beside `path`, fsync, rename: never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished directory into place; an existing one is swapped out, then removed."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory; choose another output path")
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def timestamp() -> str:
    """The time an output records (UTC, to the second): now, or SOURCE_DATE_EPOCH's time where it is set (the
    reproducible-builds convention), so that the same work run twice can write the same bytes."""
    import datetime as _dt
    import os

    epoch = os.environ.get("SOURCE_DATE_EPOCH", "")
    when = (_dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc) if epoch.isdigit()
            else _dt.datetime.now(_dt.timezone.utc))
    return when.isoformat(timespec="seconds")
