"""Latency of the `vlm` judge at the real model sizes, per 1024x1024 image.

    python benchmarks/judge_gpu.py                 # CUDA: Qwen2.5-VL-3B and -7B shapes, bf16
    python benchmarks/judge_gpu.py --sizes 7b --cache dynamic
    python benchmarks/judge_gpu.py --tiny          # any machine: a tiny model of the same kind

Builds random-weight Qwen2.5-VL models from the public configurations (nothing is downloaded: the
weights are random, the tokenizer is trained here, so the answers are nonsense but every shape and
FLOP is real) and runs the judge's own code (guard.judges.vlm.VLMJudge, profile safeeditor):

- safe path: one prefill of prompt + image + the forced verdict, scores read from the logits;
  nothing decoded. Batch 1 and 4.
- refine path: the same, then the explanation decoded for every image (the policy's thresholds
  are 0), `--refine-tokens` tokens (default 40, about a refined prompt). Batch 1 and 4.
- reference (run first, before the judge batches the vision tower's attention windows): plain
  `model.generate` of 1 and 128 tokens at batch 1 (dynamic cache), to compare the machine with
  the design notes (7B on one H100: prefill 0.19 s, +128 tokens 4.3 s).

Targets (real sizes): safe path <= 0.25 s per image at batch 1 and <= 0.1 s per image at batch 4;
refine path <= 0.6 s at batch 1 (the explanation continues from the scoring pass's prefill; the
`refine(...,prefill)` row prefills a second time, as before) and <= 1.0 s per image at batch 4.
Each row is the median of `--repeats` timed calls after warm-up
calls (the first refine call with the static cache compiles the decoding step; its time is shown
as `warmup_s`). Images are processed as Qwen2.5-VL-7B-Instruct's preprocessor does (1024 px ->
37x37 = 1,369 image tokens); the processor here is a stand-in built from the real image processor
class, so no torchvision is needed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from guard.core.policy import Policy  # noqa: E402
from guard.core.types import GeneratedImage, JudgeInput  # noqa: E402
from guard.judges.vlm import VLMJudge, VLMOptions  # noqa: E402

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|image_pad|>", "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

VISION = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
          "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
          "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2}
SIZES: dict[str, dict[str, Any]] = {
    "3b": {"text": {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                    "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936},
           "vision": VISION, "tie": True, "mrope": [16, 24, 24]},
    "7b": {"text": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                    "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064},
           "vision": VISION, "tie": False, "mrope": [16, 24, 24]},
    "tiny": {"text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024},
             "vision": {**VISION, "depth": 2, "hidden_size": 32, "intermediate_size": 64,
                        "num_heads": 2, "fullatt_block_indexes": [1]},
             "tie": False, "mrope": [2, 3, 3]},
}
CATEGORIES = ("sexual", "violence", "self_harm", "shocking", "hate", "harassment",
              "illegal_activity", "minors")
PROMPT = "a knight in ornate armour fighting a dragon above a burning village, dramatic light"


def build_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from guard.judges.profiles import SAFEEDITOR_SYSTEM

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [SAFEEDITOR_SYSTEM, PROMPT, " ".join(CATEGORIES), "yes no keep Yes No"] * 4
    bpe.train_from_iterator(corpus, trainer=trainers.BpeTrainer(
        vocab_size=1000, special_tokens=SPECIAL, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|endoftext|>",
                                  eos_token="<|im_end|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


class QwenLikeProcessor:
    """What Qwen2_5_VLProcessor does for images, without its torchvision-only video processor:
    the real image processor class with the 7B-Instruct settings, each <|image_pad|> expanded to
    the image's merged patch count, and `mm_token_type_ids` marking image tokens."""

    def __init__(self, tokenizer: Any, merge: int = 2) -> None:
        from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

        self.tokenizer = tokenizer
        self.image_processor = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056)
        self.merge = merge
        self.image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        return str(self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True))

    def __call__(self, text: list[str], images: list[Any] | None = None,
                 **kwargs: Any) -> Any:
        import torch
        from transformers import BatchFeature

        data: dict[str, Any] = {}
        if images:
            pix = self.image_processor(images=images, return_tensors="pt")
            data.update(pix)
            counts = iter((pix["image_grid_thw"].prod(-1) // self.merge ** 2).tolist())
            text = ["".join(part + ("<|image_pad|>" * next(counts) if i < t.count("<|image_pad|>")
                                    else "")
                            for i, part in enumerate(t.split("<|image_pad|>"))) for t in text]
        enc = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")
        data.update(enc)
        data["mm_token_type_ids"] = (enc["input_ids"] == self.image_token_id).to(torch.int32)
        return BatchFeature(data)


def build_model(size: str, tokenizer: Any, device: str, dtype: Any, attn: str | None) -> Any:
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    spec = SIZES[size]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
    text = {**spec["text"], "max_position_embeddings": 128000, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                "mrope_section": spec["mrope"]},
            "pad_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
            "bos_token_id": ids["<|endoftext|>"]}
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config={**spec["vision"],
                                         "out_hidden_size": spec["text"]["hidden_size"]},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=spec["tie"])
    torch.manual_seed(0)
    with torch.device(device):
        extra = {"attn_implementation": attn} if attn else {}
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype, **extra)
    model.eval()
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    return model


