"""The audit log as a transparency log (guard.audit.tlog), on SQLite and PostgreSQL.

Through the real interfaces: traces written by the stores as the proxy writes them, the log's
HTTP endpoints on the app served by uvicorn, `safeedit audit verify` and `safeedit audit
witness` as subprocesses, and a tamper matrix (wipe, cut, forged append, rollback of the head
sink, deleted sink, fork) that each of them must catch.
"""

from __future__ import annotations

import asyncio
import base64
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
import yaml

from guard.audit import merkle
from guard.audit.heads import TreeHead
from guard.audit.logkeys import DEFAULT_KEYS_ENV, public_keys_from
from guard.audit.tlog import leaf_data
from guard.core.config import load_config
from guard.plugins import build_store
from tests.audit_writer import sample_trace
from tests.servers import serve
from tests.services import drop_schemas, require_postgres

ROOT = Path(__file__).resolve().parent.parent
SAFEEDIT = str(Path(sys.executable).with_name("safeedit"))
N = 6


class Log:
    """One audit store's database and its head sink, as an attacker with access to both sees
    them: raw SQL and the sink's records."""

    def __init__(self, kind: str, tmp: Path, dsn: str | None = None) -> None:
        self.kind, self.tmp = kind, tmp
        if kind == "sqlite":
            self.db = tmp / "audit.db"
            self.options: dict[str, Any] = {"kind": "sqlite", "path": str(self.db)}
            self.sink = tmp / "audit.anchors"
        else:
            assert dsn is not None
            self.dsn, self.schema = dsn, f"t_{uuid.uuid4().hex[:12]}"
            self.options = {"kind": "postgres", "dsn": dsn, "schema": self.schema}
        self.config = tmp / "config.yaml"
        self.write_config()

    def write_config(self, **extra: Any) -> None:
        self.config.write_text(yaml.safe_dump({"audit": {**self.options, **extra}}))

    def sql(self, *statements: str) -> list[Any]:
        if self.kind == "sqlite":
            with sqlite3.connect(self.db) as conn:
                out: list[Any] = []
                for s in statements:
                    out = conn.execute(s).fetchall()
                return out
        return asyncio.run(self._pg(statements))

    async def _pg(self, statements: tuple[str, ...]) -> list[Any]:
        conn = await asyncpg.connect(self.dsn, server_settings={"search_path": self.schema})
        try:
            out: list[Any] = []
            for s in statements:
                out = [tuple(r) for r in await conn.fetch(s)]
            return out
        finally:
            await conn.close()

    def sink_records(self) -> list[dict[str, Any]]:
        if self.kind == "sqlite":
            if not self.sink.exists():
                return []
            return [orjson.loads(line) for line in self.sink.read_bytes().splitlines()]
        rows = asyncio.run(self._pg((f'SELECT record FROM "{self.schema}_heads".tree_heads'
                                     " ORDER BY n",)))
        return [orjson.loads(r[0]) for r in rows]

    def sink_keep(self, count: int) -> None:
        """Roll the sink back to its first `count` records."""
        if self.kind == "sqlite":
            kept = self.sink.read_bytes().splitlines()[:count]
            self.sink.write_bytes(b"".join(line + b"\n" for line in kept))
        else:
            asyncio.run(self._pg((f'DELETE FROM "{self.schema}_heads".tree_heads WHERE n NOT IN'
                                  f' (SELECT n FROM "{self.schema}_heads".tree_heads ORDER BY n'
                                  f" LIMIT {count})",)))

    def sink_delete(self) -> None:
        if self.kind == "sqlite":
            self.sink.unlink()
        else:
            asyncio.run(self._pg((f'DROP TABLE "{self.schema}_heads".tree_heads',)))

    def cleanup(self) -> None:
        if self.kind == "postgres":
            asyncio.run(drop_schemas(self.dsn, self.schema))


@pytest.fixture(params=["sqlite", "postgres"])
def log(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Log]:
    dsn = require_postgres() if request.param == "postgres" else None
    made = Log(request.param, tmp_path, dsn)
    yield made
    made.cleanup()


