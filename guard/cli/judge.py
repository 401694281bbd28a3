"""`safeedit judge`: try a judge on one image and prompt; prints the verdict as JSON with timings.

    safeedit judge --image out.png --prompt "a knight fighting a dragon" [--config config.yaml]
    safeedit judge --image out.png --prompt "..." --model /models/Qwen2.5-VL-7B-Instruct \\
                   --adapter /models/ipr-7b --profile ipr --set max_new_tokens=64 --repeat 3

The judge is the config's `judge:` section (the builtin judge without --config), changed by
--kind/--model/--adapter/--profile/--set; --model alone means a `vlm` judge. The policy is a file
or the id of a shipped policy (default: the config's `policy`). Without --image the prompt is
judged alone, as the proxy's prescreen does. --repeat N judges N times and reports the warm
latency too, since the first call pays one-time costs (CUDA kernels, compilation). A composite
judge (`ensemble`, `cascade`) works the same; a cascade's deciding stage is printed as `stage`,
an ensemble's members under `details.members`.

`safeedit judge coverage [--config F] [--policy P]` prints what the judge assesses per policy
category, on the prompt and on the image (guard.judges.coverage), without a call.

`safeedit judge finetune --dataset DIR --model M` trains a LoRA adapter for the `vlm` judge on a
dataset from `safeedit dataset export` (guard.offline.finetune, docs/finetune.md).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import yaml

from guard.core.policy import Policy, PolicySet, load_policy, policy_sources
from guard.core.types import GeneratedImage, JudgeInput
from guard.plugins import build_judge
from guard.support.errors import ConfigError
from guard.support.lifecycle import Startable


def register(sub: Any) -> None:
    p = sub.add_parser("judge", help="judge one image + prompt and print the verdict as JSON",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", type=Path, help="image file (PNG, JPEG, WebP); none: prompt only")
    p.add_argument("--prompt", help="the prompt the image was made from (required)")
    p.add_argument("--original-prompt", help="the user's prompt, when --prompt is a refinement")
    p.add_argument("--config", type=Path, help="operators' config whose `judge:` to use")
    p.add_argument("--policy", help="policy file or shipped policy id (default: config's)")
    p.add_argument("--kind", help="judge kind (builtin, vlm, remote, ensemble, cascade, ...)")
    p.add_argument("--model", help="model folder or hub id (implies --kind vlm without config)")
    p.add_argument("--adapter", help="PEFT adapter over --model")
    p.add_argument("--profile", help="safeeditor | ipr | llavaguard | shieldgemma2")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other judge option; VALUE is read as YAML (repeatable)")
    p.add_argument("--repeat", type=int, default=1, help="judge N times, report warm latency")
    p.set_defaults(func=run)
    from guard.cli.dataset import register_finetune

    actions = p.add_subparsers(dest="judge_command", metavar="ACTION")
    register_finetune(actions)
    c = actions.add_parser(
        "coverage", help="what the judge assesses per policy category, on text and on images",
        description="Print the coverage table the proxy logs at start: per policy category, "
                    "whether each judge (each member of an ensemble or cascade) assesses it on "
                    "the prompt and on the image, and what the policy's `unassessed` makes of "
                    "a category no judge assesses on images (docs/judges.md). Makes no call.")
    c.add_argument("--config", type=Path, help="operators' config whose `judge:` to use")
    c.add_argument("--policy", help="policy file or shipped policy id (default: config's)")
    c.add_argument("--kind", help="judge kind (default: the config's, else builtin)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other judge option; VALUE is read as YAML (repeatable)")
    c.set_defaults(func=coverage)


def judge_section(args: argparse.Namespace) -> tuple[dict[str, Any], str, list[str]]:
    """The judge options, the default policy id and the extra policy paths."""
    section: dict[str, Any] = {"kind": "builtin"}
    policy_id, policy_paths = "default", []
    if args.config is not None:
        from guard.core.config import load_config

        config = load_config(args.config)
        section = dict(config.judge)
        policy_id, policy_paths = config.policy, list(config.policy_paths)
    elif args.model:
        section = {"kind": "vlm"}
    for flag in ("kind", "model", "adapter", "profile"):
        value = getattr(args, flag)
        if value is not None:
            section[flag] = value
    for pair in args.set:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        section[key.strip()] = yaml.safe_load(value)
    return section, policy_id, policy_paths


def pick_policy(spec: str | None, default_id: str, paths: list[str]) -> Policy:
    if spec is not None and Path(spec).is_file():
        return load_policy(spec)
    return PolicySet.load(policy_sources(paths))[spec or default_id]


def read_image(path: Path) -> GeneratedImage:
    from PIL import Image, UnidentifiedImageError

    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            fmt = (image.format or "png").lower()
    except OSError as exc:
        reason = "not an image" if isinstance(exc, UnidentifiedImageError) else exc.strerror
        raise ConfigError(f"cannot read image {path}: {reason}") from exc
    return GeneratedImage(data=data, media_type=f"image/{'jpeg' if fmt == 'jpg' else fmt}")


async def judge_once(args: argparse.Namespace) -> dict[str, Any]:
    if args.prompt is None:
        raise ConfigError("safeedit judge needs --prompt (or the action `finetune`)")
    if args.repeat < 1:
        raise ConfigError("--repeat must be 1 or more")
    section, policy_id, policy_paths = judge_section(args)
    policy = pick_policy(args.policy, policy_id, policy_paths)
    image = read_image(args.image) if args.image is not None else None
    item = JudgeInput(prompt=args.prompt, original_prompt=args.original_prompt or args.prompt,
                      image=image)
    t0 = time.perf_counter()
    judge = build_judge(section)
    try:
        if isinstance(judge, Startable):
            await judge.start()
        load_ms = (time.perf_counter() - t0) * 1000.0
        runs = []
        for _ in range(args.repeat):
            t1 = time.perf_counter()
            [verdict] = await judge.judge([item], policy)
            runs.append((time.perf_counter() - t1) * 1000.0)
    finally:
        await judge.aclose()
    decision = policy.decide(verdict.scores)
    timings: dict[str, Any] = {"load": round(load_ms, 1), "judge": round(runs[0], 1)}
    if len(runs) > 1:
        timings["judge_warm_median"] = round(statistics.median(runs[1:]), 1)
        timings["runs"] = [round(r, 1) for r in runs]
    stage = verdict.details.get("stage")  # a cascade's deciding stage
    return {
        "judge": verdict.judge_id, **({"stage": stage} if stage is not None else {}),
        "policy": policy.ref, "action": decision.action, "flagged": list(decision.flagged),
        "scores": {c: round(s, 6) for c, s in verdict.scores.items()},
        "thought": verdict.thought, "refined_prompt": verdict.refined_prompt, "raw": verdict.raw,
        "assessed_on": verdict.assessed_on, "details": dict(verdict.details),
        "timings_ms": timings,
    }


def coverage(args: argparse.Namespace) -> int:
    from guard.judges.coverage import coverage_table

    section, policy_id, policy_paths = judge_section(args)
    policy = pick_policy(args.policy, policy_id, policy_paths)
    judge = build_judge(section)
    try:
        sys.stdout.write(coverage_table(judge, policy))
    finally:
        asyncio.run(judge.aclose())
    return 0


def run(args: argparse.Namespace) -> int:
    result = asyncio.run(judge_once(args))
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0
