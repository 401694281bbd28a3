"""The wheel, installed away from the checkout: from an empty folder, `safeedit serve` answers an
OpenAI client under the shipped default policy and `safeedit policy validate` finds the shipped
policies."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import openai
import pytest

from guard.core.policy import POLICIES_DIR, load_policy
from tests.test_serve_cli import ROOT, safeedit_serve

pytestmark = pytest.mark.slow

# The build runs on a copy, so that build/ and the egg-info never land in the working tree.
_NOT_BUILT = shutil.ignore_patterns(".git", ".venv", "var", "build", "dist", "*.egg-info",
                                    "__pycache__", ".*_cache")


def NOT_BUILT(directory: str, names: list[str]) -> set[str]:  # noqa: N802 - as ignore_patterns
    """What the copy leaves out: build leftovers anywhere, the suite and benchmarks at the top
    (policies/tests/, the example policy cases, ships)."""
    top = {"tests", "benchmarks"} & set(names) if Path(directory) == ROOT else set()
    return set(_NOT_BUILT(directory, names)) | top
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def run(*command: str | Path, cwd: Path | None = None) -> str:
    result = subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def bin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the wheel; the dependencies (torch...) come from the project's venv
    through a .pth line, so nothing is downloaded. Returns the venv's bin folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    shutil.copytree(ROOT, tmp / "src", symlinks=True, ignore=NOT_BUILT)
    run(sys.executable, "-m", "pip", "wheel", tmp / "src", "--no-deps", "--no-build-isolation",
        "--no-index", "-q", "-w", tmp / "dist")
    wheel, = (tmp / "dist").glob("safeedit_guard-*.whl")
    venv.create(tmp / "venv", with_pip=False, symlinks=True)
    python = tmp / "venv/bin/python"
    site = run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").strip()
    # A plain path in a .pth is appended to sys.path; the .pth files there (the editable
    # install's finder among them) are not run, so this checkout stays out of reach.
    (Path(site) / "project-venv.pth").write_text(sysconfig.get_path("purelib") + "\n")
    # pip comes from the project's venv too; --ignore-installed keeps it from touching the
    # editable install it sees there.
    run(python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q",
        wheel)
    return python.parent


def test_the_code_and_the_policies_come_from_the_wheel(bin_dir: Path, tmp_path: Path) -> None:
    out = run(bin_dir / "python", "-c",
              "import adapters, guard, proxy; from guard.core.policy import POLICIES_DIR;"
              "print(guard.__file__, adapters.__file__, proxy.__file__, POLICIES_DIR)",
              cwd=tmp_path)
    paths = [Path(p) for p in out.split()]
    site = bin_dir.parent.resolve()
    assert all(p.is_relative_to(site) and not p.is_relative_to(ROOT) for p in paths), paths
    assert sorted(p.name for p in paths[-1].iterdir()) == sorted(
        p.name for p in POLICIES_DIR.iterdir())


def test_serve_from_an_empty_folder_applies_the_shipped_default(bin_dir: Path,
                                                                tmp_path: Path) -> None:
    with safeedit_serve(tmp_path, safeedit=[str(bin_dir / "safeedit")], env=ENV) as (_, base):
        client = openai.OpenAI(base_url=base + "/v1", api_key="anything", max_retries=0)
        image = client.images.generate(model="gpt-image-1", prompt="a red apple")
    assert base64.b64decode(image.data[0].b64_json or "")[:4] == b"\x89PNG"
    guard = (image.model_extra or {})["guard"]
    assert guard["decision"] == "passed"
    assert guard["policy"] == load_policy(POLICIES_DIR / "default.yaml").ref


def test_policy_validate_and_schema_find_the_shipped_files(bin_dir: Path, tmp_path: Path) -> None:
    out = run(bin_dir / "safeedit", "policy", "validate", cwd=tmp_path)
    assert sorted(re.findall(r": ok \((\w+) v\d+", out)) == ["default", "permissive", "strict"]
    assert "up to date" in run(bin_dir / "safeedit", "policy", "schema", "--check", cwd=tmp_path)


def test_config_example_comes_from_the_wheel(bin_dir: Path, tmp_path: Path) -> None:
    """`serve --help` points at `safeedit config example`: the wheel must carry what it prints."""
    out = run(bin_dir / "safeedit", "config", "example", cwd=tmp_path)
    assert out == (ROOT / "examples" / "config.yaml").read_text()
