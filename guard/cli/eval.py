"""`safeedit eval`: run a prompt set through a policy's prescreen and report pass / edit / refuse.

    safeedit eval --policy policies/default.yaml --prompts prompts.csv [--out results.jsonl]
                  [--config config.yaml] [--limit N]
    safeedit eval --policy default --labels store|labels.csv [--config config.yaml]

The CSV needs a `prompt` column; an I2P-style `categories` column adds rates per labelled
category. Without --config the builtin judge scores the prompts; with it, the config's judge.
With a `cascade` judge the summary counts the prompts each stage decided.

With --labels, the labelled traces are the ground truth: `store` (the labels kept in the audit
store of --config) or a labels CSV (guard.offline.labelled: trace_id, slot, round, verdict,
category, and a `prompt` column, or lookups in the audit store). Each labelled item is judged
again (an image with its retained copy; images not retained are skipped) and the summary adds
the precision and recall per category against the labels.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import orjson

from guard.core.policy import Policy, load_policy
from guard.offline.evaluate import EvalResult, evaluate, read_prompts
from guard.plugins import Judge, build_judge
from guard.support.errors import ConfigError
from guard.support.lifecycle import Startable


def register(sub: Any) -> None:
    p = sub.add_parser("eval", help="rates of pass / edit / refuse of a policy on a prompt set",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", required=True,
                   help="policy file, or the id of a shipped policy (default, strict, ...)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", type=Path, help="CSV with a `prompt` column")
    source.add_argument("--labels", help="labelled traces as ground truth: `store` or a labels "
                                         "CSV; adds precision and recall per category")
    p.add_argument("--out", type=Path, help="write one JSON line per prompt here")
    p.add_argument("--config", type=Path,
                   help="operators' config whose judge (default: the builtin judge) and, with "
                        "--labels, whose audit store to use")
    p.add_argument("--limit", type=int, help="only the first N prompts")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per judge call (32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run)


def _policy(spec: str, config: Path | None) -> Policy:
    """A file, or a shipped or configured id: the resolver of every `safeedit policy` command."""
    from guard.cli.policy import policy_file

    return load_policy(policy_file(spec, config))


def _judge(config: Path | None) -> Judge:
    if config is None:
        from guard.judges.builtin import BuiltinJudge

        return BuiltinJudge(nudenet=False)  # prompts only: no image detector to load
    from guard.core.config import load_config

    return build_judge(load_config(config).judge)


def run(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 0:
        raise ConfigError("--limit must be 0 or more")
    if args.batch_size < 1:
        raise ConfigError("--batch-size must be 1 or more")
    policy = _policy(args.policy, args.config)
    skipped: dict[str, int] = {}
    if args.labels is not None:
        rows, skipped = asyncio.run(_labelled(policy, args))
        rows = rows[: args.limit] if args.limit is not None else rows
    else:
        rows = read_prompts(args.prompts, args.limit)
    judge = _judge(args.config)
    summary = asyncio.run(_run(judge, policy, rows, args))
    print(summary.format())
    for why, n in sorted(skipped.items()):
        print(f"({n} labelled item(s) skipped: {why})")
    if args.out:
        print(f"\nper-prompt results: {args.out}")
    return 0


async def _labelled(policy: Policy, args: argparse.Namespace) -> tuple[list[Any], dict[str, int]]:
    """Rows from the labelled items of --labels, and the items skipped by reason."""
    from guard.audit import ImageKeepingStore
    from guard.core.config import load_config
    from guard.offline.evaluate import labelled_rows
    from guard.offline.labelled import read_labels_csv, resolve, store_labels
    from guard.plugins import build_store

    from_store = args.labels == "store"
    labels: list[Any] = [] if from_store else read_labels_csv(args.labels)
    needs_store = from_store or any(not (label.prompt and label.flagged is not None)
                                    and not label.scores for label in labels)
    store = build_store(load_config(args.config).audit) if needs_store else None
    try:
        if from_store:
            labels = await store_labels(store)
        resolved = await resolve(labels, policy, store, need_scores=False)
        images = store.images if isinstance(store, ImageKeepingStore) else None
        rows, skipped = await labelled_rows(resolved.items, list(policy.categories), images)
    finally:
        if store is not None:
            await store.aclose()
    return rows, dict(skipped + resolved.skipped)


async def _run(judge: Judge, policy: Policy, rows: list[Any], args: argparse.Namespace) -> Any:
    from tqdm import tqdm

    out = args.out.open("wb") if args.out else None
    bar = tqdm(total=len(rows), unit="prompt", file=sys.stderr, disable=args.no_progress,
               dynamic_ncols=True)

    def on_result(result: EvalResult) -> None:
        if out is not None:
            out.write(orjson.dumps(result.to_dict()) + b"\n")
        bar.update(1)

    try:
        if isinstance(judge, Startable):
            await judge.start()
        source = args.prompts.name if args.prompts else f"labels ({args.labels})"
        return await evaluate(judge, policy, rows, batch_size=args.batch_size, source=source,
                              ground_truth=args.labels is not None, on_result=on_result)
    finally:
        bar.close()
        if out is not None:
            out.close()
        await judge.aclose()
