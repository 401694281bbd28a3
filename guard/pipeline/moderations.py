"""Checks that make no images: OpenAI's POST /v1/moderations, served by the proxy's judge under
the caller's policy, and the exchange it shares with LiteLLM's guardrail API
(guard.pipeline.guardrail).

    Check(state, endpoint, headers)    an Exchange: the trace and the request span open
      .open(authorization, policy)     authenticate (a client key), the caller's policy, quotas
      .answer(work)                    the work's answer, or its failure as a traced reply
      .finish(reply)                   the Exchange's: the trace written before the reply leaves
    moderate(check, job)               one judge call for every input; the results in OpenAI's
                                       names (guard.core.moderation.OPENAI_NAMES)

Each input is judged with its text and each of its images (a text-only input: the text alone);
an input's score per category is the highest of its judged items'. The policy decides what is
flagged, its thresholds per category; `category_applied_input_types` says what each category was
assessed on: the judge's own account (`Verdict.assessed_on`) where it gives one, else the input
types it was given. A judge failure is a 503 whatever `on_judge_error` says: an unjudged input
has no honest answer. The trace's decision for each input is what the policy would do with it as
an images prompt (passed, edited, refused); nothing is generated or changed.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from pydantic import PrivateAttr

from guard.core.config import ImageUrlsConfig
from guard.core.moderation import (
    ImageRef,
    InputType,
    ModerationGuardBlock,
    ModerationGuardResult,
    ModerationJob,
    ModerationResponse,
    moderation_result,
)
from guard.core.policy import Decision, Policy
from guard.core.types import (
    INPUTS,
    GeneratedImage,
    ImageDecision,
    JudgeInput,
    RoundRecord,
    Trace,
    Verdict,
    clock,
    decode_b64,
    worst,
)
from guard.pipeline.exchange import TRACE_HEADER, Exchange, GuardState, Reply
from guard.pipeline.records import judged
from guard.plugins import UrlFetcher, build_url_fetcher
from guard.support.errors import GuardError, JudgeError, RequestError
from guard.support.inputs import validate_image

log = logging.getLogger("safeedit.serving")
DECISION_OF: dict[str, ImageDecision] = {"pass": "passed", "edit": "edited", "refuse": "refused"}


class CheckTrace(Trace):
    """The trace of a check that makes no images: its decision is the one the check sets
    (`decided`), not the worst of images it never made."""

    _decision: ImageDecision = PrivateAttr("passed")

    def decided(self, decision: ImageDecision) -> None:
        self._decision = decision

    def outcome_decision(self) -> ImageDecision:
        return self._decision


class Check(Exchange):
    """One check without images, traced from its first byte as an images request is."""

    def __init__(self, state: GuardState, endpoint: str,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(state, endpoint, headers)
        self.trace: CheckTrace = CheckTrace(**self.trace.model_dump())
        self.policy: Policy | None = None

    async def open(self, authorization: str | None, policy_header: str | None) -> Reply | None:
        """Authenticate, choose the caller's policy (as for images: key, tenant, default) and
        count the request; None when admitted, else the (unfinished) error."""
        trace = self.trace
        with self._active():
            try:
                principal = self.caller(authorization)
                self.policy = self.state.policy_for(principal, policy_header)
                trace.policy = self.policy.ref
                self.quota = await self.state.quotas.admit(trace.id, principal.key_id,
                                                           principal.tenant, 0)
            except Exception as exc:  # noqa: BLE001 - every failure is a traced reply
                return self._failure(exc)
        return None

    async def answer(self, work: Callable[[], Awaitable[dict[str, Any]]]) -> Reply:
        """The work's answer as a 200, or its failure in OpenAI's shape (not yet finished)."""
        with self._active():
            try:
                return Reply(200, {TRACE_HEADER: self.trace.id}, body=await work())
            except Exception as exc:  # noqa: BLE001 - every failure is a traced reply
                return self._failure(exc)

    async def judge(self, items: Sequence[JudgeInput], policy: Policy, stage: str,
                    record: RoundRecord) -> list[Verdict]:
        """One judge call for `items`, timed into `record`; any failure is a JudgeError."""
        state, timer = self.state, clock()
        try:
            with state.telemetry.span("guard.judge", **{"guard.judge": state.judge.id,
                                                        "guard.stage": stage,
                                                        "guard.batch": len(items)}):
                verdicts = await state.judge.judge(items, policy)
            if len(verdicts) != len(items):
                raise JudgeError(f"judge returned {len(verdicts)} verdicts for {len(items)} "
                                 "items")
            return list(verdicts)
        except Exception as exc:  # noqa: BLE001 - any judge failure is a judge failure
            reason = exc.message if isinstance(exc, GuardError) else type(exc).__name__
            record.error = f"judge error: {reason}"
            log.warning("judge %s failed at %s: %s", state.judge.id, stage, reason)
            raise JudgeError("The safety judge is unavailable; nothing was judged.",
                             detail=reason) from exc
        finally:
            record.judge_ms += timer.ms()
            state.metrics.judge_latency.labels(state.judge.id, stage).observe(timer.ms() / 1000)

    def note(self, **attributes: Any) -> None:
        """Attributes of the request span."""
        for name, value in attributes.items():
            self._span.set_attribute(name, value)

    def count(self, decision: Decision) -> None:
        for category in decision.flagged:
            self.state.metrics.flags.labels(category, decision.action).inc()


# --- images given by the client ---------------------------------------------------------------

async def load_images(refs: Sequence[ImageRef], options: ImageUrlsConfig, max_bytes: int,
                      trace: Trace) -> dict[ImageRef, GeneratedImage]:
    """Each image a request names: a base64 data URI, or an http(s) URL fetched through the
    SSRF-safe fetcher where `moderations.image_urls` allows it. The trace records each image's
    sha256 and where it came from (a URL's scheme and host only: its path or query may hold a
    token)."""
    out: dict[ImageRef, GeneratedImage] = {}
    fetcher: UrlFetcher | None = None
    sources: list[dict[str, Any]] = []
    try:
        for ref in refs:
            scheme = ref.url.split(":", 1)[0].lower()
            if scheme == "data":
                image = _data_uri(ref, max_bytes)
                sources.append({"param": ref.param, "source": "data"})
            elif scheme in ("http", "https"):
                if not options.enabled:
                    raise RequestError(
                        f"Invalid '{ref.param}': this server does not fetch image URLs "
                        "(moderations.image_urls is off); send the image as a data URI "
                        "(data:image/png;base64,...).", param=ref.param,
                        code="image_url_not_allowed")
                if fetcher is None:
                    fetcher = build_url_fetcher(options.model_dump(exclude={"enabled"}))
                image = await fetcher.fetch_image(ref.url, ref.param)
                sources.append({"param": ref.param, "source": "url",
                                "host": urlsplit(ref.url).hostname})
            else:
                raise RequestError(f"Invalid '{ref.param}': expected a data URI "
                                   "(data:image/png;base64,...) or an http(s) URL.",
                                   param=ref.param, code="invalid_image_url")
            sources[-1]["sha256"] = image.sha256
            out[ref] = image
    finally:
        if sources:
            trace.request["images"] = sources
        if fetcher is not None:
            await fetcher.aclose()
    return out


def _data_uri(ref: ImageRef, max_bytes: int) -> GeneratedImage:
    header, comma, data = ref.url[5:].partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise RequestError(f"Invalid '{ref.param}': expected a base64 data URI "
                           "(data:image/png;base64,...).", param=ref.param,
                           code="invalid_image_url")
    try:
        raw = decode_b64(data)
    except ValueError:
        raise RequestError(f"Invalid '{ref.param}': the data URI is not valid base64.",
                           param=ref.param, code="invalid_image_url") from None
    return GeneratedImage(data=raw, media_type=validate_image(raw, ref.param,
                                                              max_bytes=max_bytes))


# --- POST /v1/moderations ---------------------------------------------------------------------

async def moderate(check: Check, job: ModerationJob) -> dict[str, Any]:
    """Judge every input of `job` under the check's policy; OpenAI's response (with the guard
    block). The trace records one prescreen-kind round, an item per judged (text, image)."""
    assert check.policy is not None
    state, trace, policy = check.state, check.trace, check.policy
    trace.model = job.model
    trace.request = {"model": job.model,
                     "input": [{"text": item.text, "images": len(item.images)}
                               for item in job.items]}
    if job.unknown_fields:
        trace.request["unknown_fields"] = list(job.unknown_fields)
    images = await load_images([ref for item in job.items for ref in item.images],
                               state.config.moderations.image_urls,
                               state.config.server.max_upload_bytes, trace)
    inputs: list[JudgeInput] = []
    owner: list[int] = []  # the index of the input each judged item belongs to
    for index, item in enumerate(job.items):
        shown: list[GeneratedImage | None] = [images[ref] for ref in item.images]
        for image in shown or [None]:
            inputs.append(JudgeInput(prompt=item.text, original_prompt=item.text, image=image))
            owner.append(index)
    record = RoundRecord(index=0, kind="prescreen")
    trace.rounds.append(record)
    # Scores only: a moderation has no use for a thought or a refined prompt.
    verdicts = await check.judge(inputs, policy.verdict_only(), "moderation", record)
    scores: list[dict[str, float]] = [{} for _ in job.items]
    applied: list[dict[str, set[str]]] = [{} for _ in job.items]
    for given, verdict, index in zip(inputs, verdicts, owner, strict=True):
        record.images.append(judged(index, given.prompt, given.image, verdict,
                                    policy.decide(verdict.scores)))
        for category, score in verdict.scores.items():
            scores[index][category] = max(scores[index].get(category, 0.0), float(score))
        for category, types in _applied(verdict, given, policy).items():
            applied[index].setdefault(category, set()).update(types)
    results, guard_results, decisions = [], [], []
    for index in range(len(job.items)):
        decision = policy.decide(scores[index])
        check.count(decision)
        flagged = set(decision.flagged)
        in_policy = {c: s for c, s in scores[index].items() if c in policy.categories}
        results.append(moderation_result(
            {**dict.fromkeys(policy.categories, 0.0), **in_policy}, flagged,
            {c: [t for t in INPUTS if t in types]  # type: ignore[misc]
             for c, types in applied[index].items()}))
        decisions.append(DECISION_OF[decision.action])
        guard_results.append(ModerationGuardResult(decision=DECISION_OF[decision.action],
                                                   categories=sorted(flagged)))
    trace.categories = sorted({c for r in guard_results for c in r.categories})
    trace.decided(worst(decisions))  # type: ignore[arg-type]
    check.note(**{"guard.moderation.inputs": len(job.items)})
    return ModerationResponse(
        id="modr-" + uuid.uuid4().hex, model=job.model, results=results,
        guard=ModerationGuardBlock(trace_id=trace.id, policy=trace.policy,
                                   judge=state.judge.id, results=guard_results),
    ).model_dump(mode="json")


def _applied(verdict: Verdict, item: JudgeInput, policy: Policy) -> dict[str, list[InputType]]:
    """What each policy category was assessed on in this item: the judge's account where it
    gives one, else what it was given; never the text when the item had none."""
    coverage = verdict.coverage(policy.categories, image=item.image is not None)
    has_text = bool(item.prompt.strip())
    return {c: [t for t in types if t != "text" or has_text]  # type: ignore[misc]
            for c, types in coverage.items()}
