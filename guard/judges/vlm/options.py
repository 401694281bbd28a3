"""The `vlm` judge's options (the `judge:` section of the config, `kind: vlm`).

Options (all but `model` optional):

- `model`: folder or hub id, loaded with `AutoProcessor` + `AutoModelForImageTextToText`.
- `adapter` (null): PEFT adapter folder or hub id over `model`; `merge_adapter` (true) folds it
  into the weights at load, which makes inference as fast as the base model.
- `profile` (safeeditor): prompt template + parser, built in or registered, see
  `guard.judges.profiles`;
  `profile_options` ({}): that profile's options (`ipr`: `categories`; `shieldgemma2`:
  `wrap_instruction`).
- `device` (auto): `auto` picks cuda, then mps, then cpu; or any torch device string.
- `dtype` (auto): `auto` is bfloat16 on CUDA (float16 where bf16 is unsupported), float16 on MPS,
  float32 on CPU; or `bfloat16` | `float16` | `float32`.
- `explain` (unsafe_only): decode reasoning and a refined prompt only for items whose scores cross
  a policy threshold (`unsafe_only`), or for every item (`always`).
- `max_batch` (8), `max_wait_ms` (5): the micro-batcher: items of one request and of concurrent
  requests share one forward pass of up to `max_batch` items; a batch leaves when full or when its
  oldest item has waited `max_wait_ms`.
- `max_new_tokens` (96): most tokens decoded for an explanation.
- `max_image_side` (null): shrink images whose longer side exceeds this many pixels before the
  processor sees them (fewer image tokens, faster prefill); null leaves it to the processor.
- `cache_implementation` (auto): KV cache for decoding: `auto` is `static` on CUDA (transformers
  then compiles the decoding step: the first explanation of each batch size pays the compile) and
  the default dynamic cache elsewhere; `dynamic` or `static` to choose.
- `max_cache_len` (null): with the static cache, size it for at least this many tokens so that
  longer prompts later do not reallocate it (and recompile).
- `reuse_prefill` (true): an explanation that runs alone continues from the scoring pass's KV
  cache of its prompt instead of prefilling the prompt (image included) a second time
  (guard.judges.vlm.prefix); false always prefills.
- `attn_implementation` (null): e.g. `sdpa`, `flash_attention_2`; null lets transformers choose.
- `vision_attention` (auto): for Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision towers without
  flash-attn, run each layer's attention windows as one padded SDPA call instead of one call per
  window (same result, far fewer kernel launches); `model` keeps the model's own code.
- `trust_remote_code` (false), `local_files_only` (false): passed to `from_pretrained`.
- `id` (null): the judge id recorded in traces; default `vlm:<profile>:<model name>[+<adapter>]`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class VLMOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Model folder or hub id.")
    adapter: str | None = Field(None, description="PEFT (LoRA) adapter folder or hub id.")
    merge_adapter: bool = Field(True, description="Fold the adapter into the weights at load.")
    profile: str = Field("safeeditor", description="safeeditor | ipr | llavaguard | shieldgemma2")
    profile_options: dict[str, Any] = Field(default_factory=dict)
    device: str = Field("auto", description="auto | cuda | cuda:N | mps | cpu")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    explain: Literal["unsafe_only", "always"] = "unsafe_only"
    max_batch: int = Field(8, ge=1, le=256)
    max_wait_ms: float = Field(5.0, ge=0, le=10_000)
    max_new_tokens: int = Field(96, ge=1, le=4096)
    max_image_side: int | None = Field(None, ge=16)
    cache_implementation: Literal["auto", "dynamic", "static"] = "auto"
    max_cache_len: int | None = Field(None, ge=1)
    reuse_prefill: bool = True
    attn_implementation: str | None = None
    vision_attention: Literal["auto", "model"] = "auto"
    trust_remote_code: bool = False
    local_files_only: bool = False
    id: str | None = None
