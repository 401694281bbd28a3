"""What every profile is made of: probes with slots, the explain request, the parsed answer, and
the `Profile` base a built-in or third-party profile subclasses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from guard.core.policy import Policy
from guard.core.types import JudgeInput
from guard.support.errors import ConfigError

Message = dict[str, Any]
SlotProbs = Mapping[str, Mapping[str, float]]  # slot name -> answer label -> probability
UNSAFE, SAFE = "unsafe", "safe"


@dataclass(frozen=True, slots=True)
class Slot:
    """A position in the answer where the verdict is read.

    `options` maps an answer label to the text whose first token stands for it; with `rest` set,
    the probabilities come from the full vocabulary and `rest` gets everything the options do not
    (`ipr`: P(unsafe) = 1 - P(keep)); otherwise they are a softmax over the options alone.
    `marker` is the text right before the slot in a free-running answer ("" = the very start).
    """

    name: str
    options: Mapping[str, str]
    rest: str | None = None
    marker: str = ""


@dataclass(frozen=True, slots=True)
class Probe:
    messages: tuple[Message, ...]
    answer: tuple[str | Slot, ...]
    key: str = ""  # what this probe asks about, where a profile asks one thing per probe

    @property
    def has_image(self) -> bool:
        return has_image(self.messages)


def has_image(messages: Sequence[Message]) -> bool:
    return any(part.get("type") == "image" for m in messages
               if isinstance(m["content"], list) for part in m["content"])


@dataclass(frozen=True, slots=True)
class Explain:
    """How to ask for the reasoning and refined prompt: messages, the forced start of the answer,
    first answer tokens that are not allowed (`ipr`'s "keep" once the verdict is unsafe), and the
    text after which decoding may stop."""

    messages: tuple[Message, ...]
    prefix: str
    banned_first: tuple[str, ...] = ()
    stop: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Parsed:
    scores: dict[str, float]
    thought: str = ""
    refined_prompt: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True, slots=True)
class Encoding:
    """How the vlm judge turns a probe's messages into tokens, as the model's own processor
    does: the chat template with or without the generation prompt, then the processor with or
    without the tokenizer's special tokens (a BOS the template does not write itself)."""

    add_generation_prompt: bool = True
    add_special_tokens: bool = False


@dataclass(frozen=True, slots=True)
class RemotePlan:
    """The remote judge's first request: stop early after the verdict where the profile allows."""

    stop: tuple[str, ...] = ()
    max_tokens: int | None = None  # None: the judge's full max_tokens; the answer is the verdict


def unsafe_everywhere(policy: Policy, error: str, thought: str = "") -> Parsed:
    return Parsed({c: 1.0 for c in policy.categories}, thought=thought, error=error)


def text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def user_message(item: JudgeInput, text: str, *, image_first: bool = True) -> Message:
    parts: list[dict[str, Any]] = [text_part(text)]
    if item.image is not None:
        parts.insert(0 if image_first else 1, {"type": "image"})
    return {"role": "user", "content": parts}


class Profile:
    """Base of the profiles; each overrides what differs.

    A profile is built from its `profile_options` as keyword arguments; an option it does not
    know is a ConfigError."""

    name = ""
    explains = True  # whether decoding adds reasoning or a refined prompt
    encoding = Encoding()

    def __init__(self, **options: Any) -> None:
        if options:
            raise ConfigError(
                f"profile {self.name!r} has no option(s) {', '.join(sorted(options))}")

    def probes(self, item: JudgeInput, policy: Policy) -> list[Probe]:
        raise NotImplementedError

    def combine(self, probs: Sequence[SlotProbs], policy: Policy) -> dict[str, float | None]:
        """Category scores from the slots' probabilities, one mapping per probe; None where a
        slot is missing (a remote answer that did not follow the format there)."""
        raise NotImplementedError

    def explain(self, item: JudgeInput, policy: Policy, scores: Mapping[str, float],
                flagged: Sequence[str]) -> Explain | None:
        return None

    def parse(self, texts: Sequence[str], policy: Policy) -> Parsed:
        """Parse the answer text(s), one per probe (or one explanation)."""
        raise NotImplementedError

    def remote_plan(self, policy: Policy) -> RemotePlan:
        return RemotePlan()

    def coverage(self, policy: Policy) -> dict[str, set[str]] | None:
        """Per policy category, the inputs ("text", "image") the model was trained to judge it
        on; a category left out is not assessed. None: every category, on whatever it is given."""
        return None


def assessed(profile: Profile, item: JudgeInput, policy: Policy, scores: Mapping[str, float]
             ) -> tuple[dict[str, float], dict[str, list[str]] | None, list[str]]:
    """The scores of what `profile` assessed in `item`, per category the inputs it assessed it
    on (None when the profile does not say), and the categories it did not assess."""
    cover = profile.coverage(policy)
    if cover is None:
        return dict(scores), None, []
    given = {"text", "image"} if item.image is not None else {"text"}
    on: dict[str, list[str]] = {
        c: [i for i in ("text", "image") if i in cover.get(c, set()) & given]
        for c in policy.categories}
    on = {c: inputs for c, inputs in on.items() if inputs}
    return ({c: s for c, s in scores.items() if c in on}, on,
            [c for c in policy.categories if c not in on])


def merge_scores(measured: Mapping[str, float | None], parsed: Parsed,
                 policy: Policy) -> dict[str, float]:
    """Scores measured from token probabilities where there are some, else the parsed answer's;
    a parse error makes every category 1.0 whatever was measured (fail closed)."""
    if not parsed.ok:
        return dict(parsed.scores)
    out: dict[str, float] = {}
    for c in policy.categories:
        value = measured.get(c)
        out[c] = float(value) if value is not None else parsed.scores.get(c, 1.0)
    return out
