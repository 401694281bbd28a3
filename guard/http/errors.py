"""The one map from the guard's domain errors (guard.support.errors) to HTTP statuses.

The body is the error's own OpenAI shape (`GuardError.to_dict()`, also what the trace records);
the status is looked up here by the error's class, the nearest class in its MRO winning, so a new
error class answers its parent's status until it is given one of its own.
"""

from __future__ import annotations

from guard.support.errors import (
    AuthenticationError,
    BackendError,
    BackendRateLimited,
    BackendRejected,
    BackendTimeout,
    ClientDisconnected,
    ConfigError,
    DeadlineExceeded,
    Draining,
    GuardError,
    JudgeError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    PolicyViolation,
    ProvenanceFailed,
    RateLimited,
    RequestError,
    Unavailable,
    Unsupported,
)

STATUS: dict[type[GuardError], int] = {
    GuardError: 500,
    RequestError: 400,
    PayloadTooLarge: 413,
    NotFound: 404,
    MethodNotAllowed: 405,
    ClientDisconnected: 499,  # nginx's "client closed request": nobody reads it, the trace does
    AuthenticationError: 401,
    PermissionDenied: 403,
    RateLimited: 429,
    PolicyViolation: 400,
    BackendError: 502,
    BackendTimeout: 504,
    BackendRateLimited: 429,
    BackendRejected: 400,
    JudgeError: 503,
    DeadlineExceeded: 504,
    Unavailable: 503,
    ProvenanceFailed: 500,  # the guard's own signing failed: neither the client's nor the backend's
    Unsupported: 501,
    Draining: 503,
    ConfigError: 500,
}


def status_of(error: GuardError) -> int:
    """The HTTP status `error` answers with."""
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]  # type: ignore[index]
    return 500
