"""The policy file's JSON Schema (for editors) and plain words for what a field allows.

Both come from the pydantic model in guard.core.policy, so the schema, the validator's messages and the
proxy can never disagree about what a policy file may contain.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cache
from typing import Any

from guard.core.policy import POLICIES_DIR, Policy

SCHEMA_PATH = POLICIES_DIR / "schema.json"
Loc = Sequence[str | int]


@cache
def model_schema() -> dict[str, Any]:
    """The effective policy's schema: what a policy is after `extends` is resolved."""
    return Policy.model_json_schema()


def file_schema() -> dict[str, Any]:
    """The schema of one policy *file*, for editors (YAML language server, IDEs).

    A file that `extends` another only overrides what it changes, so below the top level nothing
    is required here; `safeedit policy validate` checks the policy with its parents resolved.
    """
    schema = json.loads(json.dumps(model_schema()))
    for definition in schema.get("$defs", {}).values():
        definition.pop("required", None)
    schema["required"] = ["id", "version"]
    schema["if"] = {"properties": {"extends": {"type": "string"}}, "required": ["extends"]}
    schema["else"] = {"required": ["categories"]}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "SafeEdit Guard policy",
        "description": (
            "A policy file under policies/. Generated from guard/core/policy/__init__.py by "
            "`safeedit policy schema`; do not edit by hand. Check a file with "
            "`safeedit policy validate FILE`."),
        **{k: v for k, v in schema.items() if k != "title"},
    }


def render_file_schema() -> str:
    return json.dumps(file_schema(), indent=2, ensure_ascii=False) + "\n"


def undescribed_fields(schema: dict[str, Any] | None = None) -> list[str]:
    """Dotted names of properties without a description (a test keeps this empty)."""
    schema = schema if schema is not None else model_schema()
    missing: list[str] = []
    objects = [("", schema), *((f"$defs.{n}", d) for n, d in schema.get("$defs", {}).items())]
    for prefix, obj in objects:
        for name, prop in obj.get("properties", {}).items():
            if not str(prop.get("description", "")).strip():
                missing.append(f"{prefix}.{name}".lstrip("."))
    return missing


# --- walking the schema along an error's location --------------------------------------------

def _deref(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        node = {**model_schema()["$defs"][name], **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def _step(node: dict[str, Any], part: str | int) -> dict[str, Any] | None:
    node = _deref(node)
    for branch in node.get("anyOf", ()):
        if branch.get("type") != "null":
            node = _deref(branch)
            break
    if isinstance(part, str) and part in node.get("properties", {}):
        return dict(node["properties"][part])
    if isinstance(node.get("additionalProperties"), dict) and isinstance(part, str):
        return dict(node["additionalProperties"])
    if isinstance(part, int) and isinstance(node.get("items"), dict):
        return dict(node["items"])
    return None


def field_schema(loc: Loc) -> dict[str, Any] | None:
    """The schema node for a location such as ("categories", "sexual", "threshold")."""
    node: dict[str, Any] | None = model_schema()
    for part in loc:
        if node is None:
            return None
        node = _step(node, part)
    return _deref(node) if node is not None else None


def keys_at(loc: Loc) -> list[str]:
    """The keys a mapping at `loc` may have (empty when its keys are free names)."""
    node = field_schema(loc)
    return list(node.get("properties", {})) if node else []


def allowed(node: dict[str, Any] | None) -> str:
    """What a schema node accepts, in words: 'a number from 0 to 1', 'one of edit, refuse'."""
    if node is None:
        return ""
    node = _deref(node)
    if "enum" in node:  # true/false as YAML writes them
        return "one of " + ", ".join(v if isinstance(v, str) else json.dumps(v)
                                     for v in node["enum"])
    if "anyOf" in node:
        return " or ".join(filter(None, (allowed(n) for n in node["anyOf"])))
    kind = node.get("type")
    if kind in ("number", "integer"):
        noun = "a number" if kind == "number" else "a whole number"
        low, high = node.get("minimum"), node.get("maximum")
        if node.get("exclusiveMinimum") is not None and high is None:
            return f"{noun} above {_num(node['exclusiveMinimum'])}"
        if low is not None and high is not None:
            return f"{noun} from {_num(low)} to {_num(high)}"
        if low is not None:
            return f"{noun} of at least {_num(low)}"
        return f"{noun} of at most {_num(high)}" if high is not None else noun
    if kind == "boolean":
        return "true or false"
    if kind == "string":
        return "text"
    if kind == "null":
        return "nothing (null)"
    if kind == "array" and node.get("prefixItems"):  # a fixed-length list such as [low, high]
        return "[" + ", ".join(allowed(n) for n in node["prefixItems"]) + "]"
    if kind == "array":
        return "a list of " + {"text": "texts"}.get(allowed(node.get("items", {})), "items")
    if kind == "object":
        if node.get("properties"):
            return "a mapping with keys " + ", ".join(node["properties"])
        inner = node.get("additionalProperties")
        if isinstance(inner, dict):
            return "a mapping of names to " + allowed(inner)
        return "a mapping"
    return ""


def _num(value: float) -> str:
    return f"{value:g}"
