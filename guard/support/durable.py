"""Files that must survive a crash: append a record and fsync it, or replace a file whole.

The audit log's anchors and tree heads (guard.audit.anchor, guard.audit.heads) and its trace
spool (guard.audit.spool) are append-only files whose every line must be on disk before the
caller goes on: a line is written with one O_APPEND write and fsync'd.
"""

from __future__ import annotations

import os
from pathlib import Path


def append_durably(path: Path, data: bytes, mode: int = 0o640) -> None:
    """Append `data` to `path` (created with `mode`, its folder too) and fsync it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_lines(path: Path) -> list[tuple[int, bytes]]:
    """The non-empty lines of an append-only file with their line numbers (from 1); none when
    it does not exist (yet)."""
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return []
    return [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]


def replace_durably(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write `data` to a file beside `path`, fsync it, then rename it over `path`."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
