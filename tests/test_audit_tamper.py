"""The tamper matrix: every way a database admin could alter the audit log, on SQLite and on
PostgreSQL, each caught by `safeedit audit verify --json` run as the real command (exit 1, the
expected problem kind), and the untouched log verifies (exit 0).

The log: 8 traces written through the store API, a signed checkpoint every 3 (seq 3 and 6) and
an anchor of the head (seq 8) written outside the database when the store closes: to a file for
SQLite, to a table in another schema for PostgreSQL. Beside them, 5 auditors' labels in their own
chain (guard.core.labels): a checkpoint at label seq 3, their head anchored beside the traces'.
"""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import yaml

from guard.audit.keys import Signer
from guard.core.hashchain import link_hash
from guard.core.labels import Label
from guard.plugins import build_store
from tests.audit_writer import sample_trace
from tests.services import drop_schemas
from tests.test_audit_postgres import pg_dsn  # noqa: F401 - the fixture: skip or fail without PG

KEYS_ENV = "SAFEEDIT_TEST_CHECKPOINT_KEYS"
KID = "k2025"
KEYS = f"{KID}:tamper-matrix-secret-0123456789"
ROOT = Path(__file__).resolve().parent.parent
SAFEEDIT = str(ROOT / ".venv" / "bin" / "safeedit")
N, EVERY, N_LABELS = 8, 3, 5


