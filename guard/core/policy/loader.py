"""Policy files as compliance officers write them: read with line and column marks, `extends`
resolved by deep merge, and every problem reported at once at the place where it can be fixed.

    read_files(paths)  -> the bytes of every policy file (one snapshot; reload compares these)
    load(files)        -> Loaded: policies by id, problems, each policy's chain of files
    load_policies(paths), load_file(path): the two ways in (a policy set, one file)
    find_policy(spec, dirs)  -> the file of a policy named by a path or an id (every command's)
    changed_in_place(old, new) -> a file's own content changed under the same id and version
    canonical_yaml(policy)   -> the effective policy as the policy history keeps it

A problem in an inherited value is reported in the file that sets it; a missing key at the key
that should hold it. The sha256 of a policy covers its own file followed by every file it extends.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ValidationError

from guard.core.policy import POLICIES_DIR, Policy, schema
from guard.support.errors import ConfigError

Loc = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a policy file, where it is and what would be right."""

    path: str
    line: int  # 1-based
    column: int  # 1-based
    field: str  # dotted path in the policy, "" for the file as a whole
    message: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        at = f" {self.field}:" if self.field else ""
        return f"{self.path}:{self.line}:{self.column}: {self.severity}:{at} {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.path, "line": self.line, "column": self.column,
                "field": self.field, "message": self.message, "severity": self.severity}


@dataclass(frozen=True, slots=True)
class Source:
    """One parsed policy file: its bytes, its data and its YAML nodes (for marks)."""

    path: Path
    data: bytes
    raw: dict[str, Any]
    node: yaml.MappingNode

    @property
    def id(self) -> str:
        return str(self.raw["id"])

    def find(self, loc: Sequence[str | int]) -> tuple[int, yaml.Node, yaml.Node | None]:
        """How deep `loc` reaches into this file: (depth, deepest node, its key node)."""
        node: yaml.Node = self.node
        key_node: yaml.Node | None = None
        for depth, part in enumerate(loc):
            child: tuple[yaml.Node | None, yaml.Node] | None = None
            if isinstance(node, yaml.MappingNode):
                for k, v in node.value:
                    if isinstance(k, yaml.ScalarNode) and k.value == str(part):
                        child = (k, v)  # the last one wins, as it does when YAML is loaded
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
                if 0 <= part < len(node.value):
                    child = (None, node.value[part])
            if child is None:
                return depth, node, key_node
            key_node, node = child[0] or key_node, child[1]
        return len(loc), node, key_node

    def problem(self, loc: Sequence[str | int], message: str, *, at_key: bool = False,
                severity: Literal["error", "warning"] = "error",
                field: Sequence[str | int] | None = None) -> Problem:
        """A problem at `loc` (its value, or its key with `at_key`), reported as `field`."""
        _, node, key = self.find(loc)
        mark = (key if at_key and key is not None else node).start_mark
        return Problem(str(self.path), mark.line + 1, mark.column + 1,
                       _dotted(loc if field is None else field), message, severity)


@dataclass
class Loaded:
    """The outcome of loading policy files: what loaded, and what is wrong."""

    policies: dict[str, Policy] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    chains: dict[str, list[Source]] = field(default_factory=dict)  # policy id -> its files

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    def raise_for_errors(self) -> None:
        if self.errors:
            raise ConfigError("invalid policy files:\n" + "\n".join(map(str, self.errors)))


# --- reading ------------------------------------------------------------------------------------

