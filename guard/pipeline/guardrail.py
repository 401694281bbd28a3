"""LiteLLM's Generic Guardrail API (POST /beta/litellm_basic_guardrail_api): the guard's
prescreen, asked by a LiteLLM proxy before it calls a model.

    input_type request:   each text judged as a prompt under the caller's policy
        every text passes          -> NONE
        an edit-category crossed   -> GUARDRAIL_INTERVENED, `texts` with each flagged text
                                      replaced by its refined prompt (the judge's, else the rule
                                      refiner's, as the engine's prescreen writes it)
        a refuse-category crossed  -> BLOCKED, `blocked_reason` in OpenAI's words
    input_type response:  the texts judged the same way; a response cannot be refined, so
                          anything but a pass is BLOCKED
    images (data URIs, or URLs `moderations.image_urls` allows) are judged with the texts as
    their context; an image that does not pass is BLOCKED: an image cannot be refined here.
    `additional_provider_specific_params: {edits: block}` (the guardrail's config in LiteLLM)
    blocks what would be rewritten: LiteLLM 1.110's image endpoints drop a rewritten prompt
    (docs/gateways.md), and a prompt to refine must then not go through as it is.

LiteLLM sends an image generation's prompt (as `texts`) but never the images it returns: the
images themselves are judged only when the generation goes through the proxy (docs/gateways.md).
With the guard disabled (`guard.enabled: false`) every check answers NONE, traced. A judge
failure is a 503, which LiteLLM treats as a failed guardrail (its `fail_on_error`).
"""

from __future__ import annotations

from typing import Any

from guard.core.moderation import (
    GuardrailAction,
    GuardrailGuardBlock,
    GuardrailRequest,
    GuardrailResponse,
    ImageRef,
)
from guard.core.policy import Decision
from guard.core.types import GeneratedImage, ImageDecision, JudgeInput, RoundRecord
from guard.pipeline.moderations import Check, load_images
from guard.pipeline.records import judged
from guard.pipeline.slots import Slot
from guard.support.errors import RequestError

_DROPPED = ("user_api_key_hash",)  # request_data kept in the trace, less the key's hash


async def guardrail_check(check: Check, req: GuardrailRequest) -> dict[str, Any]:
    assert check.policy is not None
    state, trace, policy = check.state, check.trace, check.policy
    texts, edits = list(req.texts or []), _edits(req)
    trace.model = req.model
    trace.request = {
        "input_type": req.input_type, "texts": texts, "images": len(req.images or ()),
        **{k: v for k in ("litellm_call_id", "litellm_trace_id", "litellm_version")
           if (v := getattr(req, k)) is not None},
        "request_data": {k: v for k, v in req.request_data.items() if k not in _DROPPED},
    }
    if not state.engine.enabled:
        return _answer(check, "NONE", "passed")
    found = await load_images([ImageRef(url, f"images[{i}]")
                               for i, url in enumerate(req.images or ())],
                              state.config.moderations.image_urls,
                              state.config.server.max_upload_bytes, trace)
    context = "\n".join(texts)
    items = [JudgeInput(prompt=text, original_prompt=text) for text in texts]
    images: list[GeneratedImage | None] = [None] * len(items) + list(found.values())
    items += [JudgeInput(prompt=context, original_prompt=context, image=image)
              for image in found.values()]
    if not items:
        return _answer(check, "NONE", "passed")
    refining = req.input_type == "request"
    record = RoundRecord(index=0, kind="prescreen")
    trace.rounds.append(record)
    verdicts = await check.judge(items, policy if refining else policy.verdict_only(),
                                 "guardrail", record)
    decisions: list[Decision] = []
    for slot, (item, image, verdict) in enumerate(zip(items, images, verdicts, strict=True)):
        decision = policy.decide(verdict.scores)
        decisions.append(decision)
        check.count(decision)
        record.images.append(judged(slot, item.prompt, image, verdict, decision))
    trace.categories = sorted({c for d in decisions for c in d.flagged})
    unsafe = [d for d in decisions if d.unsafe]
    if not unsafe:
        return _answer(check, "NONE", "passed")
    what = "the prompt" if refining else "the response"
    if (not refining or edits == "block" or any(d.action == "refuse" for d in unsafe)
            or any(d.unsafe for d in decisions[len(texts):])):
        return _blocked(check, what, unsafe)
    refined = list(texts)
    for slot, (text, decision) in enumerate(zip(texts, decisions, strict=False)):
        if decision.action != "edit":
            continue
        found_prompt = Slot(slot, text).next_prompt(verdicts[slot], decision, policy)
        if found_prompt is None:  # nothing new to offer: the prompt cannot be served as is
            return _blocked(check, what, unsafe)
        refined[slot], by = found_prompt
        record.images[slot].details.update({"guardrail_text": refined[slot], "refined_by": by})
    return _answer(check, "GUARDRAIL_INTERVENED", "edited", texts=refined)


def _edits(req: GuardrailRequest) -> str:
    """`additional_provider_specific_params.edits`: `rewrite` (the default) answers an edit with
    the refined texts, `block` blocks it (for a gateway that drops rewritten prompts)."""
    edits = (req.additional_provider_specific_params or {}).get("edits", "rewrite")
    if edits not in ("rewrite", "block"):
        raise RequestError("Invalid 'additional_provider_specific_params.edits': expected "
                           "'rewrite' or 'block'.",
                           param="additional_provider_specific_params.edits")
    return str(edits)


def _blocked(check: Check, what: str, unsafe: list[Decision]) -> dict[str, Any]:
    cats = ", ".join(sorted({c for d in unsafe for c in d.flagged})) or "unspecified"
    # OpenAI's words for a refusal, as the images API answers it; LiteLLM shows the reason.
    reason = (f"Your request was rejected as a result of the safety system ({what} crossed: "
              f"{cats}). Trace {check.trace.id}.")
    return _answer(check, "BLOCKED", "refused", blocked_reason=reason)


def _answer(check: Check, action: GuardrailAction, decision: ImageDecision,
            **fields: Any) -> dict[str, Any]:
    trace = check.trace
    trace.decided(decision)
    check.note(**{"guard.guardrail.action": action})
    return GuardrailResponse(
        action=action, **fields,
        guard=GuardrailGuardBlock(trace_id=trace.id, decision=decision,
                                  categories=trace.categories, policy=trace.policy),
    ).model_dump(mode="json", exclude_none=True)
