"""The audit log as a transparency log (RFC 9162's model, as Certificate Transparency and Rekor).

Entries
    Every trace and every label is sealed into its hash chain (guard.audit.chain) and, in the same
    transaction, signed by the server: an Ed25519 signature (guard.audit.logkeys) over
    `safeedit-entry-v1\\n<chain>\\n<seq>\\n<hash>` in `entry_sigs` (Rekor's signed entry
    timestamp: the log's promise to include it). The chain hash covers the row's content and
    position, so a row appended without the key has no valid signature and fails `verify`.

The tree
    An integrator (this module's `TransparencyLog`) takes the signed rows of both chains that are
    not in the tree yet, in the order they were written, and appends one leaf per row to one
    Merkle tree (guard.audit.merkle): the leaf is canonical JSON
    `{"kind": "trace"|"label"|"event", "id", "seq", "hash", "time", ...}` (a trace's also lists
    the sha256 of each image delivered, so that an image's recipient can check it against the log
    without reading the trace). Leaves, the tree's perfect-subtree nodes and the integrator's
    state live in the audit database (`log_leaves`, `log_nodes`, `log_state`), written under a
    lock on `log_state` so that replicas integrate one after another. A pending row without a
    valid signature stops the integrator there: the log signs no head past a forged row (its
    heads go stale, which a witness reports).

Signed tree heads (guard.audit.heads)
    Every `every_s` seconds (when the tree grew, and at least every HEARTBEAT_S), on shutdown and
    on request, the integrator signs a head and keeps it in the database (`log_heads`) and in the
    head sink outside it (`audit.anchor`). `check_start` compares the database with the last
    head in the sink before the server takes requests: a tree smaller than the head (wiped, cut),
    one whose root at the head's size differs (forked, rewritten), or a sink behind the
    database's own heads (rolled back, truncated) stops the start, unless the operator accepts a
    reset, which writes a `log_reset` event leaf and a reset record.

Proofs: `inclusion` (by trace or label id: leaf index, audit path, the leaf, the head) and
`consistency` (between two tree sizes), each answered with one batched lookup of O(log n) nodes.
`verify` (guard.audit.chain.verify's companion) checks row signatures, leaves against rows, the
roots of every head, and the sink against the database; guard.audit.witness checks a log from
outside with only its public key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from guard.audit import merkle
from guard.audit.heads import HeadSink, TreeHead, build_head_sink, heads_after_reset
from guard.audit.logkeys import LogKeys, load_log_keys
from guard.core.hashchain import Problem, ProblemKind
from guard.support.errors import ConfigError, NotFound, RequestError

log = logging.getLogger("safeedit.audit.log")
HEARTBEAT_S = 60.0  # a head at least this often while the log is healthy, grown or not
BATCH = 5000  # rows integrated per transaction
ENTRY_PREFIX = "safeedit-entry-v1"
CHAINS = {"trace": "traces", "label": "labels"}


def entry_message(chain: str, seq: int, hash_: str) -> bytes:
    return f"{ENTRY_PREFIX}\n{chain}\n{seq}\n{hash_}".encode()


def leaf_data(entry: Mapping[str, Any]) -> bytes:
    return orjson.dumps(dict(entry), option=orjson.OPT_SORT_KEYS)


def delivered_of(body: bytes | str) -> list[str]:
    """The sha256 of every image a trace delivered (as marked, else as generated): none for a
    request that failed or was refused, and none of an image withheld."""
    trace = orjson.loads(body)
    if trace.get("status") != 200:
        return []
    return [h for r in trace.get("results") or [] if r.get("decision") in ("passed", "edited")
            and (h := r.get("delivered_sha256") or r.get("image_sha256"))]


def trace_entry(seq: int, id_: str, hash_: str, created_at: float, body: bytes | str
                ) -> dict[str, Any]:
    return {"kind": "trace", "id": id_, "seq": seq, "hash": hash_, "time": created_at,
            "delivered": delivered_of(body)}


def label_entry(seq: int, id_: str, hash_: str, created_at: float, trace_id: str
                ) -> dict[str, Any]:
    return {"kind": "label", "id": id_, "seq": seq, "hash": hash_, "time": created_at,
            "trace_id": trace_id}


@dataclass(frozen=True, slots=True)
class LogSetup:
    keys: LogKeys
    sink: HeadSink | None
    every_s: float = 10.0
    accept_reset: bool = False
    public: bool = False  # `audit.public_log`: heads, proofs and keys without a key


def log_setup(opts: dict[str, Any], anchor: Any, key_dir: Path | None,
              sink_default: Mapping[str, Any]) -> LogSetup:
    """Pops the log's options (keys, `accept_log_reset`) from a store's options; `anchor` is the
    audit section's `anchor` (a mapping, or false: heads in the database only)."""
    keys = load_log_keys(opts, default_dir=key_dir)
    accept = opts.pop("accept_log_reset", False)
    public = opts.pop("public_log", False)
    if not isinstance(public, bool):
        raise ConfigError("audit: public_log must be true or false")
    if anchor is False:
        return LogSetup(keys, None, accept_reset=bool(accept), public=public)
    if anchor is not None and not isinstance(anchor, Mapping):
        raise ConfigError("audit: `anchor` must be a mapping (e.g. {path: ..., every_s: 10}) "
                          "or false")
    every_s = (anchor or {}).get("every_s", 10.0)
    if not isinstance(every_s, int | float) or isinstance(every_s, bool) or every_s <= 0:
        raise ConfigError("audit: anchor every_s must be a positive number")
    return LogSetup(keys, build_head_sink(anchor or {}, sink_default), float(every_s),
                    bool(accept), public)


