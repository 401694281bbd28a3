"""The two remote adapters (direct httpx and litellm) against a real local image server: the same
behaviour from both, as a client of the proxy would see it."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from adapters.litellm_backend import LiteLLMBackend
from guard.core.types import GenerationCall
from guard.http.errors import status_of
from guard.plugins import Backend, EditingBackend, build_backend
from guard.support.errors import (
    BackendError,
    BackendRateLimited,
    BackendRejected,
    BackendTimeout,
    ConfigError,
)
from tests.backend_servers import ImageServer, png
from tests.servers import free_port, serve

KINDS = ["openai-compatible", "litellm"]
CALL = GenerationCall(prompt="a lighthouse at dusk", n=2, model="sd", size="64x64")
FAST = {"backoff_s": 0.01, "max_backoff_s": 0.02}


@pytest.fixture
def server() -> Iterator[ImageServer]:
    backend = ImageServer()
    with serve(backend.app()) as url:
        backend.base_url = url
        yield backend


def make(kind: str, api_base: str, **options: Any) -> Backend:
    section: dict[str, Any] = {"kind": kind, "api_base": api_base, "timeout_s": 5, **options}
    if kind == "litellm":
        section.setdefault("model", "openai/sd")
    return build_backend("remote", section)


async def run(backend: Backend, call: GenerationCall = CALL) -> list[Any]:
    try:
        return await backend.generate(call)
    finally:
        await backend.aclose()


@pytest.mark.parametrize("kind", KINDS)
async def test_transient_500s_are_retried_until_success(server, kind) -> None:  # type: ignore[no-untyped-def]
    server.fail_first = 2
    images = await run(make(kind, server.base_url + "/v1", retry={"attempts": 3, **FAST}))
    assert len(images) == 2 and images[0].data == png()
    assert server.calls == 3  # the SDK under litellm retried nothing itself


@pytest.mark.parametrize("kind", KINDS)
async def test_attempts_are_bounded_then_502(server, kind) -> None:  # type: ignore[no-untyped-def]
    server.fail_first = 99
    with pytest.raises(BackendError) as info:
        await run(make(kind, server.base_url + "/v1", retry={"attempts": 3, **FAST}))
    assert (status_of(info.value), info.value.code) == (502, "backend_error")
    assert server.calls == 3


@pytest.mark.parametrize("kind", KINDS)
async def test_429_is_retried_then_passed_on_with_retry_after(server, kind) -> None:  # type: ignore[no-untyped-def]
    server.fail_first, server.fail_status, server.retry_after = 99, 429, "0"
    with pytest.raises(BackendRateLimited) as info:
        await run(make(kind, server.base_url + "/v1", retry={"attempts": 2, **FAST}))
    assert status_of(info.value) == 429 and info.value.code == "rate_limit_exceeded"
    assert info.value.headers == {"retry-after": "0"}
    assert server.calls == 2


@pytest.mark.parametrize("kind", KINDS)
async def test_retry_after_beyond_the_deadline_goes_straight_to_the_client(server, kind) -> None:  # type: ignore[no-untyped-def]
    server.fail_first, server.fail_status, server.retry_after = 99, 429, "30"
    started = time.perf_counter()
    with pytest.raises(BackendRateLimited) as info:
        await run(make(kind, server.base_url + "/v1",
                       retry={"attempts": 5, "deadline_s": 3, **FAST}))
    assert info.value.headers == {"retry-after": "30"}
    assert server.calls == 1 and time.perf_counter() - started < 2


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("said, passed_on", [
    ("Bearer sk-operator-key-0123456789", {}),        # an echo of the request: never passed on
    ("7, Authorization: sk-operator-key-0123456789", {}),
    ("12.2", {"retry-after": "13"}),                   # seconds, whole, rounded up
    ("Wed, 21 Oct 2015 07:28:00 GMT", {"retry-after": "0"}),  # a date, as seconds from now
])
async def test_only_a_parsed_retry_after_reaches_the_client(server, kind, said: str,  # type: ignore[no-untyped-def]
                                                            passed_on: dict[str, str]) -> None:
    server.fail_first, server.fail_status, server.retry_after = 99, 429, said
    with pytest.raises(BackendRateLimited) as info:
        await run(make(kind, server.base_url + "/v1",
                       retry={"attempts": 1, **FAST}))
    assert info.value.headers == passed_on
    assert "sk-operator" not in str(info.value.headers) + str(info.value.to_dict())


@pytest.mark.parametrize("kind", KINDS)
async def test_retry_after_within_the_deadline_is_honoured(server, kind) -> None:  # type: ignore[no-untyped-def]
    server.fail_first, server.fail_status, server.retry_after = 1, 429, "1"
    started = time.perf_counter()
    images = await run(make(kind, server.base_url + "/v1",
                            retry={"attempts": 2, "deadline_s": 4, **FAST}))
    assert len(images) == 2 and server.calls == 2
    assert time.perf_counter() - started >= 1.0


@pytest.mark.parametrize("kind", KINDS)
async def test_overall_deadline_bounds_retries(server, kind) -> None:  # type: ignore[no-untyped-def]
    server.fail_first = 999
    started = time.perf_counter()
    with pytest.raises(BackendError) as info:
        await run(make(kind, server.base_url + "/v1",
                       retry={"attempts": 20, "backoff_s": 0.1, "max_backoff_s": 0.1,
                              "deadline_s": 0.6}))
    elapsed = time.perf_counter() - started
    assert status_of(info.value) in (502, 504)
    assert elapsed < 1.0 and 2 <= server.calls < 20


@pytest.mark.parametrize("kind", KINDS)
async def test_overall_deadline_cuts_a_hanging_backend(server, kind) -> None:  # type: ignore[no-untyped-def]
    server.hang_s = 1.5
    started = time.perf_counter()
    with pytest.raises(BackendTimeout) as info:
        await run(make(kind, server.base_url + "/v1", retry={"deadline_s": 0.4}))
    assert status_of(info.value) == 504 and info.value.code == "backend_timeout"
    assert time.perf_counter() - started < 1.5 and server.calls == 1


@pytest.mark.parametrize("kind", KINDS)
async def test_read_timeout_is_504_and_not_retried(server, kind) -> None:  # type: ignore[no-untyped-def]
    server.hang_s = 1.5
    with pytest.raises(BackendTimeout):
        await run(make(kind, server.base_url + "/v1", timeout_s=0.3, retry={"attempts": 3}))
    assert server.calls == 1


class RetryWarnings(logging.Handler):
    """Notes the retry module's warnings: an attempt failed and another is coming."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.set()


