"""Reading the verdict: one forward pass over prompts with their teacher-forced answers, and each
slot's answer probabilities from the logits at that slot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from guard.judges.profiles import Slot
from guard.judges.vlm.collate import Encoded, collate
from guard.judges.vlm.loading import Loaded
from guard.judges.vlm.prefix import PromptKV, cache_of, keep_prompt


@dataclass(slots=True)
class Row:
    """One probe ready for the forward pass: its encoded prompt, the teacher-forced answer's
    token ids, and each slot with its offset in the answer and its options' token ids."""

    encoded: Encoded
    answer: list[int]
    slots: list[tuple[Slot, int, dict[str, int]]]


def read_slots(loaded: Loaded, rows: Sequence[Row], *, keep_prompts: bool = False,
               ) -> tuple[list[dict[str, dict[str, float]]], list[PromptKV | None]]:
    """Per row, slot name -> answer label -> probability, from one forward pass over all rows;
    and per row, with `keep_prompts`, its prompt's KV cache where it can be reused for an
    explanation (guard.judges.vlm.prefix; None elsewhere)."""
    import torch

    inputs, starts = collate([(row.encoded, row.answer) for row in rows], loaded)
    # Absolute position of each slot: the last token before the answer token it predicts.
    where = [[starts[r] + len(row.encoded.ids) + off for _, off, _ in row.slots]
             for r, row in enumerate(rows)]
    wanted = sorted({pos for positions in where for pos in positions})
    column = {pos: j for j, pos in enumerate(wanted)}
    with torch.inference_mode():
        output = _forward(loaded.model, inputs, wanted, loaded.device, keep_prompts)
        logits = output.logits.float()
        probs = [{slot.name: _slot_probs(logits[r, column[pos]], slot, ids)
                  for (slot, _, ids), pos in zip(row.slots, where[r], strict=True)}
                 for r, row in enumerate(rows)]
        cache = cache_of(output) if keep_prompts else None
        # Only a prompt without left padding has the positions it would have alone.
        kvs = [keep_prompt(cache, r, len(row.encoded.ids))
               if cache is not None and starts[r] == 0 else None
               for r, row in enumerate(rows)]
    return probs, kvs


def _forward(model: Any, inputs: dict[str, Any], positions: list[int], device: Any,
             use_cache: bool) -> Any:
    """The output with logits at `positions` only (the vocabulary projection is the big part of
    a short read); with `use_cache`, the pass's KV cache too."""
    import torch

    keep = torch.tensor(positions, dtype=torch.long, device=device)
    try:
        return model(**inputs, use_cache=use_cache, logits_to_keep=keep)
    except TypeError:  # a model without logits_to_keep
        output = model(**inputs, use_cache=use_cache)
        output.logits = output.logits[:, keep]
        return output


def _slot_probs(vec: Any, slot: Slot, ids: Mapping[str, int]) -> dict[str, float]:
    import torch

    labels = list(ids)
    index = torch.tensor([ids[label] for label in labels], device=vec.device)
    if slot.rest is None:
        probs = torch.softmax(vec[index], dim=-1).tolist()
        return dict(zip(labels, probs, strict=True))
    probs = torch.softmax(vec, dim=-1)[index].tolist()
    out = dict(zip(labels, probs, strict=True))
    out[slot.rest] = max(0.0, 1.0 - sum(probs))
    return out
