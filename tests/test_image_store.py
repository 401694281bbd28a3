"""The image store (guard.imagestore), each kind through the same interface: the local folder
and PostgreSQL (the real server on 127.0.0.1:5432, a fresh schema per test; skipped without one
unless SAFEEDIT_REQUIRE_POSTGRES=1). Then the signed links on top of it, and where the store is
when the config names none."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from guard.errors import ConfigError, GuardError, RequestError
from guard.images import ImageLinks
from guard.imagestore import ImageStore, build_image_store, resolve_options
from guard.imagestore.local import LocalImageStore
from guard.imagestore.postgres import CHUNK_BYTES, PostgresImageStore
from guard.types import GeneratedImage
from tests.fake_backend import png
from tests.test_audit_postgres import DSN

HOUR, DAY = 3600.0, 86400.0
Factory = Callable[[], Awaitable[ImageStore]]


@pytest.fixture
def pg_schema() -> Iterator[tuple[str, str]]:
    """A fresh schema on the test server (skipped without one, failed with
    SAFEEDIT_REQUIRE_POSTGRES=1, as in tests/test_audit_postgres.py), dropped afterwards."""
    async def connect() -> asyncpg.Connection:
        return await asyncpg.connect(DSN, timeout=3)

    async def answers() -> None:
        await (await connect()).close()

    try:
        asyncio.run(answers())
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        message = f"no PostgreSQL server answers at {DSN} ({type(exc).__name__}: {exc})"
        if os.environ.get("SAFEEDIT_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{message}; SAFEEDIT_REQUIRE_POSTGRES=1 makes this an error")
        pytest.skip(message)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    yield DSN, schema

    async def drop() -> None:
        conn = await connect()
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()

    asyncio.run(drop())


@pytest.fixture(params=["local", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_options(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if request.param == "local":
        return {"kind": "local", "path": str(tmp_path / "images")}
    dsn, schema = request.getfixturevalue("pg_schema")
    return {"kind": "postgres", "dsn": dsn, "schema": schema}


@pytest.fixture
async def stores(store_options: dict[str, Any]) -> AsyncIterator[Factory]:
    """A factory of stores on one storage: each call is another process's view of it."""
    opened: list[ImageStore] = []

    async def make() -> ImageStore:
        opened.append(build_image_store(store_options))
        return opened[-1]

    yield make
    for store in opened:
        await store.aclose()


async def rows(store: ImageStore, sql: str) -> list[Any]:
    assert isinstance(store, PostgresImageStore)
    conn = await asyncpg.connect(store._dsn, server_settings={"search_path": store.schema})
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


async def test_an_image_stored_by_one_is_read_by_another(stores: Factory) -> None:
    writer, reader = await stores(), await stores()
    assert await writer.ready() and await reader.ready()
    data = png("red")
    image_id = await writer.put(data, "image/png", HOUR)
    assert image_id == hashlib.sha256(data).hexdigest()  # content-addressed
    assert await reader.get(image_id) == ("image/png", data)
    assert await reader.has(image_id)
    assert await reader.get(hashlib.sha256(b"never stored").hexdigest()) is None
    for not_an_id in ("", "../../etc/passwd", image_id + "\n", image_id.upper(), "a" * 32):
        assert await reader.get(not_an_id) is None and not await reader.has(not_an_id)


async def test_an_expired_image_is_not_served_and_a_later_put_extends_it(stores: Factory) -> None:
    store = await stores()
    data = png("blue")
    image_id = await store.put(data, "image/png", HOUR)
    later = time.time() + 2 * HOUR
    assert await store.get(image_id, now=later) is None and not await store.has(image_id, later)
    # Retained for 30 days: the link's hour no longer decides.
    assert await store.put(data, "image/png", 30 * DAY) == image_id
    assert await store.get(image_id, now=later) == ("image/png", data)
    # A shorter put afterwards (another link) never shortens it.
    await store.put(data, "image/png", 1.0)
    assert await store.has(image_id, now=time.time() + 29 * DAY)
    assert not await store.has(image_id, now=time.time() + 31 * DAY)
    await store.put(data, "image/png", None)  # kept until purged by age
    assert await store.has(image_id, now=time.time() + 3650 * DAY)


