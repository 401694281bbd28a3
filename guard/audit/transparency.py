"""Checking a log from outside, with its public key only: the witness, and an image's trace.

`witness(url, state_file, ...)` is `safeedit audit witness`: it fetches the log's newest signed
tree head, checks its signature, and checks that it extends the head it saw last (a consistency
proof, RFC 9162 §2.1.4); it keeps that head in its state file. A rollback, a wipe, a fork, a bad
signature, an unknown key or (with `max_age_s`) a log that stopped signing heads is a failure.
It needs no database access, so it can run anywhere: as a cron job, a sidecar, a Kubernetes
CronJob (deploy/witness-cronjob.yaml), ideally operated by someone other than the log's operator.

`verify_delivered(url, trace_id, sha256)` is `safeedit verify-image --log`: the trace's leaf must
list the image's sha256 among the images it delivered, and its inclusion proof must lead to the
root of a tree head signed by the log's key.

Keys: `keys` is a PEM file of public keys, or a URL of a keys document
(`GET /v1/guard/log/keys`); without it the log's own keys document is fetched, and the witness
pins the keys it first saw in its state (trust on first use: say so when you run it first).
A log that is not public needs an auditor's key: `api_key`, or SAFEEDIT_LOG_API_KEY.
"""

from __future__ import annotations

import base64
import binascii
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from guard.audit import merkle
from guard.audit.heads import TreeHead
from guard.audit.logkeys import check_signature, public_entry, public_keys_from
from guard.audit.tlog import leaf_data

API_KEY_ENV = "SAFEEDIT_LOG_API_KEY"


class LogCheckFailed(Exception):
    """The log failed a check (the message says which); exit 1."""


class _Client:
    def __init__(self, url: str, api_key: str | None, timeout_s: float = 15.0) -> None:
        self.base = url.rstrip("/")
        if self.base.endswith("/v1"):
            self.base = self.base[:-3]
        key = api_key or os.environ.get(API_KEY_ENV)
        self.http = httpx.Client(timeout=timeout_s, headers={"authorization": f"Bearer {key}"}
                                 if key else {})

    def get(self, path: str, **params: Any) -> Any:
        try:
            reply = self.http.get(f"{self.base}{path}", params=params)
        except httpx.HTTPError as exc:
            raise ConnectionError(f"cannot reach the log at {self.base} "
                                  f"({type(exc).__name__})") from exc
        if reply.status_code != 200:
            try:
                message = reply.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = reply.text[:200]
            raise ConnectionError(f"{path} answered {reply.status_code}: {message}")
        return reply.json()


def load_keys(client: _Client, keys: str | None) -> dict[str, Ed25519PublicKey]:
    if keys is None:
        return public_keys_from(client.get("/v1/guard/log/keys"))
    if keys.startswith(("http://", "https://")):
        return public_keys_from(httpx.get(keys, timeout=15.0).json())
    return public_keys_from(Path(keys).read_text())


def checked_head(document: Mapping[str, Any], keys: Mapping[str, Ed25519PublicKey]) -> TreeHead:
    try:
        head = TreeHead.from_dict(document)
    except ValueError as exc:
        raise LogCheckFailed(f"the log answered a malformed tree head ({exc})") from exc
    valid = check_signature(keys, head.key_id, head.message(), head.signature)
    if valid is None:
        raise LogCheckFailed(f"the tree head is signed with key {head.key_id}, which is not a "
                             f"trusted key of this log ({', '.join(keys)})")
    if not valid:
        raise LogCheckFailed(f"the tree head of size {head.tree_size} has an invalid signature")
    return head


def _b64list(values: Any) -> list[bytes]:
    try:
        return [base64.b64decode(v, validate=True) for v in values]
    except (TypeError, binascii.Error) as exc:
        raise LogCheckFailed("the log answered a malformed proof") from exc


