"""guard.core.config: the operators' file is read strictly; a mistake stops the start, named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from guard.core.config import hash_key, load_config
from guard.support.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
ZEROS = "sha256:" + "0" * 64


def test_a_key_listed_twice_is_refused_not_silently_replaced(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(f"keys:\n  - {{id: admin, hash: '{ZEROS}', role: admin}}\n"
                    "policy: default\n"
                    f"keys:\n  - {{id: app, hash: '{hash_key('k')}'}}\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'keys' \(first at line 1\)"):
        load_config(path)


def test_duplicate_keys_nested_in_a_section_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("server:\n  port: 8000\n  port: 9000\n")
    with pytest.raises(ConfigError, match="duplicate key 'port'"):
        load_config(path)


@pytest.mark.parametrize("digest", ["g" * 64, "0" * 63 + "z", " " * 64, "0" * 63])
def test_a_key_hash_must_be_64_hex_digits(tmp_path: Path, digest: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(f"keys:\n  - {{id: app, hash: 'sha256:{digest}'}}\n")
    with pytest.raises(ConfigError, match="64 hex digits"):
        load_config(path)


def test_an_upper_case_hash_matches_its_key(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    upper = "sha256:" + hash_key("the-key").removeprefix("sha256:").upper()
    path.write_text(f"keys:\n  - {{id: app, hash: '{upper}'}}\n")
    assert load_config(path).keys[0].matches("the-key")


def test_serve_stops_at_a_duplicate_key_and_says_where(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("policy: default\npolicy: strict\n")
    out = subprocess.run([sys.executable, "-m", "guard.cli", "serve", "--config", str(path),
                          "--port", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "duplicate key 'policy' (first at line 1)" in out.stderr + out.stdout
