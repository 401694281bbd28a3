"""The built-in image backends: `demo`, `openai-compatible`, `litellm`, `diffusers`.

They implement guard.backends.Backend (and EditingBackend) and register in the same registry a
third party uses (or its entry-point group `safeedit.backends`); importing this package registers
them. Each adapter validates its own options in its `from_config`.
"""

from __future__ import annotations

from guard.backends import Backend, EditingBackend, backends, build_backend

backends.register("demo", "adapters.demo:DemoBackend.from_config")
backends.register("openai-compatible", "adapters.openai_compat:OpenAICompatBackend.from_config")
backends.register("litellm", "adapters.litellm_backend:LiteLLMBackend.from_config")
backends.register("diffusers", "adapters.diffusers_backend:DiffusersBackend.from_config")

__all__ = ["Backend", "EditingBackend", "backends", "build_backend"]