def witness(url: str, state_file: str | Path, *, keys: str | None = None,
            api_key: str | None = None, max_age_s: float | None = None) -> str:
    """One check; returns a line saying what was seen, raises LogCheckFailed on tampering
    (ConnectionError when the log cannot be asked). The state is written only when all holds."""
    path = Path(state_file)
    state = orjson.loads(path.read_bytes()) if path.exists() else {}
    client = _Client(url, api_key)
    pinned = {k: v for k, v in public_keys_from({"keys": state["keys"]}).items()} \
        if state.get("keys") and keys is None else load_keys(client, keys)
    head = checked_head(client.get("/v1/guard/log/sth"), pinned)
    note = ""
    last = TreeHead.from_dict(state["head"]) if state.get("head") else None
    if last is not None:
        if head.tree_size < last.tree_size:
            raise LogCheckFailed(
                f"the log shrank from {last.tree_size} to {head.tree_size} leaves: rolled back, "
                "cut or wiped (the head seen last is kept in the state file)")
        if head.tree_size == last.tree_size and head.root_hash != last.root_hash:
            raise LogCheckFailed(f"the log forked: two heads of size {head.tree_size} with "
                                 "different roots")
        if head.tree_size > last.tree_size and last.tree_size > 0:
            proof = client.get("/v1/guard/log/proof/consistency", first=last.tree_size,
                               second=head.tree_size)
            try:
                merkle.verify_consistency(last.tree_size, head.tree_size,
                                          _b64list(proof.get("proof")), last.root_hash,
                                          head.root_hash)
            except merkle.ProofError as exc:
                raise LogCheckFailed(
                    f"the log forked: its head of size {head.tree_size} does not extend the "
                    f"head of size {last.tree_size} seen before ({exc})") from exc
        note = f" (+{head.tree_size - last.tree_size} since the last check)"
    else:
        note = " (first check: keys pinned, trust on first use)" if keys is None else \
            " (first check)"
    if max_age_s is not None and time.time() * 1000 - head.timestamp > max_age_s * 1000:
        raise LogCheckFailed(
            f"the newest tree head is {int(time.time() - head.timestamp / 1000)} s old (more "
            f"than {max_age_s:g} s): the log stopped signing heads (a forged or unsigned row "
            "stops it; see the server's log and `safeedit audit verify`)")
    state = {"url": url, "keys": [public_entry(k, v) for k, v in pinned.items()],
             "head": head.to_dict(), "checked_at": time.time()}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(orjson.dumps(state, option=orjson.OPT_INDENT_2))
    tmp.replace(path)
    return (f"ok: tree size {head.tree_size}{note}, root "
            f"{base64.b64encode(head.root_hash).decode()}, signed by {head.key_id}")


def verify_delivered(log_url: str, trace_id: str, sha256: str, trust_keys: str | None = None,
                     api_key: str | None = None) -> list[str]:
    """Problems with the claim "the log recorded delivering this image for this trace"; []: ok."""
    try:
        client = _Client(log_url, api_key)
        keys = load_keys(client, trust_keys)
        proof = client.get("/v1/guard/log/proof/inclusion", trace_id=trace_id)
        head = checked_head(proof.get("sth") or {}, keys)
        leaf = proof.get("leaf") or {}
        if leaf.get("kind") != "trace" or leaf.get("id") != trace_id:
            return [f"the log's leaf is not trace {trace_id}"]
        if sha256 not in (leaf.get("delivered") or []):
            return [f"trace {trace_id} did not deliver an image with sha256 {sha256} "
                    f"(it delivered {', '.join(leaf.get('delivered') or []) or 'none'})"]
        merkle.verify_inclusion(merkle.leaf_hash(leaf_data(leaf)), int(proof["leaf_index"]),
                                head.tree_size, _b64list(proof.get("audit_path")),
                                head.root_hash)
    except (LogCheckFailed, ConnectionError, merkle.ProofError, OSError, ValueError,
            KeyError) as exc:
        return [f"{type(exc).__name__ if isinstance(exc, KeyError) else ''}{exc}".strip()]
    return []
