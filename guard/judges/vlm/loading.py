"""Loading the `vlm` judge's model: processor and model from a folder or hub id, an optional PEFT
adapter over it, device and dtype, and the tokenizer helpers the judge reads and writes with."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from guard.judges.vlm.attention import batch_vision_windows
from guard.judges.vlm.options import VLMOptions
from guard.support.torch_device import pick_device, pick_dtype

log = logging.getLogger("guard.judges.vlm")


@dataclass(slots=True)
class Loaded:
    """A model ready to run: inputs go to `device` in `dtype` (floating tensors); decoding uses
    `cache_implementation` (None: transformers' default dynamic cache)."""

    model: Any
    processor: Any
    tokenizer: Any
    device: Any
    dtype: Any
    cache_implementation: str | None
    reuse_prefill: bool = True  # switched off for good by the first failed continuation
    token_cache: dict[tuple[str, str], int] = field(default_factory=dict)

    @property
    def pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(self.tokenizer, "eos_token_id", None)
        return int(pad if pad is not None else 0)

    def eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list | tuple):
                ids.update(int(v) for v in value)
        return ids

    def piece_ids(self, text: str) -> list[int]:
        if not text:
            return []
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def option_id(self, before: str, option: str) -> int:
        """The first token of `option` as the tokenizer writes it right after `before`."""
        key = (before, option)
        if key not in self.token_cache:
            context = before or "\n"
            base, full = self.piece_ids(context), self.piece_ids(context + option)
            if full[:len(base)] == base and len(full) > len(base):
                self.token_cache[key] = full[len(base)]
            else:
                self.token_cache[key] = self.piece_ids(option)[0]
        return self.token_cache[key]


_LOAD_LOCK = threading.Lock()


def load(opts: VLMOptions, judge_id: str, given: tuple[Any, Any] | None = None) -> Loaded:
    """Load `opts.model` (and its adapter), or prepare the already loaded `given` model and
    processor the same way."""
    import torch

    device = pick_device(opts.device)
    dtype = pick_dtype(opts.dtype, device)
    t0 = time.perf_counter()
    if given is not None:
        model, processor = given
    else:
        common = {"trust_remote_code": opts.trust_remote_code,
                  "local_files_only": opts.local_files_only}
        extra = {"attn_implementation": opts.attn_implementation} \
            if opts.attn_implementation else {}
        # One load at a time in the process: transformers builds a model under a device context
        # that is global, not per thread, so two judges loading at once (an ensemble, a judge
        # still loading in a closed app's thread) could leave each other's weights on "meta".
        with _LOAD_LOCK:
            processor = _load_processor(opts.model, common)
            model = _load_model(opts.model, dtype=dtype, **common, **extra)
        if opts.adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, opts.adapter,
                                              local_files_only=opts.local_files_only,
                                              key_mapping=_adapter_key_mapping(model))
            if opts.merge_adapter:
                model = model.merge_and_unload()
        model.to(device)
    model.eval()
    if opts.vision_attention == "auto":
        batch_vision_windows(model)
    processor = _usable_processor(processor)
    tokenizer = getattr(processor, "tokenizer", processor)
    cache = opts.cache_implementation
    if cache == "auto":
        cache = "static" if torch.device(device).type == "cuda" else "dynamic"
    # Inputs follow the model wherever it actually is (a given model, a device map).
    where = torch.device(getattr(model, "device", device))
    dtype = getattr(model, "dtype", dtype)
    log.info("vlm judge %s loaded on %s (%s) in %.1f s", judge_id, where, dtype,
             time.perf_counter() - t0)
    return Loaded(model, processor, tokenizer, where, dtype,
                  None if cache == "dynamic" else cache, opts.reuse_prefill)


def _usable_processor(processor: Any) -> Any:
    # ShieldGemma 2's processor builds its own prompts from policy names and ignores `text`; the
    # profile writes the prompts, so use the Gemma 3 processor it wraps.
    if type(processor).__name__ == "ShieldGemma2Processor":
        from transformers import Gemma3Processor

        return Gemma3Processor(image_processor=processor.image_processor,
                               tokenizer=processor.tokenizer,
                               chat_template=processor.chat_template,
                               image_seq_length=processor.image_seq_length)
    return processor


def _load_processor(model: str, common: dict[str, Any]) -> Any:
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(model, **common)
    except ImportError as exc:
        # transformers 5 builds the Qwen2-VL, Qwen2.5-VL, Qwen3-VL and LLaVA-OneVision processors
        # with a video processor that needs torchvision, even for images only. The judge never
        # sends video: build the checkpoint's own processor class without it.
        if "torchvision" not in str(exc).lower():
            raise
        log.info("vlm judge: %s; building the image and text processor without video", exc)
        return image_text_processor(model, common)


def image_text_processor(model: str, common: dict[str, Any]) -> Any:
    """The checkpoint's processor class made of its tokenizer, its image processor (the PIL
    backend where torchvision is missing), its chat template and its processor options, without
    the video processor: the same image-token expansion and model inputs as the full one."""
    import inspect

    import transformers
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

    config = AutoConfig.from_pretrained(model, **common)
    base: Any = PROCESSOR_MAPPING[type(config)]
    settings, _ = base.get_processor_dict(model, **common)
    named = settings.get("processor_class")
    if isinstance(named, str) and isinstance(getattr(transformers, named, None), type):
        base = getattr(transformers, named)
    params = set(inspect.signature(base.__init__).parameters)
    accepted = params - {"self", "image_processor", "tokenizer", "video_processor", "kwargs"}
    none = {"video_processor": None} if "video_processor" in params else {}

    def init(self: Any, image_processor: Any, tokenizer: Any, **options: Any) -> None:
        # ProcessorMixin takes its sub-processors from this signature: image and text only.
        base.__init__(self, image_processor, tokenizer, **none, **options)

    image_only = type(base.__name__, (base,), {"__init__": init})
    return image_only(AutoImageProcessor.from_pretrained(model, **common),
                      AutoTokenizer.from_pretrained(model, **common),
                      **{k: v for k, v in settings.items() if k in accepted})


def _adapter_key_mapping(model: Any) -> dict[str, str] | None:
    """Adapters saved before transformers 4.52 name Qwen2-VL / Qwen2.5-VL layers `model.layers.*`
    and `visual.*` (now `model.language_model.*`, `model.visual.*`); peft maps old names only for
    the model types transformers registers, not these, and loads such an adapter as nothing at
    all (a warning). Adapters trained before mid-2025, IPR's possibly among them, have that
    layout. None: peft's own mapping."""
    if getattr(getattr(model, "config", None), "model_type", None) not in ("qwen2_vl",
                                                                            "qwen2_5_vl"):
        return None
    return {r"^model\.(?!language_model\.|visual\.)": "model.language_model.",
            r"^visual\.": "model.visual."}


# Checkpoints whose architecture wraps an image-text-to-text model as `.model`: loading them as
# that inner model directly would not find its weights under the wrapper's names.
_WRAPPERS = {"ShieldGemma2ForImageClassification"}


def _load_model(model: str, **kwargs: Any) -> Any:
    import transformers
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(model, trust_remote_code=kwargs["trust_remote_code"],
                                        local_files_only=kwargs["local_files_only"])
    wrapper = next((a for a in getattr(config, "architectures", None) or () if a in _WRAPPERS),
                   None)
    if wrapper is not None:
        return getattr(transformers, wrapper).from_pretrained(model, **kwargs).model
    return AutoModelForImageTextToText.from_pretrained(model, **kwargs)
