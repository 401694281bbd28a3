"""`safeedit verify-image FILE [--trust PEM] [--json] [--log URL]`: what an image's recipient runs.

Exit 0 only if the image's C2PA manifest holds: its signature verifies and its hash binding
matches every byte of the image; with `--trust`, the signer's chain also leads to one of the
certificates in that PEM file (without it the signer is reported untrusted: the binding holds,
but nothing says who signed). With `--log URL`, the image's sha256 must also be the delivered
hash of the trace its manifest names, and that trace's inclusion proof must verify against a
tree head signed by the log's published key (guard.audit.transparency). Exit 1 when a check
fails, 2 when the command cannot run (no such file, a bad --trust file).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson

from guard.provenance import Reading, read_image
from guard.support.errors import ConfigError


def register(sub: Any) -> None:
    p = sub.add_parser("verify-image", help="check an image's C2PA manifest (signature, hash "
                                            "binding, signer, and the audit log with --log)")
    p.add_argument("file", metavar="FILE", help="the image (PNG, JPEG or WebP)")
    p.add_argument("--trust", metavar="PEM",
                   help="certificates to trust (PEM); the signer's chain must lead to one")
    p.add_argument("--log", metavar="URL",
                   help="the guard's base URL: also check the trace the manifest names in its "
                        "transparency log (delivered hash, inclusion proof, signed tree head); "
                        "a log that is not public needs an auditor's key in "
                        "SAFEEDIT_LOG_API_KEY")
    p.add_argument("--log-keys", metavar="PEM",
                   help="with --log: the log's public keys (PEM), instead of those it serves")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=run_verify_image)


def run_verify_image(args: argparse.Namespace) -> int:
    data = _read(args.file, "image")
    trust = _read(args.trust, "--trust").decode(errors="replace") if args.trust else None
    reading = read_image(data, trust)
    log_problems: list[str] | None = None
    facts = reading.facts or {}
    if args.log and reading.ok:
        trace_id = facts.get("trace_id")
        if not isinstance(trace_id, str):
            log_problems = ["the manifest names no trace of this guard"]
        else:
            keys = _read(args.log_keys, "--log-keys").decode() if args.log_keys else None
            log_problems = _check_log(args.log, trace_id, reading.sha256, keys)
    ok = reading.ok and not log_problems
    if args.json:
        body = {"file": args.file, "ok": ok, **reading.to_dict()}
        if args.log:
            body["log"] = {"url": args.log, "checked": log_problems is not None,
                           "problems": log_problems or []}
        sys.stdout.write(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        _print(args.file, reading, trust=args.trust, log_url=args.log, log_problems=log_problems)
    return 0 if ok else 1


def _check_log(url: str, trace_id: str, sha256: str, keys: str | None) -> list[str]:
    from guard.audit.transparency import verify_delivered  # an HTTP client: only with --log

    return verify_delivered(url, trace_id, sha256, keys)


def _print(name: str, reading: Reading, *, trust: str | None, log_url: str | None,
           log_problems: list[str] | None) -> None:
    if not reading.manifest or not reading.intact:
        print(f"{name}: FAILED: {'; '.join(reading.problems)}")
        if reading.manifest:
            print("  the image or its manifest changed after signing, or it was never signed "
                  "as it claims")
        return
    print(f"{name}: the C2PA manifest holds: signature valid, image bytes match (sha256 "
          f"{reading.sha256})")
    signer = reading.signer
    who = f"{signer.get('common_name', '?')} (issuer {signer.get('issuer', '?')})"
    if trust is None:
        print(f"  signer: {who}: UNTRUSTED, no --trust given (a development certificate unless "
              "you check the issuer yourself)")
    elif reading.trusted:
        print(f"  signer: {who}: trusted, its chain leads to {trust}")
    else:
        print(f"  signer: {who}: FAILED: its chain does not lead to {trust}")
    facts = reading.facts
    if facts is None:
        print("  no SafeEdit Guard assertion: not marked by this guard")
    else:
        policy = facts.get("policy") or {}
        print(f"  trace {facts.get('trace_id')}: decision {facts.get('decision')}, "
              f"rounds {facts.get('rounds')}, categories "
              f"{', '.join(facts.get('categories') or []) or 'none'}")
        print(f"  policy {policy.get('id')} version {policy.get('version')} (sha256 "
              f"{policy.get('sha256')}); log {facts.get('log_id') or 'none named'}")
    print(f"  actions: {', '.join(str(a.get('action')) for a in reading.actions)}"
          f"{'; keeps the backend’s own manifest as its parent' if reading.parent else ''}")
    if log_url is not None:
        if log_problems is None:
            print(f"  log {log_url}: not checked")
        elif log_problems:
            for problem in log_problems:
                print(f"  log {log_url}: FAILED: {problem}")
        else:
            print(f"  log {log_url}: the trace is in the log, its delivered hash is this "
                  "image's, and its inclusion proof verifies against a signed tree head")


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
