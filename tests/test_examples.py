"""`examples/config.yaml` is the operators' reference ("every option, with its default"): it
must load, and every option of the config model must appear in it."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from guard.core.config import Config, KeyConfig, LimitsConfig, ServerConfig, load_config

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "config.yaml"


def test_the_example_config_loads() -> None:
    config = load_config(EXAMPLE)
    assert config.keys and config.routes


def test_every_option_is_in_the_example() -> None:
    text = EXAMPLE.read_text()
    models: list[type[BaseModel]] = [Config, ServerConfig, KeyConfig, LimitsConfig]
    missing = [f"{model.__name__}.{name}" for model in models for name in model.model_fields
               if f"{name}:" not in text]
    assert missing == []
