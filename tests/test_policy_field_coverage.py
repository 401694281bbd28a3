"""`policy diff` and `policy explain` describe every field of a policy, by construction: each leaf
field of the Policy model (walked from the model itself, so a field added tomorrow is walked too)
is changed in turn, and both tools must say something about it. A new field that they do not
describe fails here."""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from pydantic import BaseModel

from guard.core.policy import Category, Policy, Rounds, TermSet
from guard.offline.explain import diff, explain

BASE: dict[str, Any] = {
    "id": "base", "version": 1, "description": "a policy",
    "categories": {"violence": {"threshold": 0.6, "action": "edit", "description": "fights"}},
    "terms": {"violence": {"strong": ["bloodbath"], "weak": ["fight"], "patterns": ["gore+"],
                           "rewrites": {"bloodbath": "party"}, "append": "calm",
                           "requires": ["sexual"]}},
}
# Mappings whose values are models: walked through one sample key.
_SAMPLE_KEY = {"categories": "violence", "terms": "violence"}


def _leaves(model: type[BaseModel], prefix: tuple[str, ...] = ()
            ) -> Iterator[tuple[tuple[str, ...], Any]]:
    for name, info in model.model_fields.items():
        path = (*prefix, name)
        annotation = info.annotation
        inner = _model_in(annotation)
        if inner is not None:
            yield from _leaves(inner, path)
            continue
        origin = typing.get_origin(annotation)
        args = typing.get_args(annotation)
        if origin in (Mapping, dict) and args and _model_in(args[1]) is not None:
            yield from _leaves(_model_in(args[1]), (*path, _SAMPLE_KEY[name]))  # type: ignore[arg-type]
            continue
        yield path, annotation


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _other(value: Any, annotation: Any) -> Any:
    """A different valid value for a field."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return next(a for a in args if a != value)
    if origin in (typing.Union, types.UnionType):
        if value is not None and type(None) in args:  # `X | None`
            return None
        arms = [a for a in args if a is not type(None)]
        if value is None:
            return _sample(arms[0])
        return _sample(next(a for a in arms if not _accepts(a, value)))  # another arm's value
    if annotation is bool:
        return not value
    if annotation is int:
        return value + 1
    if annotation is float:
        return round(value / 2, 3)
    if annotation is str:
        return (value or "") + " changed"
    if origin is tuple:
        return (*value, "added")
    if origin in (Mapping, dict):
        return {**value, "added": "value"}
    raise AssertionError(f"no way to change a field of type {annotation!r}: teach this test")


def _accepts(annotation: Any, value: Any) -> bool:
    if typing.get_origin(annotation) is typing.Literal:
        return value in typing.get_args(annotation)
    return isinstance(annotation, type) and isinstance(value, annotation)


def _sample(annotation: Any) -> Any:
    """Some valid value of a type, for a field whose default is None."""
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)[0]
    if annotation is float:
        return 30.0
    model = _model_in(annotation)
    if model is not None:  # each required field of the model sampled in turn
        return {name: _sample_field(info.annotation) for name, info in model.model_fields.items()
                if info.is_required()}
    return _other(None, annotation)


def _sample_field(annotation: Any) -> Any:
    if typing.get_origin(annotation) is tuple:  # a band [low, high] of floats
        return [0.25, 0.75]
    return _sample(annotation)


def _get(raw: Any, path: tuple[str, ...], model: type[BaseModel]) -> Any:
    node: Any = Policy.model_validate(raw)
    for part in path:
        node = node[part] if isinstance(node, Mapping) else getattr(node, part)
    return node


def _set(raw: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    import copy

    out = copy.deepcopy(raw)
    node = out
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = list(value) if isinstance(value, tuple) else value
    return out


LEAVES = list(_leaves(Policy))


def test_the_walk_reaches_every_model() -> None:
    walked = {path[:-1] for path, _ in LEAVES}
    assert ("rounds",) in walked
    assert ("categories", "violence") in walked and ("terms", "violence") in walked
    assert len(LEAVES) == (len(Policy.model_fields) - 3 + len(Category.model_fields)
                           + len(TermSet.model_fields) + len(Rounds.model_fields))


@pytest.mark.parametrize(("path", "annotation"), LEAVES, ids=[".".join(p) for p, _ in LEAVES])
def test_diff_and_explain_describe_every_field(path: tuple[str, ...], annotation: Any) -> None:
    old = Policy.model_validate(BASE)
    changed = _set(BASE, path, _other(_get(BASE, path, Policy), annotation))
    new = Policy.model_validate(changed)
    assert old != new
    described = [c for c in diff(old, new) if c.field.split(".")[0] == path[0]]
    assert described, f"policy diff says nothing when {'.'.join(path)} changes"
    assert explain(old) != explain(new), f"policy explain does not show {'.'.join(path)}"
