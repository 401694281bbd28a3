"""The base64-lifting JSON parser gives exactly what orjson gives, on ordinary and odd inputs."""

from __future__ import annotations

import base64
import os

import orjson
import pytest

from guard import b64json

BIG = base64.b64encode(os.urandom(30_000)).decode()


@pytest.mark.parametrize("body", [
    orjson.dumps({"created": 1, "data": [{"b64_json": BIG, "revised_prompt": "a \"cat\""}]}),
    orjson.dumps({"created": 1, "data": [{"b64_json": BIG}, {"b64_json": BIG[::-1]}]}),
    b'{"created": 1, "data": [ {"revised_prompt": "x", "b64_json" :\n "' + BIG.encode() + b'"} ]}',
    b'{"data": [{"b64_json": "' + BIG.replace("/", "\\/").encode() + b'"}]}',  # escaped slashes
    b'{"data": [{"b64_json": null}, {"b64_json": "short"}]}',
    b'{"note": "the key \\"b64_json\\" in a string", "data": []}',
    b'{"data": [{"url": "http://x/y.png"}]}',
    # A long image, then a short one: the text between them must survive (was n=2 -> 1 item).
    orjson.dumps({"data": [{"b64_json": BIG, "revised_prompt": "first"},
                           {"b64_json": "QUJD", "revised_prompt": "second"}]}),
    orjson.dumps({"data": [{"b64_json": "QUJD", "revised_prompt": "first"},
                           {"b64_json": BIG, "revised_prompt": "second"},
                           {"b64_json": "1234"}, {"b64_json": BIG[::-1]}]}),
])
def test_loads_equals_orjson(body: bytes) -> None:
    assert b64json.loads(body) == orjson.loads(body)


def test_loads_rejects_what_orjson_rejects() -> None:
    with pytest.raises(orjson.JSONDecodeError):
        b64json.loads(b'{"data": [{"b64_json": "' + BIG.encode() + b'"}')