def policy_files(paths: Iterable[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
        else:
            files.append(path)
    return files


def read_files(paths: Iterable[Path]) -> dict[Path, bytes | None]:
    """The bytes of every policy file under `paths`, None where a file cannot be read. Later
    paths win on equal policy ids, so the order is kept."""
    out: dict[Path, bytes | None] = {}
    for file in policy_files(paths):
        try:
            out[file] = file.read_bytes()
        except OSError:
            out[file] = None
    return out


def parse(path: Path, data: bytes | None) -> Source | Problem:
    if data is None:
        return Problem(str(path), 1, 1, "", "cannot read the file (missing or not allowed)")
    loader = yaml.SafeLoader(data)
    try:
        node = loader.get_single_node()
        raw = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        what = exc.problem or ""
        if exc.context and exc.context_mark:
            what = f"{exc.context} (line {exc.context_mark.line + 1}): {what}"
        return Problem(str(path), line, col, "", f"not valid YAML: {what}")
    except yaml.YAMLError as exc:
        return Problem(str(path), 1, 1, "", f"not valid YAML: {exc}")
    finally:
        loader.dispose()
    if not isinstance(node, yaml.MappingNode) or not isinstance(raw, dict):
        return Problem(str(path), 1, 1, "",
                       "a policy file must be a mapping (id: ..., version: ..., categories: ...)")
    source = Source(path, data, raw, node)
    if not isinstance(raw.get("id"), str) or not raw["id"]:
        return source.problem(("id",), "every policy file needs an `id` (text)",
                              at_key="id" in raw)
    return source


def _duplicates(source: Source) -> list[Problem]:
    """YAML keeps the last of two equal keys without a word; a policy must not."""
    out: list[Problem] = []

    def walk(node: yaml.Node, loc: Loc) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode):
                    if k.value in seen:
                        out.append(Problem(
                            str(source.path), k.start_mark.line + 1, k.start_mark.column + 1,
                            _dotted((*loc, k.value)),
                            f"duplicate key '{k.value}' (first at line {seen[k.value]}); "
                            "YAML would silently keep only the last one"))
                    seen.setdefault(k.value, k.start_mark.line + 1)
                    walk(v, (*loc, k.value))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, (*loc, i))

    walk(source.node, ())
    return out


# --- resolving and validating --------------------------------------------------------------------

def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# A file's identity is its own: these are never inherited from the file it extends.
_OWN_KEYS = ("id", "version", "description", "extends")


def chain_of(pid: str, sources: Mapping[str, Source]) -> tuple[list[Source], list[Problem]]:
    """The files of policy `pid`, itself first, then what it extends, in order."""
    chain: list[Source] = [sources[pid]]
    while True:
        last = chain[-1]
        parent = last.raw.get("extends")
        if parent is None:
            return chain, []
        if not isinstance(parent, str) or not parent:
            return [], [last.problem(("extends",), "`extends` takes the id of another policy")]
        if parent in (s.id for s in chain):
            cycle = " -> ".join([*(s.id for s in chain), parent])
            return [], [last.problem(("extends",), f"`extends` goes round in a cycle: {cycle}")]
        if parent not in sources:
            known = ", ".join(sorted(sources)) or "none"
            return [], [last.problem(("extends",), f"extends unknown policy '{parent}'; "
                                                   f"known policies: {known}")]
        chain.append(sources[parent])


def resolve(pid: str, sources: Mapping[str, Source]) -> tuple[Policy | None, list[Source],
                                                               list[Problem]]:
    """Policy `pid` with its parents merged in, or None and every problem found."""
    chain, problems = chain_of(pid, sources)
    if not chain:
        return None, [], problems
    merged: dict[str, Any] = {}
    for source in reversed(chain):
        merged = deep_merge(merged, source.raw)
    for key in _OWN_KEYS:
        merged.pop(key, None)
        if key in chain[0].raw:
            merged[key] = chain[0].raw[key]
    problems += _unknown_categories(merged, chain)
    problems += _bad_patterns(merged, chain)
    try:
        policy = Policy.model_validate(merged)
    except ValidationError as exc:
        return None, chain, problems + _located(exc, chain)
    if any(p.severity == "error" for p in problems):
        return None, chain, problems
    digest = hashlib.sha256()
    for source in chain:
        digest.update(source.data)
    policy._sha256 = digest.hexdigest()
    policy._source = str(chain[0].path)
    return policy, chain, problems


def origin(chain: Sequence[Source], loc: Sequence[str | int]) -> Source | None:
    """The file of a chain that sets the value at `loc` (the policy's own file first)."""
    for source in chain:
        if source.find(loc)[0] == len(loc):
            return source
    return None


