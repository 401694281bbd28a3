"""Tamper evidence on a real SQLite audit file: `safeedit audit verify` run as an auditor would,
after the ways someone could alter the record (change, delete, reorder, rewrite, truncate), and
two real processes appending at once."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from guard.core.hashchain import link_hash
from guard.core.types import Trace
from guard.plugins import build_store
from tests.audit_writer import BATCH, sample_trace
from tests.conftest import ADMIN_KEY, CLIENT_KEY, write_policy

KEY_ENV = "SAFEEDIT_TEST_CHECKPOINT_KEY"
KEY = "test-checkpoint-key-0123456789"
ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "guard.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, KEY_ENV: KEY, **(env or {})})


@pytest.fixture
def audit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv(KEY_ENV, KEY)
    options = {"kind": "sqlite", "path": str(tmp_path / "audit.db"), "checkpoint_every": 5,
               "checkpoint_key_env": KEY_ENV}
    config = tmp_path / "cli" / "config.yaml"  # not among the test's policy files
    config.parent.mkdir(exist_ok=True)
    config.write_text(yaml.safe_dump({"audit": options}))
    return {"options": options, "config": str(config), "db": tmp_path / "audit.db"}


def write_chain(options: dict[str, Any], n: int) -> list[str]:
    async def go() -> list[str]:
        store = build_store(options)
        ids = []
        for i in range(n):
            trace = sample_trace("app", i)
            await store.write(trace)
            ids.append(trace.id)
        await store.aclose()
        return ids

    return asyncio.run(go())


def verify(config: str) -> tuple[int, str]:
    result = cli("audit", "verify", "--config", config)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, result.stdout


def first_problem(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith("FAILED: "))


def reported(stdout: str, expected: str) -> bool:
    """`expected` ("FAILED: kind: message") is among the problems verify printed. Since the
    transparency log signs every row, a rewrite without the key is also (and first) reported as
    rows with invalid log signatures; the checkpoints' findings still stand beside them."""
    return expected.removeprefix("FAILED: ") in stdout


def sql(db: Path, *statements: str) -> None:
    with sqlite3.connect(db) as conn:
        for statement in statements:
            conn.execute(statement)


def row(db: Path, seq: int) -> tuple[str, str, str | None, str]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT id, body, prev_hash, hash FROM traces WHERE seq = ?",
                            (seq,)).fetchone()


