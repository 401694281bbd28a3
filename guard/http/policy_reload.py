"""Hot reload of the policy files, watched or on an admin's request.

A new version is read as one snapshot of the files, validated as a whole, and swapped in with a
single assignment to `state.policies`; a request reads that reference once, so it runs entirely
under the set it started with. A snapshot with any error is rejected, logged, and the running set
kept. The watcher polls the files' bytes (no extra dependency) and waits for a file to stop
changing before it loads it, so a half-written file is not mistaken for a new policy.

The proxy's `POST /v1/guard/policies/reload` (admin) calls `reload`: 200 with what changed, or
400 invalid_policy with every problem.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from guard.core.config import Config
from guard.core.policy import Policy, PolicySet, policy_sources
from guard.core.policy.loader import Problem, load, read_files
from guard.offline.explain import diff
from guard.support.errors import RequestError

log = logging.getLogger("safeedit.policy")


class PolicyInvalid(RequestError):
    """The policy files on disk do not validate; the running policies stay in force."""

    code = "invalid_policy"

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__(
            f"{len(problems)} problem(s) in the policy files; the running policies are kept. "
            f"First: {problems[0]}", param="policies")
        self.problems = problems

    def to_dict(self) -> dict[str, Any]:
        body = super().to_dict()
        body["error"]["problems"] = [p.to_dict() for p in self.problems]
        return body


@dataclass(frozen=True, slots=True)
class ReloadResult:
    changed: list[dict[str, Any]] = field(default_factory=list)
    policies: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"object": "guard.policy_reload", "changed": self.changed,
                "policies": self.policies, "warnings": self.warnings}


class PolicyHolder(Protocol):
    """Where the running policies live (the app's GuardState): read by requests, swapped here."""

    config: Config
    policies: PolicySet


class PolicyReloader:
    """Loads the policy files again and swaps `state.policies` when they changed."""

    def __init__(self, state: PolicyHolder, paths: list[Path], interval_s: float,
                 settle_s: float = 0.2) -> None:
        self.state = state
        self.paths = paths
        self.interval_s = interval_s
        self.settle_s = settle_s
        self._lock = asyncio.Lock()
        self._seen: Mapping[Path, bytes | None] | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def for_state(cls, state: PolicyHolder) -> PolicyReloader:
        config = state.config
        return cls(state, policy_sources(config.policy_paths),
                   config.policy_reload_s)

    @classmethod
    def start(cls, state: PolicyHolder) -> PolicyReloader:
        """A reloader for the proxy's state, polling when `policy_reload_s` > 0."""
        reloader = cls.for_state(state)
        if reloader.interval_s > 0:
            reloader._task = asyncio.create_task(reloader._watch(), name="policy-watcher")
        return reloader

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def reload(self) -> ReloadResult:
        """Read, validate and swap now. Raises PolicyInvalid, keeping the running set."""
        async with self._lock:
            return self._apply(await asyncio.to_thread(read_files, self.paths))

    async def poll(self) -> ReloadResult | None:
        """One look at the files: reload when they changed and have stopped changing."""
        files = await asyncio.to_thread(read_files, self.paths)
        if files == self._seen:
            return None
        await asyncio.sleep(self.settle_s)
        async with self._lock:
            if await asyncio.to_thread(read_files, self.paths) != files:
                return None  # still being written: the next poll sees it settled
            try:
                return self._apply(files)
            except PolicyInvalid:
                return None  # logged; reported again only when the files change

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.poll()
            except Exception:  # noqa: BLE001 - the watcher must outlive any one bad poll
                log.exception("policy watcher: poll failed")

    def _apply(self, files: Mapping[Path, bytes | None]) -> ReloadResult:
        loaded = load(files)
        problems = loaded.errors or self._unreferenced(loaded.policies)
        self._seen = files
        if problems:
            log.error("policy reload rejected, running policies kept:\n%s",
                      "\n".join(map(str, problems)))
            raise PolicyInvalid(problems)
        running = self.state.policies
        changed, warnings = _changes(running, loaded.policies)
        if changed:
            # One reference assignment: a request sees the old set or the new one, never a mix.
            self.state.policies = PolicySet(loaded.policies)
            for change in changed:
                log.info("policy %s %s: %s", change["id"], change["change"],
                         "; ".join(change.get("differences", [])) or _ref(change.get("to")))
        for warning in warnings:
            log.warning("%s", warning)
        refs = [loaded.policies[pid].ref for pid in sorted(loaded.policies)]
        return ReloadResult(changed, refs, warnings)

    def _unreferenced(self, policies: Mapping[str, Policy]) -> list[Problem]:
        # The config names policies; a reload must not take away one that requests are sent to.
        config = self.state.config
        uses = [("policy", config.policy),
                *((f"tenants.{t}", config.tenant_policy(t)) for t in config.tenants),
                *((f"keys[{k.id}].policy", k.policy) for k in config.keys if k.policy)]
        return [Problem("(config)", 1, 1, where, f"uses policy '{pid}', which the policy files "
                        "no longer define") for where, pid in uses if pid and pid not in policies]


def _changes(running: PolicySet, new: Mapping[str, Policy]
             ) -> tuple[list[dict[str, Any]], list[str]]:
    changed: list[dict[str, Any]] = []
    warnings: list[str] = []
    for pid in sorted({*running.ids(), *new}):
        old = running[pid] if pid in running else None
        now = new.get(pid)
        if old is None and now is not None:
            changed.append({"id": pid, "change": "added", "from": None, "to": now.ref})
        elif now is None and old is not None:
            changed.append({"id": pid, "change": "removed", "from": old.ref, "to": None})
        elif old is not None and now is not None and old.sha256 != now.sha256:
            changed.append({"id": pid, "change": "updated", "from": old.ref, "to": now.ref,
                            "differences": [str(c) for c in diff(old, now)]})
            if old.version == now.version:
                warnings.append(f"policy {pid} changed but its version did not (still "
                                f"{now.version}); only the sha256 in traces tells them apart")
    return changed, warnings


def _ref(ref: Mapping[str, Any] | None) -> str:
    return f"v{ref['version']} sha256 {str(ref['sha256'])[:12]}" if ref else ""