@pytest.mark.parametrize("kind", KINDS)
async def test_a_backend_coming_back_up_is_retried_transparently(kind) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    server = ImageServer()
    stop = threading.Event()
    retrying = RetryWarnings()
    logging.getLogger("safeedit.retry").addHandler(retrying)

    def start_late() -> None:
        retrying.seen.wait(10)  # the backend was found down: only now does it come up
        with serve(server.app(), port=port):
            stop.wait(10)

    thread = threading.Thread(target=start_late, daemon=True)
    thread.start()
    try:
        images = await run(make(kind, f"http://127.0.0.1:{port}/v1",
                                retry={"attempts": 20, "backoff_s": 0.1, "max_backoff_s": 0.1,
                                       "deadline_s": 8}))
        assert len(images) == 2 and retrying.seen.is_set()
    finally:
        logging.getLogger("safeedit.retry").removeHandler(retrying)
        stop.set()
        thread.join()


@pytest.mark.parametrize("kind", KINDS)
async def test_backend_down_is_502_unavailable(kind) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BackendError) as info:
        await run(make(kind, f"http://127.0.0.1:{free_port()}/v1",
                       retry={"attempts": 2, **FAST}))
    assert (status_of(info.value), info.value.code) == (502, "backend_unavailable")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("limit", [2, None])
