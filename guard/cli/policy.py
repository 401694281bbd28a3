"""`safeedit policy`: check, explain, compare and replay policy files before they go live.

    safeedit policy validate [POLICY...] [--against DIR]
                                                every problem at once, file:line:column; exit 1
    safeedit policy explain POLICY              what the policy does, `extends` resolved
    safeedit policy diff OLD NEW                the effective differences, in words
    safeedit policy replay --candidate POLICY   re-decide stored traces under a candidate
    safeedit policy calibrate --policy POLICY --labels store|CSV --target-precision P --out DIR
                                                thresholds from labelled items, with a report
    safeedit policy test CASES.yaml [--junit FILE]
                                                a regression suite of prompts and images
    safeedit policy schema [--check]            regenerate policies/schema.json

POLICY is a policy file or the id of a shipped or configured policy (`default`, `strict`, or one
under ./policies/ or the `policy_paths` of --config), as `safeedit eval --policy` takes it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from guard.core.policy import POLICIES_DIR
from guard.core.policy.loader import Loaded, Problem, load, load_file, read_files
from guard.support.timewindow import time_option


def register(sub: Any) -> None:
    p = sub.add_parser("policy", help="check, explain, compare and replay policy files",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cmds = p.add_subparsers(dest="policy_command", required=True, metavar="SUBCOMMAND")

    v = cmds.add_parser("validate", help="check policy files; exit status 1 on any error")
    v.add_argument("files", nargs="*", metavar="POLICY",
                   help="policy files or ids (default: the shipped policies and ./policies/)")
    v.add_argument("--json", action="store_true", help="problems as JSON, one list")
    v.add_argument("--against", type=Path, metavar="DIR",
                   help="the live policies: refuse a file whose content changed under an id "
                        "and version this folder already holds (raise `version` instead)")
    _config_option(v)
    v.set_defaults(func=validate)

    e = cmds.add_parser("explain", help="what a policy does, in plain language")
    e.add_argument("policy", metavar="POLICY", help="a policy file or id")
    _config_option(e)
    e.set_defaults(func=explain)

    d = cmds.add_parser("diff", help="effective differences between two policies "
                                     "(exit 0: same, 1: different, 2: invalid file)")
    d.add_argument("old", metavar="OLD", help="a policy file or id")
    d.add_argument("new", metavar="NEW", help="a policy file or id")
    _config_option(d)
    d.set_defaults(func=diff)

    r = cmds.add_parser("replay", help="which stored requests a candidate policy would decide "
                                       "differently, from their recorded scores")
    r.add_argument("--candidate", required=True, metavar="POLICY",
                   help="the candidate policy (a file or id)")
    r.add_argument("--since", type=time_option("since"),
                   help="from this time: 2025-06-01, 2025-06-01T12:00, 24h, 7d, 2w or Unix "
                        "seconds (default: all)")
    r.add_argument("--until", type=time_option("until"), help="up to this time (same forms)")
    which = r.add_mutually_exclusive_group()
    which.add_argument("--policy", help="replay traces recorded under this policy id "
                                        "(default: the candidate's id)")
    which.add_argument("--any-policy", action="store_true",
                       help="replay traces whatever policy they ran under")
    r.add_argument("--tenant", help="only this tenant's traces")
    r.add_argument("--config", help="operators' config naming the audit store and policy_paths "
                                    "(default: embedded defaults, var/audit.db, which must "
                                    "exist)")
    r.add_argument("--limit", type=int, default=10_000, help="most traces read (10000)")
    r.add_argument("--csv", type=Path,
                   help="CSV of every replayed trace (default: replay-<id>-v<version>.csv)")
    r.add_argument("--all", action="store_true", help="list unchanged traces too")
    r.set_defaults(func=replay)

    c = cmds.add_parser("calibrate", help="thresholds that meet a target precision or "
                                          "false-positive rate, from labelled items")
    c.add_argument("--policy", required=True, metavar="POLICY",
                   help="the policy to calibrate (a file or id)")
    c.add_argument("--labels", required=True,
                   help="`store` (the labels kept beside the audit store of --config) or a "
                        "labels CSV: trace_id, slot, round, verdict, category, and optionally "
                        "flagged, prompt and score_<category> columns (self-contained)")
    goal = c.add_mutually_exclusive_group(required=True)
    goal.add_argument("--target-precision", type=_share, metavar="P",
                      help="of the items flagged, at least this share unsafe (0-1)")
    goal.add_argument("--max-false-positive-rate", type=_share, metavar="R",
                      help="of the safe items, at most this share flagged (0-1)")
    c.add_argument("--out", required=True, type=Path,
                   help="folder for proposed.yaml and report.html")
    c.add_argument("--config", help="operators' config naming the audit store (labels looked "
                                    "up by trace id; stored requests replayed)")
    c.add_argument("--tenant", help="only this tenant's labels and traces")
    c.add_argument("--since", type=time_option("since"), help="labels and traces from this "
                                                              "time (2025-06-01, 7d, ...)")
    c.add_argument("--min-labels", type=int, default=None,
                   help="unsafe and safe labelled items needed per category (default 10)")
    c.set_defaults(func=calibrate)

    t = cmds.add_parser("test", help="a regression suite: prompts (and images) with the action "
                                     "the policy must take; exit 1 if any case fails")
    t.add_argument("cases", type=Path, metavar="CASES.yaml",
                   help="the cases (see guard.offline.cases; examples in policies/tests/)")
    t.add_argument("--policy", metavar="POLICY",
                   help="the policy (default: the cases file's `policy`, else the config's)")
    t.add_argument("--config", help="operators' config whose judge decides (default: the "
                                    "builtin judge) and whose policy_paths name policies")
    t.add_argument("--junit", type=Path, metavar="FILE", help="write JUnit XML here, for CI")
    t.set_defaults(func=test)

    s = cmds.add_parser("schema", help="write the policy JSON Schema (policies/schema.json)")
    s.add_argument("--check", action="store_true",
                   help="only check the file is up to date (exit 1 if not)")
    s.add_argument("--output", type=Path, help="where to write (default: policies/schema.json)")
    s.set_defaults(func=schema)


def _config_option(parser: Any) -> None:
    parser.add_argument("--config", help="operators' config whose policy_paths name policies "
                                         "(ids are also looked up there)")


# --- naming a policy ----------------------------------------------------------------------------

def _dirs(config: str | Path | None) -> list[Path]:
    """Where ids are looked up after the shipped policies: ./policies/, then the config's
    `policy_paths` (as the proxy reads them)."""
    from guard.core.config import load_config
    from guard.core.policy import local_policies_dir

    extra = [Path(p) for p in load_config(config).policy_paths] if config else []
    return [*filter(None, [local_policies_dir()]), *extra]


def policy_file(spec: str | Path, config: str | Path | None = None) -> Path:
    """The one resolver of every policy command (and `eval --policy`): a file, or the id of a
    shipped or configured policy."""
    from guard.core.policy.loader import find_policy

    return find_policy(spec, _dirs(config))


def _policy_file(spec: str | Path, args: argparse.Namespace) -> Path:
    return policy_file(spec, getattr(args, "config", None))


def _load(spec: str | Path, args: argparse.Namespace) -> tuple[Loaded, Path] | None:
    path = _policy_file(spec, args)
    loaded = load_file(path)
    for problem in loaded.problems:
        print(problem, file=sys.stderr)
    return None if loaded.errors else (loaded, path)


# --- validate / explain / diff ------------------------------------------------------------------

def validate(args: argparse.Namespace) -> int:
    from guard.core.policy.loader import policy_files

    dirs = [POLICIES_DIR, *_dirs(args.config)]
    files = [_policy_file(f, args) for f in args.files] or policy_files(dirs)
    if not files:
        print(f"no policy files given or found under {', '.join(map(str, dirs))}",
              file=sys.stderr)
        return 1
    problems: list[Problem] = []
    ok: list[str] = []
    for file in files:
        loaded = load_file(file)
        stale = _changed_in_place(file, args.against) if args.against is not None else []
        problems += [p for p in [*loaded.problems, *stale] if p not in problems]
        for policy in loaded.policies.values() if not stale else ():
            ok.append(f"{file}: ok ({policy.id} v{policy.version}, sha256 {policy.sha256[:12]})")
    problems.sort(key=lambda p: (p.path, p.line, p.column))
    errors = [p for p in problems if p.severity == "error"]
    if args.json:
        print(json.dumps([p.to_dict() for p in problems], indent=2))
    else:
        for problem in problems:
            print(problem)
        for line in ok:
            print(line)
        bad = len({p.path for p in errors})
        if errors:
            print(f"{len(errors)} error(s) in {bad} file(s)", file=sys.stderr)
    return 1 if errors else 0


def _changed_in_place(file: Path, against: Path) -> list[Problem]:
    """A problem when `file` changed its own content under an id and version that the live
    folder `against` already holds: the proxy keeps serving the old one until it is raised."""
    from guard.core.policy.loader import changed_in_place, own_sources, read_files

    if not against.is_dir():
        return [Problem(str(against), 1, 1, "", "--against takes the folder of live policies")]
    own = next(iter(own_sources(read_files([file])).values()), None)
    if own is None:
        return []  # it does not parse: load_file reports that
    live = own_sources(read_files([against])).get(own.id)
    if live is None or live.path.resolve() == own.path.resolve() \
            or not changed_in_place(live, own):
        return []
    return [own.problem(("version",), f"policy {own.id} version {own.raw.get('version')} is "
                        f"already live in {live.path} with other content; raise `version` "
                        "(a proxy keeps serving the live content of an unchanged version)")]


def explain(args: argparse.Namespace) -> int:
    from guard.offline.explain import explain as explain_policy

    found = _load(args.policy, args)
    if found is None:
        return 1
    (pid, policy), = found[0].policies.items()
    print(explain_policy(policy, found[0].chains[pid]), end="")
    return 0


def diff(args: argparse.Namespace) -> int:
    from guard.offline.explain import diff as diff_policies

    old, new = _load(args.old, args), _load(args.new, args)
    if old is None or new is None:
        return 2
    a, b = next(iter(old[0].policies.values())), next(iter(new[0].policies.values()))
    print(f"{a.id} v{a.version} ({old[1]}) -> {b.id} v{b.version} ({new[1]})")
    changes = diff_policies(a, b)
    for change in changes:
        print(f"  {change}")
    if not changes:
        print("  no effective difference" + (" (the files differ only in form)"
                                             if a.sha256 != b.sha256 else ""))
        return 0
    effects = {e: sum(c.effect == e for c in changes) for e in ("stricter", "looser", "neutral")}
    print(f"{len(changes)} difference(s): " + ", ".join(f"{n} {e}" for e, n in effects.items()
                                                       if n))
    return 1


# --- the audit store ----------------------------------------------------------------------------

def _store(args: argparse.Namespace) -> tuple[Any, str]:
    """The audit store of --config (else the embedded default's), and which one it is in words.
    A SQLite file that does not exist is an error: reading must never create an empty store."""
    from guard.core.config import load_config
    from guard.plugins import build_store
    from guard.support.errors import ConfigError

    audit = dict(load_config(args.config).audit)
    kind = audit.get("kind", "sqlite")
    named = f"the audit: of {args.config}" if args.config else \
        "the embedded default config (name another store with --config)"
    if kind == "sqlite":
        path = Path(audit.get("path", "var/audit.db"))
        if not path.is_file():
            raise ConfigError(f"no audit store at {path.resolve()} (SQLite, from {named}): "
                              "nothing to read, and none is created")
        what = f"SQLite file {path.resolve()}"
    elif kind == "postgres":
        where = f"DSN from ${audit['dsn_env']}" if "dsn_env" in audit else "its DSN"
        what = f"PostgreSQL ({where}, schema {audit.get('schema', 'public')})"
    else:
        what = f"the {kind} store"
    return build_store(audit), f"{what}, from {named}"


# --- replay -------------------------------------------------------------------------------------

def replay(args: argparse.Namespace) -> int:
    from guard.offline.replay import render, to_csv
    from guard.offline.replay import replay as run_replay
    from guard.plugins import TraceQuery

    found = _load(args.candidate, args)
    if found is None:
        return 1
    candidate = next(iter(found[0].policies.values()))
    store, what = _store(args)
    query = TraceQuery(since=args.since, until=args.until, tenant=args.tenant,
                       policy_id=None if args.any_policy else (args.policy or candidate.id))

    async def run() -> Any:
        try:
            return await run_replay(store, candidate, query, limit=args.limit)
        finally:
            await store.aclose()

    report = asyncio.run(run())
    print(f"Traces read from {what}.")
    print(render(report, everything=args.all), end="")
    out = args.csv or Path(f"replay-{candidate.id}-v{candidate.version}.csv")
    out.write_text(to_csv(report.rows))
    print(f"\nCSV of all {len(report.rows)} replayed trace(s): {out}")
    return 0


# --- calibrate ----------------------------------------------------------------------------------

def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a share between 0 and 1, not {text!r}")
    return value


def calibrate(args: argparse.Namespace) -> int:
    from guard.offline.calibrate import MIN_LABELS, Target, proposed_yaml, report_html, table

    found = _load(args.policy, args)
    if found is None:
        return 1
    policy, source = next(iter(found[0].policies.values())), found[1]
    target = (Target("precision", args.target_precision) if args.target_precision is not None
              else Target("fpr", args.max_false_positive_rate))
    min_labels = MIN_LABELS if args.min_labels is None else max(1, args.min_labels)
    calibration, skipped = asyncio.run(_calibrate(args, policy, target, min_labels))
    args.out.mkdir(parents=True, exist_ok=True)
    proposed = args.out / "proposed.yaml"
    proposed.write_text(proposed_yaml(calibration, source.read_text(), str(source)))
    # Checked where it would go live: its `extends` found beside the original.
    check = load({**{p: d for p, d in read_files([POLICIES_DIR, source.parent]).items()
                     if p.resolve() != source.resolve()},
                  source: proposed.read_bytes()}, ids=[policy.id])
    if check.errors:  # a bug, never the user's: say so plainly
        for problem in check.errors:
            print(str(problem).replace(str(source), str(proposed)), file=sys.stderr)
        return 1
    replayed = ""
    if args.config or args.labels == "store":
        replayed = asyncio.run(_replay(args, policy, next(iter(check.policies.values()))))
    report = args.out / "report.html"
    report.write_text(report_html(calibration, skipped=skipped, replayed=replayed))
    print(table(calibration), end="")
    for why, n in sorted(skipped.items()):
        print(f"  {n} label(s) skipped: {why}")
    if replayed:
        print("\n" + replayed, end="")
    version = check.policies[policy.id].version
    print(f"\nproposed policy: {proposed} (v{version}"
          f"{'' if calibration.changed else ', unchanged'})\nreport: {report}")
    return 0


async def _calibrate(args: argparse.Namespace, policy: Any, target: Any,
                     min_labels: int) -> tuple[Any, dict[str, int]]:
    from guard.offline.calibrate import calibrate as run_calibrate
    from guard.offline.labelled import read_labels_csv, resolve, store_labels

    from_store = args.labels == "store"
    labels: list[Any] = [] if from_store else read_labels_csv(args.labels)
    needs_store = from_store or args.config or any(not label.scores for label in labels)
    store = _store(args)[0] if needs_store else None
    try:
        if from_store:
            labels = await store_labels(store, tenant=args.tenant, since=args.since)
        resolved = await resolve(labels, policy, store)
    finally:
        if store is not None:
            await store.aclose()
    return run_calibrate(policy, resolved.items, target, min_labels), dict(resolved.skipped)


async def _replay(args: argparse.Namespace, policy: Any, candidate: Any) -> str:
    """What the proposal would change on the stored requests of the calibrated policy."""
    from guard.offline.replay import render
    from guard.offline.replay import replay as run_replay
    from guard.plugins import TraceQuery

    store = _store(args)[0]
    try:
        report = await run_replay(store, candidate, TraceQuery(
            since=args.since, tenant=args.tenant, policy_id=policy.id))
    finally:
        await store.aclose()
    return render(report).split("\n\n")[0] + "\n"


# --- test ---------------------------------------------------------------------------------------

def test(args: argparse.Namespace) -> int:
    from guard.core.config import load_config
    from guard.offline.cases import junit, read_suite, run_suite, table

    suite = read_suite(args.cases)
    config = load_config(args.config)
    spec = args.policy or suite.policy or config.policy
    if args.policy is None and suite.policy is not None \
            and (args.cases.parent / suite.policy).is_file():
        spec = str(args.cases.parent / suite.policy)  # a file named relative to the cases
    found = _load(spec, args)
    if found is None:
        return 1
    policy = next(iter(found[0].policies.values()))
    judge = _judge(args.config, images=any(c.image for c in suite.cases))

    async def run() -> Any:
        from guard.support.lifecycle import Startable

        try:
            if isinstance(judge, Startable):
                await judge.start()
            return await run_suite(judge, policy, suite)
        finally:
            await judge.aclose()

    outcomes = asyncio.run(run())
    print(table(outcomes, policy, judge.id), end="")
    if args.junit is not None:
        args.junit.write_text(junit(outcomes, policy, suite))
        print(f"JUnit XML: {args.junit}")
    return 0 if all(o.passed for o in outcomes) else 1


def _judge(config: str | None, *, images: bool) -> Any:
    """The configured judge (judging only, no backend); without a config, the builtin judge,
    with its image detector only when a case has an image."""
    if config is None:
        from guard.judges.builtin import BuiltinJudge

        return BuiltinJudge(nudenet=images)
    from guard.core.config import load_config
    from guard.plugins import build_judge

    return build_judge(load_config(config).judge)


# --- schema -------------------------------------------------------------------------------------

def schema(args: argparse.Namespace) -> int:
    from guard.core.policy.schema import SCHEMA_PATH, render_file_schema, undescribed_fields

    missing = undescribed_fields()
    if missing:
        print("fields without a description: " + ", ".join(missing), file=sys.stderr)
        return 1
    path = args.output or SCHEMA_PATH
    current = path.read_text() if path.exists() else None
    if args.check:
        if current != render_file_schema():
            print(f"{path} is out of date: run `safeedit policy schema`", file=sys.stderr)
            return 1
        print(f"{path} is up to date")
        return 0
    if current != render_file_schema():
        path.write_text(render_file_schema())
        print(f"wrote {path}")
    else:
        print(f"{path} is up to date")
    return 0
