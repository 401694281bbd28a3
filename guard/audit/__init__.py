"""Audit stores: where every request's trace is kept, one hash chain per store.

`AuditStore` is what the proxy needs (write, get, query). Capabilities beyond it are declared as
Protocols and checked with isinstance, never probed attribute by attribute:
- `ChainedStore`: the hash chain can be read and verified (`safeedit audit verify|export`), its
  head anchored outside the store (`.anchorer`, an Anchorer or None; guard.audit.anchor);
- `ImageKeepingStore`: keeps the images a policy retains (`.images`, a RetainedImages or None,
  in the shared image store; the review pages and `safeedit audit purge`);
- `guard.labels.LabelStore`: keeps auditors' labels of traces in a second chain, and the review
  queue (declared with the labels, which import this package).
The built-in stores (`sqlite`, `postgres`) have all three. Options common to both are documented in
guard.audit.common; each store's own in its module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from guard.audit.anchor import Anchorer
from guard.audit.chain import ChainSource, Signer, VerifyReport
from guard.audit.images import RetainedImages
from guard.imagestore import ImageStore
from guard.registry import Registry
from guard.types import Trace


@dataclass(frozen=True, slots=True)
class TraceQuery:
    since: float | None = None
    until: float | None = None
    decision: str | None = None
    category: str | None = None
    tenant: str | None = None
    key_id: str | None = None
    policy_id: str | None = None
    policy_version: int | None = None
    model: str | None = None
    limit: int = 50
    cursor: str | None = None  # opaque; from the previous page's next_cursor


@dataclass(frozen=True, slots=True)
class TracePage:
    items: list[dict[str, Any]]
    next_cursor: str | None


@runtime_checkable
class AuditStore(Protocol):
    async def write(self, trace: Trace) -> Trace:
        """Seal the trace into the chain (prev_hash, hash) and store it durably."""
        ...

    async def get(self, trace_id: str) -> Trace | None: ...

    async def query(self, q: TraceQuery) -> TracePage: ...

    async def ready(self) -> bool: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class ChainedStore(AuditStore, ChainSource, Protocol):
    """A store whose traces form a verifiable hash chain (with signed checkpoints)."""

    signer: Signer | None
    checkpoint_every: int
    anchorer: Anchorer | None

    async def write_many(self, traces: Sequence[Trace]) -> None: ...

    async def verify(self) -> VerifyReport:
        """Walk the chain; check it against the checkpoints and the anchorer's anchors."""
        ...


@runtime_checkable
class ImageKeepingStore(AuditStore, Protocol):
    """A store that keeps the images a policy retains (None when not configured)."""

    images: RetainedImages | None


stores: Registry[AuditStore] = Registry("audit store", "safeedit.audit_stores")
stores.register("sqlite", "guard.audit.sqlite:SQLiteStore.from_config")
stores.register("postgres", "guard.audit.postgres:PostgresStore.from_config")


def build_store(options: Mapping[str, Any], images: ImageStore | None = None) -> AuditStore:
    """The store `options` name. `images`, the app's shared image store, goes to the store's
    `from_config(options, images=...)` when given (where it keeps retained images)."""
    opts = dict(options)
    kind = opts.pop("kind", "sqlite")
    return stores.create(kind, opts) if images is None else stores.create(kind, opts,
                                                                          images=images)