async def test_purge_removes_expired_and_old_copies_only(stores: Factory) -> None:
    store = await stores()
    link = await store.put(png("blue"), "image/png", 1.0)
    kept = await store.put(png("red"), "image/png", 30 * DAY)
    forever = await store.put(png("green"), "image/png", None)
    soon = time.time() + 60

    dry = await store.purge(soon, dry_run=True)
    assert (dry.removed, dry.kept) == (1, 2) and dry.freed_bytes == len(png("blue"))
    assert await store.has(link)  # a dry run deletes nothing
    done = await store.purge(soon)
    assert (done.removed, done.kept) == (1, 2)
    assert await store.get(link) is None and await store.has(kept) and await store.has(forever)

    # By age (an operator's --older-than-days): whatever was stored before the cut goes.
    everything = await store.purge(time.time(), stored_before=time.time() + 1)
    assert (everything.removed, everything.kept) == (2, 0)
    assert not await store.has(kept) and not await store.has(forever)


async def test_an_image_larger_than_a_chunk_comes_back_whole(stores: Factory) -> None:
    store = await stores()
    data = os.urandom(2 * CHUNK_BYTES + 12345)
    image_id = await store.put(data, "image/webp", HOUR)
    assert await (await stores()).get(image_id) == ("image/webp", data)
    if isinstance(store, PostgresImageStore):
        chunks = await rows(store, "SELECT n, length(data) AS size FROM stored_image_chunks"
                                   " ORDER BY n")
        assert [(r["n"], r["size"]) for r in chunks] == [
            (0, CHUNK_BYTES), (1, CHUNK_BYTES), (2, 12345)]


async def test_concurrent_puts_of_the_same_image_keep_one_copy(stores: Factory) -> None:
    replicas = [await stores() for _ in range(4)]
    data = os.urandom(CHUNK_BYTES + 1)
    ids = await asyncio.gather(*(replicas[i % 4].put(data, "image/png", HOUR)
                                 for i in range(12)))
    assert set(ids) == {hashlib.sha256(data).hexdigest()}
    assert await replicas[0].get(ids[0]) == ("image/png", data)
    result = await replicas[1].purge(0.0, dry_run=True)
    assert (result.removed, result.kept) == (0, 1)
    if isinstance(replicas[0], PostgresImageStore):
        assert len(await rows(replicas[0], "SELECT 1 FROM stored_image_chunks")) == 2


async def test_a_copy_that_no_longer_matches_its_hash_is_not_served(stores: Factory) -> None:
    store = await stores()
    data = png("red")
    image_id = await store.put(data, "image/png", HOUR)
    if isinstance(store, LocalImageStore):
        (store.root / image_id[:2] / image_id).write_bytes(png("green"))
    else:
        await rows(store, "UPDATE stored_image_chunks SET data = 'x' RETURNING n")
    assert await store.get(image_id) is None


async def test_every_user_of_a_store_shares_one_secret(stores: Factory) -> None:
    first, second = await stores(), await stores()
    secrets = await asyncio.gather(first.shared_secret(), second.shared_secret(),
                                   first.shared_secret())
    assert len(set(secrets)) == 1 and len(secrets[0]) == 32


async def test_an_unreachable_database_is_not_ready_and_fails_closed() -> None:
    store = PostgresImageStore("postgresql://nobody@127.0.0.1:1/none", command_timeout_s=2)
    assert not await store.ready()
    with pytest.raises(GuardError) as info:
        await store.put(b"x", "image/png", HOUR)
    assert (info.value.status, info.value.code) == (503, "image_store_unavailable")


# --- links -------------------------------------------------------------------------------------

