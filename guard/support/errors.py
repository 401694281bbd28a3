"""The guard's exceptions: one hierarchy of domain errors, with the OpenAI `type` and `code` each
reports. Which HTTP status each one answers is the HTTP edge's business: one table,
guard.http.errors.STATUS, renders them.

    GuardError                      server_error
    ├── RequestError                invalid_request_error (names the `param`)
    │   ├── PayloadTooLarge
    │   ├── NotFound
    │   ├── MethodNotAllowed
    │   └── ClientDisconnected      the client went away before its request was read
    ├── AuthenticationError         invalid_api_key
    ├── PermissionDenied
    ├── RateLimited                 rate_limit_exceeded, type requests|images (Retry-After)
    ├── PolicyViolation             content_policy_violation (carries the trace id)
    ├── BackendError                backend_error
    │   ├── BackendTimeout
    │   ├── BackendRateLimited      (carries Retry-After)
    │   └── BackendRejected         the backend refused the request itself
    ├── JudgeError                  judge_unavailable
    ├── DeadlineExceeded            guard_deadline_exceeded: the request's deadline passed
    ├── Unavailable                 a store the request needs is down
    ├── ProvenanceFailed            provenance_failed: an image's C2PA manifest could not be made
    ├── Unsupported                 the configured part cannot do this
    ├── Draining                    draining: the server is shutting down (Retry-After)
    └── ConfigError                 start-up and policy files; never a client's fault

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
    type: str = "server_error"
    code: str | None = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None,
                 detail: str | None = None, secrets: Iterable[str | None] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.detail = redact(detail, secrets) if detail else None
        self.param = param
        if code is not None:
            self.code = code
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
    type = "invalid_request_error"
    code = "invalid_value"


class PayloadTooLarge(RequestError):
    code = "payload_too_large"


class NotFound(RequestError):
    code = "not_found"


class MethodNotAllowed(RequestError):
    code = "method_not_allowed"


class ClientDisconnected(RequestError):
    """The client closed the connection mid-request (nginx's 499): nobody reads the answer,
    the trace records it."""

    code = "client_closed_request"


class AuthenticationError(GuardError):
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(GuardError):
    type = "permission_error"
    code = "insufficient_permissions"


class RateLimited(GuardError):
    """A key's or tenant's own limit (guard.pipeline.quotas), in the body OpenAI sends for its limits:
    `type` names what ran out ("requests" or "images"), headers say when to come back."""

    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, kind: str = "requests", **kw: Any) -> None:
        super().__init__(message, **kw)
        self.type = kind


class PolicyViolation(GuardError):
    type = "invalid_request_error"
    code = "content_policy_violation"

    def __init__(self, message: str, *, categories: tuple[str, ...] = (), **kw: Any) -> None:
        super().__init__(message, **kw)
        self.categories = categories


class BackendError(GuardError):
    type = "server_error"
    code = "backend_error"


class BackendTimeout(BackendError):
    code = "backend_timeout"


class BackendRateLimited(BackendError):
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class BackendRejected(BackendError):
    """The backend answered 4xx itself (bad size for that model, its own content filter)."""

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
    type = "server_error"
    code = "judge_unavailable"


class DeadlineExceeded(GuardError):
    """The request's deadline (policy `rounds.deadline_s`, header `x-guard-deadline-s`) passed
    before every image was safe: a failure of time, never a content-policy refusal."""

    type = "server_error"
    code = "guard_deadline_exceeded"


class Unavailable(GuardError):
    """A store the request needs (audit, image, quota store) cannot be reached: nothing is
    served rather than served unrecorded."""

    code = "unavailable"


class ProvenanceFailed(GuardError):
    """An image could not be marked (guard.provenance): under `provenance.on_error: refuse` no
    image leaves unmarked."""

    code = "provenance_failed"


class Unsupported(GuardError):
    """The configured part cannot do what was asked (an audit store that keeps no labels)."""

    code = "not_supported"


class Draining(GuardError):
    """The server is shutting down (guard.http.middleware.drain): it finishes what it started, takes nothing new."""

    code = "draining"


class ConfigError(GuardError):
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
