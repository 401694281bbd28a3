"""What the audit log's Merkle tree costs in Python, without a database (guard.audit.merkle).

Builds the perfect-node map of a tree in memory (as `MemoryTree` does, one `appended_nodes` per
leaf), then times, each on random leaves and sizes up to the full tree:
  append        appended_nodes for one leaf (frontier rows in hand), from the build
  tree head     root() over the frontier's rows of the full tree
  inclusion     inclusion_ranges + needed_nodes + proof_from over a dict of the needed rows
  verify incl.  verify_inclusion of that proof
  consistency   consistency_ranges + needed_nodes + proof_from, first size random
  verify cons.  verify_consistency of that proof
`rows` is the most rows one operation read (what a store fetches in its one query). A store adds
its query's round trip to the three middle rows. The machine is shared: compare within one run.

Run: .venv/bin/python benchmarks/merkle.py [--leaves 1000000] [--repeat 2000]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from guard.audit.merkle import (  # noqa: E402
    MemoryTree,
    consistency_ranges,
    inclusion_ranges,
    needed_nodes,
    proof_from,
    verify_consistency,
    verify_inclusion,
)


def timed(repeat: int, one: Callable[[], int]) -> tuple[float, int]:
    """Median seconds of `one()` over `repeat` calls, and the most rows any call read."""
    times, rows = [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        rows = max(rows, one())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--leaves", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=2000)
    args = parser.parse_args()
    n, rng = args.leaves, random.Random(19)

    tree = MemoryTree()
    t0 = time.perf_counter()
    for i in range(n):
        tree.append(i.to_bytes(8, "big") * 32)  # 256-byte leaves, about a small trace's hash input
    build = time.perf_counter() - t0
    nodes = tree.nodes

    root_n = tree.root(n)
    leaves = [rng.randrange(n) for _ in range(args.repeat)]
    firsts = [(m, tree.root(m)) for m in (rng.randrange(1, n) for _ in range(args.repeat))]
    inclusions: list[tuple[int, list[bytes]]] = []
    consistencies: list[tuple[int, bytes, list[bytes]]] = []

    def head() -> int:
        tree.root(n)
        return n.bit_count()

    def inclusion() -> int:
        i = leaves[len(inclusions)]
        ranges = inclusion_ranges(i, n)
        need = needed_nodes(ranges)
        inclusions.append((i, proof_from(ranges, {k: nodes[k] for k in need})))
        return len(need)

    def check_inclusion() -> int:
        i, proof = inclusions.pop()
        verify_inclusion(nodes[0, i], i, n, proof, root_n)
        return 0

    def consistency() -> int:
        m, root_m = firsts[len(consistencies)]
        ranges = consistency_ranges(m, n)
        need = needed_nodes(ranges)
        consistencies.append((m, root_m, proof_from(ranges, {k: nodes[k] for k in need})))
        return len(need)

    def check_consistency() -> int:
        m, root_m, proof = consistencies.pop()
        verify_consistency(m, n, proof, root_m, root_n)
        return 0

    results = {"tree head": timed(args.repeat, head),
               "inclusion": timed(args.repeat, inclusion),
               "verify incl.": timed(args.repeat, check_inclusion),
               "consistency": timed(args.repeat, consistency),
               "verify cons.": timed(args.repeat, check_consistency)}

    print(f"\n{'operation':<14} {'median us':>10} {'rows':>6}")
    print(f"{'append':<14} {build / n * 1e6:>10.1f} {'':>6}")
    for name, (median, rows) in results.items():
        print(f"{name:<14} {median * 1e6:>10.1f} {rows or '':>6}")
    print(f"\n{n} leaves ({len(nodes)} perfect-node rows) built in {build:.1f} s; medians over "
          f"{args.repeat} runs; {sys.version.split()[0]}, {os.cpu_count()} CPUs.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
