"""A backend's error text is untrusted: one that echoes its request echoes the operator's key.

A real local image server answers every request with an error that repeats the request's
Authorization header and body. Through the proxy (the real openai SDK, JSON and streams, both
remote adapters), the key must show up nowhere: not in the client's error, not in the SSE error
event, not in the stored trace, not in `safeedit audit export`, not in the proxy's logs. The
client reads the guard's own message naming the backend's status; the trace keeps the backend's
text, redacted, for the operator.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from guard.core.config import hash_key, load_config
from guard.support.errors import ConfigError
from tests.conftest import ADMIN_KEY, CLIENT_KEY, test_keys
from tests.servers import serve

ROOT = Path(__file__).resolve().parent.parent
KEY_ENV = "SAFEEDIT_TEST_ECHO_BACKEND_KEY"
# No known token shape: only the adapter passing its own secret to the redaction removes it
# where the echo has no header name in front of it.
KEY = "opkey-7f3a9c1e5b2d4a68e0"
BACKENDS = {"openai": "oa", "lt": "lt"}  # backend name -> model prefix routed to it


async def echo(request: Request) -> Response:
    """Fails as the request's model says (`<prefix>-400`, `-500`, `-cpv`), repeating the request."""
    body = (await request.body()).decode()
    auth = request.headers.get("authorization", "")
    said = (f"headers: authorization={auth}; token seen {auth.removeprefix('Bearer ')}; "
            f"body={body}")
    outcome = json.loads(body)["model"].rsplit("-", 1)[1]
    if outcome == "500":
        return PlainTextResponse(f"upstream exploded; {said}", 500)
    code = "content_policy_violation" if outcome == "cpv" else "invalid_size"
    return JSONResponse({"error": {"message": f"invalid request; {said}", "code": code,
                                   "type": "invalid_request_error", "param": auth}}, 400)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """The proxy in front of the echoing server through both adapters; (base URL, config)."""
    from proxy import create_app

    tmp = tmp_path_factory.mktemp("backend_errors")
    os.environ[KEY_ENV] = KEY
    try:
        with serve(Starlette(routes=[Route("/v1/images/generations", echo,
                                           methods=["POST"])])) as echo_url:
            common = {"api_base": echo_url + "/v1", "api_key_env": KEY_ENV, "timeout_s": 5,
                      "retry": {"attempts": 1}}
            raw = {
                "keys": test_keys(),
                "backends": {"openai": {"kind": "openai-compatible", **common},
                             "lt": {"kind": "litellm", **common}},
                "routes": {f"{prefix}-*": {"backend": name} for name, prefix in BACKENDS.items()},
                "judge": {"kind": "marker"},
                "audit": {"kind": "sqlite", "path": str(tmp / "audit.db")},
            }
            config_path = tmp / "config.yaml"
            config_path.write_text(yaml.safe_dump(raw))
            with serve(create_app(load_config(config_path))) as base:
                yield base, config_path
    finally:
        os.environ.pop(KEY_ENV, None)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> Iterator[None]:
    """Everything the proxy logs or prints during the test must be free of the key."""
    caplog.set_level(logging.DEBUG)
    yield
    formatter = logging.Formatter()  # with tracebacks, chained exceptions included
    logged = "\n".join(formatter.format(record) for record in caplog.get_records("call"))
    out, err = capfd.readouterr()
    assert "POST" in logged and KEY not in logged
    assert KEY not in out and KEY not in err


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=CLIENT_KEY, max_retries=0)


def stored_trace(base: str, trace_id: str) -> dict[str, Any]:
    r = httpx.get(f"{base}/v1/guard/traces/{trace_id}",
                  headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 200, r.text
    assert KEY not in r.text
    return dict(r.json())


def fail(base: str, model: str, stream: bool) -> tuple[dict[str, Any], str]:
    """Ask for an image the backend will refuse; (the error object as the client got it, the
    client's whole view of it as text)."""
    if stream:
        with pytest.raises(openai.APIError) as info:
            list(client(base).images.generate(model=model, prompt="a lighthouse", stream=True))
        body: dict[str, Any] = info.value.body  # type: ignore[assignment]
        return body, f"{info.value} {json.dumps(body)}"
    with pytest.raises(openai.APIStatusError) as status_info:
        client(base).images.generate(model=model, prompt="a lighthouse")
    response = status_info.value.response
    error = dict(response.json()["error"])
    error["status"] = response.status_code
    return error, f"{status_info.value} {response.text} {dict(response.headers)}"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("status, code, message, client_status", [
    (400, "invalid_size", "The image backend '{}' rejected the request (HTTP 400).", 400),
    (500, "backend_error", "The image backend '{}' failed (HTTP 500).", 502),
])
def test_an_echoed_key_reaches_neither_client_nor_trace(
        guarded: tuple[str, Path], logs: None, backend: str, stream: bool, status: int,
        code: str, message: str, client_status: int) -> None:
    base, _ = guarded
    error, seen = fail(base, f"{BACKENDS[backend]}-{status}", stream)
    assert KEY not in seen
    assert error["message"] == message.format(backend)
    assert error["code"] == code
    assert error["param"] is None  # the backend's `param` was the echoed header
    if not stream:
        assert error["status"] == client_status
    trace = stored_trace(base, error["trace_id"])
    assert trace["decision"] == "failed" and trace["backend"] == backend
    assert trace["error"]["message"] == message.format(backend)
    detail = trace["error"]["detail"]
    # What the backend said is still there for the operator, minus the key.
    assert "[redacted]" in detail and "a lighthouse" in detail
    assert ("upstream exploded" if status == 500 else "invalid request") in detail


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_a_backends_content_policy_refusal_stays_a_refusal(
        guarded: tuple[str, Path], logs: None, backend: str) -> None:
    base, _ = guarded
    error, seen = fail(base, f"{BACKENDS[backend]}-cpv", stream=False)
    assert KEY not in seen
    assert (error["status"], error["code"]) == (400, "content_policy_violation")
    assert error["message"] == (f"The image backend '{backend}' refused the prompt under its own "
                                "content policy (HTTP 400).")
    trace = stored_trace(base, error["trace_id"])
    assert trace["decision"] == "refused"
    assert "[redacted]" in trace["error"]["detail"]


def test_audit_export_holds_no_key(guarded: tuple[str, Path]) -> None:
    base, config = guarded
    for prefix in BACKENDS.values():
        fail(base, f"{prefix}-400", stream=False)
    result = subprocess.run([sys.executable, "-m", "guard.cli", "audit", "export", "--config",
                             str(config)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env=os.environ.copy())
    assert result.returncode == 0, result.stderr
    traces = [json.loads(line) for line in result.stdout.splitlines()]
    failed = [t for t in traces if (t.get("error") or {}).get("detail")]
    assert len(failed) >= 2 and {t["backend"] for t in failed} >= set(BACKENDS)
    assert KEY not in result.stdout and KEY not in result.stderr
    assert all("[redacted]" in t["error"]["detail"] for t in failed)


def test_two_ids_for_one_key_are_refused_at_load() -> None:
    keys = [{"id": "app", "hash": hash_key("sk-shared"), "role": "client"},
            {"id": "ops", "hash": hash_key("sk-shared"), "role": "admin"},
            {"id": "other", "hash": hash_key("sk-other")}]
    with pytest.raises(ConfigError, match="app and ops") as info:
        load_config(None, {"keys": keys})
    assert "other" not in info.value.message
    with pytest.raises(ConfigError, match="repeated: app"):
        load_config(None, {"keys": [keys[0], {**keys[2], "id": "app"}]})
