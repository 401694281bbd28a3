"""Judge profiles: how a multimodal model is asked, where its verdict is read, how its answer parses.

A profile is a chat template plus a pure parser, shared by the `vlm` judge (a local model) and the
`remote` judge (a chat-completions server). It describes each question to the model as a *probe*:
chat messages (images as `{"type": "image"}` placeholders) plus the start of the assistant's answer,
with *slots* where the verdict is read:

    probe = messages + answer pieces:  "<judgement>\\nsexual:" [slot] " no\\nviolence:" [slot] ...

The `vlm` judge writes the answer pieces itself (teacher forcing) and reads, in one forward pass,
the model's distribution over the slot's answer tokens at every slot; the `remote` judge lets the
model answer and finds the slots in the returned tokens' `logprobs` by their marker text. Either way
a score is a real probability: the unsafe answer token's probability against the safe one's
(softmax over the two), or against everything else where the profile has no explicit unsafe word.

Profiles (`profile:` in the judge's config):

- `safeeditor`: the instruction lists the policy's categories; the answer is a per-category
  checklist, then the reasoning, then a refined prompt, in a fixed tagged format (verdict first, so
  that reasoning is decoded only when needed). Earlier rounds go in as earlier chat turns.
  Category c's score = P(" yes" | ..., "c:") against P(" no"), the earlier categories answered "no".
- `ipr`: compatible with the published IPR adapters (KEVIN04087/3B, /7B over Qwen2.5-VL-3B/7B-
  Instruct): their system prompt, the image and `Original Prompt: {prompt}`; the answer is `keep`
  or a refined prompt. Unsafe probability = 1 - P(first token of "keep"). IPR has no categories:
  the score goes to the categories named in `profile_options.categories`, by default every category
  whose policy action is `edit` (IPR can only refine, never refuse).
- `llavaguard`: the policy as LlavaGuard's policy text (categories coded O1..O9 in policy order),
  JSON `rating` / `category` / `rationale` out. Score of category k = P("Unsafe") times
  P(code k | "Unsafe") among the policy's codes. Judge only: no refined prompt (the proxy falls back
  to the rule-based refiner). More than nine categories: the tenth on get P("Unsafe").
- `shieldgemma2`: one probe per category with ShieldGemma 2's policy wording, "Yes" against "No".
  The real ShieldGemma 2 chat template wraps the policy in its instruction itself; for any other
  model set `profile_options: {wrap_instruction: true}`. Judge only.

Parsers are pure functions of the text; anything unexpected is an error, and an error makes every
category score 1.0 (fail closed), with the raw text kept by the judge for the trace.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from guard.errors import ConfigError
from guard.policy import Policy
from guard.types import HistoryEntry, JudgeInput

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
class RemotePlan:
    """The remote judge's first request: stop early after the verdict where the profile allows."""

    stop: tuple[str, ...] = ()
    max_tokens: int | None = None  # None: the judge's full max_tokens; the answer is the verdict


def unsafe_everywhere(policy: Policy, error: str, thought: str = "") -> Parsed:
    return Parsed({c: 1.0 for c in policy.categories}, thought=thought, error=error)


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _user(item: JudgeInput, text: str, *, image_first: bool = True) -> Message:
    parts: list[dict[str, Any]] = [_text(text)]
    if item.image is not None:
        parts.insert(0 if image_first else 1, {"type": "image"})
    return {"role": "user", "content": parts}


class Profile:
    """Base of the profiles; each overrides what differs."""

    name = ""
    explains = True  # whether decoding adds reasoning or a refined prompt

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


# --- safeeditor --------------------------------------------------------------------------------

SAFEEDITOR_SYSTEM = """\
You are SafeEditor, the safety judge and editor of a text-to-image service. You see the prompt \
a user gave and, when there is one, the image generated from it. Judge the image (or the prompt \
alone when there is no image) against each policy category below, give your reasoning, then write \
a refined prompt that keeps the user's intent but is safe under every category.

Policy categories:
{categories}

Answer in exactly this format, one line per category in the order listed, each yes or no:
<judgement>
{lines}
</judgement>
<thought>one or two sentences: what is unsafe and why</thought>
<refined_prompt>the refined prompt, or none when every category is no</refined_prompt>"""


def _describe(policy: Policy) -> str:
    return "\n".join(f"- {name}: {cat.description or name.replace('_', ' ') + ' content'}"
                     for name, cat in policy.categories.items())


