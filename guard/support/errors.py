"""The guard's exceptions, one hierarchy, each rendered to OpenAI's error shape by one handler.

    GuardError                      500 server_error
    ├── RequestError                400 invalid_request_error (names the `param`)
    │   ├── PayloadTooLarge         413
    │   ├── NotFound                404
    │   └── ClientDisconnected      499 the client went away before its request was read
    ├── AuthenticationError         401 invalid_api_key
    ├── PermissionDenied            403
    ├── RateLimited                 429 rate_limit_exceeded, type requests|images (Retry-After)
    ├── PolicyViolation             400 content_policy_violation (carries the trace id)
    ├── BackendError                502 backend_error
    │   ├── BackendTimeout          504
    │   ├── BackendRateLimited      429 (carries Retry-After)
    │   └── BackendRejected         4xx the backend refused the request itself
    ├── JudgeError                  503 judge_unavailable
    ├── Draining                    503 draining: the server is shutting down (Retry-After)
    └── ConfigError                 500 (start-up and policy files; never a client's fault)

Foreign exceptions (httpx, litellm, torch, sqlite) are translated at the edge that owns them:
`raise BackendTimeout(...) from exc`. A bare ValueError reaching the handler is a bug and is a 500.

A server's own words are untrusted (one that echoes its request echoes the operator's key): the
`message` a client sees is always the guard's; what the server said goes in `detail`, which only
the trace keeps and which is redacted here, with the secrets the raising edge passes in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from guard.support.redact import identifier, redact


class GuardError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int | None = None, headers: dict[str, str] | None = None,
                 detail: str | None = None, secrets: Iterable[str | None] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.detail = redact(detail, secrets) if detail else None
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers: dict[str, str] = dict(headers or {})
        self.trace_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        error: dict[str, Any] = {
            "message": self.message, "type": self.type, "param": self.param, "code": self.code,
        }
        if self.trace_id:
            error["trace_id"] = self.trace_id
        return {"error": error}


class RequestError(GuardError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_value"


class PayloadTooLarge(RequestError):
    status = 413
    code = "payload_too_large"


class NotFound(RequestError):
    status = 404
    code = "not_found"


class ClientDisconnected(RequestError):
    """The client closed the connection mid-request (nginx's 499): nobody reads the answer,
    the trace records it."""

    status = 499
    code = "client_closed_request"


class AuthenticationError(GuardError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(GuardError):
    status = 403
    type = "permission_error"
    code = "insufficient_permissions"


class RateLimited(GuardError):
    """A key's or tenant's own limit (guard.pipeline.quotas), in the body OpenAI sends for its limits:
    `type` names what ran out ("requests" or "images"), headers say when to come back."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, kind: str = "requests", **kw: Any) -> None:
        super().__init__(message, **kw)
        self.type = kind


class PolicyViolation(GuardError):
    status = 400
    type = "invalid_request_error"
    code = "content_policy_violation"

    def __init__(self, message: str, *, categories: tuple[str, ...] = (), **kw: Any) -> None:
        super().__init__(message, **kw)
        self.categories = categories


class BackendError(GuardError):
    status = 502
    type = "server_error"
    code = "backend_error"


class BackendTimeout(BackendError):
    status = 504
    code = "backend_timeout"


class BackendRateLimited(BackendError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class BackendRejected(BackendError):
    """The backend answered 4xx itself (bad size for that model, its own content filter)."""

    status = 400
    type = "invalid_request_error"
    code = "backend_rejected"

    @classmethod
    def answered(cls, backend: str, status: int | None, error: Mapping[str, Any], *,
                 detail: str, secrets: Iterable[str | None]) -> BackendRejected:
        """The backend's 4xx with its OpenAI-style `error` object: its `code` and `param` pass
        on when they are plain identifiers (content_policy_violation stays a refusal), its
        words only into the redacted `detail`."""
        secrets = tuple(secrets)
        code = identifier(error.get("code"), secrets) or cls.code
        what = ("refused the prompt under its own content policy"
                if code == "content_policy_violation" else "rejected the request")
        http = f" (HTTP {status})" if status else ""
        return cls(f"The image backend {backend!r} {what}{http}.", code=code,
                   param=identifier(error.get("param"), secrets), detail=detail, secrets=secrets)


class JudgeError(GuardError):
    status = 503
    type = "server_error"
    code = "judge_unavailable"


class Draining(GuardError):
    """The server is shutting down (guard.http.middleware.drain): it finishes what it started, takes nothing new."""

    status = 503
    code = "draining"


class ConfigError(GuardError):
    status = 500
    code = "config_error"

    @classmethod
    def from_validation(cls, what: str, exc: Any) -> ConfigError:
        """One line per problem of a pydantic ValidationError, naming the option, never its
        value: a misplaced secret must not end up in a start-up log."""
        problems = []
        for err in exc.errors():
            where = ".".join(str(part) for part in err["loc"]) or "(top)"
            why = "unknown option" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{where}: {why}")
        return cls(f"{what}: {'; '.join(problems)}")
