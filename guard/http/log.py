"""The transparency log over HTTP: keys, signed tree heads, inclusion and consistency proofs.

    GET /v1/guard/log/keys                         the log's public keys (Ed25519) and log id
    GET /v1/guard/log/sth                          the newest signed tree head (signing one when
                                                   rows are waiting)
    GET /v1/guard/log/proof/inclusion?trace_id=ID  (or label_id=ID): leaf index, tree size,
                                                   audit path, the leaf and the head it is under
    GET /v1/guard/log/proof/consistency?first=N&second=M

Auditors' keys read them; with `audit.public_log: true` anyone does (a witness needs no key and
no database access: guard.audit.transparency). Hashes and signatures are base64.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from guard.audit.tlog import TransparencyLog
from guard.http.responses import JSONResponse, state_of
from guard.support.errors import RequestError, Unsupported

Handler = Callable[[Request, TransparencyLog], Awaitable[Any]]


def _log_of(request: Request) -> TransparencyLog:
    log = getattr(state_of(request).store, "log", None)
    if not isinstance(log, TransparencyLog):
        raise Unsupported("This audit store keeps no transparency log.", code="no_log")
    return log


def endpoint(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """An auditor's route, open to anyone when the log is public."""
    async def serve(request: Request) -> Response:
        log = _log_of(request)
        if not log.public:
            state_of(request).auth.authorize(request.headers.get("authorization"), "auditor")
        return JSONResponse(await handler(request, log))

    return serve


def _size(request: Request, name: str) -> int:
    value = request.query_params.get(name)
    if value is None:
        raise RequestError(f"Missing '{name}'.", param=name, code="missing_parameter")
    if not value.isdigit() or len(value) > 18:
        raise RequestError(f"'{name}' must be a tree size (a whole number).", param=name)
    return int(value)


async def keys(request: Request, log: TransparencyLog) -> Any:
    return log.keys.published()


async def sth(request: Request, log: TransparencyLog) -> Any:
    return (await log.current_head()).to_dict()


async def inclusion(request: Request, log: TransparencyLog) -> Any:
    given = {k: v for k in ("trace_id", "label_id") if (v := request.query_params.get(k))}
    if len(given) != 1:
        raise RequestError("Give exactly one of 'trace_id' or 'label_id'.", param="trace_id",
                           code="missing_parameter")
    (name, value), = given.items()
    if len(value) > 200 or not value.isprintable():
        raise RequestError(f"Invalid '{name}'.", param=name)
    return await log.inclusion(name.removesuffix("_id"), value)


async def consistency(request: Request, log: TransparencyLog) -> Any:
    return await log.consistency(_size(request, "first"), _size(request, "second"))
