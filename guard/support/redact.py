"""Credentials out of untrusted text: what a backend or a judge server answers with.

A server that echoes its request (headers, query, body) in an error puts the operator's key into
whatever the guard keeps of that error. `redact` is applied to every such text before it goes
into a trace or a log line; it is a pure function, so what it removes is pinned by literal test
cases (tests/test_redact.py). It removes, replacing each with `[redacted]`:

- every configured secret passed in, in every encoding a server may echo it in: as it is,
  percent-encoded (either hex case, `+` for a space), JSON-escaped (any character as `\\uXXXX`,
  either case, `/` as `\\/`), any mix of those character by character, and base64 (standard and
  URL-safe, at each of the three alignments a secret can have inside a longer base64 text such as
  a `Basic` credential);
- the value of an Authorization or Proxy-Authorization header, in header, query and JSON forms;
- the value of any field whose name ends in key, token, secret, password or credential(s)
  (`api-key: ...`, `x-api-key`, `api_key=...`, `"apikey": "..."`, `access_token`, `key=`);
- `Bearer <token>` and `Basic <base64>` anywhere;
- token shapes that need no name: `sk-...` keys, AWS access key ids, Google API keys, GitHub and
  Slack tokens, JSON Web Tokens.

and bounds the result to `limit` characters. Text is redacted before it is cut, so a secret is
never half kept at the cut.

`redact_logs` does the same to every record of a library's loggers (litellm's debug log prints
a provider's raw answer).
"""

from __future__ import annotations

import base64
import functools
import logging
import re
from collections.abc import Iterable

REDACTED = "[redacted]"
MAX_CHARS = 2000
# A secret this short would blank out ordinary words; no real credential is.
MIN_SECRET_CHARS = 4

# base64 of a secret shorter than this is too short to tell from ordinary base64 text
MIN_BASE64_CHARS = 8
_NAMED = re.compile(
    r"""(?ix)
    (?<![\w-])
    (?P<name>(?:proxy-)?authorization
           |[\w-]*?(?:key|token|secret|password|passwd|credentials?))
    (?![\w-])
    (?P<sep>["']?\s*[:=]\s*["']?)
    (?P<value>(?:(?:bearer|basic|token|digest)[ \t]+)?[^\s"'&,;{}\[\]<>]+)
    """)
_SCHEMES = re.compile(r"(?i)\b(?:bearer[ \t]+[^\s\"',;<>]+|basic[ \t]+[A-Za-z0-9+/]{8,}={0,2})")
_SHAPES = re.compile(
    r"""(?x)
      \bsk-[A-Za-z0-9_-]{12,}                      # OpenAI, Anthropic and look-alikes
    | \b(?:AKIA|ASIA|AGPA|AIDA|AROA)[A-Z0-9]{16}\b # AWS access key ids
    | \bAIza[0-9A-Za-z_-]{35}                      # Google API keys
    | \bgh[pousr]_[A-Za-z0-9]{30,}                 # GitHub tokens
    | \bxox[abposr]-[A-Za-z0-9-]{10,}              # Slack tokens
    | \beyJ[\w-]{8,}\.[\w-]{8,}\.[\w-]+            # JSON Web Tokens
    """)


def redact(text: str, secrets: Iterable[str | None] = (), *, limit: int | None = MAX_CHARS
           ) -> str:
    """`text` without credentials (see the module's docstring), at most `limit` characters
    (None: all of it)."""
    if limit is not None:
        text = text[: limit * 8]  # bound the work; what lies past this is cut below anyway
    for pattern in sorted({_secret_pattern(s) for s in secrets
                           if s and len(s) >= MIN_SECRET_CHARS},
                          key=lambda p: len(p.pattern), reverse=True):
        text = pattern.sub(REDACTED, text)  # longest first: one secret may contain another
    text = _NAMED.sub(lambda m: m["name"] + m["sep"] + REDACTED, text)
    text = _SCHEMES.sub(REDACTED, text)
    text = _SHAPES.sub(REDACTED, text)
    if limit is not None and len(text) > limit:
        text = text[:limit] + "... [truncated]"
    return text


def _hex(value: int, digits: int) -> str:
    """A hex number that matches in either case."""
    return "".join(f"[{d.lower()}{d.upper()}]" if d.isalpha() else d
                   for d in f"{value:0{digits}x}")


def _char_forms(char: str) -> str:
    """A regex for one character of a secret in any of its echoed encodings."""
    forms = [re.escape(char)]
    code = ord(char)
    units = ([code] if code <= 0xFFFF else
             [0xD800 + ((code - 0x10000) >> 10), 0xDC00 + ((code - 0x10000) & 0x3FF)])
    forms.append("".join(r"\\u" + _hex(unit, 4) for unit in units))  # JSON: \uXXXX
    forms.append("".join("%" + _hex(byte, 2) for byte in char.encode()))  # percent-encoded
    if char == "/":
        forms.append(r"\\/")  # JSON's optional escape of a solidus
    if char == " ":
        forms.append(r"\+")  # form encoding
    return "(?:" + "|".join(forms) + ")"


def _base64_forms(secret: str) -> list[str]:
    """The base64 text that stands for `secret` wherever it sits in a longer encoded value: at
    each alignment (0, 1 or 2 bytes before it), the characters that depend on its bytes alone."""
    raw = secret.encode()
    found = []
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + raw).decode()
        start, end = -(-4 * offset // 3), (4 * (offset + len(raw))) // 3
        for text in (encoded[start:end], encoded[start:end].replace("+", "-").replace("/", "_")):
            if len(text) >= MIN_BASE64_CHARS:
                found.append(re.escape(text))
    return found


@functools.lru_cache(maxsize=64)
def _secret_pattern(secret: str) -> re.Pattern[str]:
    return re.compile("|".join(["".join(map(_char_forms, secret)), *_base64_forms(secret)]))


_IDENTIFIER = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def identifier(value: object, secrets: Iterable[str | None] = ()) -> str | None:
    """`value` when it is a short identifier free of credentials (an error `code` or `param` a
    backend sent, fit to pass on to the client), else None."""
    if value is None:
        return None
    text = str(value)
    if not _IDENTIFIER.fullmatch(text) or redact(text, secrets) != text:
        return None
    return text


class _RedactingFilter(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.secrets: tuple[str, ...] = ()

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info:  # the traceback is the exception's text: redact it too
            text += "\n" + logging.Formatter().formatException(record.exc_info)
            record.exc_info = record.exc_text = None
        record.msg, record.args = redact(text, self.secrets, limit=None), ()
        return True


_LOG_FILTER = _RedactingFilter()


def redact_logs(loggers: Iterable[str], secrets: Iterable[str | None]) -> None:
    """Redact every record of the named loggers (each exactly: a filter does not reach a
    child logger's records), the given secrets included; for libraries that log what a server
    answered. Secrets add up across calls (one filter for the whole process)."""
    # A new tuple, never a change in place: another thread may be filtering a record.
    _LOG_FILTER.secrets = tuple({*_LOG_FILTER.secrets, *(s for s in secrets if s)})
    for name in loggers:
        logger = logging.getLogger(name)
        if _LOG_FILTER not in logger.filters:
            logger.addFilter(_LOG_FILTER)
