"""Which policy a request runs under, through the real proxy: the key's own policy, else its
tenant's, else the default; a client picks one with x-guard-policy only if its key may."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from guard.core.config import hash_key
from guard.core.policy.loader import load_file
from tests.conftest import ADMIN_KEY, write_policy

HOUSE = """\
id: house
version: 5
categories:
  violence: {threshold: 0.6, action: edit}
  hate: {threshold: 0.5, action: refuse}
terms:
  violence: {strong: [brawl], rewrites: {brawl: dance}}
"""
RELAXED = "id: relaxed\nversion: 2\nextends: house\ncategories:\n  violence: {threshold: 0.99}\n"
TIGHT = "id: tight\nversion: 9\nextends: house\ncategories:\n  violence: {action: refuse}\n"

KEYS: dict[str, tuple[str, str, dict[str, Any]]] = {  # key -> (id, tenant, extra)
    "sk-acme": ("acme-app", "acme", {}),
    "sk-globex": ("globex-app", "globex", {}),
    "sk-initech": ("initech-app", "initech", {}),
    "sk-pinned": ("pinned-app", "acme", {"policy": "tight"}),
    "sk-chooser": ("chooser-app", "acme", {"may_choose_policy": True}),
}
PROMPT = "a bar brawl at night"


@pytest.fixture
def base(proxy, tmp_path: Path) -> str:  # type: ignore[no-untyped-def]
    for text in (HOUSE, RELAXED, TIGHT):
        write_policy(tmp_path, text)
    keys: list[dict[str, Any]] = [
        {"id": "admin", "hash": hash_key(ADMIN_KEY), "role": "admin", "tenant": "acme"},
        *({"id": kid, "hash": hash_key(key), "role": "client", "tenant": tenant, **extra}
          for key, (kid, tenant, extra) in KEYS.items())]
    url: str = proxy(keys=keys, policy="house", tenants={"acme": "relaxed", "globex": "tight"},
                     policy_reload_s=0)
    return url


def generate(base: str, key: str, policy: str | None = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"}
    if policy is not None:
        headers["x-guard-policy"] = policy
    return httpx.post(f"{base}/v1/images/generations", json={"prompt": PROMPT},
                      headers=headers, timeout=30)


def recorded_policy(base: str, response: httpx.Response) -> dict[str, Any]:
    r = httpx.get(f"{base}/v1/guard/traces/{response.headers['x-guard-trace-id']}",
                  headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 200, r.text
    return r.json()["policy"]  # type: ignore[no-any-return]


def outcome(r: httpx.Response) -> str:
    if r.status_code == 200:
        return "edited" if r.json()["data"][0].get("revised_prompt") else "passed"
    return r.json()["error"]["code"]


def test_tenant_key_and_default_policies_decide_the_same_prompt_differently(
        base: str, tmp_path: Path, fake_backend) -> None:  # type: ignore[no-untyped-def]
    seen = {key: generate(base, key) for key in ("sk-acme", "sk-globex", "sk-initech",
                                                 "sk-pinned")}
    assert {k: outcome(r) for k, r in seen.items()} == {
        "sk-acme": "passed",                      # tenant acme -> relaxed
        "sk-globex": "content_policy_violation",  # tenant globex -> tight
        "sk-initech": "edited",                   # no tenant mapping -> default house
        "sk-pinned": "content_policy_violation",  # key's own policy wins over its tenant's
    }
    assert seen["sk-initech"].json()["data"][0]["revised_prompt"] == "a bar dance at night"
    policies = {k: recorded_policy(base, r) for k, r in seen.items()}
    assert {k: (p["id"], p["version"]) for k, p in policies.items()} == {
        "sk-acme": ("relaxed", 2), "sk-globex": ("tight", 9), "sk-initech": ("house", 5),
        "sk-pinned": ("tight", 9)}
    # The sha256 a compliance officer gets from `safeedit policy validate` is the trace's.
    assert policies["sk-acme"]["sha256"] == load_file(tmp_path / "relaxed.yaml") \
        .policies["relaxed"].sha256
    # Refused requests never reached the backend: only the two served prompts did.
    assert fake_backend[0].prompts == [PROMPT, "a bar dance at night"]


def test_a_key_allowed_to_choose_picks_its_policy_per_request(base: str) -> None:
    chosen = generate(base, "sk-chooser", policy="tight")
    assert outcome(chosen) == "content_policy_violation"
    assert recorded_policy(base, chosen)["id"] == "tight"
    assert outcome(generate(base, "sk-chooser")) == "passed"  # its tenant's policy otherwise


def test_a_client_never_picks_its_own_policy_unless_its_key_may(
        base: str, fake_backend) -> None:  # type: ignore[no-untyped-def]
    r = generate(base, "sk-acme", policy="relaxed")
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "insufficient_permissions"
    assert r.json()["error"]["type"] == "permission_error"
    assert fake_backend[0].requests == []
    unknown = generate(base, "sk-chooser", policy="no-such-policy")
    assert unknown.status_code == 400
    assert unknown.json()["error"]["param"] == "x-guard-policy"
