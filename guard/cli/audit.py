"""`safeedit audit verify|export|purge`: the auditors' and operators' commands for the audit log.

All three read the store named by the operators' config (`--config`, else the embedded default:
SQLite at var/audit.db).

    verify   walk the hash chain, the signed checkpoints and the anchors kept outside the store;
             name the first trace that was changed, removed or reordered, a missing or forged
             checkpoint, an anchored trace that is gone or different; then the same for the
             auditors' labels (their own chain, guard.core.labels). Exit status 0 intact,
             1 tampered, 2 error.
    export   stream traces as JSON Lines or CSV (stdout or --output), never all in memory.
    purge    delete images past their TTL from the image store (retained images and image
             links' copies); traces keep each image's sha256, so the chain still verifies.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from contextlib import ExitStack
from typing import Any, BinaryIO

import orjson

from guard.audit import ChainedStore, ImageKeepingStore, LoggedStore, SpoolingStore
from guard.plugins import LabelStore
from guard.support.errors import ConfigError
from guard.support.timewindow import time_option


def register(sub: Any) -> None:
    audit = sub.add_parser("audit", help="verify, export and purge the audit log",
                           description="The audit log's tools: verify its hash chain, checkpoints "
                                       "and anchors, export traces, purge expired images. Each "
                                       "reads the store from the config's `audit:` section.")
    cmds = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="operators' config file (YAML)")

    p = cmds.add_parser("verify", help="check the hash chain and signed checkpoints "
                                       "(exit 1 if any trace was changed, removed or reordered)")
    common(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--anchors", metavar="PATH",
                   help="an anchor file (JSON lines) to check the chain against (default: the "
                        "audit config's `anchor` sink)")
    p.set_defaults(func=run_verify)

    p = cmds.add_parser("witness", help="check a log's signed tree head from outside (public "
                                        "key only): exit 1 on a rollback, fork, wipe or bad "
                                        "signature")
    p.add_argument("--url", required=True, help="the proxy's base URL (http://host:port)")
    p.add_argument("--state", required=True, metavar="FILE",
                   help="where the witness keeps the head it saw last and the pinned keys")
    p.add_argument("--keys", metavar="PEM|URL", help="the log's public keys (default: pinned in "
                   "the state file, else fetched from the log on first use)")
    p.add_argument("--every", type=float, metavar="S", help="check every S seconds, forever "
                   "(default: once)")
    p.add_argument("--max-age", type=float, metavar="S", help="fail when the newest head is "
                   "older than S seconds (a log that stopped signing; it signs one a minute "
                   "while healthy)")
    p.set_defaults(func=run_witness)

    p = cmds.add_parser("new-log-key", help="print a new Ed25519 signing key for the audit "
                                            "log (kid:base64-seed, for SAFEEDIT_LOG_SIGNING_KEYS)"
                                            " and its public key")
    p.add_argument("--kid", default=None, help="its key id (default: from the public key)")
    p.set_defaults(func=run_new_log_key)

    p = cmds.add_parser("export", help="stream traces as JSON Lines or CSV")
    common(p)
    p.add_argument("--since", type=time_option("since"),
                   help="from this time: ISO 8601 (UTC unless an offset is given), Unix "
                        "seconds, or an age such as 24h / 7d / 2w")
    p.add_argument("--until", type=time_option("until"), help="before this time (same forms)")
    p.add_argument("--tenant", help="only this tenant's traces")
    p.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    p.add_argument("--output", "-o", help="file to write (default stdout)")
    p.set_defaults(func=run_export)

    p = cmds.add_parser("purge", help="delete images past their TTL from the image store (the "
                                      "traces and the chain are not touched)")
    common(p)
    p.add_argument("--older-than-days", type=float,
                   help="also delete images retained longer ago than this (instead of the "
                        "config's image_ttl_days) for this run")
    p.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    p.set_defaults(func=run_purge)


def _store(args: argparse.Namespace) -> Any:
    from guard.core.config import load_config
    from guard.plugins import build_store

    return build_store(load_config(args.config).audit)


def run_verify(args: argparse.Namespace) -> int:
    from guard.audit.anchor import AnchorSink, FileAnchorSink
    from guard.audit.chain import verify
    from guard.audit.logcheck import verify_log

    async def go() -> Any:
        store = _store(args)
        try:
            if not isinstance(store, ChainedStore):
                print(f"safeedit: error: the {type(store).__name__} store cannot be verified",
                      file=sys.stderr)
                return None
            sink: AnchorSink | None = (FileAnchorSink(args.anchors) if args.anchors else
                                       store.anchorer.sink if store.anchorer else None)
            anchors = await sink.read() if sink is not None else None
            report = await verify(store, store.signer, checkpoint_every=store.checkpoint_every,
                                  anchors=anchors)
            if isinstance(store, LabelStore):
                report.labels = await store.verify_labels()
            if isinstance(store, LoggedStore) and store.log is not None:
                await verify_log(store.log, report)
            if isinstance(store, SpoolingStore) and store.spool is not None:
                spooled = store.spool.records()
                for record in spooled:
                    if (problem := store.spool.check(record)) is not None:
                        report.add("signature", 0, str(record["trace"].get("id")), problem)
                report.spooled = [str(r["trace"].get("id")) for r in spooled]
                report.spool_path = str(store.spool.path)
            return report, store.signer, sink
        finally:
            await store.aclose()

    result = asyncio.run(go())
    if result is None:
        return 2
    report, signer, sink = result
    if args.json:
        out = {**report.to_dict(), "anchor_sink": sink.location if sink else None}
        print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
        return 0 if report.ok else 1
    print(f"checked {report.traces} traces (seq 1..{report.last_seq}) in "
          f"{report.elapsed_s:.2f} s")
    if signer is None:
        print("checkpoints: signatures NOT checked (no checkpoint_key_env or checkpoint_keys_env"
              " in the audit config)" + (f"; {report.checkpoints_unchecked} present"
                                         if report.checkpoints_unchecked else ""))
    else:
        last = report.last_checkpoint_seq
        print(f"checkpoints: {report.checkpoints_valid} valid signatures (keys "
              f"{', '.join(signer.kids)})" + (f", last at seq {last}" if last else ""))
    if sink is None:
        print("anchors: none configured (a cut tail or a wiped log is not detected; see "
              "`anchor` in the audit config)")
    elif not report.anchors:
        print(f"anchors: none yet in {sink.location}")
    else:
        print(f"anchors: {report.anchors} in {sink.location}"
              + (f", latest at seq {report.last_anchor_seq}" if report.last_anchor_seq else "")
              + (" (signatures NOT checked)" if report.anchors_unchecked else "")
              + f"; not yet anchored: {report.unanchored} rows")
    if report.log is not None:
        facts = report.log
        print(f"log: {facts['signed_rows']} rows with valid log signatures"
              + (f", {facts['legacy_rows']} written before the log (unsigned)"
                 if facts["legacy_rows"] else "")
              + f"; Merkle tree of {facts['tree_size']} leaves; {facts['heads']} signed tree "
              f"heads in the database, {facts['sink_heads']} in {facts['sink'] or 'no sink'}"
              + (f" ({facts['resets']} accepted reset(s))" if facts["resets"] else ""))
    spooled = report.spooled
    if spooled:
        print(f"spool: {len(spooled)} traces served while the store was down, spooled and not "
              f"yet in the log ({report.spool_path}; replayed when the proxy runs): "
              + ", ".join(spooled[:10]) + (" ..." if len(spooled) > 10 else ""))
    labels = report.labels
    if labels is not None:
        print(f"labels: checked {labels.traces} (seq 1..{labels.last_seq}) in their own chain;"
              f" {labels.checkpoints_valid} valid checkpoint signatures"
              + ("" if labels.anchors is None else f", {labels.anchors} anchors"
                 + f", not yet anchored: {labels.unanchored}"))
    if report.ok:
        print("OK: the chain is intact" + (" (traces and labels)" if labels else "")
              + (" and the log matches its signed tree heads" if report.log else ""))
        return 0
    for part, what in ((report, ""), (labels, " (labels)")):
        if part is None or not part.problems:
            continue
        print(f"FAILED{what}: {part.first}")
        if len(part.problems) > 1:
            more = "+" if part.truncated else ""
            print(f"{len(part.problems)}{more} problems in all:")
            for problem in sorted(part.problems, key=lambda p: p.seq):
                print(f"  seq {problem.seq}: {problem}")
    return 1


def run_export(args: argparse.Namespace) -> int:
    from guard.audit.export import export

    async def go(out: BinaryIO) -> int:
        store = _store(args)
        try:
            if not isinstance(store, ChainedStore):
                raise ConfigError(f"the {type(store).__name__} store has no chain to export")
            rows = store.chain_rows(since=args.since, until=args.until, tenant=args.tenant)
            return await export(rows, out, args.format)
        finally:
            await store.aclose()

    with ExitStack() as stack:
        try:
            out = (stack.enter_context(open(args.output, "wb")) if args.output
                   else sys.stdout.buffer)
        except OSError as exc:
            print(f"safeedit: error: cannot write {args.output}: {exc.strerror}",
                  file=sys.stderr)
            return 2
        count = asyncio.run(go(out))
    print(f"exported {count} traces", file=sys.stderr)
    return 0


def run_purge(args: argparse.Namespace) -> int:
    from guard.core.config import load_config
    from guard.plugins import build_image_store, build_store, resolve_image_store

    config = load_config(args.config)

    async def go() -> tuple[Any, Any]:
        shared = build_image_store(resolve_image_store(config.image_store, config.audit))
        store = build_store(config.audit, shared)
        try:
            retained = store.images if isinstance(store, ImageKeepingStore) else None
            if retained is None:  # images_dir: null: only image links' copies, once expired
                return await shared.purge(time.time(), dry_run=args.dry_run), shared
            older = args.older_than_days * 86400 if args.older_than_days is not None else None
            return await retained.purge(older_than_s=older, dry_run=args.dry_run), shared
        finally:
            await store.aclose()
            await shared.aclose()

    result, where = asyncio.run(go())
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {result.removed} images ({result.freed_bytes / 1e6:.1f} MB) from {where!r}; "
          f"{result.kept} kept. Traces keep each image's sha256, so the chain still verifies.")
    return 0


def run_witness(args: argparse.Namespace) -> int:
    from guard.audit.transparency import LogCheckFailed, witness

    while True:
        try:
            print(witness(args.url, args.state, keys=args.keys, max_age_s=args.max_age),
                  flush=True)
        except LogCheckFailed as exc:
            print(f"FAILED: {exc}", flush=True)
            return 1
        except (ConnectionError, OSError, ValueError, ConfigError) as exc:
            print(f"safeedit: error: {exc}", file=sys.stderr, flush=True)
            if args.every is None:
                return 2
        if args.every is None:
            return 0
        time.sleep(args.every)


def run_new_log_key(args: argparse.Namespace) -> int:
    import base64

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from guard.audit.logkeys import key_id_of, new_seed, public_entry

    seed = new_seed()
    public = Ed25519PrivateKey.from_private_bytes(base64.b64decode(seed)).public_key()
    kid = args.kid or key_id_of(public)
    print(f"{kid}:{seed}")
    print(f"# public key ({kid}); auditors and witnesses get it from /v1/guard/log/keys:\n"
          + public_entry(kid, public)["pem"], file=sys.stderr, end="")
    return 0
