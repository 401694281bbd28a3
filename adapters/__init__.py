"""The built-in image backends: `demo`, `openai-compatible`, `litellm`, `diffusers`; and the
hosted moderation judges (adapters.moderation).

They implement guard.backends.Backend (and EditingBackend) and register in the same registry a
third party uses (or its entry-point group `safeedit.backends`); importing this package registers
them. Each adapter validates its own options in its `from_config`.
"""

from __future__ import annotations

from guard.backends import Backend, EditingBackend, backends, build_backend
from guard.imagestore import image_stores
from guard.judges import judges

backends.register("demo", "adapters.demo:DemoBackend.from_config")
backends.register("openai-compatible", "adapters.openai_compat:OpenAICompatBackend.from_config")
backends.register("litellm", "adapters.litellm_backend:LiteLLMBackend.from_config")
backends.register("diffusers", "adapters.diffusers_backend:DiffusersBackend.from_config")

# The hosted moderation judges; also entry points in pyproject.toml, for the CLI
judges.register("openai-moderation",
                "adapters.moderation.openai_moderation:OpenAIModerationJudge.from_config")
judges.register("azure-content-safety",
                "adapters.moderation.azure_content_safety:AzureContentSafetyJudge.from_config")
judges.register("google-safesearch",
                "adapters.moderation.google_safesearch:GoogleSafeSearchJudge.from_config")
judges.register("aws-rekognition",
                "adapters.moderation.aws_rekognition:AwsRekognitionJudge.from_config")

# The S3-compatible image store; also an entry point in pyproject.toml, for the CLI
image_stores.register("s3", "adapters.imagestore_s3:S3ImageStore.from_config")

__all__ = ["Backend", "EditingBackend", "backends", "build_backend"]
