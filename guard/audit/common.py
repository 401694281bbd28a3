"""What both audit stores share: options every store takes, the opaque page cursor, a WHERE.

Audit options common to all stores (besides each store's own):
    checkpoint_every     a signed checkpoint every N traces (default 1000); see guard.audit.chain
    checkpoint_key_env   name of the environment variable holding the HMAC key for checkpoints
                         (unset = no checkpoints; named but missing = config error)
    checkpoint_keys_env  or: one holding `kid1:secret1,kid2:secret2` (the first signs, all
                         verify; key rotation), see guard.audit.chain
    anchor               the signed chain head, kept outside the database; see guard.audit.anchor
    session_key_env      name of the environment variable holding the key that signs review-page
                         sessions (see guard.review); unset = a random key per process
    images_dir, image_ttl_days   see guard.audit.images
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from guard.audit.anchor import Anchorer
from guard.audit.chain import DEFAULT_CHECKPOINT_EVERY, Signer
from guard.audit.images import RetainedImages
from guard.plugins import ImageStore
from guard.support.errors import ConfigError, RequestError


@dataclass(frozen=True, slots=True)
class CommonOptions:
    images: RetainedImages | None
    signer: Signer | None
    checkpoint_every: int
    anchorer: Anchorer | None


def common_options(opts: dict[str, Any], audit: Mapping[str, Any],
                   images: ImageStore | None) -> CommonOptions:
    """Pops the common options from a store's option dict (the rest are the store's own).
    `audit` is the whole section; `images` the shared image store (None: built from `audit`)."""
    every = opts.pop("checkpoint_every", DEFAULT_CHECKPOINT_EVERY)
    if not isinstance(every, int) or every < 1:
        raise ConfigError("audit: checkpoint_every must be a positive integer")
    opts.pop("session_key_env", None)  # read by guard.review
    signer = Signer.from_options(opts.pop("checkpoint_keys_env", None),
                                 opts.pop("checkpoint_key_env", None))
    # `anchor` is the tree heads' sink (guard.audit.heads); with HMAC checkpoint keys the chain
    # heads are also anchored there as before (guard.audit.anchor).
    anchor = opts.pop("anchor", None)
    return CommonOptions(images=RetainedImages.from_options(opts, images, audit),
                         signer=signer, checkpoint_every=every,
                         anchorer=Anchorer.from_options(anchor, signer)
                         if signer is not None and isinstance(anchor, Mapping) else None)


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(str(seq).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        seq = int(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode())
    except (ValueError, UnicodeDecodeError):
        seq = -1
    if not 0 <= seq <= 2**63 - 1:  # a sequence number both databases can compare against
        raise RequestError("Invalid 'cursor'.", param="cursor")
    return seq


def where_sql(clauses: Sequence[str]) -> str:
    """` WHERE a AND b` for the clauses given; nothing without any."""
    return " WHERE " + " AND ".join(clauses) if clauses else ""
