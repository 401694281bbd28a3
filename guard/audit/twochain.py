"""What the SQLite and PostgreSQL stores share above their SQL: both keep two chains (traces
and labels) in the same tables' shape, and each implements only the per-chain reads (`walk`,
`checkpoints_of`, `head_of`, `row_by_hash_of`) in its own dialect. From those, this gives the
trace chain's `ChainSource` methods (all but `chain_rows`, whose filters are SQL) and `verify`
of both chains."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from typing import Any

from guard.audit.anchor import Anchorer
from guard.audit.chain import (
    ChainRow,
    ChainTables,
    Checkpoint,
    Signer,
    TableChain,
    VerifyReport,
    verify,
)
from guard.audit.labels import label_columns


class TwoChainStore(ABC):
    traces_tables: ChainTables  # the store's trace chain tables (class attribute)
    label_chain: TableChain     # the same reads over the label tables
    signer: Signer | None
    checkpoint_every: int
    anchorer: Anchorer | None
    label_anchorer: Anchorer | None

    # --- each store's own reads, in its SQL ------------------------------------------------------

    @abstractmethod
    def chain_rows(self, *, since: float | None = None, until: float | None = None,
                   tenant: str | None = None, batch: int = 1000) -> AsyncIterator[ChainRow]: ...

    @abstractmethod
    def walk(self, chain: ChainTables, where: Sequence[str] = (), args: Sequence[Any] = (),
             batch: int = 1000) -> AsyncIterator[ChainRow]: ...

    @abstractmethod
    async def checkpoints_of(self, chain: ChainTables) -> list[Checkpoint]: ...

    @abstractmethod
    async def head_of(self, chain: ChainTables) -> tuple[int, str | None]: ...

    @abstractmethod
    async def row_by_hash_of(self, chain: ChainTables, hash_: str) -> ChainRow | None: ...

    # --- the trace chain (guard.audit.chain.ChainSource), less chain_rows ----------------------

    async def checkpoints(self) -> list[Checkpoint]:
        return await self.checkpoints_of(self.traces_tables)

    async def chain_head(self) -> tuple[int, str | None]:
        return await self.head_of(self.traces_tables)

    async def row_by_hash(self, hash_: str) -> ChainRow | None:
        return await self.row_by_hash_of(self.traces_tables, hash_)

    # --- verify ---------------------------------------------------------------------------------

    async def verify_labels(self) -> VerifyReport:
        anchors = (await self.label_anchorer.sink.read() if self.label_anchorer is not None
                   else None)
        return await verify(self.label_chain, self.signer, anchors=anchors, noun="label",
                            checkpoint_every=self.checkpoint_every, columns=label_columns)

    async def verify(self) -> VerifyReport:
        anchors = await self.anchorer.sink.read() if self.anchorer is not None else None
        report = await verify(self, self.signer, checkpoint_every=self.checkpoint_every,
                              anchors=anchors)
        report.labels = await self.verify_labels()
        return report
