"""The `remote` judge: the `vlm` judge's profiles over an OpenAI-compatible chat-completions server.

    judge:
      kind: remote
      api_base: http://vllm:8000/v1        # vLLM, SGLang, Ollama (/v1), any OpenAI-compatible server
      model: Qwen/Qwen2.5-VL-7B-Instruct
      profile: safeeditor

Several proxy replicas can share one judge server this way. Options (all but `model` optional):

- `model`: the model name sent to the server; with `transport: litellm`, a litellm model string
  such as `openai/gpt-4o-mini`.
- `api_base` (null): base URL ending in `/v1`; requests go to `{api_base}/chat/completions`.
- `api_bases` (null): several such servers instead of one, a fleet (guard.judges.fleet): each
  micro-batch goes to the server with the fewest requests in flight, a failing server leaves the
  rotation and comes back when its health check passes; `health_interval_s` (5), `eject_after`
  (3 failures in a row), `eject_s` (30).
- `api_key_env` (null): name of the environment variable holding the API key (sent as a Bearer
  token; never logged, never in errors or traces). What the server says when it fails is kept
  only as the error's `detail`, redacted (guard.support.redact): it may echo the request.
- `transport` (auto): `http` (direct httpx, the default with `api_base`) or `litellm` (any
  provider litellm speaks; the default without `api_base`).
- `profile` (safeeditor), `profile_options` ({}): as for `vlm`, see `guard.judges.profiles`.
- `explain` (unsafe_only): `unsafe_only` asks first for the verdict alone (stopping after it, e.g.
  at `</judgement>`) and asks for the reasoning and refined prompt only when a threshold is
  crossed; `always` asks for the full answer at once.
- `max_tokens` (256): most tokens of a full answer.
- `logprobs` (true), `top_logprobs` (5): ask for token log-probabilities; where the server returns
  them, a category's score is the probability of the unsafe answer token against the safe one at
  that category's slot in the answer (as with `vlm`); otherwise scores are 1.0 or 0.0 from the
  parsed text. A malformed answer scores 1.0 everywhere (fail closed); its text is kept raw.
- `timeout_s` (30): per request; `retries` (2): further tries after a timeout, a connection error,
  408, 409, 425, 429 or 5xx, under the guard's retry policy (guard.support.retry): a backoff from
  `backoff_s` (0.25), doubled each time up to 10 s, with full jitter, or the server's Retry-After
  (seconds or an HTTP date) when that is longer; all tries of one request within 2 x `timeout_s`
  (a Retry-After beyond that fails at once); other 4xx fail at once.
- `max_concurrency` (16): requests in flight from this judge (the server batches them itself).
- `temperature` (0), `extra_body` ({}): sent with every request; `headers` ({}): extra HTTP headers.
- `max_response_bytes` (8 MiB): a larger answer is a failed call, read no further than that
  (guard.support.bodies).
- `id` (null): judge id in traces; default `remote:<profile>:<model>`.

Failures surface as JudgeError (HTTP 503 from the proxy unless the policy allows unjudged images).
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from guard.core.policy import Policy
from guard.core.types import HistoryEntry, JudgeInput, Verdict
from guard.judges.fleet import Fleet, Server
from guard.judges.profiles import (
    Message,
    Parsed,
    Probe,
    Profile,
    Slot,
    assessed,
    get_profile,
    merge_scores,
)
from guard.plugins import Explanation
from guard.support.bodies import JUDGE_RESPONSE_BYTES, CappedTransport, ResponseTooLarge, too_large
from guard.support.errors import ConfigError, JudgeError
from guard.support.redact import redact_logs
from guard.support.retry import Retrying, RetryPolicy
from guard.support.telemetry import client_hooks, trace_headers

T = TypeVar("T")
RETRY_STATUS = {408, 409, 425, 429}
MAX_BACKOFF_S = 10.0


class RemoteOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    api_base: str | None = None
    api_bases: list[str] | None = Field(None, min_length=1)
    health_interval_s: float = Field(5.0, ge=0, le=3600)
    eject_after: int = Field(3, ge=1, le=1000)
    eject_s: float = Field(30.0, gt=0, le=86_400)
    api_key_env: str | None = None
    transport: Literal["auto", "http", "litellm"] = "auto"
    profile: str = "safeeditor"
    profile_options: dict[str, Any] = Field(default_factory=dict)
    explain: Literal["unsafe_only", "always"] = "unsafe_only"
    max_tokens: int = Field(256, ge=1, le=32_768)
    logprobs: bool = True
    top_logprobs: int = Field(5, ge=1, le=20)
    timeout_s: float = Field(30.0, gt=0, le=600)
    retries: int = Field(2, ge=0, le=10)
    backoff_s: float = Field(0.25, ge=0, le=30)
    max_concurrency: int = Field(16, ge=1, le=1024)
    temperature: float = Field(0.0, ge=0, le=2)
    extra_body: dict[str, Any] = Field(default_factory=dict)
    headers: dict[str, str] = Field(default_factory=dict)
    max_response_bytes: int = Field(JUDGE_RESPONSE_BYTES, gt=0)
    id: str | None = None


@dataclass(slots=True)
class _Answer:
    text: str
    tokens: list[dict[str, Any]] | None  # logprobs.content, when the server sent it
    usage: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Stats:
    asks: int = 0       # requests the judge meant to send
    requests: int = 0   # requests sent, retries included
    tokens: int = 0
    server: str | None = None  # the fleet server that answered last

    @property
    def retries(self) -> int:
        return self.requests - self.asks


class _Transient(JudgeError):
    """A failure another try may not meet: a timeout, a connection error, 408, 409, 425, 429
    or 5xx. To everyone but the retry policy it is a JudgeError like any other."""


class RemoteJudge:
    def __init__(self, options: RemoteOptions) -> None:
        self.options = options
        self.profile: Profile = get_profile(options.profile, options.profile_options)
        self.id = options.id or f"remote:{options.profile}:{options.model}"
        if options.api_base and options.api_bases:
            raise ConfigError("judge (remote): give `api_base` or `api_bases`, not both")
        bases = options.api_bases or ([options.api_base] if options.api_base else [])
        transport = options.transport
        if transport == "auto":
            transport = "http" if bases else "litellm"
        if transport == "http" and not bases:
            raise ConfigError("judge (remote): transport http needs `api_base`")
        if transport == "litellm" and options.api_bases:
            raise ConfigError("judge (remote): `api_bases` needs transport http")
        self.transport = transport
        self.fleet = Fleet(bases, eject_after=options.eject_after, eject_s=options.eject_s) \
            if transport == "http" else None
        self._watch: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None
        policy = RetryPolicy(attempts=options.retries + 1, backoff_s=options.backoff_s,
                             max_backoff_s=MAX_BACKOFF_S)
        self._call = Retrying("remote judge", policy, timeout_s=options.timeout_s,
                              retryable=lambda exc: isinstance(exc, _Transient),
                              expired=JudgeError, max_concurrency=options.max_concurrency)

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> RemoteJudge:
        try:
            return cls(RemoteOptions.model_validate(dict(options)))
        except ValidationError as exc:
            raise ConfigError.from_validation("judge (remote)", exc) from exc

    def __repr__(self) -> str:  # never the key
        bases = [s.base for s in self.fleet.servers] if self.fleet else self.options.api_base
        return f"RemoteJudge(id={self.id!r}, api_base={bases!r})"

    def coverage(self, policy: Policy) -> dict[str, set[str]]:
        """What the profile's model assesses (a model trained on fixed categories, such as
        ShieldGemma 2's or LlavaGuard's, says nothing of the rest): guard.plugins.Covering."""
        declared = self.profile.coverage(policy)
        return declared if declared is not None else {c: {"text", "image"}
                                                      for c in policy.categories}

    # --- lifecycle ------------------------------------------------------------------------------

    def _key(self) -> str | None:
        name = self.options.api_key_env
        return os.environ.get(name) if name else None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            headers = dict(self.options.headers)
            key = self._key()
            if key:
                headers["Authorization"] = f"Bearer {key}"
            limits = httpx.Limits(max_connections=self.options.max_concurrency)
            self._client = httpx.AsyncClient(
                headers=headers, timeout=self.options.timeout_s,
                transport=CappedTransport(self.options.max_response_bytes, limits=limits),
                event_hooks=client_hooks())  # the request's trace context goes on
        return self._client

    async def start(self) -> None:
        if self.fleet is not None and self.options.health_interval_s > 0:
            self._watch = asyncio.create_task(
                self.fleet.watch(self._http(), self.options.health_interval_s))

    async def ready(self) -> bool:
        """Some server of the fleet answers its health check (always true through litellm)."""
        if self.fleet is None:
            return True
        return any(await self.fleet.check(self._http()))

    async def aclose(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    # --- the judge ------------------------------------------------------------------------------

    async def judge(self, items: Sequence[JudgeInput], policy: Policy) -> list[Verdict]:
        return await self._each(len(items), lambda i, server: self._one(items[i], policy, server))

    async def _each(self, n: int, ask: Callable[[int, Server | None], Awaitable[T]]) -> list[T]:
        """`ask(i, server)` for items 0..n-1 at once; with a fleet, one batch on one server."""
        if self.fleet is None:
            return list(await asyncio.gather(*(ask(i, None) for i in range(n))))
        with self.fleet.busy(self.fleet.pick(), n) as server:
            return list(await asyncio.gather(*(ask(i, server) for i in range(n))))

    async def _one(self, item: JudgeInput, policy: Policy, server: Server | None) -> Verdict:
        t0 = time.perf_counter()
        stats = _Stats()
        probes = self.profile.probes(item, policy)
        plan = self.profile.remote_plan(policy)
        full_first = self.options.explain == "always" or not plan.stop
        max_tokens = self.options.max_tokens
        if plan.max_tokens is not None and (not full_first or not self.profile.explains):
            max_tokens = plan.max_tokens  # the verdict alone
        stop = () if full_first else plan.stop
        answers = await asyncio.gather(*(self._ask(p.messages, item, max_tokens, stop, stats,
                                                   server)
                                         for p in probes))
        texts = [a.text for a in answers]
        parsed = self.profile.parse(texts, policy)
        measured = self.profile.combine([_slot_probs(p, a) for p, a in zip(probes, answers,
                                                                          strict=True)], policy)
        scores, assessed_on, unassessed = assessed(self.profile, item, policy,
                                                   merge_scores(measured, parsed, policy))
        used_logprobs = parsed.ok and any(v is not None for v in measured.values())
        details: dict[str, Any] = {"logprobs": used_logprobs}
        if unassessed:
            details["unassessed"] = unassessed
        if not parsed.ok:
            details["parse_error"] = parsed.error
        thought, refined, raw = parsed.thought, parsed.refined_prompt, "\n---\n".join(texts)
        if not full_first and self.profile.explains and policy.wants_explanation(scores):
            reasons, text = await self._explain(item, policy, scores, stats, server, probes)
            raw += "\n---\n" + text
            thought, refined = reasons.thought, reasons.refined_prompt
            if not reasons.ok:
                details["explain_parse_error"] = reasons.error
        details.update(requests=stats.requests, retries=stats.retries,
                       decoded_tokens=stats.tokens)
        if stats.server is not None and self.fleet is not None and len(self.fleet.servers) > 1:
            details["server"] = stats.server
        return Verdict(scores=scores, judge_id=self.id, thought=thought, refined_prompt=refined,
                       raw=raw, latency_ms=(time.perf_counter() - t0) * 1000.0, details=details,
                       assessed_on=assessed_on)

    async def _explain(self, item: JudgeInput, policy: Policy, scores: Mapping[str, float],
                       stats: _Stats, server: Server | None,
                       probes: Sequence[Probe] | None = None) -> tuple[Parsed, str]:
        """The explanation request alone: the reasoning and refined prompt for `scores`."""
        flagged = policy.decide(scores).flagged  # what the explanation starts from
        explain = self.profile.explain(item, policy, scores, flagged)
        messages = (explain.messages if explain is not None
                    else (probes or self.profile.probes(item, policy))[0].messages)
        full = await self._ask(messages, item, self.options.max_tokens, (), stats, server)
        return self.profile.parse([full.text], policy), full.text

    async def refine(self, items: Sequence[JudgeInput], policy: Policy,
                     scores: Sequence[Mapping[str, float]]) -> list[Explanation]:
        """A Refiner (guard.plugins): the explanation request alone for items whose scores are
        already known (a preview that stopped its generation), no second verdict request."""
        async def one(item: JudgeInput, known: Mapping[str, float],
                      server: Server | None) -> Explanation:
            if not (self.profile.explains and policy.wants_explanation(known)):
                return Explanation()
            # The verdict it explains goes in as the item's last turn, as a judge-as-refiner
            # sees it (guard.judges.composite.JudgeRefiner): the model knows what was flagged.
            seen = HistoryEntry(prompt=item.prompt, scores=dict(known),
                                flagged=policy.decide(known).flagged)
            reasons, _ = await self._explain(replace(item, history=(*item.history, seen)),
                                             policy, known, _Stats(), server)
            return Explanation(reasons.thought, reasons.refined_prompt)

        if len(scores) != len(items):
            raise ValueError("refine: one score mapping per item")
        return await self._each(len(items), lambda i, server: one(items[i], scores[i], server))

    # --- requests -------------------------------------------------------------------------------

    def _body(self, messages: Sequence[Message], item: JudgeInput, max_tokens: int,
              stop: Sequence[str]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.options.model, "messages": to_openai(messages, item),
            "max_tokens": max_tokens, "temperature": self.options.temperature,
            **self.options.extra_body,
        }
        if self.options.logprobs:
            body.update(logprobs=True, top_logprobs=self.options.top_logprobs)
        if stop:
            body["stop"] = list(stop)
        return body

    async def _ask(self, messages: Sequence[Message], item: JudgeInput, max_tokens: int,
                   stop: Sequence[str], stats: _Stats, server: Server | None) -> _Answer:
        body = self._body(messages, item, max_tokens, stop)
        fleet, route = self.fleet, server

        async def attempt() -> dict[str, Any]:
            nonlocal route
            stats.requests += 1
            if fleet is None or route is None:
                return await self._post_litellm(body)
            retry = stats.requests > 1  # a retry is a request of its own on its server
            with fleet.busy(route, 1 if retry else 0) as target:
                try:
                    data = await self._post_http(body, target.base)
                except _Transient:
                    fleet.failed(target)
                    route = fleet.pick(avoid=target)  # the next try goes elsewhere
                    raise
            fleet.succeeded(target)
            stats.server = target.base
            return data

        stats.asks += 1
        return _answer(await self._call(attempt), stats)

    async def _post_http(self, body: dict[str, Any], base: str) -> dict[str, Any]:
        url = f"{base}/chat/completions"
        try:
            resp = await self._http().post(url, json=body)
        except ResponseTooLarge as exc:
            raise JudgeError(f"remote judge {too_large(exc)}") from None
        except httpx.TimeoutException as exc:
            raise _Transient(f"remote judge timed out after {self.options.timeout_s:g} s") from exc
        except httpx.HTTPError as exc:
            raise _Transient(f"remote judge unreachable at {base}: "
                             f"{type(exc).__name__}") from exc
        if resp.status_code != 200:
            error = _Transient if _transient(resp.status_code) else JudgeError
            retry_after = resp.headers.get("retry-after")
            raise error(f"remote judge answered {resp.status_code}",
                        headers={"retry-after": retry_after} if retry_after else None,
                        detail=resp.text, secrets=self._secrets())
        try:
            data = resp.json()
        except ValueError:
            raise JudgeError("remote judge answered with invalid JSON") from None
        if not isinstance(data, dict):
            raise JudgeError("remote judge answered with a non-object")
        return data

    async def _post_litellm(self, body: dict[str, Any]) -> dict[str, Any]:
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        import litellm

        # litellm's debug log prints the server's raw answer, which may echo the key
        redact_logs(("LiteLLM", "LiteLLM Router", "LiteLLM Proxy"), self._secrets())
        kwargs = dict(body)
        extra = {k: kwargs.pop(k) for k in list(kwargs) if k in self.options.extra_body}
        try:
            resp = await litellm.acompletion(
                **kwargs, api_base=self.options.api_base, api_key=self._key(),
                timeout=self.options.timeout_s, num_retries=0, max_retries=0,
                extra_headers={**self.options.headers, **trace_headers()} or None,
                extra_body=extra or None)
        except Exception as exc:  # noqa: BLE001 - litellm's exceptions, translated here
            status = getattr(exc, "status_code", None)
            timeout = isinstance(exc, litellm.exceptions.Timeout)
            transient = timeout or isinstance(exc, litellm.exceptions.APIConnectionError) or (
                isinstance(status, int) and _transient(status))
            what = "timed out" if timeout else f"failed ({type(exc).__name__}, {status})"
            # from None: litellm's exception may carry the request, key included
            raise (_Transient if transient else JudgeError)(
                f"remote judge {what}", detail=str(exc), secrets=self._secrets()) from None
        return resp.model_dump() if hasattr(resp, "model_dump") else dict(resp)

    def _secrets(self) -> tuple[str | None, ...]:
        # what a server echoing its request could send back of ours
        return (self._key(), *self.options.headers.values())


def _transient(status: int) -> bool:
    return status in RETRY_STATUS or status >= 500


def _answer(data: Mapping[str, Any], stats: _Stats) -> _Answer:
    try:
        choice = data["choices"][0]
        text = choice["message"].get("content") or ""
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise JudgeError("remote judge answered without choices[0].message") from exc
    logprobs = choice.get("logprobs") or {}
    tokens = logprobs.get("content") if isinstance(logprobs, dict) else None
    usage = data.get("usage") or {}
    stats.tokens += int(usage.get("completion_tokens") or 0)
    return _Answer(str(text), tokens if isinstance(tokens, list) else None, dict(usage))


def to_openai(messages: Sequence[Message], item: JudgeInput) -> list[dict[str, Any]]:
    """Profile messages to chat-completions messages: image placeholders become `image_url`
    parts with the item's image as a data URI; text-only contents become plain strings, which
    every OpenAI-compatible server accepts."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        if all(part.get("type") == "text" for part in content):
            out.append({"role": m["role"], "content": "".join(p["text"] for p in content)})
            continue
        parts: list[dict[str, Any]] = []
        for part in content:
            if part.get("type") == "image":
                if item.image is None:
                    continue
                url = f"data:{item.image.media_type};base64,{item.image.b64}"
                parts.append({"type": "image_url", "image_url": {"url": url}})
            else:
                parts.append({"type": "text", "text": part["text"]})
        out.append({"role": m["role"], "content": parts})
    return out