def fill(options: dict[str, Any], n: int, *, first: int = 0) -> None:
    """Write n traces as the proxy does, sign a head, close."""
    async def go() -> None:
        store = build_store(options)
        for i in range(first, first + n):
            await store.write(sample_trace("app", i, created_at=time.time()))
        await store.log.sign_head(force=True)
        await store.aclose()

    asyncio.run(go())


def verify(log: Log) -> tuple[int, dict[str, Any]]:
    result = subprocess.run([SAFEEDIT, "audit", "verify", "--config", str(log.config), "--json"],
                            cwd=log.tmp, capture_output=True, text=True, timeout=120)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, orjson.loads(result.stdout)


def witness(url: str, state: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SAFEEDIT, "audit", "witness", "--url", url, "--state", str(state),
                           *extra], capture_output=True, text=True, timeout=60)


def app_of(log: Log, **extra: Any) -> Any:
    from proxy import create_app

    log.write_config(public_log=True, anchor={"every_s": 3600}, **extra)
    return create_app(load_config(str(log.config)))


# --- the endpoints ----------------------------------------------------------------------------

def test_proofs_over_http_verify_against_the_published_key(log: Log) -> None:
    fill(log.options, N)
    with serve(app_of(log)) as url:
        keys = httpx.get(f"{url}/v1/guard/log/keys").json()
        trusted = public_keys_from(keys)
        assert keys["log_id"] and keys["keys"][0]["algorithm"] == "Ed25519"
        sth = httpx.get(f"{url}/v1/guard/log/sth").json()
        assert set(sth) == {"tree_size", "root_hash", "timestamp", "key_id", "signature"}
        head = TreeHead.from_dict(sth)
        trusted[head.key_id].verify(base64.b64decode(head.signature), head.message())
        assert head.tree_size == N
        ids = [r[0] for r in log.sql("SELECT id FROM traces ORDER BY seq")]
        for index, trace_id in enumerate(ids):
            proof = httpx.get(f"{url}/v1/guard/log/proof/inclusion",
                              params={"trace_id": trace_id}).json()
            assert proof["leaf_index"] == index and proof["leaf"]["id"] == trace_id
            merkle.verify_inclusion(merkle.leaf_hash(leaf_data(proof["leaf"])), index,
                                    proof["tree_size"],
                                    [base64.b64decode(h) for h in proof["audit_path"]],
                                    base64.b64decode(proof["sth"]["root_hash"]))
        # A trace written after the last head is included on request: a head is signed for it.
        fill(log.options, 1, first=N)
        new_id = log.sql("SELECT id FROM traces ORDER BY seq DESC LIMIT 1")[0][0]
        proof = httpx.get(f"{url}/v1/guard/log/proof/inclusion", params={"trace_id": new_id})
        assert proof.status_code == 200 and proof.json()["tree_size"] == N + 1
        consistency = httpx.get(f"{url}/v1/guard/log/proof/consistency",
                                params={"first": 3, "second": N + 1}).json()
        first_root = merkle.MemoryTree()
        for data in log.sql("SELECT data FROM log_leaves ORDER BY idx LIMIT 3"):
            first_root.append(data[0].encode())
        merkle.verify_consistency(3, N + 1, [base64.b64decode(h) for h in consistency["proof"]],
                                  first_root.root(), base64.b64decode(
                                      consistency["sth"]["root_hash"]))
        # Bad input: OpenAI-shaped errors.
        for params, status, code in (
                ({}, 400, "missing_parameter"),
                ({"trace_id": "tr_nope"}, 404, "trace_not_found"),
                ({"trace_id": "a", "label_id": "b"}, 400, "missing_parameter")):
            reply = httpx.get(f"{url}/v1/guard/log/proof/inclusion", params=params)
            assert reply.status_code == status and reply.json()["error"]["code"] == code
        for params in ({"first": 1, "second": 999}, {"first": "x", "second": 2},
                       {"first": 3, "second": 2}, {"second": 2}):
            reply = httpx.get(f"{url}/v1/guard/log/proof/consistency", params=params)
            assert reply.status_code == 400, params
            assert reply.json()["error"]["type"] == "invalid_request_error"


