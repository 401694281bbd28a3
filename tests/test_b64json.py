"""The base64-lifting JSON parser gives exactly what orjson gives, on ordinary and odd inputs."""

from __future__ import annotations

import base64
import os

import orjson
import pytest

from guard.support import b64json

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
    # Found by tests/test_parser_properties.py: a key that only ends in b64_json (its image was
    # left as a placeholder), a forged placeholder under an escaped key (restored with another
    # image, or a ValueError), non-ASCII in a long string (replaced by U+FFFD), a later
    # duplicate key.
    b'{"x\\"b64_json": "' + BIG.encode() + b'"}',
    b'{"data": [{"b64_json": "' + BIG.encode() + b'"}, {"b64\\u005fjson": "\\u00000"}]}',
    b'{"data": [{"b64_json": "' + BIG.encode() + b'"}, {"b64\\u005fjson": "\\u0000x"}]}',
    b'{"data": [{"b64_json": "' + BIG.encode() + '\u00e9"}]}'.encode(),
    b'{"b64_json": "' + BIG.encode() + b'", "b64_json": "' + BIG[::-1].encode() + b'"}',
])
def test_loads_equals_orjson(body: bytes) -> None:
    assert b64json.loads(body) == orjson.loads(body)


@pytest.mark.parametrize("body", [
    b'{"data": [{"b64_json": "' + BIG.encode() + b'"}',
    # Control characters and bytes that are not UTF-8 inside a long string (were accepted).
    b'{"data": [{"b64_json": "' + BIG[:5000].encode() + b'\n' + BIG[5000:].encode() + b'"}]}',
    b'{"data": [{"b64_json": "' + BIG.encode() + b'\x01"}]}',
    b'{"data": [{"b64_json": "' + BIG.encode() + b'\xff"}]}',
])
def test_loads_rejects_what_orjson_rejects(body: bytes) -> None:
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(body)
    with pytest.raises(orjson.JSONDecodeError):
        b64json.loads(body)
