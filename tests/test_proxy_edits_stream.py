"""/v1/images/edits and streaming through the real openai SDK."""

from __future__ import annotations

import io
import time

import httpx
import openai
import pytest
from PIL import Image

from tests.conftest import ADMIN_KEY, CLIENT_KEY, E2E_POLICY, write_policy
from tests.fake_backend import png
from tests.test_proxy import check_schema, sdk, trace


def png_file(colour: str = "blue", name: str = "in.png") -> tuple[str, bytes, str]:
    return (name, png(colour), "image/png")


def test_edit_safe_image_passes(e2e) -> None:  # type: ignore[no-untyped-def]
    base, backend = e2e
    raw = sdk(base).images.with_raw_response.edit(image=png_file(), prompt="add a hat",
                                                    model="gpt-image-1")
    result = raw.parse()
    assert result.data[0].b64_json and result.data[0].revised_prompt is None
    assert backend.requests[0]["edit"] and backend.requests[0]["images"] == [png("blue")]
    t = trace(base, raw.headers["x-guard-trace-id"])
    assert t["endpoint"] == "/v1/images/edits" and t["decision"] == "passed"
    assert len(t["request"]["input_images"][0]) == 64  # a hash, never the bytes


def test_edit_unsafe_output_is_refined_and_edited_again(e2e) -> None:  # type: ignore[no-untyped-def]
    base, backend = e2e
    backend.plan = [["red"]]
    result = sdk(base).images.edit(image=[png_file(), png_file("blue", "b.png")],
                                   prompt="make it dramatic")
    assert result.data[0].revised_prompt and result.data[0].revised_prompt != "make it dramatic"
    assert [r["prompt"] for r in backend.requests] == ["make it dramatic",
                                                       result.data[0].revised_prompt]
    # regenerate (the default) edits the client's own images again, not the unsafe output
    assert backend.requests[1]["images"] == [png("blue"), png("blue")]


def test_refine_mode_edit_repairs_the_unsafe_image(proxy, tmp_path, fake_backend) -> None:  # type: ignore[no-untyped-def]
    write_policy(tmp_path, E2E_POLICY)
    write_policy(tmp_path, "id: repair\nversion: 1\nextends: e2e\nrefine_mode: edit\n")
    base = proxy(policy="repair")
    backend = fake_backend[0]
    backend.plan = [["red"]]
    result = sdk(base).images.generate(prompt="a street at night")
    assert result.data[0].revised_prompt
    assert backend.requests[1]["edit"] and backend.requests[1]["images"] == [png("red")]


def test_edit_refused_prompt_never_reaches_backend(e2e) -> None:  # type: ignore[no-untyped-def]
    base, backend = e2e
    with pytest.raises(openai.BadRequestError) as info:
        sdk(base).images.edit(image=png_file(), prompt="add a hateflag")
    assert info.value.code == "content_policy_violation"
    assert backend.requests == []


@pytest.mark.parametrize("files, data, param, code", [
    ({"prompt": (None, "x")}, {}, "image", "missing_required_parameter"),
    ({"image": ("a.png", b"not an image", "image/png")}, {"prompt": "x"}, "image",
     "invalid_image_format"),
    ({"image": png_file()}, {}, "prompt", "missing_required_parameter"),
    ({"image": png_file()}, {"prompt": "x", "n": "lots"}, "n", "invalid_type"),
    ({"image": png_file(), "mask": ("m.png", b"GIF89a....", "image/gif")}, {"prompt": "x"},
     "mask", "invalid_image_format"),
])
def test_edit_bad_input(e2e, files, data, param, code) -> None:  # type: ignore[no-untyped-def]
    base, backend = e2e
    r = httpx.post(f"{base}/v1/images/edits", files=files, data=data,
                   headers={"authorization": f"Bearer {CLIENT_KEY}"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["code"] == code
    check_schema("ErrorResponse", r.json())
    assert trace(base, r.headers["x-guard-trace-id"])["status"] == 400
    assert backend.requests == []


def test_edit_decompression_bomb_is_refused(e2e) -> None:  # type: ignore[no-untyped-def]
    base, _ = e2e
    out = io.BytesIO()
    Image.new("1", (20000, 20000)).save(out, format="PNG")  # tiny file, 400 megapixels
    r = httpx.post(f"{base}/v1/images/edits", files={"image": ("bomb.png", out.getvalue())},
                   data={"prompt": "x"}, headers={"authorization": f"Bearer {CLIENT_KEY}"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "image_too_large"


def test_edit_not_multipart(e2e) -> None:  # type: ignore[no-untyped-def]
    base, _ = e2e
    r = httpx.post(f"{base}/v1/images/edits", json={"prompt": "x"},
                   headers={"authorization": f"Bearer {CLIENT_KEY}"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_content_type"


def test_stream_sends_only_the_judged_final_image(e2e) -> None:  # type: ignore[no-untyped-def]
    base, backend = e2e
    backend.plan = [["red"]]
    stream = sdk(base).images.generate(prompt="a street at night", stream=True,
                                       partial_images=2)
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.completed"]
    event = events[0]
    assert event.b64_json and len(backend.requests) == 2
    check_schema("ImageGenCompletedEvent", event.model_dump(exclude_none=True))
    assert trace(base, event.guard["trace_id"])["decision"] == "edited"  # type: ignore[attr-defined]


def test_stream_refusal_is_an_error_event(e2e) -> None:  # type: ignore[no-untyped-def]
    base, backend = e2e
    backend.plan = [["green"]]
    with pytest.raises(openai.APIError) as info:
        list(sdk(base).images.generate(prompt="a rally", stream=True))
    assert info.value.body["code"] == "content_policy_violation"  # type: ignore[index]
    assert trace(base, info.value.body["trace_id"])["decision"] == "refused"  # type: ignore[index]


def test_stream_edit(e2e) -> None:  # type: ignore[no-untyped-def]
    base, _ = e2e
    events = list(sdk(base).images.edit(image=png_file(), prompt="add a hat", stream=True))
    assert [e.type for e in events] == ["image_edit.completed"]


def test_stream_closed_by_the_client_still_leaves_a_trace(e2e) -> None:  # type: ignore[no-untyped-def]
    base, backend = e2e
    backend.mode = "hang"
    with httpx.stream("POST", f"{base}/v1/images/generations", timeout=30,
                      json={"prompt": "a cat", "stream": True},
                      headers={"authorization": f"Bearer {CLIENT_KEY}"}) as r:
        trace_id = r.headers["x-guard-trace-id"]
        while not backend.requests:
            time.sleep(0.02)
    deadline = time.monotonic() + 10
    while True:
        found = httpx.get(f"{base}/v1/guard/traces/{trace_id}",
                          headers={"authorization": f"Bearer {ADMIN_KEY}"})
        if found.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert found.status_code == 200
    assert found.json()["status"] == 499 and found.json()["decision"] == "failed"