def test_the_log_needs_an_auditor_unless_public(proxy, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import AUDITOR_KEY, CLIENT_KEY

    base = proxy(audit={"kind": "sqlite", "path": str(tmp_path / "a.db")})
    assert httpx.get(f"{base}/v1/guard/log/sth").status_code == 401
    assert httpx.get(f"{base}/v1/guard/log/sth",
                     headers={"authorization": f"Bearer {CLIENT_KEY}"}).status_code == 403
    ok = httpx.get(f"{base}/v1/guard/log/keys", headers={"authorization": f"Bearer {AUDITOR_KEY}"})
    assert ok.status_code == 200 and ok.json()["keys"]


def test_sqlite_makes_its_own_key_and_postgres_needs_one(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from guard.support.errors import ConfigError

    monkeypatch.delenv(DEFAULT_KEYS_ENV)
    store = build_store({"kind": "sqlite", "path": str(tmp_path / "var" / "audit.db")})
    key = tmp_path / "var" / "keys" / "log-ed25519.pem"
    assert key.exists() and key.stat().st_mode & 0o777 == 0o600
    again = build_store({"kind": "sqlite", "path": str(tmp_path / "var" / "audit.db")})
    assert again.log.keys.kid == store.log.keys.kid  # made once, then reused
    with pytest.raises(ConfigError, match="signing key shared by every replica"):
        build_store({"kind": "postgres", "dsn": "postgresql://127.0.0.1/test"})


def test_rotation_old_rows_verify_under_the_retired_key(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    log = Log("sqlite", tmp_path)
    old, new = base64.b64encode(os.urandom(32)).decode(), base64.b64encode(os.urandom(32)).decode()
    monkeypatch.setenv(DEFAULT_KEYS_ENV, f"k1:{old}")
    fill(log.options, 3)
    monkeypatch.setenv(DEFAULT_KEYS_ENV, f"k2:{new},k1:{old}")
    fill(log.options, 3, first=3)
    code, report = subprocess_verify_env(log, {DEFAULT_KEYS_ENV: f"k2:{new},k1:{old}"})
    assert code == 0, report["problems"]
    assert {r[0] for r in log.sql("SELECT kid FROM entry_sigs")} == {"k1", "k2"}
    code, report = subprocess_verify_env(log, {DEFAULT_KEYS_ENV: f"k2:{new}"})
    assert code == 1 and {p["kind"] for p in report["problems"]} >= {"signature"}


def subprocess_verify_env(log: Log, env: dict[str, str]) -> tuple[int, dict[str, Any]]:
    result = subprocess.run([SAFEEDIT, "audit", "verify", "--config", str(log.config), "--json"],
                            cwd=log.tmp, capture_output=True, text=True, timeout=120,
                            env={**os.environ, **env})
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, orjson.loads(result.stdout)


# --- the tamper matrix --------------------------------------------------------------------------

def _rebuild_tree(log: Log, size: int | None = None) -> None:
    """Recompute log_nodes and log_state from log_leaves (up to `size`), as an attacker who
    rewrote leaves would: the tree is consistent with itself again."""
    leaves = [bytes.fromhex(r[0]) for r in log.sql("SELECT leaf_hash FROM log_leaves ORDER BY idx")]
    leaves = leaves[:size] if size is not None else leaves
    tree = merkle.MemoryTree()
    for i, lh in enumerate(leaves):
        known = {p: tree.nodes[p] for p in merkle.frontier(i)}
        for level, idx, h in merkle.appended_nodes(i, lh, [known[p] for p in merkle.frontier(i)]):
            tree.nodes[(level, idx)] = h
    root = merkle.root([tree.nodes[p] for p in merkle.frontier(len(leaves))])
    values = ", ".join(f"({lv}, {ix}, '{h.hex()}')" for (lv, ix), h in tree.nodes.items())
    log.sql("DELETE FROM log_nodes",
            *([f"INSERT INTO log_nodes (level, idx, hash) VALUES {values}"] if values else []),
            f"UPDATE log_state SET seq = {len(leaves)}, hash = '{root.hex()}'"
            f", trace_seq = {len(leaves)} WHERE id = 1")


def wipe(log: Log) -> None:
    log.sql("DELETE FROM traces", "DELETE FROM entry_sigs", "DELETE FROM log_leaves",
            "DELETE FROM log_nodes", "DELETE FROM log_heads", "DELETE FROM trace_figures",
            "UPDATE chain_head SET seq = 0, hash = NULL",
            "UPDATE log_state SET seq = 0, hash = NULL, trace_seq = 0")


def cut(log: Log, keep: int = N - 3) -> None:
    """The last traces removed with everything that named them: rows, signatures, leaves, the
    tree's nodes, the database's own heads, the chain head."""
    last_hash = log.sql(f"SELECT hash FROM traces WHERE seq = {keep}")[0][0]
    log.sql(f"DELETE FROM traces WHERE seq > {keep}", f"DELETE FROM entry_sigs WHERE seq > {keep}",
            f"DELETE FROM trace_figures WHERE seq > {keep}",
            f"DELETE FROM log_leaves WHERE idx >= {keep}",
            f"DELETE FROM log_heads WHERE tree_size > {keep}",
            f"UPDATE chain_head SET seq = {keep}, hash = '{last_hash}'")
    _rebuild_tree(log)


def forged_append(log: Log) -> None:
    """A trace appended with a valid hash link but without the log's key."""
    from guard.core.hashchain import link_hash

    seq, prev = log.sql("SELECT seq, hash FROM traces ORDER BY seq DESC LIMIT 1")[0]
    trace = sample_trace("app", 99, decision="passed")
    body = trace.canonical_bytes().decode().replace("'", "''")
    new = link_hash(prev, trace.canonical_bytes())
    log.sql("INSERT INTO traces (seq, id, created_at, tenant, key_id, decision, status,"
            " categories, policy_id, policy_version, model, body, prev_hash, hash) VALUES"
            f" ({seq + 1}, '{trace.id}', {time.time()}, 'acme', 'app', 'passed', 200,"
            f" {(chr(39) + ',,' + chr(39)) if log.kind == 'sqlite' else chr(39) + '{}' + chr(39)},"
            f" 'default', 3, 'gpt-image-1', '{body}', '{prev}', '{new}')",
            f"UPDATE chain_head SET seq = {seq + 1}, hash = '{new}'")


def fork(log: Log) -> None:
    """A logged trace's leaf rewritten (another image "delivered") and the tree recomputed."""
    idx, data = log.sql("SELECT idx, data FROM log_leaves WHERE idx = 2")[0]
    entry = {**orjson.loads(data), "delivered": ["0" * 64]}
    new = leaf_data(entry)
    log.sql(f"UPDATE log_leaves SET data = '{new.decode()}',"
            f" leaf_hash = '{merkle.leaf_hash(new).hex()}' WHERE idx = {idx}",
            "DELETE FROM log_heads")
    _rebuild_tree(log)


VERIFY_CASES = {
    # name: (tamper, the problem kinds verify must report)
    "wipe": (wipe, {"behind"}),
    "cut": (cut, {"behind"}),
    "forged_append": (forged_append, {"signature"}),
    "sink_rollback": (lambda log: log.sink_keep(1), {"head_sink"}),
    "sink_deleted": (lambda log: log.sink_delete(), {"head_sink"}),
    "fork": (fork, {"fork", "tree"}),
}


@pytest.mark.parametrize("case", list(VERIFY_CASES))
def test_verify_detects_each_tampering(log: Log, case: str) -> None:
    fill(log.options, 3)
    fill(log.options, N - 3, first=3)  # two heads: at 3 and at N
    code, report = verify(log)
    assert code == 0, report["problems"]
    assert report["log"]["signed_rows"] == N and report["log"]["sink_heads"] == 2
    tamper, kinds = VERIFY_CASES[case]
    tamper(log)
    code, report = verify(log)
    found = {p["kind"] for p in report["problems"]}
    assert code == 1 and kinds <= found, report["problems"]


# What an attacker with the database and the sink does to hide from the witness, and whether the
# server must be restarted with --accept-log-reset (it refuses to start on the log otherwise).
WITNESS_CASES = {
    "wipe": (lambda log: (wipe(log), log.sink_delete()), False, "shrank"),
    "cut": (cut, True, "shrank"),
    "forged_append": (forged_append, False, "stopped signing heads"),
    "sink_rollback": (lambda log: (cut(log, 3), log.sink_keep(1)), False, "shrank"),
    "sink_deleted": (lambda log: (cut(log, 3), log.sink_delete()), True, "shrank"),
    "fork": (fork, True, "forked"),
}


@pytest.mark.parametrize("case", list(WITNESS_CASES))
def test_the_witness_detects_each_tampering(log: Log, case: str) -> None:
    fill(log.options, 3)
    fill(log.options, N - 3, first=3)
    state = log.tmp / "witness.json"
    with serve(app_of(log)) as url:
        first = witness(url, state)
        assert first.returncode == 0, first.stdout + first.stderr
        assert f"ok: tree size {N} (first check: keys pinned" in first.stdout
    tamper, reset, expected = WITNESS_CASES[case]
    tamper(log)
    time.sleep(1.2)
    with serve(app_of(log, accept_log_reset=reset)) as url:
        result = witness(url, state, "--max-age", "1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.startswith("FAILED: ") and expected in result.stdout, result.stdout
    # The state still holds the head seen before the tampering.
    assert orjson.loads(state.read_bytes())["head"]["tree_size"] == N


def test_the_witness_follows_an_honest_log(log: Log) -> None:
    fill(log.options, 2)
    state = log.tmp / "w.json"
    with serve(app_of(log)) as url:
        assert witness(url, state).returncode == 0
        fill(log.options, 5, first=2)
        again = witness(url, state, "--max-age", "60")
        assert again.returncode == 0 and "ok: tree size 7 (+5 since the last check)" \
            in again.stdout, again.stdout + again.stderr
        # A wrong key pinned from outside is a failure, not a silent re-pin.
        wrong = log.tmp / "wrong.pem"
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        wrong.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        bad = witness(url, log.tmp / "w2.json", "--keys", str(wrong))
        assert bad.returncode == 1 and "not a trusted key of this log" in bad.stdout


def test_serve_refuses_a_wiped_log_unless_accepted(tmp_path: Path) -> None:
    log = Log("sqlite", tmp_path)
    fill(log.options, N)
    wipe(log)
    cmd = [SAFEEDIT, "serve", "--config", str(log.config), "--port", "0"]
    refused = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    assert "the database holds 0 leaves but the tree head signed on" in refused.stderr
    assert "--accept-log-reset" in refused.stderr
    # Accepted: the reset is a leaf of the new history and a record in the sink.
    with serve(app_of(log, accept_log_reset=True)):
        pass
    (data,) = log.sql("SELECT data FROM log_leaves")
    assert orjson.loads(data[0])["event"] == "log_reset"
    assert any("reset" in r for r in log.sink_records())
    code, report = verify(log)
    assert code == 0, report["problems"]
    assert report["log"]["resets"] == 1


def test_a_leaf_lists_only_the_images_delivered() -> None:
    """verify-image --log trusts a leaf's `delivered`: a refused or failed request delivered
    nothing, and a withheld image is not delivered (a marked copy is named by its own hash)."""
    from guard.audit.tlog import delivered_of

    def body(status: int, *results: dict[str, Any]) -> bytes:
        return orjson.dumps({"status": status, "results": list(results)})

    shown = {"decision": "edited", "image_sha256": "a" * 64, "delivered_sha256": "b" * 64}
    plain = {"decision": "passed", "image_sha256": "c" * 64}
    withheld = {"decision": "refused", "image_sha256": "d" * 64}
    assert delivered_of(body(200, shown, plain, withheld)) == ["b" * 64, "c" * 64]
    assert delivered_of(body(400, plain)) == [] and delivered_of(body(503, shown)) == []
