"""guard.support.redact: credentials out of a server's untrusted text, pinned by literal cases."""

from __future__ import annotations

import pytest

from guard.support.redact import MAX_CHARS, identifier, redact

SECRET = "op-key/with+odd=chars"


@pytest.mark.parametrize("text, expected", [
    # Authorization headers in the forms servers echo them: key=value, header lines, JSON, repr
    ("echo: authorization=Bearer sk-live-abcdefghijklmnop; host=x",
     "echo: authorization=[redacted]; host=x"),
    ('{"headers": {"authorization": "Bearer abc.def", "host": "h"}}',
     '{"headers": {"authorization": "[redacted]", "host": "h"}}'),
    ("Authorization: Basic dXNlcjpwYXNzd29yZA==\r\nHost: x", "Authorization: [redacted]\r\nHost: x"),
    ("Proxy-Authorization: Bearer tok123", "Proxy-Authorization: [redacted]"),
    ("headers: [(b'authorization', b'Bearer zzzzzz')]", "headers: [(b'authorization', b'[redacted]')]"),
    ("sent Bearer eyJhbGciOi.x.y to it", "sent [redacted] to it"),
    # named keys and tokens: header, query and JSON forms
    ("api-key: 0123456789abcdef", "api-key: [redacted]"),
    ("x-api-key: abcd1234\nx-request-id: 7", "x-api-key: [redacted]\nx-request-id: 7"),
    ("POST /v1/x?api_key=abc123&size=1024x1024", "POST /v1/x?api_key=[redacted]&size=1024x1024"),
    ("GET https://g.example/v1/m?key=abcdef", "GET https://g.example/v1/m?key=[redacted]"),
    ('{"apikey": "v", "access_token": "t", "max_tokens": 256, "key_id": "k1"}',
     '{"apikey": "[redacted]", "access_token": "[redacted]", "max_tokens": 256, "key_id": "k1"}'),
    ("aws_secret_access_key=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
     "aws_secret_access_key=[redacted]"),
    ("client_secret: abc, password=hunter22", "client_secret: [redacted], password=[redacted]"),
    # token shapes that need no name
    ("key sk-proj-AbCdEf0123456789xyz was rejected", "key [redacted] was rejected"),
    ("AWS key AKIAIOSFODNN7EXAMPLE used", "AWS key [redacted] used"),
    ("AIzaSyA1234567890abcdefghijklmnopqrstuv in url", "[redacted] in url"),
    ("ghp_0123456789abcdefghijklmnopqrstuvwxyz", "[redacted]"),
    ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.sig-nature", "jwt [redacted]"),
    # the configured secret itself, as it is and URL-encoded (either hex case)
    (f"the key was {SECRET}.", "the key was [redacted]."),
    ("q=op-key%2Fwith%2Bodd%3Dchars&n=1", "q=[redacted]&n=1"),
    ("q=op-key%2fwith%2bodd%3dchars", "q=[redacted]"),
    # ordinary error text is kept as it is
    ("model 'sd' failed: CUDA out of memory (HTTP 500)",
     "model 'sd' failed: CUDA out of memory (HTTP 500)"),
    ('{"error": {"message": "size must be 1024x1024", "code": "invalid_size", "param": "size"}}',
     '{"error": {"message": "size must be 1024x1024", "code": "invalid_size", "param": "size"}}'),
    ("prompt_tokens=12 completion_tokens=3", "prompt_tokens=12 completion_tokens=3"),
])
def test_redact(text: str, expected: str) -> None:
    assert redact(text, [SECRET]) == expected


def test_short_or_missing_secrets_are_ignored() -> None:
    # A one-letter "secret" would blank every word; None is an unset key.
    assert redact("a cat and a dog", ["a", "", None]) == "a cat and a dog"


def test_long_text_is_cut_after_redaction() -> None:
    text = "x" * (MAX_CHARS - 5) + SECRET + "y" * 10_000
    out = redact(text, [SECRET])
    assert out == "x" * (MAX_CHARS - 5) + "[redacted]"[:5] + "... [truncated]"
    assert "op-key" not in out
    assert redact("z" * 50, limit=10) == "z" * 10 + "... [truncated]"


@pytest.mark.parametrize("value, expected", [
    ("invalid_size", "invalid_size"), ("content_policy_violation", "content_policy_violation"),
    ("size", "size"), (None, None), ("Bearer abc", None), ("sk-abcdefghijklmnopqrst", None),
    (SECRET, None), ("x" * 65, None), ({"nested": 1}, None),
])
def test_identifier_passes_only_plain_codes(value: object, expected: str | None) -> None:
    assert identifier(value, [SECRET]) == expected


KEY = "sk-op/key+1 x"  # a slash JSON may escape, a plus and a space URL encoding changes


@pytest.mark.parametrize("echoed", [
    '{"error": "bad key sk-op\\/key+1 x"}',                           # JSON's escaped solidus
    '{"error": "bad key \\u0073k-op\\/k\\u0065y+1 x"}',                # \uXXXX, lower case
    '{"error": "bad key \\u0073\\u006B-op\\u002Fkey\\u002B1\\u0020x"}',  # \uXXXX, upper case
    "GET /v1/x?k=sk-op%2fkey%2B1+x",                                   # percent, mixed case, +
    "Authorization: Basic " + "dXNlcjpzay1vcC9rZXkrMSB4",              # base64("user:" + KEY)
    "token=" + "c2stb3Ava2V5KzEgeA",                                   # base64, no padding
    "blob " + "eHlzay1vcC9rZXkrMSB4eg==",                              # base64 at offset 2
    "blob " + "eHlzay1vcC9rZXkrMSB4eg".replace("+", "-").replace("/", "_"),  # URL-safe
])
def test_the_configured_key_is_redacted_in_every_echoed_encoding(echoed: str) -> None:
    out = redact(echoed, [KEY])
    assert "[redacted]" in out
    for leftover in ("op/key", "op\\/key", "key+1", "zay1vcC9rZXkr", "y1vcC9rZXkrMSB4"):
        assert leftover not in out


def test_a_secret_s_base64_form_is_found_at_every_alignment() -> None:
    import base64
    for prefix in ("", "a", "ab", "abc"):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            text = encode((prefix + KEY + "tail").encode()).decode()
            out = redact(text, [KEY])
            assert "[redacted]" in out, (prefix, text)
            # at most 2 characters on each side of the cut depend on the key's bytes
            kept = out.split("[redacted]")
            assert len(kept) == 2 and len(text) - len(kept[0]) - len(kept[1]) >= 4 * len(KEY) // 3 - 2