def _unknown_categories(merged: Mapping[str, Any], chain: Sequence[Source]) -> list[Problem]:
    # A term list under a misspelt category name would be ignored: a typo that weakens. Checked
    # on the merged data, so that it is reported together with the model's own errors.
    categories, terms = merged.get("categories"), merged.get("terms")
    if not isinstance(categories, Mapping) or not isinstance(terms, Mapping):
        return []
    out: list[Problem] = []
    known = ", ".join(map(str, categories))
    for name, entry in terms.items():
        where = origin(chain, ("terms", name)) or chain[0]
        if name not in categories:
            out.append(where.problem(("terms", name), f"terms for '{name}', which is not a "
                                     f"category of this policy{_suggest(str(name), categories)}"
                                     f"; categories: {known}", at_key=True))
        requires = entry.get("requires") if isinstance(entry, Mapping) else None
        for i, required in enumerate(requires if isinstance(requires, list) else []):
            if isinstance(required, str) and required not in categories:
                loc = ("terms", name, "requires", i)
                out.append((origin(chain, loc) or where).problem(
                    loc, f"'{required}' is not a category of this policy"
                         f"{_suggest(required, categories)}; categories: {known}"))
    return out


def _bad_patterns(merged: Mapping[str, Any], chain: Sequence[Source]) -> list[Problem]:
    # A pattern that does not compile would only fail when the judge first uses the policy.
    terms = merged.get("terms")
    out: list[Problem] = []
    for name, entry in (terms.items() if isinstance(terms, Mapping) else ()):
        patterns = entry.get("patterns") if isinstance(entry, Mapping) else None
        for i, pattern in enumerate(patterns if isinstance(patterns, list) else []):
            if not isinstance(pattern, str):
                continue
            try:
                re.compile(pattern, re.IGNORECASE)
            except re.error as exc:
                loc = ("terms", name, "patterns", i)
                out.append((origin(chain, loc) or chain[0]).problem(
                    loc, f"not a valid regular expression: {exc}"))
    return out


def _located(exc: ValidationError, chain: Sequence[Source]) -> list[Problem]:
    errors = exc.errors()
    unknown = {(tuple(e["loc"][:-1]), str(e["loc"][-1])) for e in errors
               if e["type"] == "extra_forbidden"}
    out: list[Problem] = []
    for err in errors:
        loc: Loc = tuple(err["loc"])
        if err["type"] == "missing" and any(
                parent == loc[:-1] and difflib.get_close_matches(str(loc[-1]), [key], cutoff=0.75)
                for parent, key in unknown):
            continue  # the misspelt key's own message already says "did you mean"
        # A file's own keys are never inherited; anything else is fixed where it is set.
        best = chain[0] if loc[0] in _OWN_KEYS else max(chain, key=lambda s: s.find(loc)[0])
        depth = best.find(loc)[0]
        at_key = err["type"] in ("extra_forbidden", "missing") or depth < len(loc)
        out.append(best.problem(loc[:depth], _message(err, loc), at_key=at_key, field=loc))
    return out


def _message(err: Any, loc: Loc) -> str:
    kind, value = err["type"], err.get("input")
    if kind == "extra_forbidden":
        keys = schema.keys_at(loc[:-1])
        return (f"unknown key '{loc[-1]}'{_suggest(str(loc[-1]), keys)}; "
                f"allowed keys: {', '.join(keys)}")
    allowed = schema.allowed(schema.field_schema(loc))
    if kind == "missing":
        return f"required key '{loc[-1]}' is missing; allowed: {allowed}"
    hint = ""
    if isinstance(value, bool) and "true or false" not in allowed:
        hint = " (YAML reads unquoted yes/no/on/off as true/false: quote the word)"
    elif isinstance(value, int | float) and allowed == "text":
        hint = f" (YAML reads {value} as a number: quote it, '{value}')"
    if kind in _SHAPE_ERRORS:
        return f"got {_show(value)}; allowed: {allowed}{hint}"
    return f"{err['msg']} (got {_show(value)}); allowed: {allowed}{hint}"


_SHAPE_ERRORS = {
    "literal_error", "enum", "greater_than_equal", "less_than_equal", "greater_than",
    "less_than", "float_parsing", "float_type", "int_parsing", "int_type", "int_from_float",
    "bool_parsing", "bool_type", "string_type", "dict_type", "model_type", "model_attributes_type",
    "tuple_type", "list_type", "mapping_type", "finite_number",
}


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "nothing (null)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return repr(value) if isinstance(value, str) else str(value)


