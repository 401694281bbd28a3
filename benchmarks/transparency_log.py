"""What the transparency log costs (guard.audit.tlog): signing a row, a tree head and proofs at a
million leaves, on SQLite and PostgreSQL, through the stores' own code.

    python benchmarks/transparency_log.py [--leaves 1000000] [--repeat 200] [--no-postgres]

The tree is filled synthetically (leaf hashes of numbered entries and their perfect-subtree
nodes, bulk-inserted), which is what a million logged traces leave in `log_leaves`/`log_nodes`;
then the timed operations run as the proxy runs them:
- row signature: the Ed25519 signature made for each row inside its append transaction;
- append: one trace written through `SQLStore.write` with the log on, vs. the same store's
  write without it (the chain alone), side by side;
- tree head: `sign_head(force=True)` (integrate the rows waiting, read the state, sign, keep the
  head in the database and append it to the sink file with fsync);
- inclusion / consistency proof: `TransparencyLog.inclusion` / `.consistency`, each one query
  for O(log n) nodes.
Figures are medians in milliseconds on this machine; compare rows of one run only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from guard.audit import merkle  # noqa: E402
from guard.audit.logkeys import DEFAULT_KEYS_ENV, new_seed  # noqa: E402
from guard.audit.tlog import entry_message  # noqa: E402
from guard.plugins import build_store  # noqa: E402
from tests.audit_writer import sample_trace  # noqa: E402

PG_DSN = os.environ.get("SAFEEDIT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def synthetic_tree(n: int) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], bytes]:
    leaves, nodes = [], []
    frontier_hashes: list[bytes] = []
    known: dict[tuple[int, int], bytes] = {}
    for i in range(n):
        data = f'{{"id":"tr_{i}","kind":"trace","seq":{i + 1}}}'.encode()
        lh = merkle.leaf_hash(data)
        leaves.append((i, "trace", f"tr_{i}", i + 1, data.decode(), lh.hex()))
        for level, idx, h in merkle.appended_nodes(i, lh, frontier_hashes):
            known[(level, idx)] = h
            nodes.append((level, idx, h.hex()))
        frontier_hashes = [known[p] for p in merkle.frontier(i + 1)]
        if i % 4096 == 0:  # keep only what the frontier needs
            keep = set(merkle.frontier(i + 1))
            known = {p: h for p, h in known.items() if p in keep}
    return leaves, nodes, merkle.root(frontier_hashes)


async def fill(store: Any, leaves: list[Any], nodes: list[Any], root: bytes) -> None:
    dialect = store.dialect
    if store.kind == "postgres":
        pool = await dialect.pool.get()
        async with pool.acquire() as conn:
            await conn.copy_records_to_table("log_leaves", records=leaves,
                                             schema_name=store.schema)
            await conn.copy_records_to_table("log_nodes", records=nodes, schema_name=store.schema)
    else:
        conn = dialect._connect()
        with dialect._lock:
            conn.execute("BEGIN")
            conn.executemany("INSERT INTO log_leaves VALUES (?, ?, ?, ?, ?, ?)", leaves)
            conn.executemany("INSERT INTO log_nodes VALUES (?, ?, ?)", nodes)
            conn.execute("COMMIT")
    await dialect.fetch("UPDATE log_state SET seq = ?, hash = ? WHERE id = 1",
                        (len(leaves), root.hex()))


async def timed(repeat: int, call: Any) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - start)
    return median_ms(samples)


async def one_store(options: dict[str, Any], n: int, repeat: int,
                    tree: tuple[list[Any], list[Any], bytes]) -> dict[str, float]:
    store = build_store(options)
    # The same kind of store without the transparency log, in a database of its own.
    plain = build_store({**options, **({"path": options["path"] + ".plain"}
                                       if "path" in options else
                                       {"schema": options["schema"] + "_plain"}),
                         "anchor": False})
    plain.log = None
    await store.ready()
    out: dict[str, float] = {}
    traces = [sample_trace("bench", i) for i in range(repeat)]
    it = iter(traces)
    out["write, chain only"] = await timed(repeat // 2, lambda: plain.write(next(it)))
    out["write, chain + log signature"] = await timed(repeat // 2, lambda: store.write(next(it)))
    out["integrate + sign head (rows written above)"] = await timed(
        1, lambda: store.log.sign_head(force=True))
    await store.dialect.fetch("DELETE FROM log_leaves")
    await store.dialect.fetch("DELETE FROM log_nodes")
    start = time.perf_counter()
    await fill(store, *tree)
    print(f"  ({options['kind']}: {n} leaves and their nodes inserted in "
          f"{time.perf_counter() - start:.1f} s)", file=sys.stderr)
    # The traces written above would be integrated again: mark them integrated.
    await store.dialect.fetch("UPDATE log_state SET trace_seq = (SELECT max(seq) FROM traces)")
    out[f"tree head at {n} leaves"] = await timed(repeat, lambda: store.log.sign_head(force=True))
    ids = [f"tr_{i}" for i in range(0, n, max(1, n // repeat))]
    it2 = iter(ids * 2)
    out[f"inclusion proof at {n} leaves"] = await timed(
        len(ids), lambda: store.log.inclusion("trace", next(it2)))
    out[f"consistency proof at {n} leaves"] = await timed(
        repeat, lambda: store.log.consistency(n // 3, n))
    await plain.aclose()
    await store.aclose()
    return out


async def main(args: argparse.Namespace) -> None:
    os.environ.setdefault(DEFAULT_KEYS_ENV, "bench:" + new_seed())
    from guard.audit.logkeys import load_log_keys

    keys = load_log_keys({}, default_dir=None)
    msg = entry_message("traces", 123456, "ab" * 32)
    samples = []
    for _ in range(2000):
        start = time.perf_counter()
        keys.sign(msg)
        samples.append(time.perf_counter() - start)
    rows = {"row signature (Ed25519)": {"any": median_ms(samples)}}
    start = time.perf_counter()
    tree = synthetic_tree(args.leaves)
    print(f"  (synthetic tree of {args.leaves} leaves built in {time.perf_counter() - start:.1f}"
          " s)", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        results = {"sqlite": await one_store({"kind": "sqlite", "path": f"{tmp}/audit.db"},
                                             args.leaves, args.repeat, tree)}
        if not args.no_postgres:
            schema = f"bench_{uuid.uuid4().hex[:8]}"
            try:
                results["postgres"] = await one_store(
                    {"kind": "postgres", "dsn": PG_DSN, "schema": schema,
                     "anchor": {"kind": "file", "path": f"{tmp}/pg.anchors"}},
                    args.leaves, args.repeat, tree)
            finally:
                import asyncpg

                conn = await asyncpg.connect(PG_DSN)
                for name in (schema, f"{schema}_plain"):
                    await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
                await conn.close()
    for kind, figures in results.items():
        for name, ms in figures.items():
            rows.setdefault(name, {})[kind] = ms
    kinds = ["sqlite", *(["postgres"] if not args.no_postgres else [])]
    print("| operation | " + " | ".join(f"{k} ms" for k in kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for name, by_kind in rows.items():
        cells = [f"{by_kind[k]:.3f}" if k in by_kind else
                 (f"{by_kind['any']:.3f}" if "any" in by_kind else "-") for k in kinds]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leaves", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--no-postgres", action="store_true")
    asyncio.run(main(parser.parse_args()))
