"""Hot reload of the policy files, watched or on an admin's request.

A new version is read as one snapshot of the files, validated as a whole, and swapped in with a
single assignment to `state.policies`; a request reads that reference once, so it runs entirely
under the set it started with. A snapshot with any error is rejected, logged, and the running set
kept. The watcher polls the files' bytes (no extra dependency) and waits for a file to stop
changing before it loads it, so a half-written file is not mistaken for a new policy.

The proxy's `POST /v1/guard/policies/reload` (admin) calls `reload`: 200 with what changed, or
400 invalid_policy with every problem.

A version is a promise: the dashboard and the traces group by it. A file whose own content
changed while its id and version stayed is stale: the running content of that version keeps
being served (and so does every policy that extends it), the reload logs an error, `/readyz`
lists it under `details.stale_policies` and `guard_policy_stale_reload{policy}` is 1, until the
version is raised (or the file restored). A policy whose parent (`extends`) changed keeps its
own version and serves the new parent: its effective sha256, which traces record, is new.

Every start and reload is kept in the audit store's policy history (guard.audit.policies): each
version's effective content the first time it is served, and an event per policy; read by
`GET /v1/guard/policies/history` (auditors) and the review page /guard/policies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import Gauge
from starlette.requests import Request
from starlette.responses import Response

from guard.audit.policies import PolicyHistory, Served
from guard.core.auth import Principal
from guard.core.config import Config
from guard.core.policy import Policy, PolicySet, policy_sources
from guard.core.policy.loader import (
    Problem,
    Source,
    canonical_yaml,
    changed_in_place,
    load,
    own_sources,
    read_files,
)
from guard.http.responses import JSONResponse, state_of
from guard.offline.explain import compare_versions, diff
from guard.plugins import AuditStore
from guard.support.errors import NotFound, RequestError, Unsupported
from guard.support.telemetry import Metrics

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
    stale: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"object": "guard.policy_reload", "changed": self.changed,
                "policies": self.policies, "warnings": self.warnings, "stale": self.stale}


class PolicyHolder(Protocol):
    """Where the running policies live (the app's GuardState): read by requests, swapped here."""

    config: Config
    policies: PolicySet
    store: AuditStore
    metrics: Metrics


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
        self._recording: asyncio.Task[None] | None = None
        # The own file of each policy served (a stale file's is the one still served).
        self._own: dict[str, Source] = {}
        self.stale: dict[str, dict[str, Any]] = {}  # policy id -> what /readyz shows
        self.history = PolicyHistory.of(state.store)
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self._gauge = Gauge("guard_policy_stale_reload",
                            "1 while a policy file has changed under a version already served "
                            "(the old content is served until its version is raised).",
                            ["policy"], registry=state.metrics.registry)

    @classmethod
    def for_state(cls, state: PolicyHolder) -> PolicyReloader:
        config = state.config
        return cls(state, policy_sources(config.policy_paths),
                   config.policy_reload_s)

    @classmethod
    def start(cls, state: PolicyHolder) -> PolicyReloader:
        """A reloader for the proxy's state, polling when `policy_reload_s` > 0; what it
        serves from the start goes into the policy history."""
        reloader = cls.for_state(state)
        files = read_files(reloader.paths)
        loaded = load(files)
        reloader._own = {pid: chain[0] for pid, chain in loaded.chains.items() if chain
                         and pid in state.policies
                         and state.policies[pid].sha256 == _sha(loaded, pid)}
        served = [_served(state.policies[pid], "loaded") for pid in state.policies.ids()]
        reloader._recording = asyncio.create_task(reloader._record("start", served),
                                                  name="policy-history")
        if reloader.interval_s > 0:
            reloader._task = asyncio.create_task(reloader._watch(), name="policy-watcher")
        return reloader

    async def _record(self, event: str, served: list[Served]) -> None:
        if self.history is None or not served:
            return
        try:
            await self.history.record(event, self.replica, served)
        except Exception:  # noqa: BLE001 - serving goes on; the history says what it missed
            log.exception("policy history: could not record the %s", event)

    async def stop(self) -> None:
        if self._recording is not None:
            with contextlib.suppress(Exception):
                await self._recording
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def reload(self) -> ReloadResult:
        """Read, validate and swap now. Raises PolicyInvalid, keeping the running set."""
        async with self._lock:
            result = self._apply(await asyncio.to_thread(read_files, self.paths))
            await self._record("reload", self._events(result))
            return result

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
                result = self._apply(files)
            except PolicyInvalid:
                return None  # logged; reported again only when the files change
            await self._record("reload", self._events(result))
            return result

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
        policies, fresh = self._hold_stale(files, loaded.chains, loaded.policies, running)
        changed, warnings = _changes(running, policies, self._own, loaded.chains)
        self._own = {pid: self._own[pid] if pid in self.stale and pid in self._own else src
                     for pid, src in fresh.items() if pid in policies}
        if changed:
            # One reference assignment: a request sees the old set or the new one, never a mix.
            self.state.policies = PolicySet(policies)
            for change in changed:
                log.info("policy %s %s: %s", change["id"], change["change"],
                         "; ".join(change.get("differences", [])) or _ref(change.get("to")))
        for warning in warnings:
            log.warning("%s", warning)
        refs = [policies[pid].ref for pid in sorted(policies)]
        return ReloadResult(changed, refs, warnings, list(self.stale.values()))

    def _hold_stale(self, files: Mapping[Path, bytes | None], chains: Mapping[str, list[Source]],
                    new: Mapping[str, Policy], running: PolicySet
                    ) -> tuple[dict[str, Policy], dict[str, Source]]:
        """The policies to serve: the new ones, except that a file changed under a version
        already served (and every policy extending it) keeps its running content."""
        fresh = own_sources(files)
        stale = {pid for pid, src in fresh.items()
                 if pid in self._own and pid in running and pid in new
                 and changed_in_place(self._own[pid], src)}
        for pid in sorted(set(self.stale) - stale):
            log.info("policy %s: no longer stale (its version was raised or its file restored)",
                     pid)
            self._gauge.labels(pid).set(0)
            del self.stale[pid]
        for pid in sorted(stale):
            if pid not in self.stale:
                log.error("policy %s: %s changed under version %s, which is already served; "
                          "the proxy keeps serving the content it loaded (sha256 %s) until the "
                          "version is raised", pid, fresh[pid].path, running[pid].version,
                          running[pid].sha256[:12])
            self.stale[pid] = {"policy": pid, "file": str(fresh[pid].path),
                               "version": running[pid].version,
                               "serving_sha256": running[pid].sha256,
                               "file_sha256": new[pid].sha256,
                               "since": self.stale.get(pid, {}).get("since", time.time())}
            self._gauge.labels(pid).set(1)
        held = {pid for pid, chain in chains.items() if pid in running
                and any(source.id in stale for source in chain)}
        return {pid: running[pid] if pid in held else p for pid, p in new.items()}, fresh

    def _events(self, result: ReloadResult) -> list[Served]:
        policies = self.state.policies
        served = [_served(policies[c["id"]], c["change"]) if c["to"] is not None
                  else Served(c["id"], "removed", detail="no longer in the policy files")
                  for c in result.changed]
        served += [Served(s["policy"], "stale", s["version"], s["serving_sha256"],
                          detail=f"{s['file']} changed under version {s['version']} (its "
                                 f"content would be sha256 {s['file_sha256']}); the running "
                                 "content stays served until the version is raised")
                   for s in result.stale]
        return served

    def _unreferenced(self, policies: Mapping[str, Policy]) -> list[Problem]:
        # The config names policies; a reload must not take away one that requests are sent to.
        config = self.state.config
        uses = [("policy", config.policy),
                *((f"tenants.{t}", config.tenant_policy(t)) for t in config.tenants),
                *((f"keys[{k.id}].policy", k.policy) for k in config.keys if k.policy)]
        return [Problem("(config)", 1, 1, where, f"uses policy '{pid}', which the policy files "
                        "no longer define") for where, pid in uses if pid and pid not in policies]


def _changes(running: PolicySet, new: Mapping[str, Policy], own: Mapping[str, Source],
             chains: Mapping[str, list[Source]]) -> tuple[list[dict[str, Any]], list[str]]:
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
                parents = [s.id for s in chains.get(pid, [])[1:]
                           if s.id not in own or own[s.id].data != s.data]
                why = (f"serves the new content of {', '.join(parents)}, which it extends"
                       if parents else "its file changed only in form (comments, layout)")
                warnings.append(f"policy {pid} keeps version {now.version} and {why}; traces "
                                f"record its new sha256 {now.sha256[:12]}")
    return changed, warnings


def _sha(loaded: Any, pid: str) -> str:
    policy = loaded.policies.get(pid)
    return policy.sha256 if policy is not None else ""


def _served(policy: Policy, change: str) -> Served:
    return Served(policy.id, change, policy.version, policy.sha256, canonical_yaml(policy))


# --- the history, for auditors ------------------------------------------------------------------

async def history(request: Request, principal: Principal) -> Response:
    """`GET /v1/guard/policies/history[?policy=ID][&a=SHA256&b=SHA256]`: every version served
    (newest first, with the starts and reloads that served it), the events, and with `a` and
    `b` the effective differences between two versions."""
    found = PolicyHistory.of(state_of(request).store)
    if found is None:
        raise Unsupported("This audit store keeps no policy history.")
    params = request.query_params
    policy_id = params.get("policy") or None
    body: dict[str, Any] = {"object": "guard.policy_history",
                            "data": await found.versions(policy_id),
                            "events": await found.events(policy_id)}
    a, b = params.get("a"), params.get("b")
    if a or b:
        if not (a and b):
            raise RequestError("Give both 'a' and 'b' (sha256 of two versions) to compare.",
                               param="a" if not a else "b")
        changes = await compare_versions(found, a, b)
        if changes is None:
            raise NotFound("No such policy version in the history.")
        body["diff"] = {"a": a, "b": b, "changes": [
            {"field": c.field, "text": c.text, "effect": c.effect} for c in changes]}
    return JSONResponse(body)


def _ref(ref: Mapping[str, Any] | None) -> str:
    return f"v{ref['version']} sha256 {str(ref['sha256'])[:12]}" if ref else ""
