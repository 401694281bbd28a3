"""Streaming export of the audit log as JSON Lines or CSV, row by row from `chain_rows`.

JSON Lines: one trace per line, exactly as `GET /v1/guard/traces/{id}` returns it, plus `seq`.
The stored canonical body is copied byte for byte, so a reader can re-check each line:
`hash == sha256(prev_hash + canonical JSON of the line without seq, prev_hash and hash)`, where
canonical means sorted keys and no whitespace (orjson's `OPT_SORT_KEYS`).

CSV: one row per trace with the fields an auditor filters on (CSV_FIELDS); the request's prompt
is included, the rounds are not (use JSON Lines for those). A text cell a client wrote (the prompt,
above all) that a spreadsheet would run as a formula (it starts with `=`, `+`, `-`, `@`, a tab or
a carriage return) is written with a leading `'`, as OWASP advises: opening the export in Excel
or LibreOffice shows the text, never evaluates it.
"""

from __future__ import annotations

import csv
import datetime as dt
from collections.abc import AsyncIterator, Iterable
from typing import Any, BinaryIO, Literal

import orjson

from guard.audit.chain import ChainRow
from guard.core.types import made_images

Format = Literal["jsonl", "csv"]
CSV_FIELDS = ("seq", "id", "time_utc", "created_at", "tenant", "key_id", "endpoint", "model",
              "backend", "decision", "status", "categories", "policy_id", "policy_version",
              "policy_sha256", "rounds", "duration_ms", "error_code", "prompt", "prev_hash",
              "hash")


def jsonl_line(row: ChainRow) -> bytes:
    head = orjson.dumps({"seq": row.seq, "prev_hash": row.prev_hash, "hash": row.hash})
    return head[:-1] + b"," + row.body[1:] + b"\n"


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    """A value as a CSV cell no spreadsheet evaluates (numbers stay numbers)."""
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def csv_record(row: ChainRow) -> list[Any]:
    return [_cell(value) for value in _csv_values(row)]


def _csv_values(row: ChainRow) -> list[Any]:
    t = orjson.loads(row.body)
    policy = t.get("policy") or {}
    error = t.get("error") or {}
    return [
        row.seq, t["id"],
        dt.datetime.fromtimestamp(t["created_at"], dt.UTC).isoformat(timespec="milliseconds"),
        t["created_at"], t.get("tenant"), t.get("key_id"), t.get("endpoint"), t.get("model"),
        t.get("backend"), t["decision"], t["status"], ";".join(t.get("categories") or ()),
        policy.get("id"), policy.get("version"), policy.get("sha256"),
        _round_count(t.get("rounds") or ()),
        t.get("duration_ms"), error.get("code"), (t.get("request") or {}).get("prompt"),
        row.prev_hash, row.hash,
    ]


def _round_count(rounds: Iterable[dict[str, Any]]) -> int:
    """As Trace.round_count: rounds that made images (generate or edit, not cancelled),
    counted by index, however many backend calls each had."""
    return len({r.get("index") for r in rounds
                if made_images(r.get("kind"), r.get("cancelled"))})


class _Utf8:
    """The text side csv.writer wants, over a binary stream."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out

    def write(self, text: str) -> int:
        return self.out.write(text.encode())


async def export(rows: AsyncIterator[ChainRow], out: BinaryIO, fmt: Format) -> int:
    """Write every row to `out` as it is read; returns the number written."""
    count = 0
    if fmt == "jsonl":
        async for row in rows:
            out.write(jsonl_line(row))
            count += 1
    else:
        writer = csv.writer(_Utf8(out), lineterminator="\n")
        writer.writerow(CSV_FIELDS)
        async for row in rows:
            writer.writerow(csv_record(row))
            count += 1
    out.flush()
    return count