async def test_concurrency_limit_is_honoured(server, kind, limit) -> None:  # type: ignore[no-untyped-def]
    server.hang_s = 0.3
    backend = make(kind, server.base_url + "/v1", max_concurrency=limit)
    try:
        results = await asyncio.gather(*(backend.generate(CALL) for _ in range(6)))
    finally:
        await backend.aclose()
    assert [len(r) for r in results] == [2] * 6
    assert server.most_in_flight == (2 if limit else 6)


@pytest.mark.parametrize("kind", KINDS)
async def test_4xx_is_not_retried_and_keeps_the_backends_code(server, kind) -> None:  # type: ignore[no-untyped-def]
    server.fail_first, server.fail_status = 99, 400
    server.error_code, server.error_param = "invalid_size", "size"
    with pytest.raises(BackendRejected) as info:
        await run(make(kind, server.base_url + "/v1", retry={"attempts": 3, **FAST}))
    assert (status_of(info.value), info.value.code, info.value.param) == (400, "invalid_size", "size")
    assert server.calls == 1


@pytest.mark.parametrize("kind", KINDS)
async def test_credentials_come_from_the_environment_and_never_leak(server, kind, monkeypatch,
                                                                    caplog) -> None:  # type: ignore[no-untyped-def]
    secret = "sk-very-secret-0123456789"
    monkeypatch.setenv("TEST_BACKEND_KEY", secret)
    caplog.set_level(logging.DEBUG)
    images = await run(make(kind, server.base_url + "/v1", api_key_env="TEST_BACKEND_KEY"))
    assert images and server.headers[0]["authorization"] == f"Bearer {secret}"

    server.fail_first, server.fail_status = 99, 401
    with pytest.raises(BackendError) as info:
        await run(make(kind, server.base_url + "/v1", api_key_env="TEST_BACKEND_KEY",
                       retry={"attempts": 2, **FAST}))
    assert (status_of(info.value), info.value.code) == (502, "backend_auth_failed")
    assert server.calls == 2  # 1 success + 1 refusal: a bad key is not retried
    assert secret not in str(info.value.to_dict()) and secret not in caplog.text


