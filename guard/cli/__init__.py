"""`safeedit`: the command line. Each sub-command group lives in its own module with a
`register(subparsers)` function; this module only wires them together."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

# litellm tries the network at import unless told to use its bundled cost map.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

COMMAND_MODULES = [
    "guard.cli.serve",
    "guard.cli.config",
    "guard.cli.policy",
    "guard.cli.audit",
    "guard.cli.eval",
    "guard.cli.judge",
    "guard.cli.dataset",
    "guard.cli.provenance",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safeedit", description="SafeEdit Guard: guardrails for image-generation APIs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # noqa: BLE001 - a CLI prints a clear line, not a traceback
        from guard.support.errors import GuardError

        if isinstance(exc, GuardError):
            print(f"safeedit: error: {exc.message}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
