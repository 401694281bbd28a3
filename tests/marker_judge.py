"""A judge for tests that reads images the way a real judge would, only simpler.

It is a real implementation of the Judge protocol: prompt text is scored by the real builtin judge
(term lists of the policy), and images by their top-left pixel, which the fake backend paints:
red = violence 0.97 (edit), green = hate 0.99 (refuse), black = the judge crashes.
For a red image it writes a refined prompt, as a SafeEditor-style judge does.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image

from guard.core.policy import Policy
from guard.core.types import JudgeInput, Verdict
from guard.judges.builtin import BuiltinJudge

PIXEL_SCORES = {(255, 0, 0): {"violence": 0.97}, (0, 255, 0): {"hate": 0.99}}


class JudgeCrashed(RuntimeError):
    pass


class MarkerJudge:
    id = "marker"

    def __init__(self) -> None:
        self.text = BuiltinJudge.from_config({"nudenet": False})
        self.batches: list[int] = []

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> MarkerJudge:
        return cls()

    async def judge(self, items: Sequence[JudgeInput], policy: Policy) -> list[Verdict]:
        self.batches.append(len(items))
        text = await self.text.judge(
            [JudgeInput(prompt=i.prompt, original_prompt=i.original_prompt) for i in items],
            policy)
        out = []
        for item, verdict in zip(items, text, strict=True):
            scores = dict(verdict.scores)
            if item.image is not None:
                pixel = Image.open(io.BytesIO(item.image.data)).convert("RGB").getpixel((0, 0))
                if pixel == (0, 0, 0):
                    raise JudgeCrashed("marker judge crashed on a black image")
                for category, score in PIXEL_SCORES.get(pixel, {}).items():  # type: ignore[arg-type]
                    scores[category] = max(scores.get(category, 0.0), score)
            refined = verdict.refined_prompt
            if item.image is not None and scores.get("violence", 0.0) >= 0.97:
                refined = f"{item.prompt}, calm and peaceful"
            out.append(Verdict(scores=scores, judge_id=self.id, thought=verdict.thought,
                               refined_prompt=refined))
        return out

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None
