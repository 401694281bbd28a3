"""Decoding an explanation: greedy `generate` with the chosen KV cache (falling back to the dynamic
cache for good when the static one fails), a stop on text and a ban on some first tokens."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from guard.judges.vlm.loading import Loaded
from guard.judges.vlm.prefix import PromptKV, continuation

log = logging.getLogger("guard.judges.vlm")


def decode(loaded: Loaded, inputs: dict[str, Any], *, max_new_tokens: int,
           max_cache_len: int | None, stops: Sequence[str], banned: list[list[int]],
           prompt_kv: PromptKV | None = None) -> tuple[list[list[int]], bool]:
    """Greedy decoding after the left-padded batch `inputs`; the new token ids of each row, and
    whether the prompt's prefill was reused. `stops`: texts after which a row may stop;
    `banned`: per row, tokens it may not start with; `prompt_kv`: the scoring pass's cache of
    a single row's prompt (guard.judges.vlm.prefix), continued from instead of a prefill."""
    from transformers import LogitsProcessorList, StoppingCriteriaList

    prompt_len = inputs["input_ids"].shape[1]
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": 1,
        "pad_token_id": loaded.pad_id,
    }
    if stops:
        kwargs["stopping_criteria"] = StoppingCriteriaList(
            [StopOnText(loaded.tokenizer, stops, prompt_len)])
    if any(banned):
        kwargs["logits_processor"] = LogitsProcessorList([BanFirst(banned, prompt_len)])
    if prompt_kv is not None and loaded.reuse_prefill:
        try:
            # A static cache sized in steps of 256 tokens: prompts of nearby lengths share one
            # shape, so the compiled decoding step is not recompiled for each.
            size = max(max_cache_len or 0, -(-(prompt_len + max_new_tokens) // 256) * 256)
            out = _generate(loaded, continuation(
                loaded.model, inputs, prompt_kv,
                static=loaded.cache_implementation == "static", max_cache_len=size), kwargs)
            return out[:, prompt_len:].tolist(), True
        except Exception as exc:  # noqa: BLE001 - an optimisation: prefill as before
            log.warning("continuing from the scoring pass's prefill failed (%s: %s); "
                        "explanations prefill their prompt from now on", type(exc).__name__, exc)
            loaded.reuse_prefill = False
    if loaded.cache_implementation:
        kwargs["cache_implementation"] = loaded.cache_implementation
        if max_cache_len:
            kwargs["max_cache_len"] = max_cache_len
    try:
        out = _generate(loaded, inputs, kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure of the compiled path
        if "cache_implementation" not in kwargs:
            raise
        # The static cache is a speed-up, not a requirement: decode this batch and every later
        # one with the dynamic cache rather than failing the request. (Seen on an H100 with torch
        # 2.11: inductor's recompile for a new batch size raised inside generate.)
        log.warning("decoding with the %s KV cache failed (%s: %s); using the dynamic "
                    "cache from now on", kwargs["cache_implementation"],
                    type(exc).__name__, exc)
        loaded.cache_implementation = None
        kwargs.pop("cache_implementation")
        kwargs.pop("max_cache_len", None)
        out = _generate(loaded, inputs, kwargs)
    return out[:, prompt_len:].tolist(), False


def _generate(loaded: Loaded, inputs: dict[str, Any], kwargs: dict[str, Any]) -> Any:
    import torch

    with torch.inference_mode():
        return loaded.model.generate(**inputs, **kwargs)


class StopOnText:
    """Stop a row once its decoded text contains a stop string. (transformers' `stop_strings`
    rebuilds a table over the whole vocabulary on every `generate` call: ~0.1 s for 150k tokens.)"""

    def __init__(self, tokenizer: Any, stops: Sequence[str], prompt_len: int,
                 window: int = 16) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.prompt_len = prompt_len
        self.window = window

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        start = max(self.prompt_len, input_ids.shape[1] - self.window)
        tails = input_ids[:, start:].tolist()
        done = [any(stop in self.tokenizer.decode(tail) for stop in self.stops)
                for tail in tails]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class BanFirst:
    """Forbid some tokens as the first decoded token, per row (e.g. `keep` once the verdict says
    unsafe, so that the answer is a refined prompt)."""

    def __init__(self, banned: list[list[int]], prompt_len: int) -> None:
        self.banned = banned
        self.prompt_len = prompt_len

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if input_ids.shape[1] == self.prompt_len:
            for r, ids in enumerate(self.banned):
                if ids:
                    scores[r, ids] = float("-inf")
        return scores
