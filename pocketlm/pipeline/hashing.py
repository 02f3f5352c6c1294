"""Content hashes of files and folders, remembered by size and modification time (as DVC does), so that a
pipeline with nothing changed re-reads no data to know it."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..fsio import atomic_write_text, file_sha256


class HashCache:
    def __init__(self, path: Path):
        self.path = path
        try:
            self.known: dict[str, list] = json.loads(path.read_text())
        except (OSError, ValueError):
            self.known = {}
        self.changed = False

    def file(self, path: Path) -> str:
        stat = path.stat()
        key = str(path.resolve())
        seen = self.known.get(key)
        if seen and seen[0] == stat.st_size and seen[1] == stat.st_mtime_ns:
            return seen[2]
        digest = file_sha256(path)
        self.known[key] = [stat.st_size, stat.st_mtime_ns, digest]
        self.changed = True
        return digest

    def of(self, path: str | Path) -> str | None:
        """sha256 of a file's bytes, or of a folder's files' names and hashes; None when nothing is there."""
        path = Path(path)
        if path.is_file():
            return self.file(path)
        if not path.is_dir():
            return None
        digest = hashlib.sha256()
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                item = Path(root) / name
                digest.update(f"{item.relative_to(path).as_posix()}\0{self.file(item)}\n".encode())
        return digest.hexdigest()

    def save(self) -> None:
        if self.changed:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps(self.known))
            self.changed = False


def digest(value) -> str:
    """sha256 of a JSON-able value, its keys in order."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