def judgement_lines(policy: Policy, flagged: Sequence[str]) -> str:
    return "\n".join(f"{c}: {'yes' if c in flagged else 'no'}" for c in policy.categories)


class SafeEditorProfile(Profile):
    name = "safeeditor"

    def _messages(self, item: JudgeInput, policy: Policy) -> tuple[Message, ...]:
        system = SAFEEDITOR_SYSTEM.format(
            categories=_describe(policy),
            lines="\n".join(f"{c}: yes or no" for c in policy.categories))
        messages: list[Message] = [{"role": "system", "content": [_text(system)]}]
        for h in item.history:
            messages.append({"role": "user", "content": [_text(f"Prompt: {h.prompt}")]})
            messages.append({"role": "assistant", "content": [_text(self._past_answer(h, policy))]})
        text = f"Prompt: {item.prompt}"
        if item.original_prompt and item.original_prompt != item.prompt:
            text += f"\nOriginal prompt: {item.original_prompt}"
        messages.append(_user(item, text))
        return tuple(messages)

    @staticmethod
    def _past_answer(h: HistoryEntry, policy: Policy) -> str:
        return (f"<judgement>\n{judgement_lines(policy, h.flagged)}\n</judgement>\n"
                f"<thought>{h.thought}</thought>\n"
                f"<refined_prompt>{h.refined_prompt or 'none'}</refined_prompt>")

    def probes(self, item: JudgeInput, policy: Policy) -> list[Probe]:
        answer: list[str | Slot] = []
        before = "<judgement>\n"
        for c in policy.categories:
            answer += [f"{before}{c}:",
                       Slot(c, {UNSAFE: " yes", SAFE: " no"}, marker=f"\n{c}:")]
            before = " no\n"
        return [Probe(self._messages(item, policy), tuple(answer))]

    def combine(self, probs: Sequence[SlotProbs], policy: Policy) -> dict[str, float | None]:
        slots = probs[0] if probs else {}
        return {c: (slots[c][UNSAFE] if c in slots else None) for c in policy.categories}

    def explain(self, item: JudgeInput, policy: Policy, scores: Mapping[str, float],
                flagged: Sequence[str]) -> Explain:
        prefix = f"<judgement>\n{judgement_lines(policy, flagged)}\n</judgement>\n<thought>"
        return Explain(self._messages(item, policy), prefix, stop=("</refined_prompt>",))

    def remote_plan(self, policy: Policy) -> RemotePlan:
        return RemotePlan(stop=("</judgement>",), max_tokens=16 + 8 * len(policy.categories))

    def parse(self, texts: Sequence[str], policy: Policy) -> Parsed:
        return parse_safeeditor(texts[0] if texts else "", policy)


_TAG = r"<{0}>\s*(.*?)\s*(?:</{0}>|$)"
_LINE = re.compile(r"^\s*[-*]?\s*([A-Za-z0-9_ -]+?)\s*:\s*([A-Za-z]+)\s*\.?\s*$")


def parse_safeeditor(text: str, policy: Policy) -> Parsed:
    """Parse `<judgement>` (one `category: yes|no` line per policy category), `<thought>` and
    `<refined_prompt>`. The judgement may end without its closing tag (a remote answer stopped at
    it). Unknown, missing or repeated categories, or answers other than yes/no, are errors."""
    found = re.search(r"<judgement>(.*?)(?:</judgement>|<thought>|$)", text, re.S)
    if found is None:
        return unsafe_everywhere(policy, "no <judgement> block")
    answers: dict[str, bool] = {}
    for line in found.group(1).strip().splitlines():
        if not line.strip():
            continue
        m = _LINE.match(line)
        if m is None:
            return unsafe_everywhere(policy, f"judgement line not understood: {line.strip()!r}")
        name, answer = m.group(1).strip().lower().replace(" ", "_"), m.group(2).lower()
        if name not in policy.categories:
            return unsafe_everywhere(policy, f"unknown category in judgement: {name!r}")
        if name in answers:
            return unsafe_everywhere(policy, f"category {name!r} judged twice")
        if answer not in ("yes", "no"):
            return unsafe_everywhere(policy, f"{name}: expected yes or no, got {answer!r}")
        answers[name] = answer == "yes"
    missing = [c for c in policy.categories if c not in answers]
    if missing:
        return unsafe_everywhere(policy, f"judgement misses {', '.join(missing)}")
    thought_m = re.search(_TAG.format("thought"), text, re.S)
    refined_m = re.search(_TAG.format("refined_prompt"), text, re.S)
    thought = thought_m.group(1).strip() if thought_m else ""
    refined = refined_m.group(1).strip() if refined_m else None
    if refined is not None and refined.lower().strip(". ") in ("", "none", "n/a"):
        refined = None
    return Parsed({c: 1.0 if answers[c] else 0.0 for c in policy.categories},
                  thought=thought, refined_prompt=refined)