class Db:
    """Plain SQL on the audit database, as its admin would type it (`?` placeholders)."""

    def __init__(self, sqlite_path: Path | None = None, pg: tuple[str, str] | None = None):
        self.sqlite_path, self.pg = sqlite_path, pg

    def run(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        if self.sqlite_path is not None:
            with sqlite3.connect(self.sqlite_path) as conn:
                return conn.execute(sql, args).fetchall()
        assert self.pg is not None
        numbered = iter(range(1, 100))
        return asyncio.run(self._pg(re.sub(r"\?", lambda _: f"${next(numbered)}", sql), args))

    async def _pg(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        assert self.pg is not None
        dsn, schema = self.pg
        conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
        try:
            return [tuple(r) for r in await conn.fetch(sql, *args)]
        finally:
            await conn.close()

    def hash_at(self, seq: int, table: str = "traces") -> str | None:
        rows = self.run(f"SELECT hash FROM {table} WHERE seq = ?", seq)
        return rows[0][0] if rows else None

    def rehash(self, from_seq: int, edit: Callable[[str], str] = lambda body: body,
               table: str = "traces", head: str = "chain_head") -> None:
        """Edit the body at `from_seq` and recompute every hash after it, chain head included:
        the chain alone is consistent again."""
        prev = self.hash_at(from_seq - 1, table)
        for seq, body in self.run(f"SELECT seq, body FROM {table} WHERE seq >= ? ORDER BY seq",
                                  from_seq):
            body = edit(body) if seq == from_seq else body
            new = link_hash(prev, body.encode())
            self.run(f"UPDATE {table} SET body = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                     body, prev, new, seq)
            prev = new
        self.run(f"UPDATE {head} SET hash = ? WHERE id = 1", prev)

    def resign(self, signer: Signer) -> None:
        """Re-sign every checkpoint over the (rewritten) chain with `signer`."""
        for seq, trace_id in self.run("SELECT seq, trace_id FROM checkpoints"):
            cp = signer.sign(seq, trace_id, self.hash_at(seq) or "")
            self.run("UPDATE checkpoints SET hash = ?, signature = ?, key_fingerprint = ?,"
                     " kid = ? WHERE seq = ?", cp.hash, cp.signature, cp.key_fingerprint,
                     cp.kid, seq)


def _picnic(body: str) -> str:
    return body.replace("bloodbath", "picnic")


def _swap(db: Db) -> None:
    db.run("UPDATE traces SET seq = -1 WHERE seq = 4")
    db.run("UPDATE traces SET seq = 4 WHERE seq = 5")
    db.run("UPDATE traces SET seq = 5 WHERE seq = -1")


def _cut_tail_with_checkpoint(db: Db) -> None:
    db.run("DELETE FROM traces WHERE seq >= 6")
    db.run("DELETE FROM checkpoints WHERE seq >= 6")
    db.run("UPDATE chain_head SET seq = 5, hash = ? WHERE id = 1", db.hash_at(5))


def _append_forged(db: Db) -> None:
    """A made-up trace chained to the head with correct hashes and matching columns."""
    prev = db.hash_at(N)
    body = orjson.loads(db.run("SELECT body FROM traces WHERE seq = ?", N)[0][0])
    body["id"] = "tr_forged"
    new_body = orjson.dumps(body).decode()
    db.run("INSERT INTO traces (seq, id, created_at, tenant, key_id, decision, status,"
           " categories, policy_id, policy_version, model, body, prev_hash, hash)"
           " SELECT ?, ?, created_at, tenant, key_id, decision, status, categories, policy_id,"
           " policy_version, model, ?, ?, ? FROM traces WHERE seq = ?",
           N + 1, "tr_forged", new_body, prev, link_hash(prev, new_body.encode()), N)
    db.run("UPDATE chain_head SET seq = ?, hash = ? WHERE id = 1", N + 1, db.hash_at(N + 1))


def _wipe(db: Db) -> None:
    db.run("DELETE FROM traces")
    db.run("DELETE FROM checkpoints")
    db.run("UPDATE chain_head SET seq = 0, hash = NULL WHERE id = 1")


def _resign_wrong_key(db: Db) -> None:
    db.rehash(2, _picnic)
    db.resign(Signer({KID: b"the-attackers-own-key-0123456789"}))


TAMPERINGS: dict[str, tuple[Callable[[Db], object], set[str]]] = {
    "change_body": (lambda db: db.run("UPDATE traces SET body = replace(body, 'bloodbath',"
                                      " 'picnic') WHERE seq = 2"), {"changed"}),
    "delete_row": (lambda db: db.run("DELETE FROM traces WHERE seq = 4"), {"removed"}),
    "swap_rows": (_swap, {"reordered"}),
    "truncate_tail": (lambda db: db.run("DELETE FROM traces WHERE seq >= 7"),
                      {"removed", "anchor_missing_rows"}),
    "truncate_tail_checkpoint_head": (_cut_tail_with_checkpoint, {"anchor_missing_rows"}),
    "append_forged": (_append_forged, {"checkpoint_missing"}),
    "wipe": (_wipe, {"anchor_missing_rows"}),
    "delete_checkpoints": (lambda db: db.run("DELETE FROM checkpoints"), {"checkpoint_missing"}),
    "rewrite_after_last_checkpoint": (lambda db: db.rehash(7, _picnic), {"anchor_mismatch"}),
    "rehash_without_key": (lambda db: db.rehash(2, _picnic), {"changed", "anchor_mismatch"}),
    "rehash_resign_wrong_key": (_resign_wrong_key, {"checkpoint", "anchor_mismatch"}),
}


def _label_wipe(db: Db) -> None:
    db.run("DELETE FROM labels")
    db.run("DELETE FROM label_checkpoints")
    db.run("UPDATE label_chain_head SET seq = 0, hash = NULL WHERE id = 1")


def _missed(body: str) -> str:
    return body.replace('"correct"', '"missed"')


# Each caught in the label chain's report, the traces' staying intact.
LABEL_TAMPERINGS: dict[str, tuple[Callable[[Db], object], set[str]]] = {
    "change_body": (lambda db: db.run("UPDATE labels SET body = replace(body, '\"correct\"',"
                                      " '\"missed\"') WHERE seq = 2"), {"changed"}),
    "change_column": (lambda db: db.run("UPDATE labels SET verdict = 'missed' WHERE seq = 2"),
                      {"changed"}),
    "delete_row": (lambda db: db.run("DELETE FROM labels WHERE seq = 2"), {"removed"}),
    "truncate_tail": (lambda db: db.run("DELETE FROM labels WHERE seq >= 4"),
                      {"removed", "anchor_missing_rows"}),
    "wipe": (_label_wipe, {"anchor_missing_rows"}),
    "delete_checkpoints": (lambda db: db.run("DELETE FROM label_checkpoints"),
                           {"checkpoint_missing"}),
    "rehash_without_key": (lambda db: db.rehash(2, _missed, "labels", "label_chain_head"),
                           {"changed", "anchor_mismatch"}),
}


def _write_log(options: dict[str, Any]) -> None:
    async def go() -> None:
        store = build_store(options)
        traces = [sample_trace("app", i, decision="refused" if i == 1 else "edited")
                  for i in range(N)]
        for trace in traces:
            await store.write(trace)
        for trace in traces[:N_LABELS]:
            await store.add_label(Label(trace_id=trace.id, round=1, slot=0, verdict="correct",
                                        key_id="audit"))
        await store.aclose()  # anchors both heads outside the database

    asyncio.run(go())


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def log(request: pytest.FixtureRequest, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Db]]:
    """A freshly written log; (config path, the database)."""
    monkeypatch.setenv(KEYS_ENV, KEYS)
    common = {"checkpoint_every": EVERY, "checkpoint_keys_env": KEYS_ENV}
    schemas: list[str] = []
    if request.param == "sqlite":
        db = Db(sqlite_path=tmp_path / "audit.db")
        options = {"kind": "sqlite", "path": str(db.sqlite_path), **common,
                   "anchor": {"path": str(tmp_path / "witness" / "audit.anchors")}}
    else:
        dsn = request.getfixturevalue("pg_dsn")
        schemas = [f"t_{uuid.uuid4().hex[:12]}", f"w_{uuid.uuid4().hex[:12]}"]
        db = Db(pg=(dsn, schemas[0]))
        options = {"kind": "postgres", "dsn": dsn, "schema": schemas[0], **common,
                   "images_dir": str(tmp_path / "images"),
                   "anchor": {"kind": "postgres", "dsn": dsn, "schema": schemas[1]}}
    config = tmp_path / "cli" / "config.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump({"audit": options}))
    _write_log(options)
    yield str(config), db
    if schemas:
        asyncio.run(drop_schemas(request.getfixturevalue("pg_dsn"), *schemas))


def verify(config: str) -> tuple[int, dict[str, Any]]:
    result = subprocess.run([SAFEEDIT, "audit", "verify", "--config", config, "--json"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={**os.environ, KEYS_ENV: KEYS})
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, orjson.loads(result.stdout)


def test_the_untouched_log_verifies(log: tuple[str, Db]) -> None:
    code, report = verify(log[0])
    assert code == 0, report["problems"]
    assert report["ok"] and report["traces"] == N and report["checkpoints_valid"] == N // EVERY
    assert report["last_anchor_seq"] == N and report["unanchored_rows"] == 0
    labels = report["label_chain"]
    assert labels["ok"] and labels["labels"] == N_LABELS and labels["checkpoints_valid"] == 1
    assert labels["last_anchor_seq"] == N_LABELS and labels["unanchored_rows"] == 0


@pytest.mark.parametrize("tampering", list(TAMPERINGS))
def test_tampering_is_detected(log: tuple[str, Db], tampering: str) -> None:
    config, db = log
    tamper, expected = TAMPERINGS[tampering]
    tamper(db)
    code, report = verify(config)
    kinds = {p["kind"] for p in report["problems"]}
    assert code == 1 and not report["ok"]
    assert expected <= kinds, report["problems"]


@pytest.mark.parametrize("tampering", list(LABEL_TAMPERINGS))
def test_label_tampering_is_detected(log: tuple[str, Db], tampering: str) -> None:
    config, db = log
    tamper, expected = LABEL_TAMPERINGS[tampering]
    tamper(db)
    code, report = verify(config)
    kinds = {p["kind"] for p in report["label_chain"]["problems"]}
    assert code == 1 and not report["ok"] and report["problems"] == []
    assert expected <= kinds, report["label_chain"]["problems"]
