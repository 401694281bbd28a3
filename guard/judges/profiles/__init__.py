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

Profiles (`profile:` in the judge's config), one module each, where their verdict is described:

- `safeeditor` (default): a per-category yes/no checklist, then the reasoning and a refined prompt.
- `ipr`: the published IPR adapters' prompt; `keep` or a refined prompt.
- `llavaguard`: LlavaGuard's policy text and JSON rating; judge only.
- `shieldgemma2`: one Yes/No question per category; judge only.

Parsers are pure functions of the text; anything unexpected is an error, and an error makes every
category score 1.0 (fail closed), with the raw text kept by the judge for the trace.

Profiles register like judges and backends: the built-ins through `profiles` below, the same
registry a third party uses (`profiles.register("mine", MyProfile)`, a `Profile` subclass or any
callable taking the `profile_options` as keywords), or the entry-point group
`safeedit.judge_profiles`. Both judges look a profile up by name with `get_profile`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from guard.judges.profiles.base import (
    SAFE,
    UNSAFE,
    Encoding,
    Explain,
    Message,
    Parsed,
    Probe,
    Profile,
    RemotePlan,
    Slot,
    SlotProbs,
    assessed,
    has_image,
    merge_scores,
    unsafe_everywhere,
)
from guard.judges.profiles.ipr import IPR_SYSTEM, IPRProfile, parse_ipr
from guard.judges.profiles.llavaguard import LlavaGuardProfile, parse_llavaguard
from guard.judges.profiles.safeeditor import SAFEEDITOR_SYSTEM, SafeEditorProfile, parse_safeeditor
from guard.judges.profiles.shieldgemma2 import ShieldGemma2Profile, parse_shieldgemma2
from guard.plugins import profiles
from guard.support.errors import ConfigError


def get_profile(name: str, options: Mapping[str, Any] | None = None) -> Profile:
    """The profile registered as `name`, built with its `profile_options`; an unknown name or
    option is a ConfigError."""
    factory = profiles.factory(name)
    try:
        return factory(**dict(options or {}))
    except TypeError as exc:
        raise ConfigError(f"profile {name!r}: {exc}") from exc


__all__ = [
    "IPR_SYSTEM", "SAFE", "SAFEEDITOR_SYSTEM", "UNSAFE", "Encoding", "Explain", "IPRProfile",
    "LlavaGuardProfile", "Message", "Parsed", "Probe", "Profile", "RemotePlan",
    "SafeEditorProfile", "ShieldGemma2Profile", "Slot", "SlotProbs", "get_profile", "has_image",
    "assessed", "merge_scores", "parse_ipr", "parse_llavaguard", "parse_safeeditor", "parse_shieldgemma2",
    "profiles", "unsafe_everywhere",
]