@pytest.mark.parametrize("kind", KINDS)
async def test_missing_key_variable_or_unknown_option_is_a_config_error(kind, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    with pytest.raises(ConfigError, match="NOT_SET_ANYWHERE is not set"):
        make(kind, "http://127.0.0.1:1/v1", api_key_env="NOT_SET_ANYWHERE")
    with pytest.raises(ConfigError, match="max_concurency: unknown option"):
        make(kind, "http://127.0.0.1:1/v1", max_concurency=2)
    with pytest.raises(ConfigError, match=r"retry\.attempts"):
        make(kind, "http://127.0.0.1:1/v1", retry={"attempts": 0})


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model, sent", [("sd", "b64_json"), ("gpt-image-1", None)])
async def test_response_format_auto(server, kind, model, sent) -> None:  # type: ignore[no-untyped-def]
    options = {"model": f"openai/{model}"} if kind == "litellm" else {}
    await run(make(kind, server.base_url + "/v1", **options),
              GenerationCall(prompt="a cat", n=1, model=model))
    assert server.requests[0].get("response_format") == sent
    assert server.requests[0]["model"] == model


@pytest.mark.parametrize("kind", KINDS)
async def test_edit_sends_images_and_mask_as_multipart(server, kind) -> None:  # type: ignore[no-untyped-def]
    backend = make(kind, server.base_url + "/v1")
    assert isinstance(backend, EditingBackend)
    source, second, mask = png((255, 0, 0)), png((0, 0, 255)), png((0, 0, 0))
    try:
        images = await backend.edit(GenerationCall(prompt="add a hat", n=2, model="sd",
                                                   size="64x64"), [source, second], mask)
    finally:
        await backend.aclose()
    assert len(images) == 2 and images[0].media_type == "image/png"
    (request,) = server.requests
    assert request["prompt"] == "add a hat" and request["n"] == "2" and request["model"] == "sd"
    assert request["files"]["image[]"] == [source, second]
    assert request["files"]["mask"] == [mask]
    assert "input_fidelity" not in request  # not asked for, not sent


@pytest.mark.parametrize("kind", KINDS)
async def test_edit_sends_input_fidelity(server, kind) -> None:  # type: ignore[no-untyped-def]
    backend = make(kind, server.base_url + "/v1")
    assert isinstance(backend, EditingBackend)
    call = GenerationCall(prompt="add a hat", n=1, model="sd", input_fidelity="high")
    try:
        await backend.edit(call, [png()], None)
        await backend.generate(call)  # generations have no such parameter
    finally:
        await backend.aclose()
    edit, generation = server.requests
    assert edit["input_fidelity"] == "high" and edit["files"]["image[]"] == [png()]
    assert "input_fidelity" not in generation


@pytest.mark.parametrize("kind", KINDS)
async def test_edit_is_retried_like_generate(server, kind) -> None:  # type: ignore[no-untyped-def]
    server.fail_first = 1
    backend = make(kind, server.base_url + "/v1", retry={"attempts": 2, **FAST})
    assert isinstance(backend, EditingBackend)
    try:
        images = await backend.edit(GenerationCall(prompt="add a hat", n=1, model="sd"),
                                    [png()], None)
    finally:
        await backend.aclose()
    assert len(images) == 1 and server.calls == 2
    assert "mask" not in server.requests[1]["files"]


async def test_litellm_azure_model_string_reaches_the_deployment(server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TEST_AZURE_KEY", "azure-secret")
    backend = build_backend("azure", {
        "kind": "litellm", "model": "azure/my-dalle", "api_base": server.base_url,
        "api_version": "2024-02-01", "api_key_env": "TEST_AZURE_KEY"})
    images = await run(backend, GenerationCall(prompt="a cat", n=1, model="dall-e-3"))
    assert images[0].data == png()
    (request,) = server.requests
    assert request["path"] == "/openai/deployments/my-dalle/images/generations"
    assert request["query"] == {"api-version": "2024-02-01"}
    assert request["response_format"] == "b64_json"
    assert server.headers[0]["api-key"] == "azure-secret"


def test_litellm_refuses_secrets_in_plain_config() -> None:
    with pytest.raises(ConfigError, match="aws_secret_access_key in `extra` looks like a secret"):
        build_backend("bedrock", {"kind": "litellm", "model": "bedrock/amazon.titan-image-v2",
                                  "extra": {"aws_secret_access_key": "AKIA-plain-text",
                                            "aws_region_name": "us-east-1"}})


def test_litellm_reads_provider_credentials_from_named_variables(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TEST_AWS_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("TEST_AWS_SECRET", "wJalrXUtnFEMI")
    backend = build_backend("bedrock", {
        "kind": "litellm", "model": "bedrock/amazon.titan-image-generator-v2:0",
        "credentials_env": {"aws_access_key_id": "TEST_AWS_ID",
                            "aws_secret_access_key": "TEST_AWS_SECRET"},
        "extra": {"aws_region_name": "eu-west-1"}})
    assert isinstance(backend, LiteLLMBackend)
    kwargs = backend._kwargs(GenerationCall(prompt="a cat", n=1), ())
    assert kwargs["aws_access_key_id"] == "AKIDEXAMPLE"
    assert kwargs["aws_secret_access_key"] == "wJalrXUtnFEMI"
    assert kwargs["aws_region_name"] == "eu-west-1"
    assert "extra_body" not in kwargs  # Bedrock answers base64 without being asked
    assert "AKIDEXAMPLE" not in repr(backend.options)
