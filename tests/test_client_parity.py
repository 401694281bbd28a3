"""OpenAI parity through clients nobody here wrote: openai-python, litellm and openai-node
against the proxy on uvicorn. What they read by default (`url` for dall-e-2, dall-e-3 and no
model; base64 for gpt-image-*) and how a refusal reaches them (litellm:
ContentPolicyViolationError)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any, Literal

import httpx
import litellm
import openai
import pytest

from tests.conftest import CLIENT_KEY
from tests.test_proxy import sdk, trace

PNG = b"\x89PNG\r\n\x1a\n"
REFUSED = "a poster with a hateflag on it"  # E2E_POLICY: hate, a refuse category


def named(model: str | None) -> dict[str, Any]:
    """The SDK's keyword for a model, or none at all: a request that names no model."""
    return {"model": model} if model else {}


def form_of(result: openai.types.ImagesResponse) -> str:
    image = (result.data or [])[0]
    return {(True, False): "url", (False, True): "b64_json"}.get(
        (image.url is not None, image.b64_json is not None), "neither or both")


def downloaded(url: str) -> bytes:
    r = httpx.get(url, timeout=10)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    return r.content


# --- openai-python: the default response_format per model --------------------------------------

@pytest.mark.parametrize("model", ["dall-e-2", "dall-e-3", None])
def test_dall_e_and_no_model_answer_a_link_by_default(e2e, model: str | None) -> None:  # type: ignore[no-untyped-def]
    base, backend = e2e
    result = sdk(base).images.generate(prompt="a bowl of fruit", **named(model))
    assert form_of(result) == "url"
    image = (result.data or [])[0]
    assert image.url is not None and image.url.startswith(base + "/v1/guard/images/")
    assert downloaded(image.url).startswith(PNG)
    assert backend.requests[0]["response_format"] == "b64_json"  # the proxy keeps the bytes


@pytest.mark.parametrize("model", ["gpt-image-1", "gpt-image-1-mini", "my-sd"])
def test_gpt_image_and_other_models_answer_base64_by_default(e2e, model: str) -> None:  # type: ignore[no-untyped-def]
    base, _ = e2e
    result = sdk(base).images.generate(prompt="a bowl of fruit", model=model)
    assert form_of(result) == "b64_json"


def test_an_explicit_response_format_wins(e2e) -> None:  # type: ignore[no-untyped-def]
    base, _ = e2e
    client = sdk(base)
    result = client.images.generate(prompt="a lamp", model="dall-e-3", response_format="b64_json")
    assert form_of(result) == "b64_json"
    result = client.images.generate(prompt="a lamp", model="my-sd", response_format="url")
    assert form_of(result) == "url"
    assert downloaded((result.data or [])[0].url or "").startswith(PNG)


@pytest.mark.parametrize("default, expected", [
    ("b64_json", {"dall-e-3": "b64_json", None: "b64_json", "my-sd": "b64_json",
                  "gpt-image-1": "b64_json"}),
    ("url", {"dall-e-3": "url", None: "url", "my-sd": "url", "gpt-image-1": "b64_json"}),
])
def test_a_deployment_sets_its_own_default(proxy, default: str,  # type: ignore[no-untyped-def]
                                           expected: dict[str | None, str]) -> None:
    client = sdk(proxy(server={"default_response_format": default}))
    answered = {model: form_of(client.images.generate(prompt="a lamp", **named(model)))
                for model in expected}
    assert answered == expected
    other: Literal["url", "b64_json"] = "url" if default == "b64_json" else "b64_json"
    assert form_of(client.images.generate(prompt="a lamp", model="dall-e-3",
                                          response_format=other)) == other


def test_openai_python_sees_a_refusal_as_content_policy_violation(e2e) -> None:  # type: ignore[no-untyped-def]
    base, _ = e2e
    with pytest.raises(openai.BadRequestError) as info:
        sdk(base).images.generate(prompt=REFUSED, model="dall-e-3")
    assert info.value.code == "content_policy_violation"
    assert info.value.type == "invalid_request_error"


# --- litellm: image calls map errors by the message alone ---------------------------------------

