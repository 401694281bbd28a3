"""Prompts to tensors: one prompt encoded by the processor, unpadded, and many of them (each with
tokens appended) left-padded into one batch on the model's device."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from guard.judges.profiles import Encoding, Message, has_image
from guard.judges.vlm.loading import Loaded


@dataclass(slots=True)
class Encoded:
    """One prompt as the processor encoded it, unpadded: token ids, tensors aligned with the
    tokens (e.g. `mm_token_type_ids`), and the rest (pixel values, grids), image-major."""

    ids: list[int]
    per_token: dict[str, Any]
    other: dict[str, Any]


def encode_prompt(loaded: Loaded, messages: Sequence[Message], image: Any,
                  encoding: Encoding | None = None) -> Encoded:
    """The prompt's tokens as the model's processor makes them (`encoding`: the profile's)."""
    encoding = encoding or Encoding()
    kwargs: dict[str, Any] = {"return_tensors": "pt",
                              "add_special_tokens": encoding.add_special_tokens}
    if image is not None and has_image(messages):
        kwargs["images"] = [image]
    # Called from several threads at once: safe because every call uses the same settings
    # (one text, no padding, no truncation), so the fast tokenizer's state never changes.
    text = loaded.processor.apply_chat_template(
        list(messages), add_generation_prompt=encoding.add_generation_prompt, tokenize=False)
    enc = loaded.processor(text=[text], **kwargs)
    ids = enc["input_ids"]
    per_token, other = {}, {}
    for key, value in enc.items():
        if key in ("input_ids", "attention_mask") or not hasattr(value, "shape"):
            continue
        if value.dim() >= 2 and tuple(value.shape[:2]) == tuple(ids.shape):
            per_token[key] = value[0]
        else:
            other[key] = value
    return Encoded(ids[0].tolist(), per_token, other)


def collate(rows: Sequence[tuple[Encoded, list[int]]],
            loaded: Loaded) -> tuple[dict[str, Any], list[int]]:
    """Left-pad prompts + appended answer tokens into one batch; returns the inputs on the model's
    device and, per row, where its prompt starts. Left padding keeps every row's end aligned, and
    rotary position embeddings are shift-invariant, so a padded row scores as it would alone."""
    import torch

    lengths = [len(enc.ids) + len(extra) for enc, extra in rows]
    width = max(lengths)
    ids = torch.full((len(rows), width), loaded.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    per_token: dict[str, list[Any]] = {}
    other: dict[str, list[Any]] = {}
    starts = []
    for r, ((enc, extra), n) in enumerate(zip(rows, lengths, strict=True)):
        start = width - n
        starts.append(start)
        ids[r, start:] = torch.tensor(enc.ids + extra, dtype=torch.long)
        mask[r, start:] = 1
        for key, value in enc.per_token.items():
            full = torch.zeros((width, *value.shape[1:]), dtype=value.dtype)
            full[start:start + len(enc.ids)] = value
            per_token.setdefault(key, []).append(full)
        for key, value in enc.other.items():
            other.setdefault(key, []).append(value)
    inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    inputs.update({k: torch.stack(v) for k, v in per_token.items()})
    inputs.update({k: _cat(v) for k, v in other.items()})
    for key, value in inputs.items():
        if value.is_floating_point():
            value = value.to(loaded.dtype)
        inputs[key] = value.to(loaded.device)
    return inputs, starts


def _cat(values: list[Any]) -> Any:
    """Concatenate image-major tensors, zero-padding trailing dims that differ (e.g. a varying
    number of image tiles) as the processors' own batching does."""
    import torch

    if all(v.shape[1:] == values[0].shape[1:] for v in values):
        return torch.cat(values)
    shape = [max(v.shape[d] for v in values) for d in range(1, values[0].dim())]
    padded = []
    for v in values:
        full = torch.zeros((v.shape[0], *shape), dtype=v.dtype)
        full[tuple(slice(0, s) for s in v.shape)] = v
        padded.append(full)
    return torch.cat(padded)
