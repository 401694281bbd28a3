"""What every adapter shares in its config: option models and credentials from the environment.

Each adapter describes its options as a pydantic model (unknown options are refused) and turns a
validation failure into a ConfigError that names the backend and the option, never the value:
a misplaced secret must not end up in a start-up log.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from guard.support.errors import ConfigError


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


OptionsT = TypeVar("OptionsT", bound=Options)


def parse_options(model: type[OptionsT], backend: str, kind: str, options: Mapping[str, Any]) -> OptionsT:
    try:
        return model.model_validate(dict(options))
    except ValidationError as exc:
        raise ConfigError.from_validation(f"backend {backend!r} ({kind})", exc) from None


def secret_from_env(backend: str, variable: str | None) -> str | None:
    """The value of the environment variable the config names (None when it names none)."""
    if not variable:
        return None
    value = os.environ.get(variable)
    if not value:
        raise ConfigError(f"backend {backend!r}: environment variable {variable} is not set")
    return value


def wants_b64(response_format: str | None, model: str | None) -> str | None:
    """The `response_format` to send: `auto` asks for base64, except from the gpt-image models,
    which always answer in base64 and refuse the parameter ("Unknown parameter")."""
    if response_format != "auto":
        return response_format
    name = (model or "").rsplit("/", 1)[-1]
    return None if name.startswith("gpt-image") else "b64_json"
