"""Which torch device and dtype a model runs on, for every component that loads one (the `vlm`
judge, the diffusers backend). torch is imported only when asked, so importing the guard does not
import it."""

from __future__ import annotations

from typing import Any


def pick_device(device: str) -> str:
    """`auto`: cuda, then mps, then cpu; any other torch device string as given."""
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(dtype: str, device: str) -> Any:
    """`auto`: bfloat16 on CUDA (float16 where bf16 is unsupported), float16 on MPS, float32
    elsewhere; or the torch dtype named (`bfloat16`, `float16`, `float32`)."""
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if kind == "mps":
        return torch.float16
    return torch.float32
