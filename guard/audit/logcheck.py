"""`safeedit audit verify`'s part for the transparency log (guard.audit.tlog): row signatures,
leaves against the rows they log, the root of every signed tree head (database and sink), and the
sink against the database. Memory stays flat: rows and leaves are read in pages, the tree is
rebuilt from its right edge (O(log n) hashes).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from guard.audit import merkle
from guard.audit.heads import TreeHead
from guard.audit.tlog import TransparencyLog, entry_message, label_entry, leaf_data, trace_entry
from guard.core.hashchain import ProblemKind, VerifyReport

Add = Callable[[ProblemKind, int, str | None, str], None]


def _when(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


async def verify_log(self: TransparencyLog, report: VerifyReport) -> None:
    """Row signatures, leaves against rows, every head's signature and root, and the sink
    against the database; adds what fails to `report` (a labels row's to `report.labels`),
    counts to `report.log`."""
    add: Add = report.add
    label_add: Add = (report.labels or report).add
    facts: dict[str, Any] = {"signed_rows": 0, "legacy_rows": 0}
    size, root, tseq, lseq, tlegacy, llegacy = await self.state()
    for chain, legacy in (("traces", tlegacy), ("labels", llegacy)):
        last = 0
        while rows := await self.dialect.fetch(
                f"SELECT t.seq, t.id, t.hash, s.kid, s.sig FROM {chain} t LEFT JOIN"
                f" entry_sigs s ON s.chain = '{chain}' AND s.seq = t.seq WHERE t.seq > ?"
                " ORDER BY t.seq LIMIT 5000", (last,)):
            for seq, id_, hash_, kid, sig in rows:
                ok = self.keys.check(kid, entry_message(chain, seq, hash_), sig) \
                    if sig else None
                if ok:
                    facts["signed_rows"] += 1
                elif not sig and seq <= legacy:
                    facts["legacy_rows"] += 1
                else:
                    (label_add if chain == "labels" else add)(
                        "signature", seq, id_, f"{chain} row {id_} (seq {seq}) "
                        + ("has no log signature: written without the log's key (forged)"
                           if not sig else f"is signed with key {kid}, which is not "
                           "configured" if ok is None else "has an invalid log signature "
                           "(forged or altered)"))
            last = rows[-1][0]
    heads = await self.db_heads()
    sink_heads, resets, _ = await self.sink_heads()
    facts.update(tree_size=size, heads=len(heads), sink_heads=len(sink_heads),
                 resets=resets, sink=self.sink.location if self.sink else None,
                 blocked=self.blocked)
    await _verify_leaves(self, size, root, [*heads, *sink_heads], add, label_add)
    for kind, seq, message in await self.problems():
        add(kind, seq, None, message)
    report.log = facts

async def _verify_leaves(self: TransparencyLog, size: int, root: bytes,
                         heads: Sequence[TreeHead], add: Add, add_label: Add) -> None:
    at: dict[int, list[TreeHead]] = {}
    for head in heads:
        if not self.keys.check(head.key_id, head.message(), head.signature):
            add("head_invalid", head.tree_size, None, f"the tree head of size "
                f"{head.tree_size} signed on {_when(head.timestamp)} has an invalid "
                f"signature or an unknown key ({head.key_id})")
        else:
            at.setdefault(head.tree_size, []).append(head)
    frontier: list[bytes] = []
    index = 0
    for head in at.pop(0, []):
        if head.root_hash != merkle.EMPTY_ROOT:
            add("fork", 0, None, "the empty tree's head has a root that is not empty")
    while rows := await self.dialect.fetch(
            "SELECT l.idx, l.kind, l.data, l.leaf_hash, t.id, t.hash, t.created_at, t.body,"
            " b.id, b.hash, b.created_at, b.trace_id FROM log_leaves l"
            " LEFT JOIN traces t ON l.kind = 'trace' AND t.seq = l.seq"
            " LEFT JOIN labels b ON l.kind = 'label' AND b.seq = l.seq"
            " WHERE l.idx >= ? ORDER BY l.idx LIMIT 2000", (index,)):
        for idx, kind, data, lh, tid, th, tc, body, bid, bh, bc, btr in rows:
            if idx != index:
                add("tree", index, None, f"leaf {index} of the tree is missing")
                return
            entry = orjson.loads(data)
            expected = (trace_entry(entry["seq"], tid, th, tc, body) if kind == "trace"
                        and tid else label_entry(entry["seq"], bid, bh, bc, btr)
                        if kind == "label" and bid else entry if kind == "event" else None)
            if expected is None or leaf_data(expected) != data.encode() \
                    or merkle.leaf_hash(data.encode()).hex() != lh:
                (add_label if kind == "label" else add)(
                    "tree", entry.get("seq") or 0, entry.get("id"),
                    f"leaf {idx} ({kind} {entry.get('id')}) does not match the "
                    f"{'row it logs' if expected else 'log: its row is gone'}")
            leaf = bytes.fromhex(lh)
            known = dict(zip(merkle.frontier(index), frontier, strict=True))
            for level, i, h in merkle.appended_nodes(index, leaf, frontier):
                known[(level, i)] = h
            index += 1
            frontier = [known[p] for p in merkle.frontier(index)]
            for head in at.pop(index, []):
                if head.root_hash != merkle.root(frontier):
                    add("fork", index, None, f"the tree head of size {index} signed on "
                        f"{_when(head.timestamp)} has another root than the log's leaves: "
                        "the log was rewritten (forked)")
    if index != size or (size and merkle.root(frontier) != root):
        add("tree", index, None, f"the log's state says {size} leaves, its leaves make "
            f"{index}: the tree was damaged")
    for size_, hs in at.items():
        add("behind", size_, None, f"a tree head signed on {_when(hs[0].timestamp)} has "
            f"{size_} leaves, the log only {index}: the log was cut or wiped")