def make_images(n: int, side: int) -> list[GeneratedImage]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        y, x = np.mgrid[0:side, 0:side]
        base = np.stack([(x + 40 * i) % 256, (y * 2) % 256, (x + y) % 256], axis=-1)
        noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype("uint8")
        buf = io.BytesIO()
        Image.fromarray(noisy).save(buf, "PNG")
        out.append(GeneratedImage(data=buf.getvalue()))
    return out


def policy(threshold: float) -> Policy:
    return Policy.model_validate({"id": "bench", "version": 1, "categories": {
        c: {"threshold": threshold, "action": "refuse" if c == "minors" else "edit"}
        for c in CATEGORIES}})


async def measure(judge: VLMJudge, images: list[GeneratedImage], batch: int, pol: Policy,
                  warmups: int, repeats: int) -> dict[str, Any]:
    items = [JudgeInput(prompt=PROMPT, original_prompt=PROMPT, image=images[i % len(images)])
             for i in range(batch)]
    warm = []
    for _ in range(warmups):
        t0 = time.perf_counter()
        await judge.judge(items, pol)
        warm.append(time.perf_counter() - t0)
    times, forwards, tokens = [], [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        verdicts = await judge.judge(items, pol)
        times.append(time.perf_counter() - t0)
        forwards.append(verdicts[0].details["forward_ms"])
        tokens = max(v.details["decoded_tokens"] for v in verdicts)
    call = statistics.median(times)
    return {"s_per_call": call, "s_per_image": call / batch, "warmup_s": warm[0] if warm else 0,
            "forward_ms": statistics.median(forwards), "decoded_tokens": tokens}


def reference(model: Any, processor: QwenLikeProcessor, image: GeneratedImage,
              new_tokens: int) -> dict[str, float]:
    """Plain transformers: prefill alone, and generate(new_tokens) with the default cache."""
    import torch
    from PIL import Image

    pil = Image.open(io.BytesIO(image.data)).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    enc = processor([processor.apply_chat_template(messages)], images=[pil])
    enc = {k: (v.to(model.dtype) if v.is_floating_point() else v).to(model.device)
           for k, v in enc.items()}
    out: dict[str, float] = {"image_tokens": float(enc["mm_token_type_ids"].sum())}
    with torch.inference_mode():
        for label, n in (("prefill_s", 1), (f"generate_{new_tokens}_s", new_tokens)):
            model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            _sync()
            t0 = time.perf_counter()
            model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            _sync()
            out[label] = time.perf_counter() - t0
    return out


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


TARGETS = {("safe", 1): 0.25, ("safe", 4): 0.1, ("refine", 1): 0.6, ("refine", 4): 1.0}


async def run_size(size: str, args: argparse.Namespace, device: str, dtype: Any,
                   rows: list[dict[str, Any]]) -> None:
    import torch

    tok = build_tokenizer()
    processor = QwenLikeProcessor(tok)
    t0 = time.perf_counter()
    model = build_model(size, tok, device, dtype, args.attn)
    params = sum(p.numel() for p in model.parameters()) / 1e9
    print(f"# {size}: {params:.2f} B parameters, built in {time.perf_counter() - t0:.1f} s "
          f"on {device} ({dtype}), attention {model.config._attn_implementation}", flush=True)
    images = make_images(4, args.image_size)
    if not args.no_reference:  # before the judge changes the vision tower's attention
        ref = reference(model, processor, images[0], args.reference_tokens)
        rows.append({"size": size, "path": "reference", **ref})
        print(f"{size:>5} reference: {ref['image_tokens']:.0f} image tokens, plain transformers "
              "generate: " + ", ".join(f"{k} {v:.3f}" for k, v in ref.items()
                                       if k != "image_tokens"), flush=True)
    caches = [args.cache]
    # refine: alone, the explanation continues from the scoring pass's prefill; "prefill" is the
    # same with a second prefill of the prompt (reuse_prefill: false), for comparison.
    plan = [("safe", 1.0, args.max_image_side, True), ("refine", 0.0, args.max_image_side, True),
            ("refine", 0.0, args.max_image_side, False)]
    plan += [("safe", 1.0, side, True) for side in args.extra_sides]
    for path, threshold, side, reuse in plan:
        for batch in args.batches if reuse else args.batches[:1]:
            for cache in caches:
                options = VLMOptions(model=f"qwen2.5-vl-{size}-random", profile="safeeditor",
                                     max_batch=max(args.batches), max_wait_ms=0,
                                     max_new_tokens=args.refine_tokens,
                                     cache_implementation=cache, device=device,
                                     max_image_side=side,
                                     vision_attention=args.vision_attention,
                                     reuse_prefill=reuse)
                judge = VLMJudge(options, model=model, processor=processor)
                await judge.start()
                label = path
                if path == "refine":
                    label += f"({judge._loaded().cache_implementation or 'dynamic'}"
                    label += ")" if reuse else ",prefill)"
                if side:
                    label += f"@{side}px"
                try:
                    result = await measure(judge, images, batch, policy(threshold),
                                           args.warmups, args.repeats)
                except Exception as exc:  # noqa: BLE001 - a failed configuration is a result
                    print(f"{size:>5} {label:<24} b={batch}: FAILED {type(exc).__name__}: "
                          f"{str(exc)[:300]}", flush=True)
                    if path == "refine" and cache != "dynamic":
                        caches = ["dynamic"]  # fall back for the remaining rows
                    rows.append({"size": size, "path": label, "batch": batch,
                                 "error": f"{type(exc).__name__}: {exc}"[:500]})
                    continue
                finally:
                    await judge.aclose()  # drops the judge's reference; `model` stays here
                target = None if size == "tiny" or side else TARGETS.get((path, batch))
                row = {"size": size, "path": label, "batch": batch, **result, "target": target,
                       "ok": None if target is None else result["s_per_image"] <= target}
                rows.append(row)
                print(fmt(row), flush=True)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


HEADER = (f"{'size':>5} {'path':<24} {'batch':>5} {'s/call':>8} {'s/image':>8} {'fwd ms':>8} "
          f"{'tokens':>6} {'warmup s':>8} {'target':>7}  ok")


def fmt(row: dict[str, Any]) -> str:
    target = f"{row['target']:.2f}" if row.get("target") is not None else "-"
    ok = {True: "yes", False: "NO", None: "-"}[row.get("ok")]
    return (f"{row['size']:>5} {row['path']:<24} {row['batch']:>5} {row['s_per_call']:>8.3f} "
            f"{row['s_per_image']:>8.3f} {row['forward_ms']:>8.1f} {row['decoded_tokens']:>6} "
            f"{row['warmup_s']:>8.2f} {target:>7}  {ok}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model, any device (CPU)")
    parser.add_argument("--sizes", default="3b,7b", help="comma list of 3b, 7b")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--image-size", type=int, default=None,
                        help="square test images (default 1024; 448 with --tiny)")
    parser.add_argument("--max-image-side", type=int, default=None,
                        help="the judge's max_image_side option (default: full resolution)")
    parser.add_argument("--extra-sides", default=None,
                        help="comma list of max_image_side values for extra safe-path rows "
                             "(default 672; none with --tiny)")
    parser.add_argument("--attn", default=None,
                        help="attn_implementation for the model (sdpa, flash_attention_2, ...)")
    parser.add_argument("--vision-attention", choices=["auto", "model"], default="auto",
                        help="the judge's vision_attention option (auto: batched windows)")
    parser.add_argument("--refine-tokens", type=int, default=40)
    parser.add_argument("--cache", choices=["auto", "static", "dynamic"], default="auto")
    parser.add_argument("--warmups", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--reference-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    sides = args.extra_sides if args.extra_sides is not None else ("" if args.tiny else "672")
    args.extra_sides = [int(x) for x in sides.split(",") if x.strip()]

    import torch

    if args.tiny:
        sizes, device, dtype = ["tiny"], "cpu", torch.float32
        args.image_size = args.image_size or 448
        args.repeats = min(args.repeats, 3)
        args.warmups = min(args.warmups, 1)
        args.reference_tokens = min(args.reference_tokens, 16)
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --tiny", file=sys.stderr)
            return 2
        sizes, device, dtype = args.sizes.split(","), "cuda", torch.bfloat16
        args.image_size = args.image_size or 1024
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    import transformers

    print(f"# transformers {transformers.__version__}; image {args.image_size}px; "
          f"refine {args.refine_tokens} tokens; median of {args.repeats} after {args.warmups} "
          "warm-up calls", flush=True)
    print(HEADER, flush=True)
    rows: list[dict[str, Any]] = []
    for size in sizes:
        asyncio.run(run_size(size, args, device, dtype, rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    failed = [r for r in rows if r.get("ok") is False or "error" in r]
    return 1 if failed and not args.tiny else 0


if __name__ == "__main__":
    sys.exit(main())
