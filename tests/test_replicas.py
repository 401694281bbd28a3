"""Two replicas: two real `safeedit serve` processes on two ports, one config, one policy folder,
one PostgreSQL schema (the audit log and the image store). What a client, an auditor and an
operator see must not depend on which replica answers: an image link minted by one is served by
the other, a retained image shows on both review pages, one chain verifies with both replicas'
traces, and a policy edit reloaded on one is in force on the other (through the policy file
watcher of each replica: they read the same folder).

Skipped without the PostgreSQL server on 127.0.0.1:5432 (failed with SAFEEDIT_REQUIRE_POSTGRES=1).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.conftest import ADMIN_KEY, AUDITOR_KEY, CLIENT_KEY
from tests.conftest import test_keys as configured_keys
from tests.services import drop_schemas, require_postgres
from tests.test_audit_postgres import DSN
from tests.test_serve_cli import safeedit_serve

pytestmark = [pytest.mark.postgres, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent
POLICY = "id: shared\nversion: {version}\nextends: default\nimage_retention: all\n"


@pytest.fixture
def schema() -> Iterator[str]:
    require_postgres(DSN)
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    asyncio.run(drop_schemas(DSN, name))


@pytest.fixture
def replicas(tmp_path: Path, schema: str) -> Iterator[dict[str, Any]]:
    """Replicas A and B (base URLs), the shared policy file and config."""
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "shared.yaml").write_text(POLICY.format(version=1))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "keys": configured_keys(), "policy": "shared", "policy_paths": [str(policies)],
        "judge": {"kind": "builtin", "nudenet": False},
        # No images_dir and no image_store: the images follow the audit log into PostgreSQL.
        "audit": {"kind": "postgres", "dsn": DSN, "schema": schema},
    }))
    with ExitStack() as stack:
        bases = {}
        for name in ("A", "B"):  # each its own working directory: nothing shared on disk
            cwd = tmp_path / name
            cwd.mkdir()
            _, bases[name] = stack.enter_context(safeedit_serve(cwd, "--config", str(config)))
        yield {**bases, "policy": policies / "shared.yaml", "config": str(config),
               "tmp": tmp_path}


def sdk(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=CLIENT_KEY, max_retries=0)


def generate(base: str, prompt: str, **extra: Any) -> tuple[str, Any]:
    """(trace id, images response) of one request to `base`."""
    raw = sdk(base).images.with_raw_response.generate(prompt=prompt, **extra)
    return raw.headers["x-guard-trace-id"], raw.parse()


@contextmanager
def review_session(base: str) -> Iterator[httpx.Client]:
    """An auditor signed in on `base` through the login form."""
    with httpx.Client(base_url=base, timeout=30) as client:
        form = client.get("/guard/login")
        token = re.search(r'name="csrf" value="([^"]+)"', form.text)[1]  # type: ignore[index]
        signed_in = client.post("/guard/login", data={"key": AUDITOR_KEY, "csrf": token})
        assert signed_in.status_code == 303 and client.cookies.get("safeedit_review")
        yield client


def test_two_replicas_share_links_images_chain_and_policies(replicas: dict[str, Any]) -> None:
    a, b = replicas["A"], replicas["B"]

    # A link minted by A is served by B (and by A), byte for byte; a forged one by neither.
    trace_id, linked = generate(a, "a lighthouse at dusk", response_format="url")
    url = linked.data[0].url
    assert url.startswith(a + "/v1/guard/images/")
    from_b = httpx.get(b + url.removeprefix(a), timeout=30)
    assert from_b.status_code == 200 and from_b.headers["content-type"] == "image/png"
    assert from_b.content[:4] == b"\x89PNG" and from_b.content == httpx.get(url).content
    forged = httpx.get(b + url.removeprefix(a).replace("sig=", "sig=0"), timeout=30)
    assert forged.status_code == 404 and forged.json()["error"]["code"] == "not_found"

    # The image A's trace retained (as generated; the link serves it as delivered, with its
    # C2PA manifest) shows on B's review page (and on A's).
    result = httpx.get(f"{b}/v1/guard/traces/{trace_id}", timeout=30,
                       headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()["results"][0]
    sha = result["image_sha256"]
    assert result["delivered_sha256"] == hashlib.sha256(from_b.content).hexdigest()
    for base in (b, a):
        with review_session(base) as auditor:
            page = auditor.get(f"/guard/traces/{trace_id}")
            assert page.status_code == 200 and f"/images/{sha}" in page.text
            image = auditor.get(f"/guard/traces/{trace_id}/images/{sha}")
            assert image.status_code == 200 and hashlib.sha256(image.content).hexdigest() == sha

    # Traces from both replicas form one chain, and it verifies.
    b_trace, before = generate(b, "a red apple on a table")
    assert before.guard["policy"]["version"] == 1
    generate(a, "a quiet harbour")
    verified = subprocess.run(
        [sys.executable, "-m", "guard.cli", "audit", "verify", "--config", replicas["config"]],
        cwd=replicas["tmp"], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "checked 3 traces" in verified.stdout and "OK: the chain is intact" in verified.stdout
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    assert httpx.get(f"{a}/v1/guard/traces/{b_trace}", headers=admin).status_code == 200

    # An operator edits the shared policy and reloads it on A: A serves it at once, and B's
    # watcher of the same folder puts it in force there within a few seconds.
    replicas["policy"].write_text(POLICY.format(version=2))
    reloaded = httpx.post(f"{a}/v1/guard/policies/reload", headers=admin, timeout=30).json()
    # (`changed` is empty when A's own watcher saw the edit first; the set in force is not.)
    assert {p["id"]: p["version"] for p in reloaded["policies"]}["shared"] == 2
    assert generate(a, "a sailing boat")[1].guard["policy"]["version"] == 2
    deadline = time.monotonic() + 20
    while True:
        trace_id, served = generate(b, "a sailing boat")
        if served.guard["policy"]["version"] == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    recorded = httpx.get(f"{b}/v1/guard/traces/{trace_id}", headers=admin).json()
    assert recorded["policy"]["id"] == "shared" and recorded["policy"]["version"] == 2
