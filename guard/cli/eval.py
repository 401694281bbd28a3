"""`safeedit eval`: run a prompt set through a policy's prescreen and report pass / edit / refuse.

    safeedit eval --policy policies/default.yaml --prompts prompts.csv [--out results.jsonl]
                  [--config config.yaml] [--limit N]

The CSV needs a `prompt` column; an I2P-style `categories` column adds rates per labelled
category. Without --config the builtin judge scores the prompts; with it, the config's judge.
With a `cascade` judge the summary counts the prompts each stage decided.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import orjson

from guard.errors import ConfigError
from guard.evaluate import EvalResult, evaluate, read_prompts
from guard.judges import Judge, build_judge
from guard.lifecycle import Startable
from guard.policy import POLICIES_DIR, Policy, load_policy


def register(sub: Any) -> None:
    p = sub.add_parser("eval", help="rates of pass / edit / refuse of a policy on a prompt set",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", required=True,
                   help="policy file, or the id of a shipped policy (default, strict, ...)")
    p.add_argument("--prompts", required=True, type=Path, help="CSV with a `prompt` column")
    p.add_argument("--out", type=Path, help="write one JSON line per prompt here")
    p.add_argument("--config", type=Path,
                   help="operators' config whose judge to use (default: the builtin judge)")
    p.add_argument("--limit", type=int, help="only the first N prompts")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per judge call (32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run)


def _policy(spec: str) -> Policy:
    path = Path(spec)
    if not path.exists() and (POLICIES_DIR / f"{spec}.yaml").exists():
        path = POLICIES_DIR / f"{spec}.yaml"
    return load_policy(path)


def _judge(config: Path | None) -> Judge:
    if config is None:
        from guard.judges.builtin import BuiltinJudge

        return BuiltinJudge(nudenet=False)  # prompts only: no image detector to load
    from guard.config import load_config

    return build_judge(load_config(config).judge)


def run(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 0:
        raise ConfigError("--limit must be 0 or more")
    if args.batch_size < 1:
        raise ConfigError("--batch-size must be 1 or more")
    policy = _policy(args.policy)
    rows = read_prompts(args.prompts, args.limit)
    judge = _judge(args.config)
    summary = asyncio.run(_run(judge, policy, rows, args))
    print(summary.format())
    if args.out:
        print(f"\nper-prompt results: {args.out}")
    return 0


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
        return await evaluate(judge, policy, rows, batch_size=args.batch_size,
                              source=args.prompts.name, on_result=on_result)
    finally:
        bar.close()
        if out is not None:
            out.close()
        await judge.aclose()