def _norm(token: str) -> str:
    return token.strip().lower()


def _slot_probs(probe: Probe, answer: _Answer) -> dict[str, dict[str, float]]:
    """Find each slot of `probe` in the answer's tokens (the token right after the slot's marker)
    and turn its top log-probabilities into the slot's answer probabilities. Slots not found, or
    whose options are all missing from the top tokens, are left out (the parsed text decides)."""
    if not answer.tokens:
        return {}
    slots = [piece for piece in probe.answer if isinstance(piece, Slot)]
    found: dict[str, dict[str, float]] = {}
    text = ""
    for entry in answer.tokens:
        token = str(entry.get("token", ""))
        for slot in slots:
            if slot.name in found:
                continue
            at_slot = (text.strip() == "" and token.strip() != "") if slot.marker == "" \
                else text.rstrip(" ").endswith(slot.marker)
            if at_slot:
                probs = _option_probs(slot, entry)
                if probs is not None:
                    found[slot.name] = probs
        text += token
    return found


def _option_probs(slot: Slot, entry: Mapping[str, Any]) -> dict[str, float] | None:
    candidates: dict[str, float] = {}
    for cand in [entry, *(entry.get("top_logprobs") or [])]:
        try:
            token, logprob = str(cand["token"]), float(cand["logprob"])
        except (KeyError, TypeError, ValueError):
            continue
        candidates.setdefault(token, logprob)  # the same token may be listed twice
    mass: dict[str, float] = dict.fromkeys(slot.options, 0.0)
    wanted = {label: _norm(text) for label, text in slot.options.items()}
    for token, logprob in candidates.items():
        for label, text in wanted.items():
            if _norm(token) == text and math.isfinite(logprob):
                mass[label] += math.exp(logprob)
                break  # a token counts once (`ipr`'s "keep" and "Keep" are one word here)
    total = sum(mass.values())
    if slot.rest is not None:
        out = {label: min(1.0, p) for label, p in mass.items()}
        out[slot.rest] = max(0.0, 1.0 - sum(out.values()))
        return out
    if total <= 0.0:
        return None
    return {label: p / total for label, p in mass.items()}


__all__ = ["RemoteJudge", "RemoteOptions", "to_openai"]
