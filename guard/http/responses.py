"""What every HTTP route shares: the app's state, the JSON response that writes a relayed image's
base64 without copying it, and authentication at the edge (`api`: a key with a role, then the
handler with its principal)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from guard.core.auth import Principal, Role
from guard.pipeline.exchange import GuardState
from guard.support import b64json


class JSONResponse(Response):
    """JSON sent in parts (`b64json.dumps_parts`): a relayed image's base64 goes to the socket
    as the backend sent it, never joined into one more multi-megabyte copy of the body. A part
    may be a memoryview of the backend's body: uvicorn writes any bytes-like body as it is."""

    media_type = "application/json"

    def __init__(self, body: Any, status: int = 200, headers: dict[str, str] | None = None):
        self.parts = b64json.dumps_parts(body)
        super().__init__(b"", status, headers)
        self.headers["content-length"] = str(sum(map(len, self.parts)))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        last = len(self.parts) - 1
        for i, part in enumerate(self.parts):
            await send({"type": "http.response.body", "body": part, "more_body": i < last})


def state_of(request: Request) -> GuardState:
    return request.app.state.guard  # type: ignore[no-any-return]


Handler = Callable[[Request, Principal], Awaitable[Response]]


def api(handler: Handler, role: Role) -> Callable[[Request], Awaitable[Response]]:
    """A route that needs a key with `role` (or admin): the principal is the handler's argument.
    Authentication (`Authenticator.authorize`: authenticate, then require the role) happens here,
    at the edge, for every API route but the images API, whose Exchange does the same."""
    async def endpoint(request: Request) -> Response:
        principal = state_of(request).auth.authorize(request.headers.get("authorization"), role)
        return await handler(request, principal)

    return endpoint
