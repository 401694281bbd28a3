"""Which backend serves a request: the routing table from the operators' config, plus fallback."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import TypeVar

from guard.core.config import RouteConfig
from guard.core.types import GeneratedImage, GenerationCall
from guard.plugins import Backend, EditingBackend, PreviewHandler, PreviewingBackend
from guard.support.errors import BackendError, BackendRejected, RequestError

log = logging.getLogger("safeedit.routing")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Route:
    backend: str
    model: str | None


class Router:
    def __init__(self, backends: Mapping[str, Backend], routes: Mapping[str, RouteConfig],
                 fallback: str | None = None) -> None:
        self.backends = dict(backends)
        self._exact = {m: r for m, r in routes.items() if not any(c in m for c in "*?[")}
        self._patterns = [(m, r) for m, r in routes.items() if m not in self._exact]
        # Most specific pattern first: "gpt-image-*" before "*".
        self._patterns.sort(key=lambda item: -len(item[0].replace("*", "")))
        self.fallback = fallback

    def route(self, model: str | None) -> Route:
        name = model or ""
        chosen = self._exact.get(name)
        if chosen is None:
            chosen = next((r for p, r in self._patterns if fnmatch.fnmatchcase(name, p)), None)
        if chosen is None:
            raise RequestError(f"The model '{name}' is not served by this proxy.", param="model",
                               code="model_not_found")
        return Route(chosen.backend, chosen.model or model)

    def can_edit(self, route: Route) -> bool:
        return isinstance(self.backends[route.backend], EditingBackend)

    async def generate(self, route: Route, call: GenerationCall) -> tuple[str, list[GeneratedImage]]:
        """Call the routed backend; on a backend failure (not a client error), try the fallback."""
        return await self._call(route, lambda b: b.generate(replace(call, model=route.model)))

    def shows_previews(self, route: Route, call: GenerationCall) -> bool:
        """Whether the routed backend would show previews while it makes this call's images."""
        backend = self.backends[route.backend]
        return (isinstance(backend, PreviewingBackend)
                and backend.shows_previews(replace(call, model=route.model)))

    async def generate_previewed(self, route: Route, call: GenerationCall,
                                 on_preview: PreviewHandler
                                 ) -> tuple[str, list[GeneratedImage | None]]:
        """As `generate`, each preview shown to `on_preview` (None where it said stop); a
        backend without previews, the fallback included, just generates."""
        async def run(backend: Backend) -> list[GeneratedImage | None]:
            routed = replace(call, model=route.model)
            if isinstance(backend, PreviewingBackend) and backend.shows_previews(routed):
                return await backend.generate_previewed(routed, on_preview)
            return list(await backend.generate(routed))

        return await self._call(route, run)

    async def edit(self, route: Route, call: GenerationCall, images: list[bytes],
                   mask: bytes | None) -> tuple[str, list[GeneratedImage]]:
        """Edit images with the routed backend (fallback as for generate)."""
        def run(backend: Backend) -> Awaitable[list[GeneratedImage]]:
            if not isinstance(backend, EditingBackend):
                raise RequestError(f"The backend for model '{route.model}' cannot edit images.",
                                   param="model", code="unsupported_model")
            return backend.edit(replace(call, model=route.model), images, mask)

        return await self._call(route, run)

    async def _call(self, route: Route, run: Callable[[Backend], Awaitable[T]]
                    ) -> tuple[str, T]:
        try:
            return route.backend, await run(self.backends[route.backend])
        except BackendError as exc:
            # A 4xx from the backend is about the request; another backend would say the same.
            if self.fallback in (None, route.backend) or isinstance(exc, BackendRejected):
                raise
            log.warning("backend %s failed (%s); trying fallback %s",
                        route.backend, exc.code, self.fallback)
            assert self.fallback is not None
            return self.fallback, await run(self.backends[self.fallback])
