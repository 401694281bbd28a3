"""No trace lost (issue 23, item 9): with PostgreSQL down, traces are spooled, signed, served, and
replayed in order once it is back.

PostgreSQL is "restarted" by cutting a real TCP relay between the proxy and the server (every
connection dropped, new ones refused), the way a restart looks from the proxy, without touching
the server other tests share. Clients are the openai SDK against the proxy on uvicorn.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from openai import OpenAI

from tests.conftest import AUDITOR_KEY, CLIENT_KEY
from tests.services import drop_schemas, require_postgres

SAFEEDIT = str(Path(sys.executable).with_name("safeedit"))


class Relay:
    """A TCP relay 127.0.0.1:<port> -> PostgreSQL that can be cut and restored."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = True
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self.up = False
        with self.lock:
            for s in self.conns:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()
                except OSError:
                    pass
            self.conns.clear()

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.cut()
        self.listener.close()


@pytest.fixture
def relay() -> Iterator[tuple[Relay, str]]:
    dsn = require_postgres()
    made = Relay(("127.0.0.1", 5432))
    yield made, dsn
    made.close()


def _audit(relay: Relay, dsn: str, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    relayed = dsn.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}")
    assert relayed != dsn, dsn
    return {"kind": "postgres", "dsn": relayed, "schema": schema, "command_timeout_s": 3,
            "images_dir": str(tmp_path / "images"),
            "anchor": {"kind": "file", "path": str(tmp_path / "audit.anchors")},
            "spool": {"path": str(tmp_path / "audit.spool")}, **extra}


def _generate(client: OpenAI, n: int, tag: str) -> list[str]:
    def one(i: int) -> str:
        raw = client.images.with_raw_response.generate(prompt=f"a quiet harbour {tag} {i}",
                                                       model="gpt-image-1")
        return raw.headers["x-guard-trace-id"]

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def _stored_ids(dsn: str, schema: str) -> list[str]:
    import asyncpg

    async def go() -> list[str]:
        conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
        try:
            return [r["id"] for r in await conn.fetch("SELECT id FROM traces ORDER BY seq")]
        finally:
            await conn.close()

    return asyncio.run(go())


def test_a_restart_loses_no_trace(proxy, relay, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server, dsn = relay
    audit = _audit(server, dsn, tmp_path)
    base = proxy(audit=audit)
    client = OpenAI(base_url=f"{base}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=60)
    auditor = {"authorization": f"Bearer {AUDITOR_KEY}"}
    try:
        before = _generate(client, 4, "before")
        server.cut()
        during = _generate(client, 16, "during")  # every one served: its trace is spooled
        ready = httpx.get(f"{base}/readyz").json()
        assert ready["details"]["audit_spool"]["traces"] == 16
        metrics = httpx.get(f"{base}/metrics").text
        assert "guard_audit_spooled_total 16.0" in metrics
        assert "guard_audit_spool_pending 16.0" in metrics
        lines = (tmp_path / "audit.spool").read_bytes().splitlines()
        assert sorted(_order(lines)) == sorted(during)
        assert all(orjson.loads(x)["sig"] for x in lines)
        # verify (straight to the database) names what is spooled and not yet logged.
        config = tmp_path / "verify.yaml"
        config.write_text(yaml.safe_dump({"audit": {**audit, "dsn": dsn}}))
        out = subprocess.run([SAFEEDIT, "audit", "verify", "--config", str(config)],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert "spool: 16 traces served while the store was down" in out.stdout, out.stdout
        server.restore()
        deadline = time.monotonic() + 30
        while httpx.get(f"{base}/readyz").json()["details"]["audit_spool"]["traces"]:
            assert time.monotonic() < deadline, "the spool was not replayed"
            time.sleep(0.2)
        stored = _stored_ids(dsn, audit["schema"])
        assert set(stored[:4]) == set(before)
        assert stored[4:] == _order(lines)  # replayed, in the spool's order
        for trace_id in during:  # logged like any other trace: a leaf with a proof
            proof = httpx.get(f"{base}/v1/guard/log/proof/inclusion",
                              params={"trace_id": trace_id}, headers=auditor)
            assert proof.status_code == 200, proof.text
        out = subprocess.run([SAFEEDIT, "audit", "verify", "--config", str(config)],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert out.returncode == 0 and "spool:" not in out.stdout, out.stdout
    finally:
        server.restore()
        asyncio.run(drop_schemas(dsn, audit["schema"]))


def _order(lines: list[bytes]) -> list[str]:
    return [orjson.loads(x)["trace"]["id"] for x in lines]


@pytest.mark.parametrize("extra", [{"on_unavailable": "refuse"},
                                   {"spool": {"max_mb": 0.0001}}])
def test_refuse_and_a_full_spool_answer_503(proxy, relay, tmp_path: Path, extra) -> None:  # type: ignore[no-untyped-def]
    server, dsn = relay
    audit = _audit(server, dsn, tmp_path, **extra)
    if "spool" in extra:
        audit["spool"] = {"path": str(tmp_path / "audit.spool"), **extra["spool"]}
    base = proxy(audit=audit)
    client = OpenAI(base_url=f"{base}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=60)
    try:
        _generate(client, 1, "warm")
        server.cut()
        reply = httpx.post(f"{base}/v1/images/generations", timeout=60,
                           headers={"authorization": f"Bearer {CLIENT_KEY}"},
                           json={"prompt": "a lighthouse at dawn", "model": "gpt-image-1"})
        assert reply.status_code == 503
        assert reply.json()["error"]["code"] == "audit_unavailable"
    finally:
        server.restore()
        asyncio.run(drop_schemas(dsn, audit["schema"]))


def test_a_trace_stored_and_spooled_both_is_written_once(tmp_path: Path) -> None:
    """A write can commit as its connection dies (PostgreSQL shutting down): the proxy sees a
    failure and spools a trace the store holds already. The replay must not stop at it (the
    fault soak found the spool stuck behind such a duplicate) nor write it twice."""
    from guard.plugins import build_store
    from tests.audit_writer import sample_trace

    async def go() -> tuple[list[str], list[str], int]:
        store = build_store({"kind": "sqlite", "path": str(tmp_path / "audit.db"),
                             "spool": {"path": str(tmp_path / "audit.spool")}})
        first, second = sample_trace("app", 1), sample_trace("app", 2)
        await store.write(first)
        assert await store.spool.keep(first) and await store.spool.keep(second)
        replayed = await store.spool.replay(store)
        ids = [r.id async for r in store.chain_rows()]
        await store.aclose()
        return ids, [first.id, second.id], replayed

    ids, expected, replayed = asyncio.run(go())
    assert ids == expected and replayed == 2
    assert not (tmp_path / "audit.spool").exists()
