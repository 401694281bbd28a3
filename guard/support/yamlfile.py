"""YAML read strictly: two equal keys in one mapping are an error, not the last one silently kept
(an operator who lists `keys:` twice loses the first list without a word otherwise)."""

from __future__ import annotations

from typing import Any

import yaml


class DuplicateKey(yaml.constructor.ConstructorError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            line = key_node.start_mark.line + 1
            if key in seen:
                raise DuplicateKey(None, None, f"duplicate key {key!r} (first at line "
                                   f"{seen[key]}); YAML would silently keep only the last one",
                                   key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_unique(text: str) -> Any:
    """`yaml.safe_load`, refusing duplicate keys (a yaml.YAMLError naming the line)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
