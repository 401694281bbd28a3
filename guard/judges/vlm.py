"""The `vlm` judge: a local multimodal model (transformers) behind the Judge protocol.

    judge:
      kind: vlm
      model: /models/Qwen2.5-VL-7B-Instruct   # a folder, or a hub id already in the local cache
      adapter: /models/ipr-7b                 # optional PEFT (LoRA) adapter over `model`
      profile: ipr                            # safeeditor | ipr | llavaguard | shieldgemma2

Options (all but `model` optional):

- `model`: folder or hub id, loaded with `AutoProcessor` + `AutoModelForImageTextToText`.
- `adapter` (null): PEFT adapter folder or hub id over `model`; `merge_adapter` (true) folds it
  into the weights at load, which makes inference as fast as the base model.
- `profile` (safeeditor): prompt template + parser, see `guard.judges.profiles`;
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
- `attn_implementation` (null): e.g. `sdpa`, `flash_attention_2`; null lets transformers choose.
- `vision_attention` (auto): for Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision towers without
  flash-attn, run each layer's attention windows as one padded SDPA call instead of one call per
  window (same result, far fewer kernel launches); `model` keeps the model's own code.
- `trust_remote_code` (false), `local_files_only` (false): passed to `from_pretrained`.
- `id` (null): the judge id recorded in traces; default `vlm:<profile>:<model name>[+<adapter>]`.

How the verdict is read (verdict first). Each profile turns an item into probes: the chat prompt
plus the start of the answer, teacher-forced, with slots where the model would write its verdict
(`safeeditor`: `<judgement>\\nsexual:` [slot] ` no\\nviolence:` [slot] ...). One forward pass over
all probes of a batch gives the logits at every slot; a category's score is the softmax of the
unsafe answer token's logit against the safe one's (`ipr`: 1 - P("keep") over the vocabulary), so
thresholds are probabilities the model itself assigns. Nothing is decoded for items that stay under
every threshold; for the others the answer is forced up to the reasoning with the actual verdict and
then decoded (greedy, `max_new_tokens`), and the profile's parser extracts the reasoning and refined
prompt. The scores stay those read from the logits; a reasoning text that does not parse is kept raw
in the trace, with `details.parse_error`.

Threads: the model is loaded and run in one dedicated thread, so the event loop never blocks on it
and the model never runs two batches at once; images are decoded and preprocessed in the default
thread pool, concurrently with the model's work on earlier batches.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from guard.errors import ConfigError, JudgeError
from guard.judges.batching import MicroBatcher
from guard.judges.profiles import (
    Explain,
    Message,
    Probe,
    Profile,
    Slot,
    get_profile,
    has_image,
)
from guard.policy import Policy
from guard.types import JudgeInput, Verdict

log = logging.getLogger("guard.judges.vlm")


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
    attn_implementation: str | None = None
    vision_attention: Literal["auto", "model"] = "auto"
    trust_remote_code: bool = False
    local_files_only: bool = False
    id: str | None = None


@dataclass(slots=True)
class _Encoded:
    """One prompt as the processor encoded it, unpadded: token ids, tensors aligned with the
    tokens (e.g. `mm_token_type_ids`), and the rest (pixel values, grids), image-major."""

    ids: list[int]
    per_token: dict[str, Any]
    other: dict[str, Any]


@dataclass(slots=True)
class _Row:
    """One probe ready for the forward pass: its encoded prompt, the teacher-forced answer's
    token ids, and each slot with its offset in the answer and its options' token ids."""

    encoded: _Encoded
    answer: list[int]
    slots: list[tuple[Slot, int, dict[str, int]]]


@dataclass(slots=True)
class _Prepared:
    item: JudgeInput
    policy: Policy
    rows: list[tuple[Probe, _Row]]


@dataclass(slots=True)
class _Scored:
    scores: dict[str, float]
    batch_size: int
    forward_ms: float


@dataclass(slots=True)
class _ExplainJob:
    explain: Explain
    encoded: _Encoded
    prefix: list[int]
    banned: list[int]


@dataclass(slots=True)
class _Explained:
    text: str
    tokens: int
    batch_size: int
    decode_ms: float


