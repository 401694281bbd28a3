"""`safeedit dataset export` and `safeedit judge finetune`: training data from the audit log, and a
LoRA fine-tune of the `vlm` judge on it.

    safeedit dataset export --out DIR [--config C] [--since 30d] [--until T] [--tenant T]
                            [--policy ID[@VERSION]] [--labelled-only]
    safeedit judge finetune --dataset DIR --model M [--adapter-out A] [--profile ipr|safeeditor]

The export reads the audit store of the operators' config (`--config`, else the embedded
default), writes the layout described in guard.offline.dataset (JSON Lines, an image folder, a dataset
card), and says how many images it refused and why (not retained by the policy, or no longer
kept). The fine-tune is described in guard.offline.finetune and docs/finetune.md.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import orjson

from guard.support.timewindow import time_option


def register(sub: Any) -> None:
    dataset = sub.add_parser("dataset", help="export judged items as a training dataset",
                             description="Judged items from the audit log as a training "
                                         "dataset, for `safeedit judge finetune` "
                                         "(docs/finetune.md).")
    cmds = dataset.add_subparsers(dest="dataset_command", required=True, metavar="ACTION")
    p = cmds.add_parser("export", help="one record per judged item, with labels and the "
                                       "images the policy retained (Hugging Face layout)",
                        description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="folder to write (missing or empty)")
    p.add_argument("--config", help="operators' config file (YAML)")
    p.add_argument("--since", type=time_option("since"),
                   help="traces from this time: ISO 8601, Unix seconds, or an age (7d, 2w)")
    p.add_argument("--until", type=time_option("until"), help="traces before this time")
    p.add_argument("--tenant", help="only this tenant's traces")
    p.add_argument("--policy", help="only traces under this policy: ID or ID@VERSION")
    p.add_argument("--labelled-only", action="store_true",
                   help="only items an auditor labelled")
    p.add_argument("--key-env", default=None, metavar="NAME",
                   help="environment variable holding the pseudonym key (default "
                        "SAFEEDIT_DATASET_KEY; unset: a random key for this export)")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from guard.core.config import load_config
    from guard.offline.dataset import KEY_ENV, ExportFilter, Pseudonyms, export_dataset
    from guard.plugins import build_image_store, build_store, resolve_image_store

    policy_id, version = ExportFilter.policy_spec(args.policy)
    flt = ExportFilter(since=args.since, until=args.until, tenant=args.tenant,
                       policy_id=policy_id, policy_version=version,
                       labelled_only=args.labelled_only)
    config = load_config(args.config)

    async def go() -> Any:
        shared = build_image_store(resolve_image_store(config.image_store, config.audit))
        store = build_store(config.audit, shared)
        try:
            return await export_dataset(store, args.out, flt,
                                        Pseudonyms.from_env(args.key_env or KEY_ENV))
        finally:
            await store.aclose()
            await shared.aclose()

    report = asyncio.run(go())
    print("\n".join(report.lines()))
    return 0


def register_finetune(actions: Any) -> None:
    """`safeedit judge finetune` (registered by guard.cli.judge)."""
    from guard.offline.finetune import FinetuneOptions

    d = FinetuneOptions.model_fields
    p = actions.add_parser(
        "finetune", help="LoRA fine-tune of the vlm judge on an exported dataset",
        description="LoRA fine-tune of the `vlm` judge's model on a dataset written by "
                    "`safeedit dataset export`; see docs/finetune.md.")
    p.add_argument("--dataset", required=True, type=Path, help="folder of the export")
    p.add_argument("--model", required=True, help="base model folder or hub id")
    p.add_argument("--adapter-out", type=Path, default=Path("adapter"),
                   help="where to save the adapter (default ./adapter)")
    p.add_argument("--profile", choices=("safeeditor", "ipr"), default="safeeditor",
                   help="the prompt and answer format the judge will use")
    p.add_argument("--config", type=Path, help="operators' config (for its policy_paths)")
    p.add_argument("--policy", help="policy file or id to render every record with (default: "
                                    "each record's own policy, by id)")
    p.add_argument("--unlabelled", choices=("decision", "skip"),
                   default=d["unlabelled"].default,
                   help="items nobody labelled: train on the recorded decision, or skip them")
    for name, kind in (("epochs", int), ("max_steps", int), ("lr", float),
                       ("batch_size", int), ("grad_accum", int), ("rank", int),
                       ("alpha", int), ("dropout", float), ("holdout", float), ("seed", int),
                       ("max_image_side", int), ("device", str), ("dtype", str),
                       ("target_modules", str)):
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=d[name].default,
                       help=f"{d[name].description} (default {d[name].default})")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass (a 7B on one GPU)")
    p.add_argument("--allow-one-class", action="store_true",
                   help="train even when every example is safe, or every one unsafe")
    p.add_argument("--no-eval", action="store_true",
                   help="write the adapter without judging it on a held-back split (>= 10 "
                        "items of each class)")
    p.add_argument("--max-recall-drop", type=float, default=d["max_recall_drop"].default,
                   help="write the adapter only when unsafe recall on the held-back split falls "
                        "by no more than this (absolute; default %(default)s); else exit 1")
    p.add_argument("--eval-only", type=Path, metavar="ADAPTER",
                   help="judge ADAPTER on the held-back split against the base model; train "
                        "nothing")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run_finetune)


def run_finetune(args: argparse.Namespace) -> int:
    from guard.cli.judge import pick_policy
    from guard.core.policy import PolicySet, policy_sources
    from guard.offline.finetune import FinetuneOptions, finetune

    paths: list[str] = []
    if args.config is not None:
        from guard.core.config import load_config

        paths = list(load_config(args.config).policy_paths)
    if args.policy is not None:
        override = pick_policy(args.policy, args.policy, paths)
        lookup = lambda _id: override  # noqa: E731
    else:
        lookup = PolicySet.load(policy_sources(paths)).__getitem__
    fields = set(FinetuneOptions.model_fields)
    options = FinetuneOptions.build(**{k: v for k, v in vars(args).items() if k in fields})
    report = finetune(options, lookup)
    if args.json:
        print(orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2).decode())
    else:
        print("\n".join(report.lines()))
    # an adapter that failed its held-back evaluation is not written: a failure to act on
    return 0 if report.written or options.eval_only is not None else 1