class _Moved(Exception):
    """Another writer integrated meanwhile: read again and retry."""


class TransparencyLog:
    """The Merkle tree over one SQL store's chains (guard.audit.sql.SQLStore `.log`)."""

    def __init__(self, dialect: Any, keys: LogKeys, sink: HeadSink | None,
                 every_s: float = 10.0, public: bool = False) -> None:
        self.dialect = dialect
        self.public = public
        self.keys = keys
        self.sink = sink
        self.every_s = every_s
        self.blocked: str | None = None  # why the integrator stopped (a forged row), if it did
        self._last_signed: TreeHead | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._wrote = False  # this process sealed rows: sign a head at close

    # --- signing entries (inside the chains' append transaction) ------------------------------

    def entry_signature(self, chain: str, seq: int, hash_: str) -> tuple[str, int, str, str]:
        """The `entry_sigs` row of a chain row being sealed."""
        self._wrote = True
        return (chain, seq, self.keys.kid, self.keys.sign(entry_message(chain, seq, hash_)))

    # --- integrating ----------------------------------------------------------------------------

    async def state(self) -> tuple[int, bytes, int, int, int, int]:
        """(tree size, root, trace seq, label seq integrated, legacy trace / label seq bounds)."""
        (size, root, tseq, lseq, tlegacy, llegacy), = await self.dialect.fetch(
            "SELECT seq, hash, trace_seq, label_seq, legacy_trace_seq, legacy_label_seq"
            " FROM log_state WHERE id = 1")
        return size, bytes.fromhex(root) if root else merkle.EMPTY_ROOT, tseq, lseq, \
            tlegacy, llegacy

    async def _pending(self, tseq: int, lseq: int, tlegacy: int, llegacy: int
                       ) -> list[tuple[str, int, dict[str, Any]]]:
        traces = await self.dialect.fetch(
            "SELECT t.seq, t.id, t.hash, t.created_at, t.body, s.kid, s.sig FROM traces t"
            " LEFT JOIN entry_sigs s ON s.chain = 'traces' AND s.seq = t.seq"
            " WHERE t.seq > ? ORDER BY t.seq LIMIT ?", (tseq, BATCH))
        labels = await self.dialect.fetch(
            "SELECT l.seq, l.id, l.hash, l.created_at, l.trace_id, s.kid, s.sig FROM labels l"
            " LEFT JOIN entry_sigs s ON s.chain = 'labels' AND s.seq = l.seq"
            " WHERE l.seq > ? ORDER BY l.seq LIMIT ?", (lseq, BATCH))
        out = []
        for chain, rows, legacy, make in (("traces", traces, tlegacy, trace_entry),
                                          ("labels", labels, llegacy, label_entry)):
            for seq, id_, hash_, created, extra, kid, sig in rows:
                if seq > legacy and not (sig and self.keys.check(
                        kid, entry_message(chain, seq, hash_), sig)):
                    why = ("has no signature" if not sig else "has an invalid signature"
                           if self.keys.check(kid, entry_message(chain, seq, hash_), sig)
                           is False else f"is signed with unknown key {kid}")
                    self.blocked = (f"{chain} row {id_} (seq {seq}) {why}: written without the "
                                    "log's key (forged?); the log signs no head past it")
                    log.error("audit log: %s", self.blocked)
                    break
                out.append((chain, seq, make(seq, id_, hash_, created, extra)))
        # In the order written: traces and labels interleaved by time (a chain's own order kept).
        out.sort(key=lambda e: (e[2]["time"], e[0], e[1]))
        return out

    async def integrate(self) -> tuple[int, bytes]:
        """Append the signed rows not in the tree yet; the tree's size and root after."""
        async with self._lock:
            while True:
                size, root, tseq, lseq, tlegacy, llegacy = await self.state()
                pending = await self._pending(tseq, lseq, tlegacy, llegacy)
                if not pending:
                    return size, root
                try:
                    await self._append_leaves(size, [e for _, _, e in pending],
                                              max([tseq, *(s for c, s, _ in pending
                                                           if c == "traces")]),
                                              max([lseq, *(s for c, s, _ in pending
                                                           if c == "labels")]))
                except _Moved:
                    continue

    async def _append_leaves(self, size: int, entries: Sequence[Mapping[str, Any]],
                             tseq: int, lseq: int) -> None:
        positions = merkle.frontier(size)
        known = await self._nodes(set(positions))
        leaves, nodes = [], []
        for i, entry in enumerate(entries):
            data = leaf_data(entry)
            lh = merkle.leaf_hash(data)
            created = merkle.appended_nodes(size + i, lh,
                                            [known[p] for p in merkle.frontier(size + i)])
            for level, idx, h in created:
                known[(level, idx)] = h
                nodes.append((level, idx, h.hex()))
            leaves.append((size + i, entry["kind"], entry["id"], entry.get("seq"),
                           data.decode(), lh.hex()))
        new_size = size + len(entries)
        root = merkle.root([known[p] for p in merkle.frontier(new_size)])

        def statements(seq: int, _: str | None) -> list[tuple[str, Sequence[Sequence[Any]]]]:
            if seq != size:
                raise _Moved
            return [("INSERT INTO log_leaves (idx, kind, ref, seq, data, leaf_hash)"
                     " VALUES (?, ?, ?, ?, ?, ?)", leaves),
                    ("INSERT INTO log_nodes (level, idx, hash) VALUES (?, ?, ?)", nodes),
                    ("UPDATE log_state SET seq = ?, hash = ?, trace_seq = ?, label_seq = ?"
                     " WHERE id = 1", [(new_size, root.hex(), tseq, lseq)])]

        await self.dialect.append("log_state", statements)

    async def append_event(self, event: Mapping[str, Any]) -> None:
        """A leaf that is no row of a chain: an operator's event (a log reset)."""
        async with self._lock:
            size, _, tseq, lseq, _, _ = await self.state()
            entry = {"kind": "event", "id": f"ev_{time.time_ns()}", "seq": None,
                     "time": time.time(), **event}
            await self._append_leaves(size, [entry], tseq, lseq)

    async def _nodes(self, wanted: set[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        out: dict[tuple[int, int], bytes] = {}
        items = sorted(wanted)
        for start in range(0, len(items), 200):
            chunk = items[start:start + 200]
            rows = await self.dialect.fetch(
                "SELECT level, idx, hash FROM log_nodes WHERE "
                + " OR ".join("(level = ? AND idx = ?)" for _ in chunk),
                [v for pos in chunk for v in pos])
            out.update({(r[0], r[1]): bytes.fromhex(r[2]) for r in rows})
        if len(out) != len(wanted):
            raise ConfigError(f"audit log: {len(wanted) - len(out)} tree node(s) are missing "
                              "from log_nodes: the tree was damaged (run safeedit audit verify)")
        return out

    async def root_at(self, size: int) -> bytes:
        ranges = [(0, size)] if size else []
        nodes = await self._nodes(merkle.needed_nodes(ranges))
        return merkle.proof_from(ranges, nodes)[0] if size else merkle.EMPTY_ROOT

    # --- heads ----------------------------------------------------------------------------------

    async def latest_head(self) -> TreeHead | None:
        rows = await self.dialect.fetch(
            "SELECT tree_size, root_hash, timestamp, key_id, signature FROM log_heads"
            " ORDER BY n DESC LIMIT 1")
        if not rows:
            return None
        size, root, ts, kid, sig = rows[0]
        return TreeHead(size, bytes.fromhex(root), ts, kid, sig)

    async def sign_head(self, *, force: bool = False) -> TreeHead | None:
        """Integrate, then sign a head when the tree grew (or `force`, or a heartbeat is due);
        kept in the database and in the sink. None when nothing was signed."""
        size, root = await self.integrate()
        if self.blocked:
            return None
        last = self._last_signed or await self.latest_head()
        now = int(time.time() * 1000)
        if last is not None and last.tree_size == size and last.root_hash == root and not force \
                and now - last.timestamp < HEARTBEAT_S * 1000:
            return None
        unsigned = TreeHead(size, root, now, self.keys.kid, "")
        head = TreeHead(size, root, now, self.keys.kid, self.keys.sign(unsigned.message()))
        await self.dialect.append("log_state", lambda seq, _: [(
            "INSERT INTO log_heads (tree_size, root_hash, timestamp, key_id, signature)"
            " VALUES (?, ?, ?, ?, ?)", [(size, root.hex(), now, head.key_id, head.signature)])])
        self._last_signed = head
        if self.sink is not None:
            try:
                await self.sink.append(head.to_dict())
            except Exception:  # noqa: BLE001 - the head is in the database; verify reports the gap
                log.warning("writing the tree head to %s failed", self.sink.location,
                            exc_info=True)
        return head

    async def current_head(self) -> TreeHead:
        """The newest signed head, signing one first when rows are waiting (on request)."""
        head = await self.sign_head()
        head = head or self._last_signed or await self.latest_head()
        return head or await self.sign_head(force=True) or _raise_blocked(self.blocked)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="safeedit-tree-heads")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            try:
                await self.sign_head()
            except Exception:  # noqa: BLE001 - the next tick retries; requests go on
                log.warning("signing a tree head failed", exc_info=True)

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is None and not self._wrote:
            return  # a reader (`safeedit audit verify`) writes nothing
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            await self.sign_head()
        except Exception:  # noqa: BLE001 - closing goes on; verify reports what is unsigned
            log.warning("the last tree head could not be signed", exc_info=True)

    # --- proofs ---------------------------------------------------------------------------------

    async def inclusion(self, kind: str, ref: str) -> dict[str, Any]:
        rows = await self._leaf(kind, ref)
        head = await self.current_head()
        if not rows or rows[0][0] >= head.tree_size:
            rows = await self._leaf(kind, ref)
            if not rows:
                raise NotFound(f"No {kind} {ref} in the log.", code=f"{kind}_not_found")
            if rows[0][0] >= head.tree_size:
                raise NotFound(f"The {kind} {ref} is not in a signed tree head yet"
                               + (f": {self.blocked}" if self.blocked else "."),
                               code="not_yet_included")
        index, data, lh = rows[0]
        ranges = merkle.inclusion_ranges(index, head.tree_size)
        path = merkle.proof_from(ranges, await self._nodes(merkle.needed_nodes(ranges)))
        return {"leaf_index": index, "tree_size": head.tree_size, "leaf": orjson.loads(data),
                "leaf_hash": _b64(bytes.fromhex(lh)), "audit_path": [_b64(h) for h in path],
                "sth": head.to_dict()}

    async def _leaf(self, kind: str, ref: str) -> list[Any]:
        return await self.dialect.fetch("SELECT idx, data, leaf_hash FROM log_leaves"
                                        " WHERE kind = ? AND ref = ? LIMIT 1", (kind, ref))

    async def consistency(self, first: int, second: int) -> dict[str, Any]:
        head = await self.current_head()
        if not 1 <= first <= second:
            raise RequestError("Need 1 <= first <= second.", param="first")
        if second > head.tree_size:
            raise RequestError(f"second ({second}) is beyond the latest signed tree head "
                               f"(tree size {head.tree_size}).", param="second")
        ranges = merkle.consistency_ranges(first, second)
        proof = merkle.proof_from(ranges, await self._nodes(merkle.needed_nodes(ranges)))
        return {"first": first, "second": second, "proof": [_b64(h) for h in proof],
                "sth": head.to_dict()}

    # --- the start check --------------------------------------------------------------------------

    async def sink_heads(self) -> tuple[list[TreeHead], int, bool]:
        if self.sink is None:
            return [], 0, False
        exists = await self.sink.exists()
        heads, resets = heads_after_reset(await self.sink.read())
        return heads, resets, exists

    async def db_heads(self) -> list[TreeHead]:
        rows = await self.dialect.fetch("SELECT tree_size, root_hash, timestamp, key_id,"
                                        " signature FROM log_heads ORDER BY n")
        return [TreeHead(s, bytes.fromhex(r), t, k, g) for s, r, t, k, g in rows]

    async def problems(self) -> list[tuple[ProblemKind, int, str]]:
        """How the database disagrees with the heads signed for it (sink and its own)."""
        out: list[tuple[ProblemKind, int, str]] = []
        size, *_ = await self.state()
        heads, _, exists = await self.sink_heads()
        mine = await self.db_heads()
        where = self.sink.location if self.sink else "-"
        if self.sink is not None and not heads and (mine or size):
            out.append(("head_sink", size, f"the tree-head sink {where} is "
                        f"{'empty' if exists else 'missing'} while the log holds {size} "
                        "leaves: deleted or replaced"))
        if heads:
            last = heads[-1]
            if last.tree_size > size:
                out.append(("behind", size, f"the database holds {size} leaves but the tree "
                            f"head signed on {_when(last.timestamp)} has {last.tree_size}: the "
                            "log was wiped or cut"))
            elif await self.root_at(last.tree_size) != last.root_hash:
                out.append(("fork", last.tree_size, f"the tree at size {last.tree_size} does not"
                            f" match the head signed on {_when(last.timestamp)}: the log was "
                            "rewritten (forked)"))
            newer = [h for h in mine if h.tree_size > last.tree_size]
            if newer:
                out.append(("head_sink", last.tree_size, f"the tree-head sink {where} ends at "
                            f"size {last.tree_size}, the database signed {newer[-1].tree_size} "
                            "later: the sink was rolled back or truncated"))
        return out

    async def check_start(self, accept_reset: bool) -> None:
        found = await self.problems()
        if not found:
            return
        text = "; ".join(m for _, _, m in found)
        if not accept_reset:
            raise ConfigError(f"audit log: {text}. Refusing to start; investigate, or start "
                              "with --accept-log-reset to begin a new history (recorded in the "
                              "log)")
        heads, _, _ = await self.sink_heads()
        previous = heads[-1].to_dict() if heads else None
        log.warning("audit log reset accepted: %s", text)
        await self.append_event({"event": "log_reset", "problems": text, "previous": previous})
        if self.sink is not None:
            await self.sink.append({"reset": {"time": int(time.time() * 1000),
                                              "problems": text, "previous": previous}})
        await self.sign_head(force=True)

def _b64(raw: bytes) -> str:
    import base64

    return base64.b64encode(raw).decode()


def _when(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def _raise_blocked(reason: str | None) -> TreeHead:
    from guard.support.errors import Unavailable

    raise Unavailable(f"The audit log signs no tree head: {reason or 'unknown'}",
                      code="log_blocked")


__all__ = ["TransparencyLog", "Problem", "entry_message", "leaf_data"]