# --- ipr -----------------------------------------------------------------------------------------

# The system prompt the published IPR adapters were fine-tuned with, whitespace included.
IPR_SYSTEM = """
        You are an AI safety moderation model. Your task is to check and refine prompts intended for a text-to-image generation model, ensuring they comply strictly with AI safety guidelines and ethics.
        You will be given both an image and its corresponding text prompt. Use **both** the visual content and the text prompt to make your judgment.
        - If the prompt or the image contains any unsafe, inappropriate, harmful, or unethical content, **rewrite the prompt** to make it safe while preserving the original intent as closely as possible.
        - If the image already safe and ethical, simply respond with: keep
        """


class IPRProfile(Profile):
    name = "ipr"

    def __init__(self, categories: Sequence[str] | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.categories = tuple(categories) if categories is not None else None

    def targets(self, policy: Policy) -> tuple[str, ...]:
        if self.categories is not None:
            unknown = [c for c in self.categories if c not in policy.categories]
            if unknown:
                raise ConfigError(f"ipr profile: categories not in policy {policy.id!r}: "
                                  f"{', '.join(unknown)}")
            return self.categories
        return tuple(c for c, cat in policy.categories.items() if cat.action == "edit")

    def _messages(self, item: JudgeInput) -> tuple[Message, ...]:
        return ({"role": "system", "content": [_text(IPR_SYSTEM)]},
                _user(item, f"Original Prompt: {item.prompt}"))

    def probes(self, item: JudgeInput, policy: Policy) -> list[Probe]:
        slot = Slot("verdict", {SAFE: "keep"}, rest=UNSAFE)
        return [Probe(self._messages(item), (slot,))]

    def _spread(self, p: float, policy: Policy) -> dict[str, float]:
        targets = self.targets(policy)
        return {c: (p if c in targets else 0.0) for c in policy.categories}

    def combine(self, probs: Sequence[SlotProbs], policy: Policy) -> dict[str, float | None]:
        slots = probs[0] if probs else {}
        if "verdict" not in slots:
            return dict.fromkeys(policy.categories)
        return dict(self._spread(slots["verdict"][UNSAFE], policy))

    def explain(self, item: JudgeInput, policy: Policy, scores: Mapping[str, float],
                flagged: Sequence[str]) -> Explain:
        return Explain(self._messages(item), "", banned_first=("keep",) if flagged else ())

    def parse(self, texts: Sequence[str], policy: Policy) -> Parsed:
        return parse_ipr(texts[0] if texts else "", policy, self.targets(policy))


def parse_ipr(text: str, policy: Policy, targets: Sequence[str]) -> Parsed:
    """`keep` (any case, optional full stop or quotes) is safe; any other non-empty text is the
    refined prompt, which means the model found the image unsafe. Empty output is an error."""
    clean = text.strip().strip("`").strip()
    clean = re.sub(r"^(refined|rewritten|safe)?\s*prompt\s*:\s*", "", clean, flags=re.I)
    clean = clean.strip().strip("\"'").strip()
    if not clean:
        return unsafe_everywhere(policy, "empty answer")
    if clean.lower().rstrip(".!") == "keep":
        return Parsed(dict.fromkeys(policy.categories, 0.0))
    return Parsed({c: (1.0 if c in targets else 0.0) for c in policy.categories},
                  refined_prompt=clean)


# --- llavaguard --------------------------------------------------------------------------------

LLAVAGUARD_INTRO = ("Provide a safety assessment for the content provided by the user. Determine "
                    "compliance or violation against our safety policy by reviewing the following "
                    "policy categories:\n")
LLAVAGUARD_STEPS = """\
Assessment Steps:
1. Select a safety "rating". This should be "Unsafe" if the content violates the safety policy; \
otherwise, it should be "Safe".
2. Assign a policy "category". If none of the policy categories are applicable, select \
"NA: None applying".
3. Provide a "rationale". Describe the user content and justify why it is considered safe or \
unsafe, referring to the specific policy category and its associated guidelines to illustrate \
any violations or compliance.
To provide your assessment use the following json template for each category:
{{
    "rating": str<"Unsafe"|"Safe">,
    "category": str<{codes}|"NA: None applying">,
    "rationale": str,
}}.
"""
_LG_OPEN = '{\n    "rating": "'


def llavaguard_codes(policy: Policy) -> dict[str, str]:
    """category -> LlavaGuard code label, e.g. `O1: Sexual`."""
    return {c: f"O{i}: {c.replace('_', ' ').capitalize()}"
            for i, c in enumerate(policy.categories, start=1)}


class LlavaGuardProfile(Profile):
    name = "llavaguard"

    def _messages(self, item: JudgeInput, policy: Policy) -> tuple[Message, ...]:
        codes = llavaguard_codes(policy)
        body = "".join(
            f"{codes[c]}:\nShould not:\n- Contain "
            f"{cat.description or c.replace('_', ' ') + ' content'}.\n\n"
            for c, cat in policy.categories.items())
        text = LLAVAGUARD_INTRO + body + LLAVAGUARD_STEPS.format(
            codes="|".join(f'"{label}"' for label in codes.values()))
        if item.image is None:
            text += f"\nThe content to assess is this text-to-image prompt: {item.prompt}\n"
        return (_user(item, text),)

    def probes(self, item: JudgeInput, policy: Policy) -> list[Probe]:
        digits = {c: str(i) for i, c in enumerate(policy.categories, start=1) if i <= 9}
        answer: tuple[str | Slot, ...] = (
            _LG_OPEN, Slot("rating", {UNSAFE: "Unsafe", SAFE: "Safe"}, marker='"rating": "'),
            'Unsafe",\n    "category": "O', Slot("category", digits, marker='"category": "O'))
        return [Probe(self._messages(item, policy), answer)]

    def combine(self, probs: Sequence[SlotProbs], policy: Policy) -> dict[str, float | None]:
        slots = probs[0] if probs else {}
        if "rating" not in slots:
            return dict.fromkeys(policy.categories)
        unsafe = slots["rating"][UNSAFE]
        which = slots.get("category")
        # Without the category slot (a remote answer rated Safe names no category) the joint
        # probability of any one category is at most P(unsafe).
        return {c: unsafe * which[c] if which is not None and c in which else unsafe
                for c in policy.categories}

    def explain(self, item: JudgeInput, policy: Policy, scores: Mapping[str, float],
                flagged: Sequence[str]) -> Explain:
        codes = llavaguard_codes(policy)
        if flagged:
            top = max(flagged, key=lambda c: scores.get(c, 0.0))
            head = f'Unsafe",\n    "category": "{codes[top]}",\n'
        else:
            head = 'Safe",\n    "category": "NA: None applying",\n'
        return Explain(self._messages(item, policy), _LG_OPEN + head + '    "rationale": "',
                       stop=("}",))

    def remote_plan(self, policy: Policy) -> RemotePlan:
        return RemotePlan(stop=('"rationale"',), max_tokens=64)

    def parse(self, texts: Sequence[str], policy: Policy) -> Parsed:
        return parse_llavaguard(texts[0] if texts else "", policy)


def parse_llavaguard(text: str, policy: Policy) -> Parsed:
    """Parse LlavaGuard's JSON. A verdict-only answer (stopped before `"rationale"`) is accepted.
    Unsafe with a category outside the policy, or anything not JSON of that shape, is an error."""
    body = text.strip()
    fenced = re.search(r"```(?:json)?\s*(.*?)```", body, re.S)
    if fenced:
        body = fenced.group(1).strip()
    start, end = body.find("{"), body.rfind("}")
    if start < 0:
        return unsafe_everywhere(policy, "no JSON object")
    candidate = body[start:end + 1] if end > start else body[start:]
    data = _loads_lenient(candidate)
    if not isinstance(data, dict):
        return unsafe_everywhere(policy, "answer is not a JSON object")
    rating = str(data.get("rating", "")).strip().lower()
    rationale = str(data.get("rationale", "") or "").strip()
    if rating == "safe":
        return Parsed(dict.fromkeys(policy.categories, 0.0), thought=rationale)
    if rating != "unsafe":
        return unsafe_everywhere(policy, f"rating must be Safe or Unsafe, got {rating!r}",
                                 rationale)
    code = re.match(r"\s*O(\d+)\b", str(data.get("category", "")))
    names = list(policy.categories)
    if code is None or not 1 <= int(code.group(1)) <= len(names):
        return unsafe_everywhere(policy, f"unknown category {data.get('category')!r}", rationale)
    hit = names[int(code.group(1)) - 1]
    return Parsed({c: 1.0 if c == hit else 0.0 for c in names}, thought=rationale)


def _loads_lenient(text: str) -> Any:
    """json.loads, also accepting the template's trailing comma and an answer cut off before its
    closing brace (verdict-only requests stop there)."""
    attempts = [text, re.sub(r",\s*}", "}", text)]
    cut = text.rstrip().rstrip(",")
    if not cut.endswith("}"):
        attempts.append(cut + "\n}")
    for attempt in attempts:
        try:
            return json.loads(attempt)
        except json.JSONDecodeError:
            continue
    return None


# --- shieldgemma2 ------------------------------------------------------------------------------

SHIELDGEMMA2_INSTRUCTION = """\
You are a policy expert trying to help determine whether a generated or real image is in \
violation of the safety policy below. Your decision must very clearly follow the specific \
language used in the safety policy and should not include any interpretation outside of the \
safety policy.

<BEGIN_SAFETY_POLICY>
{policy}
</END_SAFETY_POLICY>

Does the image violate the above policy? Your Answer must start with 'Yes' or 'No'."""


class ShieldGemma2Profile(Profile):
    name = "shieldgemma2"
    explains = False

    def __init__(self, wrap_instruction: bool = False, **options: Any) -> None:
        super().__init__(**options)
        self.wrap_instruction = bool(wrap_instruction)

    @staticmethod
    def policy_text(category: str, policy: Policy) -> str:
        title = category.replace("_", " ").title()
        what = policy.categories[category].description or f"{category.replace('_', ' ')} content"
        return f'"No {title} content": The image shall not contain {what}.'

    def probes(self, item: JudgeInput, policy: Policy) -> list[Probe]:
        out = []
        for c in policy.categories:
            text = self.policy_text(c, policy)
            if item.image is None:
                text += f"\n(No image yet: judge this text-to-image prompt: {item.prompt})"
            if self.wrap_instruction:
                text = SHIELDGEMMA2_INSTRUCTION.format(policy=text)
            slot = Slot("verdict", {UNSAFE: "Yes", SAFE: "No"})
            out.append(Probe((_user(item, text),), (slot,), key=c))
        return out

    def combine(self, probs: Sequence[SlotProbs], policy: Policy) -> dict[str, float | None]:
        scores: dict[str, float | None] = dict.fromkeys(policy.categories)
        for c, slots in zip(policy.categories, probs, strict=False):
            if "verdict" in slots:
                scores[c] = slots["verdict"][UNSAFE]
        return scores

    def remote_plan(self, policy: Policy) -> RemotePlan:
        return RemotePlan(max_tokens=1)

    def parse(self, texts: Sequence[str], policy: Policy) -> Parsed:
        return parse_shieldgemma2(texts, policy)


def parse_shieldgemma2(texts: Sequence[str], policy: Policy) -> Parsed:
    """One answer per category, in policy order, each starting with Yes or No."""
    if len(texts) != len(policy.categories):
        return unsafe_everywhere(policy, f"{len(texts)} answers for "
                                         f"{len(policy.categories)} categories")
    scores = {}
    for c, text in zip(policy.categories, texts, strict=True):
        first = re.match(r"\W*([A-Za-z]+)", text)
        word = first.group(1).lower() if first else ""
        if word not in ("yes", "no"):
            return unsafe_everywhere(policy, f"{c}: expected Yes or No, got {text.strip()[:40]!r}")
        scores[c] = 1.0 if word == "yes" else 0.0
    return Parsed(scores)


# --- registry ------------------------------------------------------------------------------------

PROFILES: dict[str, Callable[..., Profile]] = {
    "safeeditor": SafeEditorProfile,
    "ipr": IPRProfile,
    "llavaguard": LlavaGuardProfile,
    "shieldgemma2": ShieldGemma2Profile,
}


def get_profile(name: str, options: Mapping[str, Any] | None = None) -> Profile:
    try:
        factory = PROFILES[name]
    except KeyError:
        raise ConfigError(f"unknown judge profile {name!r}; known: "
                          f"{', '.join(sorted(PROFILES))}") from None
    try:
        return factory(**dict(options or {}))
    except TypeError as exc:
        raise ConfigError(f"profile {name!r}: {exc}") from exc


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


__all__ = [
    "PROFILES", "Explain", "Message", "Parsed", "Probe", "Profile", "RemotePlan", "Slot",
    "SlotProbs", "get_profile", "has_image", "merge_scores", "parse_ipr", "parse_llavaguard",
    "parse_safeeditor", "parse_shieldgemma2", "unsafe_everywhere",
]
