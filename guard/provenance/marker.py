"""Marking an image: a C2PA manifest, signed, embedded in the image's own bytes.

What the manifest says (its active manifest's assertions):
    c2pa.actions.v2      `c2pa.created` with digitalSourceType trainedAlgorithmicMedia (IPTC),
                         or `c2pa.opened` of the backend's own image when that image carried a
                         manifest already (kept whole as the parent ingredient: C2PA allows no
                         parent under `created`); then `c2pa.edited` when the guard refined the
                         prompt or repaired the image
    com.safeedit.guard   the facts: trace id, policy id/version/sha256, the decision, rounds,
                         flagged categories, the transparency log's id
plus the hash binding of every other byte of the image (`c2pa.hash.data`) and the signature.

Signing is CPU work of a few milliseconds in the native c2pa library, thread-safe: the pipeline
calls `mark` in worker threads, one per image, never on the event loop.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import c2pa

from guard.core.config import ProvenanceConfig
from guard.provenance.credentials import Credentials, load_credentials
from guard.support.errors import ProvenanceFailed

log = logging.getLogger("safeedit.provenance")

GUARD_LABEL = "com.safeedit.guard"
TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
# Thumbnails would cost ~100 ms an image (and copy the image into its own manifest); reading
# the signed image back (verify_after_sign) ~1 ms: the manifest is the library's own making,
# and tests/test_provenance.py reads every kind of image back.
_SETTINGS = {"builder": {"thumbnail": {"enabled": False}},
             "verify": {"verify_after_sign": False}}
_PARENT = "c2pa.ingredient.v3"
_FAILED = "The image could not be given its provenance manifest (C2PA); it was not sent."


def media_type_of(data: bytes) -> str | None:
    """PNG, JPEG or WebP from the first bytes; None for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


@dataclass(frozen=True, slots=True)
class Facts:
    """What the guard decided about one image, as its manifest states it."""

    trace_id: str
    policy: Mapping[str, Any]  # id, version, sha256 (Policy.ref)
    decision: str  # passed | edited
    rounds: int
    categories: Sequence[str] = ()
    log_id: str | None = None  # the transparency log's id: a hash of its public key

    def assertion(self) -> dict[str, Any]:
        return {"trace_id": self.trace_id,
                "policy": {k: self.policy.get(k) for k in ("id", "version", "sha256")},
                "decision": self.decision, "rounds": self.rounds,
                "categories": list(self.categories), "log_id": self.log_id}


@dataclass(frozen=True, slots=True)
class _Signing:
    """The credentials as c2pa holds them: one signer and one context, shared by every thread
    (the library allows shared calls at once), made once instead of per image."""

    credentials: Credentials
    signer: c2pa.Signer
    context: c2pa.Context


class Marker:
    """Signs images with the configured credentials (`provenance.c2pa`)."""

    def __init__(self, config: ProvenanceConfig, *, keys_dir: Path = Path("var/keys"),
                 log_id: str | None = None) -> None:
        """`keys_dir`: where the development chain lives unless `c2pa.dev_dir` says; `log_id`:
        the transparency log's id every manifest names."""
        self.config = config
        self.keys_dir = keys_dir
        self.log_id = log_id
        self._lock = threading.Lock()
        self._signing: _Signing | None = None
        self._generator = [{"name": "safeedit-guard", "version": _version()}]
        try:
            self._signing = self._load()
        except ProvenanceFailed as exc:  # each image then retries, and fails as on_error says
            log.error("provenance: %s; images cannot be marked (on_error: %s)",
                      exc.message, config.on_error)

    @property
    def refuses(self) -> bool:
        return self.config.on_error == "refuse"

    @property
    def credentials(self) -> Credentials:
        return self._ready().credentials

    def _ready(self) -> _Signing:
        if self._signing is None:
            with self._lock:
                if self._signing is None:
                    self._signing = self._load()
        return self._signing

    def _load(self) -> _Signing:
        credentials, line = load_credentials(self.config.c2pa, self.keys_dir)
        try:
            signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(
                credentials.alg, credentials.chain_pem, credentials.key_pem,
                self.config.c2pa.tsa_url))
        except c2pa.C2paError as exc:
            raise ProvenanceFailed(f"provenance.c2pa: c2pa refuses the certificate or key "
                                   f"({type(exc).__name__})") from None
        (log.warning if credentials.dev else log.info)("provenance: %s", line)
        return _Signing(credentials, signer, c2pa.Context.from_dict(_SETTINGS))

    def mark(self, data: bytes, facts: Facts) -> bytes:
        """The image with its manifest; ProvenanceFailed (its `detail` for the trace) if not."""
        media_type = media_type_of(data)
        if media_type is None:
            raise ProvenanceFailed(_FAILED, detail="not a PNG, JPEG or WebP image")
        try:
            signing = self._ready()
        except ProvenanceFailed as exc:  # names the operator's files: for the trace only
            raise ProvenanceFailed(_FAILED, detail=exc.message) from None
        try:
            return self._sign(signing, data, media_type, facts)
        except c2pa.C2paError as exc:
            raise ProvenanceFailed(
                _FAILED, detail=f"{type(exc).__name__}: {exc}",
                secrets=[signing.credentials.key_pem.decode(errors="replace")]) from exc

    def _sign(self, signing: _Signing, data: bytes, media_type: str, facts: Facts) -> bytes:
        parent = _has_manifest(data, media_type, signing.context)
        actions: list[dict[str, Any]] = [
            {"action": "c2pa.opened", "parameters": {"ingredientIds": [_PARENT]},
             "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA} if parent else
            {"action": "c2pa.created", "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA}]
        if facts.decision == "edited":
            actions.append({"action": "c2pa.edited", "description": (
                "the guard judged an earlier image unsafe and regenerated or repaired it from "
                "a refined prompt")})
        manifest = {
            "claim_generator_info": self._generator,
            "title": f"{facts.trace_id}{_EXTENSIONS[media_type]}",
            "assertions": [{"label": "c2pa.actions.v2", "data": {"actions": actions}},
                           {"label": GUARD_LABEL, "data": facts.assertion()}],
        }
        with c2pa.Builder(manifest, context=signing.context) as builder:
            if parent:
                builder.add_ingredient({"title": "the backend's image",
                                        "relationship": "parentOf", "label": _PARENT},
                                       media_type, io.BytesIO(data))
            out = io.BytesIO()
            builder.sign(signing.signer, media_type, io.BytesIO(data), out)
        return out.getvalue()


_EXTENSIONS = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}


def _has_manifest(data: bytes, media_type: str, context: c2pa.Context) -> bool:
    """Whether the image carries a manifest already (a parse of its structure: cheaper than a
    scan of its bytes for the label)."""
    try:
        reader = c2pa.Reader.try_create(media_type, io.BytesIO(data), context=context)
    except c2pa.C2paError:  # a broken manifest is no parent worth keeping
        return False
    if reader is None:
        return False
    reader.close()
    return True


def _version() -> str:
    try:
        return version("safeedit-guard")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0"