def _litellm_generate(base: str, prompt: str, run_async: bool) -> Any:
    kw: dict[str, Any] = {"model": "openai/dall-e-3", "api_base": base + "/v1",
                          "api_key": CLIENT_KEY, "prompt": prompt, "max_retries": 0}
    if run_async:
        import asyncio

        return asyncio.run(litellm.aimage_generation(**kw))
    return litellm.image_generation(**kw)


@pytest.mark.parametrize("run_async", [False, True], ids=["image_generation", "aimage_generation"])
def test_litellm_raises_content_policy_violation_for_a_refusal(e2e, run_async: bool) -> None:  # type: ignore[no-untyped-def]
    base, backend = e2e
    with pytest.raises(litellm.ContentPolicyViolationError) as info:
        _litellm_generate(base, REFUSED, run_async)
    assert info.value.status_code == 400 and backend.requests == []
    assert "hate" in str(info.value)
    trace_id = info.value.response.headers["x-guard-trace-id"]
    assert trace(base, trace_id)["decision"] == "refused"


@pytest.mark.parametrize("run_async", [False, True], ids=["image_generation", "aimage_generation"])
def test_litellm_gets_a_link_from_dall_e_3(e2e, run_async: bool) -> None:  # type: ignore[no-untyped-def]
    base, _ = e2e
    result = _litellm_generate(base, "a red bicycle", run_async)
    assert result.data[0].b64_json is None
    assert downloaded(result.data[0].url).startswith(PNG)


# --- openai-node: the npm package, installed once per session ----------------------------------

NODE_SCRIPT = r"""
import OpenAI from "openai";
const [base, key, calls] = process.argv.slice(2);
const client = new OpenAI({ baseURL: base + "/v1", apiKey: key, maxRetries: 0 });
const out = [];
for (const params of JSON.parse(calls)) {
  try {
    const { data } = await client.images.generate(params);
    const image = data[0];
    let head = null;
    if (image.url) {
      const bytes = new Uint8Array(await (await fetch(image.url)).arrayBuffer());
      head = Buffer.from(bytes.slice(0, 8)).toString("hex");
    }
    out.push({ ok: true, url: image.url ?? null, b64: image.b64_json ? image.b64_json.length : 0,
               head });
  } catch (err) {
    out.push({ ok: false, name: err.constructor.name, status: err.status ?? null,
               code: err.code ?? null, type: err.type ?? null });
  }
}
console.log(JSON.stringify(out));
"""


@pytest.fixture(scope="session")
def openai_node(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the `openai` npm package installed and the script that drives it."""
    if not (shutil.which("node") and shutil.which("npm")):
        pytest.skip("node and npm are not installed: the openai-node client is not tested")
    folder = tmp_path_factory.mktemp("openai-node")
    (folder / "package.json").write_text('{"private": true, "type": "module"}')
    try:
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error",
                        "openai@6"], cwd=folder, check=True, capture_output=True, timeout=180)
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"`npm install openai` failed (no npm registry?): {exc}")
    (folder / "generate.mjs").write_text(NODE_SCRIPT)
    return folder


@pytest.mark.slow
def test_openai_node_reads_each_models_default_and_a_refusal(e2e, openai_node: Path) -> None:  # type: ignore[no-untyped-def]
    base, _ = e2e
    calls = [{"prompt": "a lamp", "model": "dall-e-3"}, {"prompt": "a lamp"},
             {"prompt": "a lamp", "model": "gpt-image-1"}, {"prompt": REFUSED, "model": "dall-e-3"}]
    run = subprocess.run(["node", "generate.mjs", base, CLIENT_KEY, json.dumps(calls)],
                         cwd=openai_node, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    dall_e_3, no_model, gpt_image, refused = json.loads(run.stdout)
    for linked in (dall_e_3, no_model):
        assert linked["ok"] and linked["url"] and linked["b64"] == 0
        assert linked["head"] == PNG.hex()
    assert gpt_image["ok"] and gpt_image["url"] is None and gpt_image["b64"] > 0
    assert refused == {"ok": False, "name": "BadRequestError", "status": 400,
                       "code": "content_policy_violation", "type": "invalid_request_error"}
