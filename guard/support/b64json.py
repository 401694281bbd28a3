"""Parsing JSON image payloads without walking megabytes of base64 character by character.

An OpenAI images response is a few hundred bytes of JSON around one 2-4 MB base64 string per
image. A JSON parser checks every character of those strings for escapes (5 ms for a 1024x1024
PNG with orjson); base64 has neither quotes nor backslashes, so the strings can be cut out with
memchr-speed searches, the small rest parsed normally, and the strings put back. Anything
unusual (an escape, a control or non-ASCII character inside the string, a key that appears in an
odd place) falls back to a full parse, so the result is always what `orjson.loads` would give.

`loads_raw` is the relay's variant: a lifted string stays a memoryview of the backend's body
(checked to need no escaping: ASCII, no control characters), and `dumps_parts` puts such bytes
back into a JSON body without passing them through a serializer, as separate parts the server
writes one after the other: a passthrough sends the backend's base64 as received, not copied.
"""

from __future__ import annotations

import secrets
from typing import Any

import numpy as np
import orjson

_KEY = b'"b64_json"'
_MIN_LIFT = 4096  # below this a full parse is as fast


def loads(body: bytes) -> Any:
    return _loads(body, raw=False)


def loads_raw(body: bytes) -> Any:
    """As `loads`, but each long `b64_json` string is a memoryview of `body` (JSON-safe as it
    is; whether it is an image is the judge's first look to find out)."""
    return _loads(body, raw=True)


def _loads(body: bytes, *, raw: bool) -> Any:
    lifted: list[str | memoryview] = []
    parts: list[bytes] = []
    view = memoryview(body)
    # A placeholder no string of the body can be, even one written with escapes: a NUL and a
    # nonce of this call (a backend could write "\u00000" under a key spelt "b64\u005fjson").
    nonce = secrets.token_hex(8)
    mark = "\x00" + nonce
    pos = 0  # where the search goes on
    copied = 0  # how much of the body is in `parts` already
    while True:
        key = body.find(_KEY, pos)
        if key < 0:
            break
        colon = key + len(_KEY)
        while colon < len(body) and body[colon] in b" \t\r\n":
            colon += 1
        if colon >= len(body) or body[colon] != ord(":"):
            return orjson.loads(body)
        start = colon + 1
        while start < len(body) and body[start] in b" \t\r\n":
            start += 1
        if start >= len(body) or body[start] != ord('"'):
            pos = start  # not a string value (null, say): leave it to the parser
            continue
        end = body.find(b'"', start + 1)
        if end < 0 or body.find(b"\\", start + 1, end) >= 0:
            return orjson.loads(body)
        pos = end + 1
        if end - start - 1 < _MIN_LIFT:
            continue  # short: stays in place, copied with the text around it
        text = view[start + 1:end]  # no copy: a relay writes these very bytes back out
        if not _json_safe(text):  # a control character or non-ASCII: the parser's to judge
            return orjson.loads(body)
        parts.append(body[copied:start])
        parts.append(b'"\\u0000%s%d"' % (nonce.encode(), len(lifted)))
        lifted.append(text if raw else str(text, "ascii"))
        copied = pos
    if not lifted:
        return orjson.loads(body)
    parts.append(body[copied:])
    payload = orjson.loads(b"".join(parts))
    if _restore(payload, lifted, mark) != len(lifted):
        # Some lifted string is not a `b64_json` value after all: its key only ends in
        # `"b64_json` (`"x\"b64_json"`), or a later duplicate key replaced it.
        return orjson.loads(body)
    return payload


def _json_safe(text: memoryview) -> bool:
    """Whether `text` (already free of quotes and backslashes) is a JSON string's content as
    it stands: ASCII without control characters. Two vectorised passes, no copy."""
    codes = np.frombuffer(text, np.uint8)
    return int(codes.min()) >= 0x20 and int(codes.max()) < 0x80


def dumps(obj: Any) -> bytes:
    return b"".join(dumps_parts(obj))


def dumps_parts(obj: Any) -> list[bytes | memoryview]:
    """`orjson.dumps(obj)` as a list of parts that concatenate to the body, where a bytes or
    memoryview value (base64 from `loads_raw`, or encoded by us) is its own part, written
    without passing through the serializer. Only JSON-safe text (base64) may be given so."""
    nonce = secrets.token_hex(8)  # a client's string can never fake a placeholder
    kept: list[bytes | memoryview] = []

    def keep(value: Any) -> str:
        if isinstance(value, bytes | memoryview):
            kept.append(value)
            return f"\x00{nonce}{len(kept) - 1}"
        raise TypeError(f"cannot serialize {type(value).__name__}")

    out = orjson.dumps(obj, default=keep)
    if not kept:
        return [out]
    parts: list[bytes | memoryview] = []
    pos = 0
    for i, value in enumerate(kept):
        marker = b'"\\u0000%s%d"' % (nonce.encode(), i)
        at = out.index(marker, pos)
        parts += [out[pos:at + 1], value]
        pos = at + len(marker) - 1
    parts.append(out[pos:])
    return parts


def _restore(node: Any, lifted: list[str | memoryview], mark: str) -> int:
    """Put the lifted strings back where their placeholders are; how many were."""
    restored = 0
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "b64_json" and isinstance(value, str) and value.startswith(mark):
                node[key] = lifted[int(value[len(mark):])]
                restored += 1
            else:
                restored += _restore(value, lifted, mark)
    elif isinstance(node, list):
        for item in node:
            restored += _restore(item, lifted, mark)
    return restored