def _suggest(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _dotted(loc: Sequence[str | int]) -> str:
    return ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")


# --- the ways in --------------------------------------------------------------------------------

def load(files: Mapping[Path, bytes | None], ids: Iterable[str] | None = None) -> Loaded:
    """Parse and resolve a snapshot of policy files (later files win on equal ids).

    With `ids`, only those policies are resolved and only their files' problems reported (plus
    files that did not parse, when a parent cannot be found: it may be one of them).
    """
    result = Loaded()
    sources: dict[str, Source] = {}
    own: dict[Path, list[Problem]] = {}
    unparsed: list[Problem] = []
    for path, data in files.items():
        parsed = parse(path, data)
        if isinstance(parsed, Problem):
            unparsed.append(parsed)
            continue
        own[path] = _duplicates(parsed)
        if path.stem != parsed.id:
            own[path].append(parsed.problem(
                ("id",), f"the file is named '{path.name}' but holds policy '{parsed.id}'; "
                         "policies are chosen by id", severity="warning"))
        sources[parsed.id] = parsed
    if ids is None:
        result.problems += unparsed
        result.problems += [p for problems in own.values() for p in problems]
    for pid in (sorted(sources) if ids is None else ids):
        if pid not in sources:
            continue
        policy, chain, problems = resolve(pid, sources)
        if ids is not None:
            for source in chain or [sources[pid]]:
                problems = own.pop(source.path, []) + problems
            if not chain:
                problems += unparsed
        result.problems += [p for p in problems if p not in result.problems]
        result.chains[pid] = chain
        if policy is not None:
            result.policies[pid] = policy
    if result.errors:
        result.policies.clear()  # a set with a broken policy in it is never used
    return result


def load_policies(paths: Iterable[Path]) -> Loaded:
    """Every policy under `paths` (directories or files)."""
    return load(read_files(paths))


def load_file(path: str | Path) -> Loaded:
    """One policy file; `extends` is resolved against the shipped policies and the files beside
    it. Problems are reported for this file and its chain, not for unrelated neighbours."""
    path = Path(path)
    own = read_files([path])
    parsed = parse(path, own[path])
    if isinstance(parsed, Problem):
        return Loaded(problems=[parsed])
    files: dict[Path, bytes | None] = {}
    if parsed.raw.get("extends") is not None:
        files = {p: d for p, d in read_files([POLICIES_DIR, path.parent]).items()
                 if p.resolve() != path.resolve()}
    return load({**files, **own}, ids=[parsed.id])


def find_policy(spec: str | Path, dirs: Iterable[Path] = ()) -> Path:
    """The file of a policy named by `spec`: a file that exists, else the id of a shipped or
    configured policy (the shipped ones, then `dirs`: later folders win on equal ids, as when
    the proxy loads them). Raises ConfigError naming the ids it knows."""
    path = Path(spec)
    if path.is_file():
        return path
    found = {pid: source.path for pid, source in own_sources(
        read_files([POLICIES_DIR, *dirs])).items()}
    if str(spec) in found:
        return found[str(spec)]
    if path.exists():
        raise ConfigError(f"{spec} is not a file")
    where = ", ".join(str(d) for d in [POLICIES_DIR, *dirs])
    raise ConfigError(f"no policy file {spec} and no policy with id {str(spec)!r} under "
                      f"{where}; known ids: {', '.join(sorted(found)) or 'none'}")


def canonical_yaml(policy: Policy) -> str:
    """The effective policy (`extends` merged in, every field) as canonical YAML, keys sorted:
    what the policy history keeps of each version served."""
    return yaml.safe_dump(policy.model_dump(mode="json"), sort_keys=True, allow_unicode=True,
                          width=100)


def from_canonical(text: str) -> Policy:
    """A policy back from `canonical_yaml` (already merged: its `extends` is not followed)."""
    return Policy.model_validate(yaml.safe_load(text))


def own_sources(files: Mapping[Path, bytes | None]) -> dict[str, Source]:
    """Each policy's own file, by id (later files win, as when loading), unparsable ones left
    out."""
    out: dict[str, Source] = {}
    for path, data in files.items():
        parsed = parse(path, data)
        if isinstance(parsed, Source):
            out[parsed.id] = parsed
    return out


def changed_in_place(old: Source, new: Source) -> bool:
    """Whether a policy file's own content changed while its id and version stayed the same.
    Comments and layout do not count; a changed parent (`extends`) does not either: the
    policy's own version stands for its own file."""
    return (old.id == new.id and old.raw.get("version") == new.raw.get("version")
            and old.raw != new.raw)