def test_proxy_traces_form_a_signed_chain_that_verifies(proxy, tmp_path, fake_backend,
                                                        monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv(KEY_ENV, KEY)
    write_policy(tmp_path, "id: e2e\nversion: 7\nextends: default\n")
    options = {"kind": "sqlite", "path": str(tmp_path / "audit.db"), "checkpoint_every": 2,
               "checkpoint_key_env": KEY_ENV}
    base = proxy(policy="e2e", audit=options)
    fake_backend[0].plan = [["red"], ["blue"]]
    ids = [httpx.post(f"{base}/v1/images/generations", json={"prompt": p},
                      headers={"authorization": f"Bearer {CLIENT_KEY}"},
                      timeout=30).headers["x-guard-trace-id"]
           for p in ("a cat", "a dog", "a bird", "a fish")]
    # Each trace, as the API shows it, hashes (Trace.seal) to its stored hash, chained in order.
    prev = None
    for trace_id in ids:
        body = httpx.get(f"{base}/v1/guard/traces/{trace_id}",
                         headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()
        assert body["prev_hash"] == prev
        resealed = Trace.model_validate({k: v for k, v in body.items()
                                         if k not in ("hash", "prev_hash")})
        resealed.seal(prev)
        assert resealed.hash == body["hash"]
        prev = body["hash"]
    config = tmp_path / "cli" / "config.yaml"  # not among the test's policy files
    config.parent.mkdir(exist_ok=True)
    config.write_text(yaml.safe_dump({"audit": options}))
    code, out = verify(str(config))
    assert code == 0, out
    assert "checked 4 traces" in out and "2 valid signatures" in out and "OK" in out


@pytest.mark.parametrize("edit", [
    "UPDATE traces SET body = replace(body, 'bloodbath', 'picnic') WHERE seq = 3",
    "UPDATE traces SET prev_hash = (SELECT prev_hash FROM traces WHERE seq = 2) WHERE seq = 3",
], ids=["content", "link"])
def test_changed_row_fails_and_names_the_trace(audit, edit) -> None:  # type: ignore[no-untyped-def]
    ids = write_chain(audit["options"], 8)
    sql(audit["db"], edit)
    code, out = verify(audit["config"])
    assert code == 1
    assert first_problem(out) == (f"FAILED: changed: trace {ids[2]} (seq 3) was changed: its "
                                  "content no longer matches its stored hash")


def test_changed_index_column_fails_and_names_the_trace(audit) -> None:  # type: ignore[no-untyped-def]
    # Someone hides a refusal from filtered queries without touching the hashed record.
    ids = write_chain(audit["options"], 6)
    sql(audit["db"], "UPDATE traces SET decision = 'passed' WHERE seq = 4")
    code, out = verify(audit["config"])
    assert code == 1
    assert f"changed: trace {ids[3]} (seq 4) was changed: its indexed column decision='passed'" \
        in first_problem(out)


def test_deleted_row_fails_and_names_where(audit) -> None:  # type: ignore[no-untyped-def]
    ids = write_chain(audit["options"], 8)
    _, _, _, removed_hash = row(audit["db"], 4)
    sql(audit["db"], "DELETE FROM traces WHERE seq = 4")
    code, out = verify(audit["config"])
    assert code == 1
    assert first_problem(out) == (
        f"FAILED: removed: the trace at seq 4 was removed: after trace {ids[2]} (seq 3), "
        f"trace {ids[4]} (seq 5) is chained to a missing record with hash {removed_hash}")


def test_reordered_rows_fail_and_name_the_trace(audit) -> None:  # type: ignore[no-untyped-def]
    ids = write_chain(audit["options"], 8)
    sql(audit["db"], "UPDATE traces SET seq = -1 WHERE seq = 3",
        "UPDATE traces SET seq = 3 WHERE seq = 4", "UPDATE traces SET seq = 4 WHERE seq = -1")
    code, out = verify(audit["config"])
    assert code == 1
    assert first_problem(out) == (
        f"FAILED: reordered: trace {ids[3]} (seq 3) is out of order: it was written after "
        f"trace {ids[2]}, which is stored later at seq 4")


def test_rewritten_chain_is_caught_by_the_signed_checkpoint(audit) -> None:  # type: ignore[no-untyped-def]
    """An attacker with write access but without the key edits trace 2 and recomputes every hash
    after it, chain head included: the hash chain alone is consistent again, the checkpoint
    signed at seq 5 is not."""
    ids = write_chain(audit["options"], 7)
    signed_hash = row(audit["db"], 5)[3]
    with sqlite3.connect(audit["db"]) as conn:
        prev = conn.execute("SELECT hash FROM traces WHERE seq = 1").fetchone()[0]
        for seq, body in conn.execute("SELECT seq, body FROM traces WHERE seq >= 2 ORDER BY seq"
                                      ).fetchall():
            if seq == 2:
                body = body.replace("bloodbath", "picnic")
            new = link_hash(prev, body.encode())
            conn.execute("UPDATE traces SET body = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                         (body, prev, new, seq))
            prev = new
        conn.execute("UPDATE chain_head SET hash = ?", (prev,))
    code, out = verify(audit["config"])
    assert code == 1
    assert reported(out,
        f"FAILED: changed: the chain was rewritten between seq 1 and 5: the signed checkpoint "
        f"at seq 5 names trace {ids[4]} with hash {signed_hash}, the store has {ids[4]} with "
        f"hash {row(audit['db'], 5)[3]}")
    # Moving the checkpoint along with the rewrite needs the key: the signature gives it away.
    sql(audit["db"], f"UPDATE checkpoints SET hash = '{row(audit['db'], 5)[3]}' WHERE seq = 5")
    code, out = verify(audit["config"])
    assert code == 1
    assert "invalid log signature" in out
    assert reported(out, f"FAILED: checkpoint: the checkpoint at trace {ids[4]} "
                                  "(seq 5) has an invalid signature (forged or altered)")


def test_cut_tail_is_detected(audit) -> None:  # type: ignore[no-untyped-def]
    write_chain(audit["options"], 8)
    sql(audit["db"], "DELETE FROM traces WHERE seq >= 7")
    code, out = verify(audit["config"])
    assert code == 1
    assert "FAILED: removed: 2 trace(s) removed at the end of the chain (seq 7..8" in out


def test_verify_with_the_wrong_key_and_without_one(audit) -> None:  # type: ignore[no-untyped-def]
    write_chain(audit["options"], 5)
    wrong = cli("audit", "verify", "--config", audit["config"],
                env={KEY_ENV: "another-key-entirely-0123456789"})
    assert wrong.returncode == 1 and "was signed with another key" in wrong.stdout
    unsigned = Path(audit["config"]).with_name("unsigned.yaml")
    unsigned.write_text(yaml.safe_dump({"audit": {"kind": "sqlite", "path": str(audit["db"])}}))
    plain = cli("audit", "verify", "--config", str(unsigned))
    assert plain.returncode == 0
    assert "signatures NOT checked" in plain.stdout and "1 present" in plain.stdout
    missing = cli("audit", "verify", "--config", audit["config"], env={KEY_ENV: ""})
    assert missing.returncode == 2 and f"names {KEY_ENV}, which is not set" in missing.stderr


def test_two_processes_writing_at_once_keep_one_chain(audit, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    go = tmp_path / "go"
    n = 300
    procs = [subprocess.Popen([sys.executable, "-m", "tests.audit_writer",
                               orjson.dumps(audit["options"]).decode(), name, str(n), "4",
                               str(go), "writer-a,writer-b"], cwd=ROOT, env={**os.environ, KEY_ENV: KEY})
             for name in ("writer-a", "writer-b")]
    # Both writers import and open the store (slow on a loaded machine), then start together.
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"go.{w}.ready").exists() for w in ("writer-a", "writer-b")):
        assert time.monotonic() < deadline, "the writers never got ready"
        time.sleep(0.05)
    go.touch()
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    with sqlite3.connect(audit["db"]) as conn:
        seqs, writers = zip(*conn.execute("SELECT seq, key_id FROM traces ORDER BY seq"),
                            strict=True)
    assert list(seqs) == list(range(1, 2 * n + 1))
    switches = sum(a != b for a, b in zip(writers, writers[1:], strict=False))
    # The writers meet at a barrier every BATCH traces, so each batch holds both: at least one
    # hand-over per batch. (Without it a loaded machine once ran one writer alone: 1 hand-over.)
    assert switches >= n // BATCH, "the two writers did not overlap; the test proves nothing"
    code, out = verify(audit["config"])
    assert code == 0, out
    assert f"checked {2 * n} traces" in out and f"{2 * n // 5} valid signatures" in out


def rehash_from(db: Path, seq: int) -> None:
    """Recompute every hash from `seq` on, chain head included, as an attacker without the key
    would after editing a row: the hash chain alone is consistent again."""
    with sqlite3.connect(db) as conn:
        prev = conn.execute("SELECT hash FROM traces WHERE seq = ?", (seq - 1,)).fetchone()[0]
        for s, body in conn.execute("SELECT seq, body FROM traces WHERE seq >= ? ORDER BY seq",
                                    (seq,)).fetchall():
            new = link_hash(prev, body.encode())
            conn.execute("UPDATE traces SET prev_hash = ?, hash = ? WHERE seq = ?",
                         (prev, new, s))
            prev = new
        conn.execute("UPDATE chain_head SET hash = ?", (prev,))


def test_deleting_the_checkpoints_does_not_switch_them_off(audit) -> None:  # type: ignore[no-untyped-def]
    """A refusal turned into a pass, the chain rehashed, the checkpoints deleted: with keys
    configured, a checkpoint that is due and missing fails verify; it is no warning."""
    async def go() -> list[str]:
        store = build_store(audit["options"])
        ids = [(await store.write(sample_trace("app", i, decision="refused" if i == 1 else
                                               "edited"))).id for i in range(7)]
        await store.aclose()
        return ids

    ids = asyncio.run(go())
    sql(audit["db"], "UPDATE traces SET decision = 'passed', body = replace(body,"
                     " '\"decision\":\"refused\"', '\"decision\":\"passed\"') WHERE seq = 2")
    rehash_from(audit["db"], 2)
    sql(audit["db"], "DELETE FROM checkpoints")
    code, out = verify(audit["config"])
    assert code == 1 and "OK" not in out and "WARNING" not in out
    assert reported(out, f"FAILED: checkpoint_missing: the signed checkpoint at trace "
                                  f"{ids[4]} (seq 5) is missing: one is due every 5 traces "
                                  "(deleted, or the row was written without the key)")
    as_json = cli("audit", "verify", "--config", audit["config"], "--json")
    report = orjson.loads(as_json.stdout)
    assert as_json.returncode == 1 and report["ok"] is False
    assert {(p["kind"], p["seq"]) for p in report["problems"]} >= {
        ("checkpoint_missing", 5), ("signature", 2)}


def anchored(audit: dict[str, Any], tmp_path: Path, **anchor: Any) -> dict[str, Any]:
    """The audit fixture's options with anchors (a file under witness/ unless given)."""
    options = {**audit["options"],
               "anchor": {"path": str(tmp_path / "witness" / "audit.anchors"), **anchor}}
    Path(audit["config"]).write_text(yaml.safe_dump({"audit": options}))
    return options


def anchors_in(path: Path) -> list[dict[str, Any]]:
    """The HMAC anchors in a sink file (signed tree heads share it: guard.audit.heads)."""
    return [a for line in path.read_bytes().splitlines() if "seq" in (a := orjson.loads(line))]


def test_the_store_anchors_its_head_at_close_and_readers_do_not(audit, tmp_path) -> None:  # type: ignore[no-untyped-def]
    options = anchored(audit, tmp_path, every_s=3600)
    write_chain(options, 4)
    anchor_file = tmp_path / "witness" / "audit.anchors"
    (only,) = anchors_in(anchor_file)
    assert only["seq"] == 4 and only["hash"] == row(audit["db"], 4)[3]
    assert set(only) == {"seq", "hash", "time", "kid", "sig"}
    code, out = verify(audit["config"])
    assert code == 0, out
    assert f"anchors: 1 in {anchor_file}, latest at seq 4; not yet anchored: 0 rows" in out
    assert len(anchors_in(anchor_file)) == 1, "verify (a reader) appended an anchor"
    # The same file keeps the log's signed tree heads (one, at close), and verify added none.
    heads = [h for line in anchor_file.read_bytes().splitlines()
             if "tree_size" in (h := orjson.loads(line))]
    assert [h["tree_size"] for h in heads] == [4]


def test_the_running_proxy_anchors_in_the_background(proxy, tmp_path, fake_backend,  # type: ignore[no-untyped-def]
                                                     monkeypatch) -> None:
    from openai import OpenAI

    monkeypatch.setenv(KEY_ENV, KEY)
    write_policy(tmp_path, "id: e2e\nversion: 7\nextends: default\n")
    anchor_file = tmp_path / "witness" / "audit.anchors"
    options = {"kind": "sqlite", "path": str(tmp_path / "audit.db"), "checkpoint_every": 2,
               "checkpoint_key_env": KEY_ENV,
               "anchor": {"path": str(anchor_file), "every_s": 0.2}}
    base = proxy(policy="e2e", audit=options)
    client = OpenAI(base_url=f"{base}/v1", api_key=CLIENT_KEY, max_retries=0)
    for prompt in ("a cat", "a dog", "a bird"):
        client.images.generate(prompt=prompt, model="gpt-image-1")
    deadline = time.monotonic() + 15
    while not (anchor_file.exists() and any(a["seq"] == 3 for a in anchors_in(anchor_file))):
        assert time.monotonic() < deadline, "no anchor of the head while the proxy runs"
        time.sleep(0.05)
    config = tmp_path / "cli" / "config.yaml"
    config.parent.mkdir(exist_ok=True)
    config.write_text(yaml.safe_dump({"audit": options}))
    code, out = verify(str(config))
    assert code == 0, out
    assert "latest at seq 3; not yet anchored: 0 rows" in out


def test_verify_checks_an_anchor_file_given_on_the_command_line(audit, tmp_path) -> None:  # type: ignore[no-untyped-def]
    options = anchored(audit, tmp_path)
    write_chain(options, 6)
    plain = Path(audit["config"]).with_name("no-anchor.yaml")
    plain.write_text(yaml.safe_dump({"audit": audit["options"]}))
    # Wiped: rows, checkpoints and chain head. The log's leaves and tree heads still disagree.
    sql(audit["db"], "DELETE FROM traces", "DELETE FROM checkpoints",
        "UPDATE chain_head SET seq = 0, hash = NULL")
    code, out = verify(str(plain))
    assert code == 1 and "its row is gone" in out
    anchor_file = tmp_path / "witness" / "audit.anchors"
    result = cli("audit", "verify", "--config", str(plain), "--anchors", str(anchor_file))
    assert result.returncode == 1
    assert "FAILED: anchor_missing_rows: the chain ends at seq 0, but an anchor signed on " \
        in result.stdout
    assert "records seq 6" in result.stdout and "the log was cut or wiped" in result.stdout


def test_an_anchor_with_a_bad_signature_fails(audit, tmp_path) -> None:  # type: ignore[no-untyped-def]
    write_chain(anchored(audit, tmp_path), 4)
    anchor_file = tmp_path / "witness" / "audit.anchors"
    (anchor,) = anchors_in(anchor_file)
    heads = [line for line in anchor_file.read_bytes().splitlines() if b"tree_size" in line]
    anchor_file.write_bytes(orjson.dumps({**anchor, "seq": 3, "hash": row(audit["db"], 3)[3]})
                            + b"\n" + b"".join(h + b"\n" for h in heads))
    result = cli("audit", "verify", "--config", audit["config"], "--json")
    report = orjson.loads(result.stdout)
    assert result.returncode == 1
    assert [p["kind"] for p in report["problems"]] == ["anchor_invalid"]
    assert report["anchor_sink"] == str(anchor_file)


def test_key_rotation_by_key_id(audit, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Checkpoints and anchors record their key id: after a rotation both keys verify; drop
    the old key and what it signed cannot be verified, which fails."""
    keys_env = "SAFEEDIT_TEST_CHECKPOINT_KEYS"
    old, new = "old:old-secret-0123456789abcdef", "new:new-secret-0123456789abcdef"
    options = {k: v for k, v in audit["options"].items() if k != "checkpoint_key_env"}
    options |= {"checkpoint_keys_env": keys_env,
                "anchor": {"kind": "sqlite", "path": str(tmp_path / "witness" / "anchors.db")}}
    Path(audit["config"]).write_text(yaml.safe_dump({"audit": options}))
    monkeypatch.setenv(keys_env, old)
    write_chain(options, 5)  # checkpoint at 5 and anchor at 5: kid "old"
    monkeypatch.setenv(keys_env, f"{new},{old}")
    write_chain(options, 5)  # checkpoint at 10 and anchor at 10: kid "new"
    with sqlite3.connect(audit["db"]) as conn:
        assert conn.execute("SELECT seq, kid FROM checkpoints").fetchall() == [(5, "old"),
                                                                             (10, "new")]
    both = cli("audit", "verify", "--config", audit["config"], env={keys_env: f"{new},{old}"})
    assert both.returncode == 0, both.stdout
    assert "2 valid signatures (keys new, old)" in both.stdout
    only_new = cli("audit", "verify", "--config", audit["config"], "--json",
                   env={keys_env: new})
    report = orjson.loads(only_new.stdout)
    assert only_new.returncode == 1
    assert [(p["kind"], p["seq"]) for p in report["problems"]] == [("unknown_key", 5),
                                                                   ("unknown_key", 5)]
    assert "kid old" in report["problems"][0]["message"] + report["problems"][1]["message"]


def test_a_database_from_before_key_ids_opens_and_verifies(audit) -> None:  # type: ignore[no-untyped-def]
    write_chain(audit["options"], 5)
    # As the previous release left it: checkpoints without a kid column, schema version 2.
    sql(audit["db"], "ALTER TABLE checkpoints DROP COLUMN kid", "PRAGMA user_version = 2")
    write_chain(audit["options"], 5)
    with sqlite3.connect(audit["db"]) as conn:
        assert conn.execute("SELECT seq, kid IS NULL FROM checkpoints").fetchall() == [
            (5, 1), (10, 0)]
    code, out = verify(audit["config"])
    assert code == 0, out
    assert "2 valid signatures" in out


@pytest.mark.parametrize(("env", "extra", "message"), [
    ("justasecretwithoutkid-0123456789", {}, "must hold kid:secret pairs"),
    ("a:short", {}, "the checkpoint key 'a' must be at least 16 bytes"),
    ("a:first-secret-0123456789,a:second-secret-0123456789", {}, "names key id 'a' twice"),
    ("k:a-long-enough-secret-0123456789", {"checkpoint_key_env": KEY_ENV},
     "not both"),
], ids=["no-kid", "short", "twice", "both"])
def test_bad_key_config_is_named_without_the_secret(tmp_path, monkeypatch, env, extra,  # type: ignore[no-untyped-def]
                                                    message) -> None:
    from guard.support.errors import ConfigError

    monkeypatch.setenv("SAFEEDIT_TEST_CHECKPOINT_KEYS", env)
    monkeypatch.setenv(KEY_ENV, KEY)
    with pytest.raises(ConfigError) as caught:
        build_store({"kind": "sqlite", "path": str(tmp_path / "a.db"),
                     "checkpoint_keys_env": "SAFEEDIT_TEST_CHECKPOINT_KEYS", **extra})
    assert message in caught.value.message
    assert "secret" not in caught.value.message.replace("kid:secret", "")


def test_anchor_without_hmac_keys_keeps_tree_heads_only(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`anchor` names where the log's tree heads go (Ed25519, guard.audit.heads); the HMAC chain
    anchors of old are written there only when checkpoint keys are configured."""
    store = build_store({"kind": "sqlite", "path": str(tmp_path / "a.db"),
                         "anchor": {"path": str(tmp_path / "a.anchors")}})
    assert store.anchorer is None
    assert store.log is not None and store.log.sink.location == str(tmp_path / "a.anchors")
