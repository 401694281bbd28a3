"""A registry of named factories: how built-in judges, backends and stores plug in, the same way a
third party's would (a dict, plus Python entry points in the registry's group).

Built-ins are registered as "module:attribute" strings so that importing the guard does not import
torch or litellm until a config asks for them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from guard.support.errors import ConfigError

T = TypeVar("T")


def resolve(target: str) -> Any:
    """The object a "module:attribute.path" string names, imported now."""
    module, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return obj


class Registry(Generic[T]):
    def __init__(self, what: str, group: str) -> None:
        self._what = what
        self._group = group
        self._factories: dict[str, Callable[..., T] | str] = {}

    def register(self, kind: str, factory: Callable[..., T] | str) -> None:
        self._factories[kind] = factory

    def unregister(self, kind: str) -> None:
        """Forget a kind registered in code (a test's, a plugin unloading); entry points stay."""
        self._factories.pop(kind, None)

    def kinds(self) -> list[str]:
        return sorted({*self._factories, *(ep.name for ep in entry_points(group=self._group))})

    def factory(self, kind: str) -> Callable[..., T]:
        target = self._factories.get(kind)
        if target is None:
            found = [ep for ep in entry_points(group=self._group) if ep.name == kind]
            if not found:
                raise ConfigError(
                    f"unknown {self._what} kind {kind!r}; known: {', '.join(self.kinds())}")
            target = found[0].load()
        if isinstance(target, str):
            target = resolve(target)
            self._factories[kind] = target
        return target

    def create(self, kind: str, *args: Any, **kwargs: Any) -> T:
        return self.factory(kind)(*args, **kwargs)
