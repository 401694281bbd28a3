"""A relayed image travels as the backend sent it: `b64json.loads_raw` keeps its base64 as a view
of the body and `b64json.dumps_parts` writes it back without a serializer pass or a copy. What a client
reads must still be exactly what `orjson` would have written."""

from __future__ import annotations

import base64
import os

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from guard.support import b64json
from tests.conftest import CLIENT_KEY
from tests.servers import serve

LONG = base64.b64encode(os.urandom(6000))  # past the length at which strings are lifted


def test_loads_raw_keeps_long_base64_as_the_bodys_bytes() -> None:
    body = orjson.dumps({"created": 1, "data": [
        {"b64_json": LONG.decode(), "revised_prompt": "caf\u00e9 \"quoted\""},
        {"b64_json": "QUJD", "revised_prompt": "short"}]})
    parsed = b64json.loads_raw(body)
    lifted = parsed["data"][0]["b64_json"]
    assert isinstance(lifted, memoryview) and lifted.obj is body  # the body itself, not a copy
    assert lifted == LONG
    assert parsed["data"][0]["revised_prompt"] == "caf\u00e9 \"quoted\""
    assert parsed["data"][1] == {"b64_json": "QUJD", "revised_prompt": "short"}


@pytest.mark.parametrize("bad", [b"\x01", b"\xc3\xa9"])
def test_loads_raw_falls_back_to_a_full_parse_for_text_that_is_not_json_safe(bad: bytes) -> None:
    # A control character is invalid JSON (orjson refuses the body, and so must we); a non-ASCII
    # character is valid JSON and must come back as text, as orjson gives it.
    body = b'{"data":[{"b64_json":"' + LONG[:5000] + bad + LONG[5000:] + b'"}]}'
    try:
        expected = orjson.loads(body)
    except orjson.JSONDecodeError:
        with pytest.raises(orjson.JSONDecodeError):
            b64json.loads_raw(body)
        return
    assert b64json.loads_raw(body) == expected


def test_dumps_parts_writes_bytes_verbatim_and_the_rest_as_orjson_does() -> None:
    # A client's own string shaped like a placeholder stays the client's string.
    view = memoryview(b"  " + LONG)[2:]
    obj = {"created": 1, "prompt": "\x000", "data": [{"b64_json": view, "revised_prompt": "\x001"},
                                                      {"b64_json": b"QUJD"}]}
    parts = b64json.dumps_parts(obj)
    assert any(part is view for part in parts)  # the very view, not a copy joined into the body
    same = {**obj, "data": [{"b64_json": LONG.decode(), "revised_prompt": "\x001"},
                            {"b64_json": "QUJD"}]}
    assert b"".join(parts) == orjson.dumps(same)
    assert b64json.dumps({"a": 1}) == orjson.dumps({"a": 1})


def test_a_passthrough_answers_with_the_backends_base64_byte_for_byte(proxy) -> None:  # type: ignore[no-untyped-def]
    sent = base64.b64encode(os.urandom(300_000))  # not an image: passthrough never looks

    async def generate(request: Request) -> Response:
        return Response(b'{"created": 7, "data": [{"revised_prompt": "a \\"cat\\"\\u0000", '
                        b'"b64_json": "' + sent + b'"}]}', media_type="application/json")

    with serve(Starlette(routes=[Route("/v1/images/generations", generate,
                                       methods=["POST"])])) as url:
        base = proxy(guard={"enabled": False},
                     backends={"raw": {"kind": "openai-compatible", "api_base": url + "/v1"}},
                     routes={"*": {"backend": "raw"}})
        r = httpx.post(base + "/v1/images/generations",
                       json={"prompt": "a cat", "model": "gpt-image-1"},
                       headers={"authorization": f"Bearer {CLIENT_KEY}"}, timeout=30)
    assert r.status_code == 200
    assert int(r.headers["content-length"]) == len(r.content)
    body = orjson.loads(r.content)
    assert body["data"][0]["b64_json"].encode() == sent
    assert body["data"][0]["revised_prompt"] == 'a "cat"\x00'
    assert body["guard"]["decision"] == "passed"
