"""The `llavaguard` profile: LlavaGuard 1.2's own policy, as it was trained: the nine categories
O1-O9 with their trained names and text (`TRAINED`), and its JSON `rating` / `category` /
`rationale` answer.

A policy category is judged by the trained categories it maps to (`CATEGORY_CODES`, overridden by
`profile_options: {codes: {category: [O1, ...] | null}}`):

    O1 Hate, Humiliation, Harassment   hate, harassment
    O2 Violence, Harm, or Cruelty      violence, shocking
    O3 Sexual Content, O4 Nudity       sexual
    O5 Criminal Planning,
    O6 Weapons or Substance Abuse      illegal_activity
    O7 Self-Harm                       self_harm
    O8 Animal Cruelty                  violence
    O9 Disasters or Emergencies        shocking

Score of a category = P("Unsafe") times the sum of P(code | "Unsafe") over its codes, the codes
read as a softmax over the nine trained digits. The prompt is always the trained one, whatever
the policy's own descriptions say. The rest - a policy category no trained code covers (`minors`
by default) - has its documented place here: it is not assessed by this model (no score, left out
of the verdict's `assessed_on`, listed in `details.unassessed`), so the policy's `unassessed:`
decides it, or another judge of an ensemble covers it; map it with `codes` to judge it anyway.
Judge only: no refined prompt (the proxy falls back to the rule-based refiner).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from guard.core.policy import Policy
from guard.core.types import JudgeInput
from guard.judges.profiles.base import (
    SAFE,
    UNSAFE,
    Explain,
    Message,
    Parsed,
    Probe,
    Profile,
    RemotePlan,
    Slot,
    SlotProbs,
    unsafe_everywhere,
    user_message,
)
from guard.support.errors import ConfigError

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


# LlavaGuard 1.2's trained policy (the LlavaGuard repository's default policy, json-v16):
# code, name, and the text it was trained with.
TRAINED: tuple[tuple[str, str, str], ...] = (
    ("O1", "Hate, Humiliation, Harassment", """\
Should not:
- Contain content that expresses hateful, derogatory, or demeaning sentiments against people \
based on sensitive personal characteristics like their race, color, religion, national origin, \
sexual orientation, gender, gender identity, or disability.
- Contain content that encourages discrimination or harassment against people based on those \
characteristics.
Can:
- Contain educational content that provides information on discrimination, humiliation, and \
harassment.
- Discuss historical events involving hate and harassment."""),
    ("O2", "Violence, Harm, or Cruelty", """\
Should not:
- Contain content of people planning or engaging in violence.
- Contain content that encourages people to engage in violence or cruelty, including harm to \
others.
Can:
- Contain educational content that provides information on violence, harm, and cruelty.
- Discuss historical events involving violence and cruelty."""),
    ("O3", "Sexual Content", """\
Should not:
- Contain sexually explicit (i.e., erotic) content.
Can:
- Contain content that is related to sexuality and sexual education.
- Provide general information regarding sexual activities.
- Provide guidance on topics related to sexual health.
- Contain content of people in a loving and affectionate manner if it is not sexually explicit \
content."""),
    ("O4", "Nudity Content", """\
Should not:
- Contain visible genitalia (e.g., exposed breast, nipple, vagina, vulva, or penis) or explicit \
nudity content.
Can:
- Contain artistic nudity if the content does not include visible genitalia.
- Contain educational content and general information on the human body.
- Provide guidance on topics related to sexual health."""),
    ("O5", "Criminal Planning", """\
Should not:
- Contain content of people planning or engaging in criminal activities like theft, kidnapping, \
or financial crimes.
- Contain content that encourages people to engage in criminal activities or condone criminal \
behavior.
Can:
- Contain content that helps people understand how crimes are committed, provided that the \
content is not so detailed that it could be used to provide a roadmap for future crimes.
- Contain content that educates on crime prevention and understanding criminal behavior without \
providing guidance for criminal activities."""),
    ("O6", "Weapons or Substance Abuse", """\
Should not:
- Contain content of illegal weapons with the intent to promote violence or harm.
- Contain content of trafficking, consumption, or use of illegal drugs.
- Promote the use of tobacco, alcohol, and cannabis.
- Contain content about the creation or production of illegal substances.
Can:
- Contain weapons used in a legal and safe context without any indication of violence or intent \
to harm.
- Discussions on firearm ownership and educational content on regulated substances without \
promoting illegal activities.
- Contain content that provides factual information about legal drugs, including their effects \
and chemical composition, without promoting their use.
- Contain content that offers educational insights into the manufacturing processes of \
substances, ensuring that such information is general and does not include detailed \
instructions that could facilitate their production."""),
    ("O7", "Self-Harm", """\
Should not:
- Contain content that could encourage people to harm themselves.
- Contain content that romanticizes or condones self-harm or suicide.
Can:
- Contain educational content that informs about the prevalence, causes, and effects of \
self-harm and suicide, such as statistical data and discussions on mental health challenges.
- Contain resources and information that guide individuals toward professional help and support \
services for mental health, self-harm, and suicide prevention."""),
    ("O8", "Animal Cruelty", """\
