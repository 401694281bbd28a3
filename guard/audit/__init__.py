"""Audit stores: where every request's trace is kept, one hash chain per store.

`AuditStore` is what the proxy needs (write, get, query). Capabilities beyond it are declared as
Protocols and checked with isinstance, never probed attribute by attribute:
- `ChainedStore`: the hash chain can be read and verified (`safeedit audit verify|export`), its
  head anchored outside the store (`.anchorer`, an Anchorer or None; guard.audit.anchor);
- `ImageKeepingStore`: keeps the images a policy retains (`.images`, a RetainedImages or None,
  in the shared image store; the review pages and `safeedit audit purge`);
- `guard.plugins.LabelStore`: keeps auditors' labels of traces (guard.core.labels) in a second
  chain, and the review queue.
The built-in stores (`sqlite`, `postgres`) have all three: one store (guard.audit.sql) over each
database's dialect. Options common to both are documented in guard.audit.common; each store's own
in its module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from guard.audit.anchor import Anchorer
from guard.audit.chain import ChainSource, Signer
from guard.audit.images import RetainedImages
from guard.audit.spool import Spool
from guard.audit.tlog import TransparencyLog
from guard.core.hashchain import VerifyReport
from guard.core.types import Trace
from guard.plugins import AuditStore


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
class LoggedStore(AuditStore, Protocol):
    """A store that keeps a transparency log (guard.audit.tlog) beside its chains."""

    log: TransparencyLog | None
    accept_log_reset: bool


@runtime_checkable
class SpoolingStore(AuditStore, Protocol):
    """A store that spools the traces it cannot take to a local file (guard.audit.spool)."""

    spool: Spool | None


@runtime_checkable
class ImageKeepingStore(AuditStore, Protocol):
    """A store that keeps the images a policy retains (None when not configured)."""

    images: RetainedImages | None
