"""Image retention per policy through the real proxy: which images land on disk (content-addressed),
what the trace records, and `safeedit audit purge` removing old copies while the chain still
verifies."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import yaml

from tests.conftest import ADMIN_KEY, CLIENT_KEY, write_policy
from tests.fake_backend import png

ROOT = Path(__file__).resolve().parent.parent
DAY = 86400


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def keeping(proxy, tmp_path: Path, fake_backend):  # type: ignore[no-untyped-def]
    """start(retention) -> (base URL, images dir, CLI config path)."""

    def start(retention: str, **overrides: Any) -> tuple[str, Path, str]:
        write_policy(tmp_path, f"id: keep\nversion: 2\nextends: default\n"
                               f"image_retention: {retention}\n")
        options = {"kind": "sqlite", "path": str(tmp_path / "audit.db"),
                   "images_dir": str(tmp_path / "images"), "image_ttl_days": 30}
        config = tmp_path / "cli" / "config.yaml"
        config.parent.mkdir(exist_ok=True)
        config.write_text(yaml.safe_dump({"audit": options}))
        return (proxy(policy="keep", audit=options, **overrides), tmp_path / "images",
                str(config))

    return start


def edited_request(base: str, backend: Any) -> dict[str, Any]:
    """One request whose first image is unsafe (red) and whose second round is safe (blue)."""
    backend.plan += [["red"], ["blue"]]
    r = httpx.post(f"{base}/v1/images/generations", json={"prompt": "a street at night",
                                                              "response_format": "b64_json"},
                   headers={"authorization": f"Bearer {CLIENT_KEY}"}, timeout=30)
    assert r.status_code == 200 and r.json()["guard"]["decision"] == "edited", r.text
    t = httpx.get(f"{base}/v1/guard/traces/{r.headers['x-guard-trace-id']}",
                  headers={"authorization": f"Bearer {ADMIN_KEY}"})
    return t.json()  # type: ignore[no-any-return]


def stored(images: Path) -> set[str]:
    """The images kept in the folder (each file is named by its sha256, beside its metadata)."""
    return {p.name for p in images.glob("*/*") if len(p.name) == 64}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "guard.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=os.environ.copy())


@pytest.mark.parametrize(("retention", "kept"), [
    ("none", set()), ("flagged", {"red"}), ("all", {"red", "blue"})])
def test_retention_per_policy(keeping, fake_backend, retention, kept) -> None:  # type: ignore[no-untyped-def]
    base, images, _ = keeping(retention)
    trace = edited_request(base, fake_backend[0])
    by_colour = {"red": trace["rounds"][1]["images"][0], "blue": trace["rounds"][2]["images"][0]}
    assert by_colour["red"]["flagged"] == ["violence"] and by_colour["blue"]["flagged"] == []
    for colour, judged in by_colour.items():
        digest = sha(png(colour))
        assert judged["image_sha256"] == digest  # the hash is recorded whatever the policy
        if colour in kept:
            assert judged["image_ref"] == f"{digest[:2]}/{digest}"
            assert (images / judged["image_ref"]).read_bytes() == png(colour)
        else:
            assert judged["image_ref"] is None
    assert stored(images) == {sha(png(c)) for c in kept}


def test_same_image_is_stored_once_and_its_ttl_restarts(keeping, fake_backend) -> None:  # type: ignore[no-untyped-def]
    base, images, config = keeping("flagged")
    edited_request(base, fake_backend[0])
    red = images / sha(png("red"))[:2] / sha(png("red"))
    old = time.time() - 40 * DAY
    os.utime(red, (old, old))
    edited_request(base, fake_backend[0])  # the same red image, retained again
    assert stored(images) == {sha(png("red"))}
    assert time.time() - red.stat().st_mtime < 60
    assert "removed 0 images" in cli("audit", "purge", "--config", config).stdout


def test_purge_removes_expired_images_and_the_chain_still_verifies(keeping, fake_backend) -> None:  # type: ignore[no-untyped-def]
    base, images, config = keeping("all")
    first = edited_request(base, fake_backend[0])
    fake_backend[0].size = 48  # different pixels, so a different blue file
    second = edited_request(base, fake_backend[0])
    assert len(stored(images)) == 4
    old_blue = images / first["rounds"][2]["images"][0]["image_ref"]
    old = time.time() - 31 * DAY
    os.utime(old_blue, (old, old))

    dry = cli("audit", "purge", "--config", config, "--dry-run")
    assert dry.returncode == 0 and "would remove 1 images" in dry.stdout and old_blue.exists()
    done = cli("audit", "purge", "--config", config)
    assert done.returncode == 0 and "removed 1 images" in done.stdout and "3 kept" in done.stdout
    assert not old_blue.exists() and len(stored(images)) == 3

    # The record still names the purged image by hash, and nothing in the chain changed.
    again = httpx.get(f"{base}/v1/guard/traces/{first['id']}",
                      headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()
    assert again == first
    verified = cli("audit", "verify", "--config", config)
    assert verified.returncode == 0 and "checked 2 traces" in verified.stdout
    assert second["rounds"][1]["images"][0]["image_ref"]

    everything = cli("audit", "purge", "--config", config, "--older-than-days", "0")
    assert "removed 3 images" in everything.stdout and stored(images) == set()
    assert cli("audit", "verify", "--config", config).returncode == 0


def test_an_image_link_copy_goes_once_its_link_expires(keeping, fake_backend) -> None:  # type: ignore[no-untyped-def]
    # Not retained by the policy: the copy behind a `response_format: url` link lives only as
    # long as the link, then a purge (or the proxy's own sweep) deletes it.
    # Long enough that a loaded machine still fetches the link in time; the test then waits
    # for the expiry the link itself states.
    base, images, config = keeping("none", image_store={"link_ttl_s": 4})
    fake_backend[0].plan += [["blue"]]
    r = httpx.post(f"{base}/v1/images/generations", timeout=30,
                   json={"prompt": "a quiet harbour", "response_format": "url"},
                   headers={"authorization": f"Bearer {CLIENT_KEY}"})
    assert r.status_code == 200, r.text
    link = r.json()["data"][0]["url"]
    served = httpx.get(link).content  # the image as delivered: with its C2PA manifest
    assert served[:4] == b"\x89PNG" and stored(images) == {sha(served)}
    trace = httpx.get(f"{base}/v1/guard/traces/{r.headers['x-guard-trace-id']}",
                      headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()
    assert trace["rounds"][1]["images"][0]["image_ref"] is None  # not retained
    expires = int(parse_qs(urlsplit(link).query)["exp"][0])
    time.sleep(max(0.0, expires - time.time()) + 1.1)
    assert httpx.get(link).status_code == 404
    done = cli("audit", "purge", "--config", config)
    assert "removed 1 images" in done.stdout and stored(images) == set()
    assert cli("audit", "verify", "--config", config).returncode == 0