Should not:
- Contain content that could encourage people to harm animals.
- Contain content that romanticizes or condones harming animals.
- Contain explicit animal cruelty.
Can:
- Contain content that provides general information regarding animal cruelty."""),
    ("O9", "Disasters or Emergencies", """\
Should not:
- Contain content about individuals who are deceased or have suffered harm as a result of \
disasters or emergencies.
- Contain content about suffering, cruelty, or exploitation of individuals during such events.
Can:
- Contain respectful news coverage and reports on emergencies, prioritizing informational value \
over sensationalism.
- Contain educational content that provides factual information on historical and current \
disasters or emergencies."""),
)
LABELS = {code: f"{code}: {name}" for code, name, _ in TRAINED}  # "O1: Hate, Humiliation, ..."
CATEGORY_CODES: dict[str, tuple[str, ...]] = {
    "hate": ("O1",), "harassment": ("O1",), "violence": ("O2", "O8"), "shocking": ("O2", "O9"),
    "sexual": ("O3", "O4"), "illegal_activity": ("O5", "O6"), "self_harm": ("O7",),
}
POLICY_TEXT = LLAVAGUARD_INTRO + "".join(
    f"{LABELS[code]}: \n{text}\n\n" for code, _, text in TRAINED) + LLAVAGUARD_STEPS.format(
    codes="|".join(f'"{label}"' for label in LABELS.values()))


class LlavaGuardProfile(Profile):
    name = "llavaguard"

    def __init__(self, codes: Mapping[str, Sequence[str] | str | None] | None = None,
                 **options: Any) -> None:
        super().__init__(**options)
        merged: dict[str, tuple[str, ...]] = dict(CATEGORY_CODES)
        for category, given in dict(codes or {}).items():
            merged[category] = () if given is None else (given,) if isinstance(given, str) \
                else tuple(given)
        unknown = sorted({c for cs in merged.values() for c in cs} - set(LABELS))
        if unknown:
            raise ConfigError(f"profile 'llavaguard': no trained category {', '.join(unknown)} "
                              "(it has O1-O9)")
        self.codes = {c: cs for c, cs in merged.items() if cs}

    def coverage(self, policy: Policy) -> dict[str, set[str]]:
        return {c: {"text", "image"} for c in policy.categories if c in self.codes}

    def _messages(self, item: JudgeInput, policy: Policy) -> tuple[Message, ...]:
        text = POLICY_TEXT
        if item.image is None:
            text += f"\nThe content to assess is this text-to-image prompt: {item.prompt}\n"
        return (user_message(item, text),)

    def probes(self, item: JudgeInput, policy: Policy) -> list[Probe]:
        digits = {code: code[1:] for code in LABELS}
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
        return {c: unsafe * min(1.0, sum(which.get(k, 0.0) for k in self.codes[c]))
                if which is not None else unsafe
                for c in policy.categories if c in self.codes}

    def explain(self, item: JudgeInput, policy: Policy, scores: Mapping[str, float],
                flagged: Sequence[str]) -> Explain:
        if flagged:
            top = max(flagged, key=lambda c: scores.get(c, 0.0))
            head = f'Unsafe",\n    "category": "{LABELS[self.codes.get(top, ("O1",))[0]]}",\n'
        else:
            head = 'Safe",\n    "category": "NA: None applying",\n'
        return Explain(self._messages(item, policy), _LG_OPEN + head + '    "rationale": "',
                       stop=("}",))

    def remote_plan(self, policy: Policy) -> RemotePlan:
        return RemotePlan(stop=('"rationale"',), max_tokens=64)

    def parse(self, texts: Sequence[str], policy: Policy) -> Parsed:
        return parse_llavaguard(texts[0] if texts else "", policy, self.codes)


def parse_llavaguard(text: str, policy: Policy,
                     codes: Mapping[str, Sequence[str]] | None = None) -> Parsed:
    """Parse LlavaGuard's JSON. A verdict-only answer (stopped before `"rationale"`) is accepted.
    Unsafe names a trained code (O1-O9); the categories mapped to it (`codes`, by default
    `CATEGORY_CODES`) score 1.0. A code outside O1-O9, or anything not JSON of that shape, is an
    error."""
    codes = CATEGORY_CODES if codes is None else codes
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
    code = re.match(r"\s*(O\d+)\b", str(data.get("category", "")))
    if code is None or code.group(1) not in LABELS:
        return unsafe_everywhere(policy, f"unknown category {data.get('category')!r}", rationale)
    hit = code.group(1)
    return Parsed({c: 1.0 if hit in codes.get(c, ()) else 0.0 for c in policy.categories},
                  thought=rationale)


def _loads_lenient(text: str) -> Any:
    """json.loads, also accepting the template's trailing comma, an answer cut off before its
    closing brace (verdict-only requests stop there), and one cut off inside the rationale
    (decoding stops at `max_new_tokens`)."""
    attempts = [text, re.sub(r",\s*}", "}", text)]
    cut = text.rstrip().rstrip(",")
    if not cut.endswith("}"):
        attempts += [cut + "\n}", text + '"\n}']
    for attempt in attempts:
        try:
            return json.loads(attempt, strict=False)
        except json.JSONDecodeError:
            continue
    return None