@dataclass(slots=True)
class _Loaded:
    model: Any
    processor: Any
    tokenizer: Any
    device: Any
    dtype: Any
    cache_implementation: str | None
    token_cache: dict[tuple[str, str], int] = field(default_factory=dict)


class VLMJudge:
    def __init__(self, options: VLMOptions, *, model: Any = None, processor: Any = None) -> None:
        """`model`/`processor`: already loaded objects (benchmarks, tests); else loaded from
        `options.model` at `start()`."""
        self.options = options
        self.profile: Profile = get_profile(options.profile, options.profile_options)
        name = Path(options.model).name or options.model
        if options.adapter:
            name += "+" + (Path(options.adapter).name or options.adapter)
        self.id = options.id or f"vlm:{options.profile}:{name}"
        if (model is None) != (processor is None):
            raise TypeError("pass both a loaded model and its processor, or neither")
        self._given = (model, processor) if model is not None else None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlm-judge")
        self._loading: Future[_Loaded] | None = None
        # Set when decoding with the static KV cache failed once (seen on an H100 with torch
        # 2.11: inductor's recompile for a new batch size raised inside generate).
        self._static_cache_failed = False
        self._scorer: MicroBatcher[_Prepared, _Scored] = MicroBatcher(
            self._score_batch, max_batch=options.max_batch, max_wait_ms=options.max_wait_ms,
            executor=self._executor)
        self._explainer: MicroBatcher[_ExplainJob, _Explained] = MicroBatcher(
            self._explain_batch, max_batch=options.max_batch, max_wait_ms=options.max_wait_ms,
            executor=self._executor)

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> VLMJudge:
        try:
            return cls(VLMOptions.model_validate(dict(options)))
        except ValidationError as exc:
            raise ConfigError.from_validation("judge (vlm)", exc) from exc

    # --- lifecycle ------------------------------------------------------------------------------

    def _start_loading(self) -> Future[_Loaded]:
        if self._loading is None:
            self._loading = self._executor.submit(self._load)
        return self._loading

    async def start(self) -> None:
        """Load the model in the judge's thread; returns when it is ready (raises JudgeError if
        loading failed)."""
        try:
            await asyncio.wrap_future(self._start_loading())
        except Exception as exc:
            raise JudgeError(f"vlm judge could not load {self.options.model!r}: {exc}") from exc

    async def ready(self) -> bool:
        loading = self._start_loading()
        return loading.done() and loading.exception() is None

    async def aclose(self) -> None:
        await self._scorer.aclose()
        await self._explainer.aclose()
        loading, self._loading = self._loading, None
        self._given = None
        if loading is not None and loading.done() and loading.exception() is None:
            loaded = loading.result()
            loaded.model = None
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001 - best effort on shutdown
                pass
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def model(self) -> Any:
        """The loaded model (for inspection); None before loading."""
        loading = self._loading
        return loading.result().model if loading and loading.done() and not loading.exception() \
            else None

    def _load(self) -> _Loaded:
        import torch

        opts = self.options
        device = pick_device(opts.device)
        dtype = pick_dtype(opts.dtype, device)
        t0 = time.perf_counter()
        if self._given is not None:
            model, processor = self._given
        else:
            from transformers import AutoModelForImageTextToText, AutoProcessor

            common = {"trust_remote_code": opts.trust_remote_code,
                      "local_files_only": opts.local_files_only}
            processor = AutoProcessor.from_pretrained(opts.model, **common)
            extra = {"attn_implementation": opts.attn_implementation} \
                if opts.attn_implementation else {}
            model = AutoModelForImageTextToText.from_pretrained(
                opts.model, dtype=dtype, **common, **extra)
            if opts.adapter:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, opts.adapter,
                                                  local_files_only=opts.local_files_only)
                if opts.merge_adapter:
                    model = model.merge_and_unload()
            model.to(device)
        model.eval()
        if opts.vision_attention == "auto":
            _batch_vision_windows(model)
        processor = _usable_processor(processor)
        tokenizer = getattr(processor, "tokenizer", processor)
        cache = opts.cache_implementation
        if cache == "auto":
            cache = "static" if torch.device(device).type == "cuda" else "dynamic"
        # Inputs follow the model wherever it actually is (a given model, a device map).
        where = torch.device(getattr(model, "device", device))
        dtype = getattr(model, "dtype", dtype)
        log.info("vlm judge %s loaded on %s (%s) in %.1f s", self.id, where, dtype,
                 time.perf_counter() - t0)
        return _Loaded(model, processor, tokenizer, where, dtype,
                       None if cache == "dynamic" else cache)

    def _loaded(self) -> _Loaded:
        assert self._loading is not None
        return self._loading.result()

    # --- the judge ------------------------------------------------------------------------------

    async def judge(self, items: Sequence[JudgeInput], policy: Policy) -> list[Verdict]:
        if not items:
            return []
        await self.start()
        t0 = time.perf_counter()
        try:
            prepared = await asyncio.gather(
                *(asyncio.to_thread(self._prepare, item, policy) for item in items))
            scored = await self._scorer.submit_many(prepared)
            todo: dict[int, tuple[str, ...]] = {}
            if self.profile.explains:
                for i, sc in enumerate(scored):
                    decision = policy.decide(sc.scores)
                    if decision.unsafe or self.options.explain == "always":
                        todo[i] = decision.flagged
            explained: dict[int, _Explained] = {}
            if todo:
                jobs = await asyncio.gather(*(self._explain_job(prepared[i], scored[i], flagged)
                                              for i, flagged in todo.items()))
                explained = dict(zip(todo, await self._explainer.submit_many(jobs), strict=True))
        except JudgeError:
            raise
        except Exception as exc:
            raise JudgeError(f"vlm judge failed: {type(exc).__name__}: {exc}") from exc
        latency = (time.perf_counter() - t0) * 1000.0
        return [self._verdict(prepared[i], scored[i], explained.get(i), latency)
                for i in range(len(items))]

    def _verdict(self, prep: _Prepared, sc: _Scored, ex: _Explained | None,
                 latency_ms: float) -> Verdict:
        details: dict[str, Any] = {"batch_size": sc.batch_size,
                                   "forward_ms": round(sc.forward_ms, 3), "decoded_tokens": 0}
        if ex is None:
            return Verdict(scores=sc.scores, judge_id=self.id, latency_ms=latency_ms,
                           details=details)
        parsed = self.profile.parse([ex.text], prep.policy)
        details.update(decoded_tokens=ex.tokens, decode_ms=round(ex.decode_ms, 3),
                       explain_batch_size=ex.batch_size)
        if not parsed.ok:
            details["parse_error"] = parsed.error
        return Verdict(scores=sc.scores, judge_id=self.id, thought=parsed.thought,
                       refined_prompt=parsed.refined_prompt, raw=ex.text, latency_ms=latency_ms,
                       details=details)

    async def _explain_job(self, prep: _Prepared, sc: _Scored,
                           flagged: Sequence[str]) -> _ExplainJob:
        explain = self.profile.explain(prep.item, prep.policy, sc.scores, flagged)
        assert explain is not None
        return await asyncio.to_thread(self._prepare_explain, prep, explain)

    # --- preprocessing (default thread pool) ---------------------------------------------------

    def _image(self, item: JudgeInput) -> Any:
        if item.image is None:
            return None
        from PIL import Image

        try:
            image = Image.open(io.BytesIO(item.image.data)).convert("RGB")
        except Exception as exc:
            raise JudgeError(f"vlm judge cannot read the image: {exc}") from exc
        side = self.options.max_image_side
        if side and max(image.size) > side:
            image.thumbnail((side, side))
        return image

    def _prepare(self, item: JudgeInput, policy: Policy) -> _Prepared:
        image = self._image(item)
        rows = []
        for probe in self.profile.probes(item, policy):
            encoded = self._encode_prompt(probe.messages, image)
            answer: list[int] = []
            slots = []
            before = ""
            for piece in probe.answer:
                if isinstance(piece, Slot):
                    ids = {label: self._option_id(before, text)
                           for label, text in piece.options.items()}
                    if len(set(ids.values())) < len(ids):
                        raise JudgeError(f"profile {self.profile.name}: answers "
                                         f"{sorted(piece.options.values())} share a first "
                                         "token in this tokenizer")
                    slots.append((piece, len(answer) - 1, ids))
                else:
                    answer += self._piece_ids(piece)
                    before = piece
            rows.append((probe, _Row(encoded, answer, slots)))
        return _Prepared(item, policy, rows)

    def _prepare_explain(self, prep: _Prepared, explain: Explain) -> _ExplainJob:
        encoded = next((row.encoded for probe, row in prep.rows
                        if probe.messages == explain.messages), None)
        if encoded is None:
            encoded = self._encode_prompt(explain.messages, self._image(prep.item))
        banned = [self._option_id(explain.prefix, word) for word in explain.banned_first]
        return _ExplainJob(explain, encoded, self._piece_ids(explain.prefix), banned)

    def _encode_prompt(self, messages: Sequence[Message], image: Any) -> _Encoded:
        loaded = self._loaded()
        kwargs: dict[str, Any] = {"return_tensors": "pt", "add_special_tokens": False}
        if image is not None and has_image(messages):
            kwargs["images"] = [image]
        # Called from several threads at once: safe because every call uses the same settings
        # (one text, no padding, no truncation), so the fast tokenizer's state never changes.
        text = loaded.processor.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=False)
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
        return _Encoded(ids[0].tolist(), per_token, other)

    def _piece_ids(self, text: str) -> list[int]:
        if not text:
            return []
        return list(self._loaded().tokenizer(text, add_special_tokens=False)["input_ids"])

    def _option_id(self, before: str, option: str) -> int:
        """The first token of `option` as the tokenizer writes it right after `before`."""
        loaded = self._loaded()
        key = (before, option)
        if key not in loaded.token_cache:
            context = before or "\n"
            base, full = self._piece_ids(context), self._piece_ids(context + option)
            if full[:len(base)] == base and len(full) > len(base):
                loaded.token_cache[key] = full[len(base)]
            else:
                loaded.token_cache[key] = self._piece_ids(option)[0]
        return loaded.token_cache[key]

    # --- model work (the judge's thread) --------------------------------------------------------

    def _score_batch(self, batch: list[_Prepared]) -> list[_Scored | BaseException]:
        import torch

        loaded = self._loaded()
        t0 = time.perf_counter()
        rows = [row for prep in batch for _, row in prep.rows]
        inputs, starts = _collate([(row.encoded, row.answer) for row in rows],
                                  _pad_id(loaded.tokenizer), loaded)
        # Absolute position of each slot: the last token before the answer token it predicts.
        where = [[starts[r] + len(row.encoded.ids) + off for _, off, _ in row.slots]
                 for r, row in enumerate(rows)]
        wanted = sorted({pos for positions in where for pos in positions})
        column = {pos: j for j, pos in enumerate(wanted)}
        with torch.inference_mode():
            logits = _forward(loaded.model, inputs, wanted, loaded.device).float()
            per_row = [{slot.name: _slot_probs(logits[r, column[pos]], slot, ids)
                        for (slot, _, ids), pos in zip(row.slots, where[r], strict=True)}
                       for r, row in enumerate(rows)]
        forward_ms = (time.perf_counter() - t0) * 1000.0
        out: list[_Scored | BaseException] = []
        r = 0
        for prep in batch:
            n = len(prep.rows)
            combined = self.profile.combine(per_row[r:r + n], prep.policy)
            r += n
            scores = {c: float(v) if v is not None else 1.0 for c, v in combined.items()}
            out.append(_Scored(scores, len(batch), forward_ms))
        return out

    def _explain_batch(self, batch: list[_ExplainJob]) -> list[_Explained | BaseException]:
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        loaded = self._loaded()
        tok = loaded.tokenizer
        t0 = time.perf_counter()
        inputs, _ = _collate([(job.encoded, job.prefix) for job in batch], _pad_id(tok), loaded)
        prompt_len = inputs["input_ids"].shape[1]
        stops = sorted({s for job in batch for s in job.explain.stop})
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.options.max_new_tokens, "do_sample": False, "num_beams": 1,
            "pad_token_id": _pad_id(tok),
        }
        if loaded.cache_implementation and not self._static_cache_failed:
            kwargs["cache_implementation"] = loaded.cache_implementation
            if self.options.max_cache_len:
                kwargs["max_cache_len"] = self.options.max_cache_len
        if stops:
            kwargs["stopping_criteria"] = StoppingCriteriaList(
                [_StopOnText(tok, stops, prompt_len)])
        banned = [job.banned for job in batch]
        if any(banned):
            kwargs["logits_processor"] = LogitsProcessorList([_BanFirst(banned, prompt_len)])
        try:
            with torch.inference_mode():
                out = loaded.model.generate(**inputs, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure of the compiled path
            if "cache_implementation" not in kwargs:
                raise
            # The static cache is a speed-up, not a requirement: decode this batch and every
            # later one with the dynamic cache rather than failing the request.
            log.warning("decoding with the %s KV cache failed (%s: %s); using the dynamic "
                        "cache from now on", kwargs["cache_implementation"],
                        type(exc).__name__, exc)
            self._static_cache_failed = True
            kwargs.pop("cache_implementation")
            kwargs.pop("max_cache_len", None)
            with torch.inference_mode():
                out = loaded.model.generate(**inputs, **kwargs)
        new = out[:, prompt_len:].tolist()
        decode_ms = (time.perf_counter() - t0) * 1000.0
        eos = _eos_ids(loaded)
        results: list[_Explained | BaseException] = []
        for job, tokens in zip(batch, new, strict=True):
            n = next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))
            text = job.explain.prefix + tok.decode(tokens[:n], skip_special_tokens=True)
            results.append(_Explained(text, n, len(batch), decode_ms))
        return results


