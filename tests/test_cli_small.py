"""Small things a user of the command line meets: the example config the package ships
(`safeedit config example`), help that says what each command group is for, the log levels
`serve` takes; and the suite's own PostgreSQL schemas, dropped with everything made beside them."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest
import yaml

from guard.cli import build_parser, main
from guard.core.config import load_config
from tests.services import PG_DSN, drop_schemas, require_postgres

ROOT = Path(__file__).resolve().parent.parent


def help_of(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_config_example_prints_the_shipped_example_which_loads() -> None:
    result = subprocess.run([sys.executable, "-m", "guard.cli", "config", "example"],
                            capture_output=True, text=True, timeout=60, cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (ROOT / "examples" / "config.yaml").read_text()
    config = load_config(None, yaml.safe_load(result.stdout))
    assert config.server.port == 8000 and config.keys
    # it is package data, so a wheel (test_wheel.py) and the image carry it
    assert (ROOT / "guard" / "cli" / "config.example.yaml").is_file()
    assert '"guard.cli" = ["config.example.yaml"]' in (ROOT / "pyproject.toml").read_text()


def test_serve_help_points_at_what_an_installed_package_has(
        capsys: pytest.CaptureFixture[str]) -> None:
    text = " ".join(help_of(capsys, "serve").split())
    assert "safeedit config example" in text and "examples/config.yaml" not in text


@pytest.mark.parametrize("group", ["audit", "dataset", "config"])
def test_each_command_group_says_what_it_is_for(capsys: pytest.CaptureFixture[str],
                                                  group: str) -> None:
    usage, _, rest = help_of(capsys, group).partition("\n\n")
    assert usage.startswith(f"usage: safeedit {group}")
    description = rest.split("\n\n")[0]
    assert not description.startswith(("positional", "options")) and len(description) > 40


def test_log_level_lists_its_values(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_of(capsys, "serve")
    assert "{critical,error,warning,info,debug,trace}" in text
    assert build_parser().parse_args(["serve", "--log-level", "DEBUG"]).log_level == "debug"
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--log-level", "loud"])
    assert exit_.value.code == 2
    assert "invalid choice: 'loud'" in capsys.readouterr().err


@pytest.mark.postgres
def test_drop_schemas_drops_what_the_stores_made_beside_a_schema() -> None:
    require_postgres(PG_DSN)
    name = f"t_{uuid.uuid4().hex[:12]}"
    made = [name, f"{name}_anchors", f"{name}_anchors_labels", f"{name}_heads"]
    other = f"{name}x"  # another test's, whose name merely starts alike

    async def schemas(conn: asyncpg.Connection) -> set[str]:
        rows = await conn.fetch("SELECT nspname FROM pg_namespace WHERE starts_with(nspname, $1)",
                                name)
        return {r[0] for r in rows}

    async def go() -> set[str]:
        conn = await asyncpg.connect(PG_DSN)
        try:
            for schema in [*made, other]:
                await conn.execute(f'CREATE SCHEMA "{schema}"')
            await conn.execute(f'CREATE TABLE "{name}_heads".t (x int)')
            await drop_schemas(PG_DSN, name)
            left = await schemas(conn)
        finally:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{other}" CASCADE')
            await conn.close()
        return left

    assert asyncio.run(go()) == {other}
