"""`safeedit config example`: print the operators' example config, every option with its default.

The example ships inside the package (guard/cli/config.example.yaml; examples/config.yaml in the
checkout is a link to it), so an installed wheel or the image prints the same file.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from typing import Any

EXAMPLE = "config.example.yaml"


def register(sub: Any) -> None:
    p = sub.add_parser("config", help="the operators' config file: an example to start from",
                       description="The operators' config file (YAML) that `safeedit serve "
                                   "--config` reads.")
    cmds = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    e = cmds.add_parser("example", help="print the example config, every option with its default",
                        description="Print the example config, every option with its default "
                                    "and what it does: safeedit config example > config.yaml")
    e.set_defaults(func=run_example)


def example_text() -> str:
    return resources.files("guard.cli").joinpath(EXAMPLE).read_text(encoding="utf-8")


def run_example(args: argparse.Namespace) -> int:
    sys.stdout.write(example_text())
    return 0
