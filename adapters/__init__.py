"""Image backends: whatever makes the images. The loop only knows this interface.

A backend that can also edit images (the /v1/images/edits endpoint) has `edit` as well: an
EditingBackend. Built-ins (`demo`, `openai-compatible`, `litellm`, `diffusers`) register through the same registry a third
party uses (or the entry-point group `safeedit.backends`); each adapter validates its own options.
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
backends.register("demo", "adapters.demo:DemoBackend.from_config")
backends.register("openai-compatible", "adapters.openai_compat:OpenAICompatBackend.from_config")
backends.register("litellm", "adapters.litellm_backend:LiteLLMBackend.from_config")
backends.register("diffusers", "adapters.diffusers_backend:DiffusersBackend.from_config")


def build_backend(name: str, options: Mapping[str, Any]) -> Backend:
    opts = dict(options)
    kind = opts.pop("kind")
    return backends.create(kind, name, opts)
