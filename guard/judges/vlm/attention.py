"""Qwen-VL vision towers' windowed attention as one padded SDPA call per layer: an optimisation
the `vlm` judge applies at load (`vision_attention: auto`)."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("guard.judges.vlm")

_BATCHED_WINDOWS = "flash_padded_sdpa"  # "flash" in the name selects the models' varlen path
_WINDOWED_VISION = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl"}


def batch_vision_windows(model: Any) -> None:
    """Qwen-VL vision towers attend within windows of 64 patches; without flash-attn,
    transformers runs one SDPA call per window (about 86 per 1024 px image, in each of 28 layers)
    and synchronises per layer. Route them through `padded_varlen_sdpa` instead: all windows of
    a layer in one padded SDPA call, the same result."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    vision = getattr(config, "vision_config", None)
    if getattr(config, "model_type", None) not in _WINDOWED_VISION or vision is None \
            or "flash" in str(getattr(vision, "_attn_implementation", "") or ""):
        return
    try:
        from transformers import AttentionInterface

        AttentionInterface.register(_BATCHED_WINDOWS, padded_varlen_sdpa)
        # Set on the vision config directly: `set_attn_implementation` takes any name with
        # "flash" in it for a kernel to fetch from the hub (transformers 5.2x), and this one is
        # registered here, not fetched.
        vision._attn_implementation = _BATCHED_WINDOWS
    except Exception as exc:  # noqa: BLE001 - an optimisation; the model works without it
        log.warning("vlm judge: keeping the vision tower's own attention (%s)", exc)


def padded_varlen_sdpa(module: Any, query: Any, key: Any, value: Any,
                       attention_mask: Any = None, scaling: float | None = None,
                       dropout: float = 0.0, cu_seq_lens_q: Any = None,
                       max_length_q: Any = None, **kwargs: Any) -> tuple[Any, None]:
    """Variable-length attention over packed sequences (`cu_seq_lens_q` boundaries) as one SDPA
    call: sequences padded to the longest, padded keys masked. Shapes as transformers' flash
    attention interface: (1, heads, tokens, dim) in, (1, tokens, heads, dim) out."""
    import torch
    import torch.nn.functional as F

    cu = cu_seq_lens_q
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, dim)
    lengths = cu[1:] - cu[:-1]
    width = int(max_length_q) if max_length_q is not None else int(lengths.max())
    pos = torch.arange(width, device=q.device)
    valid = pos[None, :] < lengths[:, None]  # (sequences, width)
    index = torch.where(valid, cu[:-1, None] + pos[None, :], 0)
    qp, kp, vp = (t[index].transpose(1, 2) for t in (q, k, v))  # (sequences, heads, width, dim)
    mask = None if bool(valid.all()) else valid[:, None, None, :]
    out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2)[valid].unsqueeze(0), None