async def test_a_link_minted_by_one_replica_opens_on_another(stores: Factory) -> None:
    image = GeneratedImage(data=png("blue"))
    a, b = ImageLinks(await stores()), ImageLinks(await stores())
    path, _, query = (await a.mint(image)).partition("?")
    params = dict(p.split("=") for p in query.split("&"))
    image_id = path.rsplit("/", 1)[1]
    assert image_id == image.sha256
    assert await b.open(image_id, params["exp"], params["sig"]) == ("image/png", image.data)
    forged = params["sig"][:-1] + ("0" if params["sig"][-1] != "0" else "1")
    assert await b.open(image_id, params["exp"], forged) is None
    assert await b.open(image_id, str(int(params["exp"]) + 1), params["sig"]) is None
    with pytest.raises(RequestError):
        await b.open(image_id, "1e9", params["sig"])


async def test_a_configured_link_key_is_used_by_every_replica(
        stores: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFEEDIT_TEST_LINK_KEY", "link-key-0123456789")
    options = {"link_key_env": "SAFEEDIT_TEST_LINK_KEY", "link_ttl_s": 60}
    a = ImageLinks.from_options(await stores(), options)
    link = await a.mint(GeneratedImage(data=png("red")))
    exp = int(link.split("exp=")[1].split("&")[0])
    assert time.time() + 50 < exp <= time.time() + 61
    path, _, query = link.partition("?")
    params = dict(p.split("=") for p in query.split("&"))
    other_store_key = ImageLinks(await stores())  # the store's own secret instead: no match
    assert await other_store_key.open(path.rsplit("/", 1)[1], params["exp"],
                                      params["sig"]) is None
    b = ImageLinks.from_options(await stores(), options)
    assert await b.open(path.rsplit("/", 1)[1], params["exp"], params["sig"]) is not None
    monkeypatch.delenv("SAFEEDIT_TEST_LINK_KEY")
    with pytest.raises(ConfigError, match="SAFEEDIT_TEST_LINK_KEY"):
        ImageLinks.from_options(await stores(), options)


async def test_minting_links_purges_expired_copies_in_the_background(stores: Factory) -> None:
    store = await stores()
    await store.put(png("green"), "image/png", 0.05)  # a link's copy, its link long expired
    await store.put(png("red"), "image/png", 30 * DAY)  # retained
    await asyncio.sleep(0.1)
    links = ImageLinks(store)
    await links.mint(GeneratedImage(data=png("blue")))
    deadline = time.monotonic() + 10
    while (left := await store.purge(time.time(), dry_run=True)).removed:
        assert time.monotonic() < deadline, "the expired copy is still stored"
        await asyncio.sleep(0.05)
    assert left.kept == 2  # the retained image and the new link's
    await links.aclose()


# --- where the store is when the config says nothing ---------------------------------------------

@pytest.mark.parametrize(("section", "audit", "expected"), [
    (None, {"kind": "postgres", "dsn": "postgresql://db/x", "schema": "guard"},
     {"kind": "postgres", "dsn": "postgresql://db/x", "schema": "guard"}),
    ({"link_ttl_s": 60}, {"kind": "postgres", "dsn_env": "DSN"},
     {"kind": "postgres", "dsn_env": "DSN", "link_ttl_s": 60}),
    (None, {"kind": "postgres", "dsn": "postgresql://db/x", "images_dir": "/shared/images"},
     {"kind": "local", "path": "/shared/images"}),
    (None, {"kind": "sqlite", "path": "/data/audit.db"},
     {"kind": "local", "path": "/data/images"}),
    (None, {}, {"kind": "local", "path": "var/images"}),
    ({"kind": "local", "path": "/elsewhere"}, {"kind": "postgres", "dsn": "postgresql://db/x"},
     {"kind": "local", "path": "/elsewhere"}),
])
def test_the_image_store_follows_the_audit_store(section: dict[str, Any] | None,
                                                  audit: dict[str, Any],
                                                  expected: dict[str, Any]) -> None:
    assert resolve_options(section, audit) == expected


def test_unknown_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown image store kind 's3'"):
        build_image_store({"kind": "s3"})
    with pytest.raises(ConfigError, match="unknown options"):
        build_image_store({"kind": "local", "bucket": "x"})
    with pytest.raises(ConfigError, match="dsn"):
        build_image_store({"kind": "postgres"})
    with pytest.raises(ConfigError, match="keep one"):
        resolve_options({"kind": "local", "path": "/a"}, {"kind": "sqlite", "images_dir": "/b"})