# --- helpers -------------------------------------------------------------------------------------

def pick_device(device: str) -> str:
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
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if kind == "mps":
        return torch.float16
    return torch.float32


_BATCHED_WINDOWS = "flash_padded_sdpa"  # "flash" in the name selects the models' varlen path
_WINDOWED_VISION = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl"}


def _batch_vision_windows(model: Any) -> None:
    """Qwen-VL vision towers attend within windows of 64 patches; without flash-attn,
    transformers runs one SDPA call per window (about 86 per 1024 px image, in each of 28 layers)
    and synchronises per layer. Route them through `_padded_varlen_sdpa` instead: all windows of
    a layer in one padded SDPA call, the same result."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    vision = getattr(config, "vision_config", None)
    if getattr(config, "model_type", None) not in _WINDOWED_VISION or vision is None \
            or "flash" in str(getattr(vision, "_attn_implementation", "") or ""):
        return
    try:
        from transformers import AttentionInterface

        AttentionInterface.register(_BATCHED_WINDOWS, _padded_varlen_sdpa)
        base.set_attn_implementation({"vision_config": _BATCHED_WINDOWS})
    except Exception as exc:  # noqa: BLE001 - an optimisation; the model works without it
        log.warning("vlm judge: keeping the vision tower's own attention (%s)", exc)


def _padded_varlen_sdpa(module: Any, query: Any, key: Any, value: Any,
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


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return int(pad if pad is not None else 0)


def _eos_ids(loaded: _Loaded) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(loaded.model, "generation_config", None), loaded.tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids


def _collate(rows: list[tuple[_Encoded, list[int]]], pad_id: int,
             loaded: _Loaded) -> tuple[dict[str, Any], list[int]]:
    """Left-pad prompts + appended answer tokens into one batch; returns the inputs on the model's
    device and, per row, where its prompt starts. Left padding keeps every row's end aligned, and
    rotary position embeddings are shift-invariant, so a padded row scores as it would alone."""
    import torch

    lengths = [len(enc.ids) + len(extra) for enc, extra in rows]
    width = max(lengths)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
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


def _forward(model: Any, inputs: dict[str, Any], positions: list[int], device: Any) -> Any:
    """Logits at `positions` only (the vocabulary projection is the big part of a short read)."""
    import torch

    keep = torch.tensor(positions, dtype=torch.long, device=device)
    try:
        return model(**inputs, use_cache=False, logits_to_keep=keep).logits
    except TypeError:  # a model without logits_to_keep
        return model(**inputs, use_cache=False).logits[:, keep]


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


class _StopOnText:
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


class _BanFirst:
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


__all__ = ["VLMJudge", "VLMOptions", "pick_device", "pick_dtype"]
