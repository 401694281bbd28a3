"""The image store (guard.imagestore), each kind through the same interface: the local folder,
PostgreSQL (the real server on 127.0.0.1:5432, a fresh schema per test; skipped without one
unless SAFEEDIT_REQUIRE_POSTGRES=1) and S3 (adapters.imagestore_s3, against moto's S3-compatible
HTTP server on 127.0.0.1, a bucket per test). Then the signed links on top of it, where the store
is when the config names none, and the S3 kind's own behaviour, through the proxy too."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from adapters.imagestore_s3 import S3ImageStore
from guard.core.types import GeneratedImage
from guard.http.errors import status_of
from guard.imagestore.local import LocalImageStore
from guard.imagestore.postgres import CHUNK_BYTES, PostgresImageStore
from guard.pipeline.links import ImageLinks
from guard.plugins import ImageStore, build_image_store, resolve_image_store
from guard.support.errors import ConfigError, GuardError, RequestError
from tests.conftest import CLIENT_KEY, ProxyFactory
from tests.fake_backend import png
from tests.services import drop_schemas, require_postgres
from tests.test_audit_postgres import DSN

HOUR, DAY = 3600.0, 86400.0
Factory = Callable[[], Awaitable[ImageStore]]
# Credentials the store reads from the environment (moto takes any); shaped like real ones, so a
# leak would be caught by the checks below, not only by redact's patterns.
S3_ENV = {"SAFEEDIT_TEST_S3_ACCESS": "AKIAEXAMPLETESTKEY42",
          "SAFEEDIT_TEST_S3_SECRET": "s3cr3t/Example+Value0123456789abcdefghij"}


@pytest.fixture
def pg_schema() -> Iterator[tuple[str, str]]:
    """A fresh schema on the test server (skipped without one, failed with
    SAFEEDIT_REQUIRE_POSTGRES=1, as in tests/test_audit_postgres.py), dropped afterwards."""
    require_postgres(DSN)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    yield DSN, schema
    asyncio.run(drop_schemas(DSN, schema))


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3-compatible server on 127.0.0.1, one per module."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_options(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """`image_store:` options for a fresh bucket on the moto server, credentials in the env."""
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    client = s3_client(s3_endpoint)
    client.create_bucket(Bucket=bucket)
    client.close()
    return {"kind": "s3", "bucket": bucket, "endpoint_url": s3_endpoint, "region": "us-east-1",
            "access_key_env": "SAFEEDIT_TEST_S3_ACCESS",
            "secret_key_env": "SAFEEDIT_TEST_S3_SECRET"}


def s3_client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="test", aws_secret_access_key="test")


@pytest.fixture(params=["local", pytest.param("postgres", marks=pytest.mark.postgres), "s3"])
def store_options(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if request.param == "local":
        return {"kind": "local", "path": str(tmp_path / "images")}
    if request.param == "s3":
        return dict(request.getfixturevalue("s3_options"))
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
    pool = await store._pg.get()  # the store's own connections, on its schema
    return list(await pool.fetch(sql))


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
    elif isinstance(store, S3ImageStore):  # rewritten behind the store's back, metadata kept
        head = store._client.head_object(Bucket=store.bucket, Key=store.prefix + image_id)
        store._client.put_object(Bucket=store.bucket, Key=store.prefix + image_id,
                                 Body=png("green"), Metadata=head["Metadata"])
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
    assert (status_of(info.value), info.value.code) == (503, "image_store_unavailable")


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


def _link_params(link: str) -> tuple[str, dict[str, str]]:
    path, _, query = link.partition("?")
    return path.rsplit("/", 1)[1], dict(p.split("=") for p in query.split("&"))


async def test_links_survive_a_key_rotation_and_die_with_their_key(
        stores: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    store = await stores()
    monkeypatch.setenv("SAFEEDIT_TEST_LINK_KEYS", "k1:first-secret-0123456789")
    before = ImageLinks.from_options(store, {"link_keys_env": "SAFEEDIT_TEST_LINK_KEYS"})
    old_id, old = _link_params(await before.mint(GeneratedImage(data=png("red"))))
    assert old["kid"] == "k1"
    # Rotation: a new key signs, the old one still opens what it signed.
    monkeypatch.setenv("SAFEEDIT_TEST_LINK_KEYS",
                       "k2:second-secret-0123456789,k1:first-secret-0123456789")
    after = ImageLinks.from_options(store, {"link_keys_env": "SAFEEDIT_TEST_LINK_KEYS"})
    new_id, new = _link_params(await after.mint(GeneratedImage(data=png("blue"))))
    assert new["kid"] == "k2"
    assert await after.open(old_id, old["exp"], old["sig"], old["kid"]) is not None
    assert await after.open(new_id, new["exp"], new["sig"], new["kid"]) is not None
    # A kid naming the wrong key, or one no longer configured, opens nothing.
    assert await after.open(old_id, old["exp"], old["sig"], "k2") is None
    monkeypatch.setenv("SAFEEDIT_TEST_LINK_KEYS", "k2:second-secret-0123456789")
    retired = ImageLinks.from_options(store, {"link_keys_env": "SAFEEDIT_TEST_LINK_KEYS"})
    assert await retired.open(old_id, old["exp"], old["sig"], old["kid"]) is None
    assert await retired.open(new_id, new["exp"], new["sig"], new["kid"]) is not None
    # A link minted before key ids (no kid) opens with any configured key that signed it.
    assert await after.open(old_id, old["exp"], old["sig"]) is not None


@pytest.mark.parametrize("value, problem", [
    ("no-colon-here", "kid:secret pairs"), ("k1:a,k1:b", "twice"), ("bad kid!:x", "key id")])
async def test_a_bad_link_keyring_stops_the_start_without_echoing_it(
        stores: Factory, monkeypatch: pytest.MonkeyPatch, value: str, problem: str) -> None:
    monkeypatch.setenv("SAFEEDIT_TEST_LINK_KEYS", value)
    with pytest.raises(ConfigError, match=problem) as info:
        ImageLinks.from_options(await stores(), {"link_keys_env": "SAFEEDIT_TEST_LINK_KEYS"})
    assert value not in info.value.message
    with pytest.raises(ConfigError, match="not both"):
        ImageLinks.from_options(await stores(), {"link_keys_env": "A", "link_key_env": "B"})


async def test_minting_links_purges_expired_copies_in_the_background(stores: Factory) -> None:
    store = await stores()
    expiring = await store.put(png("green"), "image/png", 0.05)  # a link's copy
    await store.put(png("red"), "image/png", 30 * DAY)  # retained
    deadline = time.monotonic() + 10
    while await store.has(expiring):  # until the link's copy has expired
        assert time.monotonic() < deadline, "the link's copy never expired"
        await asyncio.sleep(0.01)
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
    assert resolve_image_store(section, audit) == expected


def test_unknown_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown image store kind 'ftp'"):
        build_image_store({"kind": "ftp"})
    with pytest.raises(ConfigError, match="unknown options"):
        build_image_store({"kind": "local", "bucket": "x"})
    with pytest.raises(ConfigError, match="dsn"):
        build_image_store({"kind": "postgres"})
    with pytest.raises(ConfigError, match="keep one"):
        resolve_image_store({"kind": "local", "path": "/a"}, {"kind": "sqlite", "images_dir": "/b"})


# --- the S3 kind's own behaviour -----------------------------------------------------------------

def test_s3_options_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="bucket"):
        build_image_store({"kind": "s3"})
    with pytest.raises(ConfigError, match="unknown options"):
        build_image_store({"kind": "s3", "bucket": "b", "path": "/x"})
    monkeypatch.delenv("SAFEEDIT_TEST_S3_NOT_SET", raising=False)
    with pytest.raises(ConfigError, match="SAFEEDIT_TEST_S3_NOT_SET"):
        build_image_store({"kind": "s3", "bucket": "b", "access_key_env": "SAFEEDIT_TEST_S3_NOT_SET",
                           "secret_key_env": "SAFEEDIT_TEST_S3_NOT_SET"})


async def test_s3_objects_are_named_by_sha256_and_carry_type_and_expiry(
        s3_options: dict[str, Any], s3_endpoint: str) -> None:
    store = build_image_store({**s3_options, "prefix": "tenant-a/"})
    data = png("red")
    before = time.time()
    image_id = await store.put(data, "image/png", HOUR)
    await store.shared_secret()
    head = s3_client(s3_endpoint).head_object(Bucket=s3_options["bucket"],
                                              Key=f"tenant-a/{image_id}")
    assert head["ContentType"] == "image/png"
    assert before + HOUR <= float(head["Metadata"]["expires-at"]) <= time.time() + HOUR
    listed = s3_client(s3_endpoint).list_objects_v2(Bucket=s3_options["bucket"])
    assert {o["Key"] for o in listed["Contents"]} == {"tenant-a/link.key",
                                                      f"tenant-a/{image_id}"}
    # Another prefix in the same bucket is another store: it neither sees nor purges these.
    other = build_image_store(s3_options)
    assert await other.get(image_id) is None
    assert (await other.purge(time.time() + 2 * HOUR, stored_before=time.time() + 1)).removed == 0
    assert await store.get(image_id) == ("image/png", data)
    await store.aclose()
    await other.aclose()


async def test_a_missing_bucket_is_not_ready_and_fails_closed_without_credentials(
        s3_options: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    store = build_image_store({**s3_options, "bucket": "no-such-bucket", "max_attempts": 1})
    assert not await store.ready()
    for call in (store.put(png("red"), "image/png", HOUR), store.shared_secret(),
                 store.purge(time.time())):
        with pytest.raises(GuardError) as info:
            await call
        assert (status_of(info.value), info.value.code) == (503, "image_store_unavailable")
        assert "NoSuchBucket" in info.value.message
        text = str(info.value.to_dict()) + repr(info.value.__cause__)
        assert not any(secret in text for secret in S3_ENV.values())
    assert caplog.records and not any(secret in caplog.text for secret in S3_ENV.values())
    await store.aclose()


async def test_an_unreachable_s3_endpoint_is_not_ready_and_fails_closed(
        s3_options: dict[str, Any]) -> None:
    store = build_image_store({**s3_options, "endpoint_url": "http://127.0.0.1:1",
                               "connect_timeout_s": 1, "max_attempts": 1})
    assert not await store.ready()
    with pytest.raises(GuardError) as info:
        await store.get(hashlib.sha256(b"x").hexdigest())
    assert (status_of(info.value), info.value.code) == (503, "image_store_unavailable")
    assert not any(secret in info.value.message for secret in S3_ENV.values())
    await store.aclose()


def test_a_link_from_the_proxy_is_served_from_s3(proxy: ProxyFactory, s3_options: dict[str, Any],
                                                 s3_endpoint: str) -> None:
    import openai


    base = proxy(image_store={**s3_options, "link_ttl_s": 600})
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=CLIENT_KEY, max_retries=0)
    url = client.images.generate(prompt="a lighthouse", response_format="url").data[0].url
    assert url and url.startswith(base + "/v1/guard/images/")
    image_id = url.split("?")[0].rsplit("/", 1)[1]
    s3 = s3_client(s3_endpoint)
    stored = s3.get_object(Bucket=s3_options["bucket"], Key=f"safeedit/images/{image_id}")
    served = httpx.get(url)
    assert served.status_code == 200 and served.content[:4] == b"\x89PNG"
    assert served.content == stored["Body"].read()
    assert served.headers["content-type"] == stored["ContentType"] == "image/png"
    # Gone from the bucket, gone from the link.
    s3.delete_object(Bucket=s3_options["bucket"], Key=f"safeedit/images/{image_id}")
    assert httpx.get(url).status_code == 404
