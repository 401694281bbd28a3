"""The backend contract: whatever makes the images. The loop only knows these interfaces.

A backend that can also edit images (the /v1/images/edits endpoint, `refine_mode: edit`) is an
EditingBackend. Implementations live in `adapters/` (or any installed package): they register a
factory `(name, options) -> Backend` in `backends` or in the entry-point group
`safeedit.backends`. A backend's factory takes its name because the name is its identity in
routes, traces and metrics; judges and audit stores are one per process and take options only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from guard.registry import Registry
from guard.types import GeneratedImage, GenerationCall


@runtime_checkable
class Backend(Protocol):
    name: str

    async def generate(self, call: GenerationCall) -> list[GeneratedImage]:
        """Make `call.n` images from `call.prompt`. Raise guard.errors.BackendError subclasses."""
        ...

    async def ready(self) -> bool: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class EditingBackend(Backend, Protocol):
    async def edit(self, call: GenerationCall, images: list[bytes],
                   mask: bytes | None) -> list[GeneratedImage]:
        """Make `call.n` images from `images` (PNG/JPEG/WebP bytes) as `call.prompt` asks.
        `mask`: transparent where the image may change, as in OpenAI's API."""
        ...


backends: Registry[Backend] = Registry("backend", "safeedit.backends")


def build_backend(name: str, options: Mapping[str, Any]) -> Backend:
    opts = dict(options)
    kind = opts.pop("kind")
    return backends.create(kind, name, opts)
