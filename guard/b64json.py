"""Parsing JSON image payloads without walking megabytes of base64 character by character.

An OpenAI images response is a few hundred bytes of JSON around one 2-4 MB base64 string per
image. A JSON parser checks every character of those strings for escapes (5 ms for a 1024x1024
PNG with orjson); base64 has neither quotes nor backslashes, so the strings can be cut out with
memchr-speed searches, the small rest parsed normally, and the strings put back. Anything
unusual (an escape inside the string, a key that appears in an odd place) falls back to a full
parse, so the result is always what `orjson.loads` would give.
"""

from __future__ import annotations

from typing import Any

import orjson

_KEY = b'"b64_json"'
_MIN_LIFT = 4096  # below this a full parse is as fast


def loads(body: bytes) -> Any:
    lifted: list[str] = []
    parts: list[bytes] = []
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
        parts.append(body[copied:start])
        # A placeholder no base64 string can be (it starts with NUL), so nothing else is restored.
        parts.append(b'"\\u0000%d"' % len(lifted))
        lifted.append(body[start + 1:end].decode("ascii", errors="replace"))
        copied = pos
    if not lifted:
        return orjson.loads(body)
    parts.append(body[copied:])
    payload = orjson.loads(b"".join(parts))
    _restore(payload, lifted)
    return payload


def _restore(node: Any, lifted: list[str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "b64_json" and isinstance(value, str) and value.startswith("\x00"):
                node[key] = lifted[int(value[1:])]
            else:
                _restore(value, lifted)
    elif isinstance(node, list):
        for item in node:
            _restore(item, lifted)
