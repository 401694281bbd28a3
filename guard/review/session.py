"""Review-page sessions: a signed, HttpOnly cookie naming the auditor's key id, and CSRF tokens.

The cookie holds `key id, expiry, nonce` and an HMAC-SHA256 over them, never the key itself.
Each request looks the key id up in the operators' config again, so removing a key ends its
sessions. The signing key comes from the environment variable named by the audit option
`session_key_env`; without one, each process draws a random key (sessions then last until a
restart and hold on one replica only).

CSRF: the session cookie is SameSite=Strict; every POST also carries a token derived from a
cookie the attacker cannot read (login: a random pre-session cookie; logout: the session nonce),
and a cross-site Origin is refused outright.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass

import orjson
from starlette.requests import Request
from starlette.responses import Response

from guard.core.auth import Authenticator, Principal
from guard.core.config import Config

SESSION_COOKIE = "safeedit_review"
CSRF_COOKIE = "safeedit_review_csrf"
SESSION_TTL_S = 8 * 3600
COOKIE_PATH = "/guard"


@dataclass(frozen=True, slots=True)
class Session:
    principal: Principal
    nonce: str
    expires: float


class Sessions:
    def __init__(self, config: Config, auth: Authenticator) -> None:
        env = config.audit.get("session_key_env")
        value = os.environ.get(env) if env else None
        self._key = value.encode() if value else secrets.token_bytes(32)
        self._auth = auth

    def _sign(self, payload: bytes) -> str:
        mac = hmac.new(self._key, payload, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    # --- sessions -----------------------------------------------------------------------------

    def issue(self, response: Response, request: Request, principal: Principal) -> None:
        payload = base64.urlsafe_b64encode(orjson.dumps(
            {"k": principal.key_id, "e": int(time.time() + SESSION_TTL_S),
             "n": secrets.token_urlsafe(16)})).decode().rstrip("=")
        self._set(response, request, SESSION_COOKIE, f"{payload}.{self._sign(payload.encode())}",
                  SESSION_TTL_S)

    def current(self, request: Request) -> Session | None:
        payload, _, sig = request.cookies.get(SESSION_COOKIE, "").partition(".")
        if not payload or not _same(sig, self._sign(payload.encode())):
            return None
        try:
            data = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            key_id, expires, nonce = str(data["k"]), float(data["e"]), str(data["n"])
        except (ValueError, KeyError, TypeError):
            return None
        if expires < time.time():
            return None
        principal = self._auth.by_id(key_id)
        if principal is None or principal.role not in ("auditor", "admin"):
            return None
        return Session(principal, nonce, expires)

    def clear(self, response: Response, request: Request) -> None:
        self._set(response, request, SESSION_COOKIE, "", 0)

    # --- CSRF ---------------------------------------------------------------------------------

    def login_seed(self, request: Request) -> tuple[str, bool]:
        """The pre-session value the login form's token is bound to, and whether it is new
        (then the caller sets it with `set_login_seed`)."""
        seed = request.cookies.get(CSRF_COOKIE, "")
        if 16 <= len(seed) <= 64:
            return seed, False
        return secrets.token_urlsafe(24), True

    def set_login_seed(self, response: Response, request: Request, seed: str) -> None:
        self._set(response, request, CSRF_COOKIE, seed, 3600)

    def login_token(self, seed: str) -> str:
        return self._sign(b"login:" + seed.encode())

    def login_token_ok(self, request: Request, token: str) -> bool:
        seed = request.cookies.get(CSRF_COOKIE, "")
        return bool(seed) and _same(token, self.login_token(seed))

    def session_token(self, session: Session) -> str:
        return self._sign(b"session:" + session.nonce.encode())

    def session_token_ok(self, session: Session, token: str) -> bool:
        return _same(token, self.session_token(session))

    @staticmethod
    def same_origin(request: Request) -> bool:
        """False for a POST a browser marks as coming from another site."""
        origin = request.headers.get("origin")
        if origin and origin != "null":
            own = f"{request.url.scheme}://{request.url.netloc}"
            return origin == own
        return request.headers.get("sec-fetch-site", "same-origin") in ("same-origin", "none")

    @staticmethod
    def _set(response: Response, request: Request, name: str, value: str, max_age: int) -> None:
        response.set_cookie(name, value, max_age=max_age, path=COOKIE_PATH, httponly=True,
                            samesite="strict", secure=request.url.scheme == "https")


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())
