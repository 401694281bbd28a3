"""The S3 image store: content-addressed objects in a bucket of any S3-compatible service (AWS S3,
MinIO, Ceph, Cloudflare R2...), shared by every replica that names the same bucket and prefix.

    <prefix><sha256>    the bytes; ContentType = the media type; metadata `expires-at` (Unix
                        seconds, "never" = until purged by age); LastModified = when last stored
    <prefix>link.key    the shared secret (32 random bytes), made by whoever comes first

Objects are whole or absent (S3 has no half-written object). The first copy of an image is
created with a conditional put (If-None-Match: *): of replicas storing it together, one writes.
A put of bytes already stored rewrites the object with the later of the two expiries (unless it
was stored in the last minute with an expiry at least as late) and reads it back: should a
concurrent put have written a shorter expiry meanwhile, it writes again (S3 cannot update
metadata conditionally; this keeps a retained copy's expiry in all but a pathological race).
The secret is created the same way; a service that ignores the condition still ends with one
secret, as every process reads back what was kept.

boto3 is synchronous: each call runs in a worker thread. Its client retries and times out by
itself (botocore Config). Failures are `GuardError` 503 `image_store_unavailable`, their text
redacted of the credentials.

Options (`image_store:` with `kind: s3`):
    bucket                  required; the bucket must exist (`ready` is a HeadBucket)
    prefix                  key prefix (default "safeedit/images/")
    endpoint_url            a non-AWS service (path-style addressing is then used)
    region                  the bucket's region
    access_key_env          names of the environment variables that hold the credentials
    secret_key_env          (without them: boto3's own chain, e.g. an instance role)
    connect_timeout_s       default 5
    read_timeout_s          default 30
    max_attempts            per call, retries included (default 3)
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import re
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from guard.plugins import PurgeResult
from guard.support.errors import ConfigError, GuardError, Unavailable
from guard.support.redact import redact, redact_logs

log = logging.getLogger("safeedit.imagestore")
T = TypeVar("T")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_NEVER = "never"
# A put of bytes stored this recently with an expiry at least as late writes nothing (ages are
# counted in days; replicas storing one image together would otherwise each rewrite it).
_RESTORE_AFTER_S = 60.0
_MISSING = {"404", "NoSuchKey", "NotFound"}
_TAKEN = {"412", "PreconditionFailed", "ConditionalRequestConflict"}
# botocore's loggers that can print a request (its signature names the access key id)
_BOTO_LOGGERS = ("botocore.auth", "botocore.endpoint", "botocore.parsers", "botocore.hooks",
                 "botocore.retryhandler", "botocore.httpsession", "urllib3.connectionpool")


class S3ImageStore:
    def __init__(self, bucket: str, *, prefix: str = "safeedit/images/",
                 endpoint_url: str | None = None, region: str | None = None,
                 access_key: str | None = None, secret_key: str | None = None,
                 connect_timeout_s: float = 5.0, read_timeout_s: float = 30.0,
                 max_attempts: int = 3) -> None:
        if not isinstance(bucket, str) or not bucket:
            raise ConfigError("image_store (s3): `bucket` is required")
        if not isinstance(prefix, str):
            raise ConfigError("image_store (s3): prefix must be a string")
        if not isinstance(max_attempts, int) or max_attempts < 1:
            raise ConfigError("image_store (s3): max_attempts must be a positive integer")
        self.bucket = bucket
        self.prefix = prefix
        self._secrets = (access_key, secret_key)
        redact_logs(_BOTO_LOGGERS, self._secrets)
        config = Config(connect_timeout=connect_timeout_s, read_timeout=read_timeout_s,
                        retries={"max_attempts": max_attempts, "mode": "standard"},
                        s3={"addressing_style": "path" if endpoint_url else "auto"})
        # A client is thread-safe (a session is not): one per store, shared by the workers.
        self._client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, region_name=region, aws_access_key_id=access_key,
            aws_secret_access_key=secret_key, config=config)

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> S3ImageStore:
        opts = dict(options)
        creds: dict[str, str | None] = {}
        for option, kwarg in (("access_key_env", "access_key"), ("secret_key_env", "secret_key")):
            name = opts.pop(option, None)
            if name:
                creds[kwarg] = os.environ.get(name)
                if not creds[kwarg]:
                    raise ConfigError(f"image_store (s3): {option} names {name}, which is not set")
        if len(creds) == 1:
            raise ConfigError("image_store (s3): access_key_env and secret_key_env go together")
        kwargs = {name: opts.pop(name) for name in
                  ("prefix", "endpoint_url", "region", "connect_timeout_s", "read_timeout_s",
                   "max_attempts") if name in opts}
        bucket = opts.pop("bucket", None)
        if opts:
            raise ConfigError(f"image_store (s3): unknown options {sorted(opts)}")
        return cls(bucket, **kwargs, **creds)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"the bucket {self.bucket} (prefix {self.prefix!r})"

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn` in a worker thread, boto's failures translated (and redacted)."""
        try:
            return await asyncio.to_thread(fn, *args)
        except (BotoCoreError, ClientError) as exc:
            message = redact(f"{type(exc).__name__}: {exc}", self._secrets, limit=300)
            raise Unavailable(f"image store (s3 {self.bucket}): {message}",
                             code="image_store_unavailable") from exc

    # --- blocking parts, run in a worker thread -------------------------------------------------

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            return self._client.head_object(Bucket=self.bucket, Key=key)  # type: ignore[no-any-return]
        except ClientError as exc:
            if _error_code(exc) in _MISSING:
                return None
            raise

    def _put(self, data: bytes, media_type: str, ttl_s: float | None) -> str:
        image_id = hashlib.sha256(data).hexdigest()
        key = self.prefix + image_id
        wanted = math.inf if ttl_s is None else time.time() + ttl_s
        for _ in range(3):
            head = self._head(key)
            if head is not None:
                if (_expires(head) >= wanted
                        and time.time() - head["LastModified"].timestamp() < _RESTORE_AFTER_S):
                    break  # just stored, for as long: nothing to write
                wanted = max(wanted, _expires(head))  # the later expiry wins
            try:
                self._client.put_object(
                    Bucket=self.bucket, Key=key, Body=data, ContentType=media_type,
                    Metadata={"expires-at": _NEVER if wanted == math.inf else repr(wanted)},
                    # the first copy: one writer wins, the others look again
                    **({"IfNoneMatch": "*"} if head is None else {}))
            except ClientError as exc:
                if _error_code(exc) not in _TAKEN:
                    raise
                continue
            after = self._head(key)
            if after is not None and _expires(after) >= wanted:
                break
        return image_id

    def _live(self, image_id: str, now: float | None) -> dict[str, Any] | None:
        if not _SHA256.fullmatch(image_id):  # `$` would pass a trailing newline
            return None
        head = self._head(self.prefix + image_id)
        if head is None or _expires(head) <= (now or time.time()):
            return None
        return head

    def _get(self, image_id: str, now: float | None) -> tuple[str, bytes] | None:
        if not _SHA256.fullmatch(image_id):
            return None
        try:
            obj = self._client.get_object(Bucket=self.bucket, Key=self.prefix + image_id)
        except ClientError as exc:
            if _error_code(exc) in _MISSING:
                return None
            raise
        with obj["Body"] as body:
            if _expires(obj) <= (now or time.time()):
                return None
            data = body.read()
        if hashlib.sha256(data).hexdigest() != image_id:
            log.error("image %s in %r does not match its sha256; not served", image_id, self)
            return None
        return obj.get("ContentType") or "application/octet-stream", data

    def _purge(self, before: float, stored_before: float | None, dry_run: bool) -> PurgeResult:
        removed = freed = kept = 0
        doomed: list[dict[str, str]] = []
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix)
        for page in pages:
            for entry in page.get("Contents", []):
                if not _SHA256.fullmatch(entry["Key"][len(self.prefix):]):
                    continue  # link.key, or not ours
                old = stored_before is not None and entry["LastModified"].timestamp() < stored_before
                head = None if old else self._head(entry["Key"])
                if old or (head is not None and _expires(head) < before):
                    doomed.append({"Key": entry["Key"]})
                    removed += 1
                    freed += entry["Size"]
                elif head is not None:
                    kept += 1
        if not dry_run:
            for start in range(0, len(doomed), 1000):  # DeleteObjects takes 1000 at most
                self._client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": doomed[start:start + 1000], "Quiet": True})
        return PurgeResult(removed, freed, kept)

    def _secret(self) -> bytes:
        key = self.prefix + "link.key"
        try:
            obj = self._client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _error_code(exc) not in _MISSING:
                raise
            try:
                self._client.put_object(Bucket=self.bucket, Key=key, IfNoneMatch="*",
                                        Body=secrets.token_bytes(32))
            except ClientError as taken:  # another process made one first: theirs is used
                if _error_code(taken) not in _TAKEN:
                    raise
            obj = self._client.get_object(Bucket=self.bucket, Key=key)
        with obj["Body"] as body:
            secret: bytes = body.read()
        return secret

    # --- the ImageStore interface ---------------------------------------------------------------

    async def put(self, data: bytes, media_type: str, ttl_s: float | None) -> str:
        return await self._call(self._put, data, media_type, ttl_s)

    async def get(self, image_id: str, now: float | None = None) -> tuple[str, bytes] | None:
        return await self._call(self._get, image_id, now)

    async def has(self, image_id: str, now: float | None = None) -> bool:
        return await self._call(self._live, image_id, now) is not None

    async def purge(self, before: float, *, stored_before: float | None = None,
                    dry_run: bool = False) -> PurgeResult:
        return await self._call(self._purge, before, stored_before, dry_run)

    async def shared_secret(self) -> bytes:
        return await self._call(self._secret)

    async def ready(self) -> bool:
        try:
            await self._call(lambda: self._client.head_bucket(Bucket=self.bucket))
        except GuardError as exc:
            log.warning("%s", exc.message)
            return False
        return True

    async def aclose(self) -> None:
        await asyncio.to_thread(self._client.close)


def _error_code(exc: ClientError) -> str:
    error = exc.response.get("Error", {})
    return str(error.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))


def _expires(obj: Mapping[str, Any]) -> float:
    raw = obj.get("Metadata", {}).get("expires-at", _NEVER)
    if raw == _NEVER:
        return math.inf
    try:
        return float(raw)
    except ValueError:  # not written by this store: treat it as expired, never as kept forever
        return -math.inf
