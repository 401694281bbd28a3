"""`safeedit serve` as an operator runs it: a real process, embedded defaults, killed with -9."""

from __future__ import annotations

import base64
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from guard.core.policy import POLICIES_DIR
from tests.fake_backend import FakeBackend
from tests.servers import free_port, serve

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def safeedit_serve(cwd: Path, *args: str,
                   safeedit: Sequence[str] = (sys.executable, "-m", "guard.cli"),
                   env: Mapping[str, str] | None = None,
                   ) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`safeedit serve` (by default this checkout's) in `cwd` until /readyz; (process, base URL)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)} if env is None else env
    proc = subprocess.Popen([*safeedit, "serve", "--port", str(port), *args], cwd=cwd, env=env,
                            stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(proc.stderr.read().decode() if proc.stderr else "no start")
            time.sleep(0.1)
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)


def test_embedded_defaults_demo_backend(tmp_path: Path) -> None:
    with safeedit_serve(tmp_path) as (proc, base):
        client = openai.OpenAI(base_url=base + "/v1", api_key="anything", max_retries=0)
        safe = client.images.generate(prompt="a lighthouse at dusk", model="gpt-image-1")
        assert safe.data and safe.data[0].b64_json
        assert base64.b64decode(safe.data[0].b64_json)[:4] == b"\x89PNG"
        assert safe.data[0].revised_prompt is None
        edited = client.images.generate(prompt="a nude woman on a beach")
        assert edited.data and edited.data[0].revised_prompt and "nude" not in edited.data[0].revised_prompt
        with pytest.raises(openai.BadRequestError) as info:
            client.images.generate(prompt="a naked child")
        assert info.value.code == "content_policy_violation"
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert "OPEN MODE" in stderr and "DEMO backend" in stderr
    assert (tmp_path / "var/audit.db").exists()


def shipped_copy(folder: Path, policy_id: str, version: int) -> None:
    """The shipped policy `policy_id`, saved in `folder` under another version number."""
    folder.mkdir(exist_ok=True)
    text = (POLICIES_DIR / f"{policy_id}.yaml").read_text()
    text, found = re.subn(r"(?m)^version: \d+$", f"version: {version}", text)
    assert found == 1
    (folder / f"{policy_id}.yaml").write_text(text)


def test_later_policy_folders_win_on_equal_ids(tmp_path: Path) -> None:
    # shipped < ./policies/ < the config's policy_paths < --policies
    for policy_id in ("default", "strict", "permissive"):
        shipped_copy(tmp_path / "policies", policy_id, 101)
    for policy_id in ("default", "strict"):
        shipped_copy(tmp_path / "configured", policy_id, 102)
    shipped_copy(tmp_path / "given", "default", 103)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"policy_paths": [str(tmp_path / "configured")]}))
    with safeedit_serve(tmp_path, "--config", str(config),
                        "--policies", str(tmp_path / "given")) as (_, base):
        versions = {policy_id: httpx.post(
            base + "/v1/images/generations", json={"prompt": "a red apple"},
            headers={"x-guard-policy": policy_id}, timeout=30).json()["guard"]["policy"]["version"]
            for policy_id in ("default", "strict", "permissive")}
    assert versions == {"default": 103, "strict": 102, "permissive": 101}


def test_open_mode_refuses_a_public_bind(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "guard.cli", "serve", "--host", "0.0.0.0",
                             "--port", str(free_port())], cwd=tmp_path, capture_output=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert result.returncode == 2 and b"loopback only" in result.stderr


def test_kill_9_mid_request_loses_no_finished_trace(tmp_path: Path) -> None:
    backend = FakeBackend()
    with serve(backend.app()) as backend_url:
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump({
            "backends": {"fake": {"kind": "openai-compatible", "api_base": backend_url + "/v1"}},
            "routes": {"*": {"backend": "fake"}},
            "audit": {"kind": "sqlite", "path": str(tmp_path / "audit.db")},
        }))
        with safeedit_serve(tmp_path, "--config", str(config)) as (proc, base):
            ids = [httpx.post(base + "/v1/images/generations", json={"prompt": f"cat {i}"},
                              timeout=30).headers["x-guard-trace-id"] for i in range(3)]
            backend.mode = "hang"
            hanging = threading.Thread(target=lambda: httpx.post(
                base + "/v1/images/generations", json={"prompt": "slow"}, timeout=30),
                daemon=True)
            hanging.start()
            while len(backend.requests) < 4:  # the fourth request is inside the backend call
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    conn = sqlite3.connect(tmp_path / "audit.db")
    rows = conn.execute("SELECT id, prev_hash, hash FROM traces ORDER BY seq").fetchall()
    assert [r[0] for r in rows] == ids
    assert rows[0][1] is None and all(rows[i][1] == rows[i - 1][2] for i in range(1, 3))


def test_workers_must_be_at_least_one(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "guard.cli", "serve", "--workers", "0",
                             "--port", str(free_port())], cwd=tmp_path, capture_output=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert result.returncode == 2 and b"--workers must be 1 or more" in result.stderr
