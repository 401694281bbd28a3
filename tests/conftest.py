"""Shared fixtures: a real fake image backend and the proxy, each served by uvicorn on 127.0.0.1."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
# The audit log's signing key (guard.audit.logkeys): PostgreSQL stores need a configured one, and
# subprocesses (the CLI, writers) inherit it. Tests of the key made at first start unset it.
LOG_KEYS = "test-log:" + "dGVzdC1sb2cta2V5LW5vdC1mb3ItcHJvZHVjdGlvbiE="  # 32 bytes, base64
os.environ.setdefault("SAFEEDIT_LOG_SIGNING_KEYS", LOG_KEYS)

from guard.core.config import Config, hash_key, load_config  # noqa: E402
from guard.plugins import judges  # noqa: E402
from tests.fake_backend import FakeBackend  # noqa: E402
from tests.judge_server import judge_server, judge_server_process  # noqa: E402, F401
from tests.servers import serve  # noqa: E402

# judge_server(_process) above are fixtures, for the tests that drive a `remote` judge.
judges.register("marker", "tests.marker_judge:MarkerJudge.from_config")

ADMIN_KEY, CLIENT_KEY, AUDITOR_KEY, OTHER_AUDITOR_KEY = (
    "sk-admin-test", "sk-client-test", "sk-auditor-test", "sk-auditor-other")


def test_keys() -> list[dict[str, Any]]:
    return [
        {"id": "admin", "hash": hash_key(ADMIN_KEY), "role": "admin", "tenant": "acme"},
        {"id": "app", "hash": hash_key(CLIENT_KEY), "role": "client", "tenant": "acme"},
        {"id": "audit", "hash": hash_key(AUDITOR_KEY), "role": "auditor", "tenant": "acme"},
        {"id": "audit2", "hash": hash_key(OTHER_AUDITOR_KEY), "role": "auditor",
         "tenant": "globex"},
    ]


@pytest.fixture
def fake_backend() -> Iterator[tuple[FakeBackend, str]]:
    backend = FakeBackend()
    with serve(backend.app()) as url:
        yield backend, url + "/v1"


ProxyFactory = Callable[..., str]


@pytest.fixture
def proxy(tmp_path: Path, fake_backend: tuple[FakeBackend, str]) -> Iterator[ProxyFactory]:
    """Start the proxy (uvicorn, 127.0.0.1) in front of the fake backend; returns its base URL.

    Keyword overrides replace top-level config sections; `backend_options` adds to the
    fake backend's section; `span_exporter` is passed to the app.
    """
    from proxy import create_app

    stack = ExitStack()

    def start(*, backend_options: dict[str, Any] | None = None, span_exporter: Any = None,
              **overrides: Any) -> str:
        _, backend_url = fake_backend
        raw: dict[str, Any] = {
            "keys": test_keys(),
            "backends": {"fake": {"kind": "openai-compatible", "api_base": backend_url,
                                  "timeout_s": 5, **(backend_options or {})}},
            "routes": {"*": {"backend": "fake"}},
            "judge": {"kind": "marker"},
            "audit": {"kind": "sqlite", "path": str(tmp_path / "audit.db")},
            "policy_paths": [str(tmp_path)],
        }
        raw.update(overrides)
        config: Config = load_config(None, raw)
        return stack.enter_context(serve(create_app(config, span_exporter=span_exporter)))

    yield start
    stack.close()


# A policy for end-to-end tests, with its own words so that tests do not depend on the shipped
# term lists: "bloodbath" is violence (edited), "hateflag" is hate (refused).
E2E_POLICY = """
id: e2e
version: 7
extends: default
terms:
  violence:
    strong: [bloodbath]
    rewrites: {bloodbath: water balloon party}
    append: ""
  hate:
    strong: [hateflag]
"""


@pytest.fixture
def e2e(proxy: ProxyFactory, tmp_path: Path,
        fake_backend: tuple[FakeBackend, str]) -> tuple[str, FakeBackend]:
    """The proxy in front of the fake backend under the E2E_POLICY; (base URL, backend)."""
    write_policy(tmp_path, E2E_POLICY)
    return proxy(policy="e2e"), fake_backend[0]


def write_policy(directory: Path, text: str) -> None:
    import yaml

    raw = yaml.safe_load(text)
    (directory / f"{raw['id']}.yaml").write_text(text)


# --- the tiny random-weight VLM judge model (tests/tiny_vlm.py), built once per session ---------

@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_vlm import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm") / "model")


# --- tiny models of the real judge families (tests/tiny_families.py), built once per session --

@pytest.fixture(scope="session")
def tiny_qwen2_5_vl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_families import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen2_5_vl") / "Qwen2.5-VL-tiny")


@pytest.fixture(scope="session")
def tiny_qwen2_vl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_families import build_tiny_qwen2_vl

    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen2_vl") / "Qwen2-VL-tiny")


@pytest.fixture(scope="session")
def ipr_adapter_dir(tiny_qwen2_5_vl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_families import build_ipr_adapter

    return build_ipr_adapter(tiny_qwen2_5_vl_dir, tmp_path_factory.mktemp("ipr") / "ipr-tiny")


@pytest.fixture(scope="session")
def tiny_shieldgemma2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_families import build_tiny_shieldgemma2

    return build_tiny_shieldgemma2(tmp_path_factory.mktemp("shieldgemma2") / "shieldgemma-2-tiny")


@pytest.fixture(scope="session")
def tiny_llava_onevision_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_families import build_tiny_llava_onevision

    return build_tiny_llava_onevision(tmp_path_factory.mktemp("llava_ov") / "LlavaGuard-tiny")
