"""What the engine writes down: a judged item as the trace records it, a slot's history as the
judge sees it, a slot's result."""

from __future__ import annotations

from typing import Any

from guard.core.policy import Decision, Policy
from guard.core.types import (
    GeneratedImage,
    HistoryEntry,
    ImageDecision,
    JudgedImage,
    SlotResult,
    Trace,
    Verdict,
)
from guard.pipeline.slots import Slot


def decide(policy: Policy, verdict: Verdict | None) -> Decision:
    # No verdict means the judge failed and the policy said allow.
    return Decision("pass") if verdict is None else policy.decide(verdict.scores)


def history_entry(prompt: str, verdict: Verdict | None, decision: Decision) -> HistoryEntry:
    return HistoryEntry(prompt=prompt, scores=dict(verdict.scores) if verdict else {},
                        flagged=decision.flagged, thought=verdict.thought if verdict else "",
                        refined_prompt=verdict.refined_prompt if verdict else None)


def judged(slot: int, prompt: str, image: GeneratedImage | None, verdict: Verdict | None,
           decision: Decision, **made: Any) -> JudgedImage:
    """`made`: an image's round, backend_ms and refined_by."""
    if verdict is None:
        return JudgedImage(slot=slot, prompt=prompt,
                           image_sha256=image.sha256 if image else None,
                           judge_id="(judge failed; allowed by policy)", action=decision.action,
                           **made)
    return JudgedImage(
        slot=slot, prompt=prompt, image_sha256=image.sha256 if image else None, **made,
        judge_id=verdict.judge_id, scores={k: round(v, 6) for k, v in verdict.scores.items()},
        flagged=list(decision.flagged), action=decision.action, thought=verdict.thought,
        refined_prompt=verdict.refined_prompt, raw=verdict.raw[:4000],
        judge_ms=round(verdict.latency_ms, 3), details=dict(verdict.details))


def given_up(slot: Slot, decision: ImageDecision) -> SlotResult:
    """A slot that ended without a safe image: `refused` (out of tries) or `failed` (of time)."""
    return SlotResult(slot=slot.index, decision=decision, rounds=slot.rounds, prompt=slot.prompt,
                      categories=sorted(slot.history[-1].flagged) if slot.history else [])


def categories_of(trace: Trace, slot: int) -> list[str]:
    """Categories flagged on the way to this slot's image: the prescreen's and its rounds'."""
    return sorted({c for r in trace.rounds for i in r.images
                   if r.kind == "prescreen" or i.slot == slot for c in i.flagged})
