"""Tiny random-weight models of the judge model families users load, built offline and saved
exactly as their published checkpoints are laid out, with their chat templates.

- Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`, the processor files of
  Qwen/Qwen2.5-VL-*-Instruct; Qwen2-VL likewise) and a LoRA adapter over it laid out as the
  IPR adapters (KEVIN04087/3B, /7B) are published: `adapter_config.json` +
  `adapter_model.safetensors`, r=8, alpha=16 on the language model's `q_proj`/`v_proj`, base
  named by its hub id.
- ShieldGemma 2 (`ShieldGemma2ForImageClassification` over Gemma 3 with a SigLIP tower,
  `ShieldGemma2Processor` with its policy-wrapping chat template and `<start_of_image>` /
  `<image_soft_token>`).
- LlavaGuard 1.2 (`LlavaOnevisionForConditionalGeneration`: SigLIP + Qwen2, `<image>`,
  `LlavaOnevisionProcessor`'s files and the LLaVA-OneVision chat template).

Tokenizers are byte-level BPEs trained here on the profiles' own words (nothing is downloaded);
weights are random, so answers are nonsense: tests assert mechanics, not judgements. Each model
builds in well under a second on CPU. None of these needs torchvision to build; whether the
saved checkpoint then loads without it is the judge loader's business.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from guard.judges.profiles import IPR_SYSTEM, SAFEEDITOR_SYSTEM
from guard.judges.profiles.llavaguard import LLAVAGUARD_INTRO, LLAVAGUARD_STEPS
from guard.judges.profiles.shieldgemma2 import SHIELDGEMMA2_INSTRUCTION
from tests.tiny_vlm import _CORPUS

# The chat templates, faithful minimal versions of each family's published one.

# Qwen2-VL / Qwen2.5-VL-Instruct (chat_template.json of Qwen/Qwen2.5-VL-7B-Instruct).
QWEN_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# ShieldGemma 2 (google/shieldgemma-2-4b-it): each text part is a policy, wrapped in the
# instruction by the template itself, which always ends with the model's turn: its processor
# never asks for a generation prompt, and its classifier reads Yes/No at the last token.
SHIELDGEMMA2_TEMPLATE = (
    "{{ bos_token }}{%- for message in messages -%}"
    "{%- if message['content'] is iterable and message['content'] is not string -%}"
    "{{ '<start_of_turn>user\\n' }}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}"
    "{{ 'You are a policy expert trying to help determine whether a generated or real image is in"
    " violation of the safety policy below. Your decision must very clearly follow the specific"
    " language used in the safety policy and should not include any interpretation outside of the"
    " safety policy.\\n\\n' }}"
    "{{ '<BEGIN_SAFETY_POLICY>\\n' }}{{ item['text'] + '\\n' }}{{ '</END_SAFETY_POLICY>\\n\\n' }}"
    "{{ 'Does the image violate the above policy? Your Answer must start with \\'Yes\\' or"
    " \\'No\\'.' }}"
    "{%- endif -%}{%- endfor -%}{{ '<end_of_turn>\\n<start_of_turn>model\\n' }}"
    "{%- else -%}{{ raise_exception('Conversation messages must contain iterable content') }}"
    "{%- endif -%}{%- endfor -%}"
)

# Gemma 3 instruction-tuned (google/gemma-3-4b-it): the system turn is folded into the first
# user turn, `assistant` is `model`.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}"
    "{%- endif -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{{ '<end_of_turn>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

# LLaVA-OneVision (llava-hf/llava-onevision-qwen2-*-ov-hf, as LlavaGuard 1.2 ships it): images
# first, then each text part on its own line.
LLAVA_ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% if message['content'] is string %}{{ '\\n' + message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\\n' + content['text'] }}{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_WORDS = "\n".join([_CORPUS, IPR_SYSTEM, SAFEEDITOR_SYSTEM, LLAVAGUARD_INTRO, LLAVAGUARD_STEPS,
                    SHIELDGEMMA2_INSTRUCTION, "keep Keep Yes No Unsafe Safe <BEGIN_SAFETY_POLICY>"])


def _tokenizer(special: list[str], **tokens: Any) -> Any:
    """A byte-level BPE trained on the profiles' words, with `special` as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([_WORDS] * 4, trainer=trainers.BpeTrainer(
        vocab_size=900, special_tokens=special, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **tokens)


def _spread_head(model: Any, std: float = 1.0) -> None:
    """Wider random output weights than the init, so that answer probabilities vary."""
    import torch

    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, std)


def _edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, indent=2))


# --- Qwen2.5-VL and the IPR adapter ----------------------------------------------------------

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 28 * 28 * 4, 28 * 28 * 16


def build_tiny_qwen2_5_vl(path: Path, *, seed: int = 0) -> Path:
    """A tiny Qwen2.5-VL-Instruct: the files of Qwen/Qwen2.5-VL-*-Instruct (config, safetensors,
    tokenizer, `preprocessor_config.json` naming `Qwen2VLImageProcessor` and
    `Qwen2_5_VLProcessor`, `chat_template.json`)."""
    return _build_tiny_qwen_vl(path, "2.5", seed)


def build_tiny_qwen2_vl(path: Path, *, seed: int = 0) -> Path:
    """A tiny Qwen2-VL-Instruct, laid out as Qwen/Qwen2-VL-*-Instruct (`Qwen2VLProcessor`)."""
    return _build_tiny_qwen_vl(path, "2", seed)


def _build_tiny_qwen_vl(path: Path, version: str, seed: int) -> Path:
    import torch
    import transformers
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    tok = _tokenizer(QWEN_SPECIAL, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    vision: dict[str, Any] = {"depth": 2, "num_heads": 2, "patch_size": 14,
                              "spatial_merge_size": 2, "temporal_patch_size": 2}
    if version == "2.5":
        name = "Qwen2_5_VL"
        vision.update(hidden_size=32, intermediate_size=64, window_size=56,
                      fullatt_block_indexes=[1], out_hidden_size=32)
    else:
        name = "Qwen2VL"
        vision.update(embed_dim=32, hidden_size=32, mlp_ratio=2)
    config = getattr(transformers, f"{name}Config")(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2,
                     "vocab_size": len(tok), "max_position_embeddings": 4096,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                         "mrope_section": [1, 1, 2]},
                     "pad_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
                     "bos_token_id": ids["<|endoftext|>"]},
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{name}ForConditionalGeneration")(config)
    # Narrower than the others: `ipr` reads P("keep") against the whole vocabulary, which a wide
    # head would make vanishingly small.
    _spread_head(model, 0.3)
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=QWEN_MIN_PIXELS,
                             max_pixels=QWEN_MAX_PIXELS).save_pretrained(path)
    # As published: the torchvision class's name (transformers picks the backend at load) and
    # the processor class; no video processor config.
    _edit_json(path / "preprocessor_config.json", image_processor_type="Qwen2VLImageProcessor",
               processor_class=f"{name}Processor")
    (path / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_VL_TEMPLATE}))
    return path


def build_ipr_adapter(base: Path, path: Path, *, seed: int = 1) -> Path:
    """A LoRA adapter over the tiny Qwen2.5-VL as IPR trained and published theirs (peft
    `LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
    task_type="CAUSAL_LM")`), with non-zero weights so that it visibly changes the answers. The
    adapter names its base by hub id, as published: loading must not go looking for it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, bias="none", target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM", init_lora_weights=False))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    peft_model.save_pretrained(str(path))
    _edit_json(path / "adapter_config.json",
               base_model_name_or_path="Qwen/Qwen2.5-VL-3B-Instruct")
    return path


# --- ShieldGemma 2 (Gemma 3) -----------------------------------------------------------------

GEMMA_SPECIAL = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>",
                 "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
GEMMA_IMAGE, GEMMA_PATCH, GEMMA_IMAGE_TOKENS = 32, 8, 4


def _gemma_tokenizer() -> Any:
    return _tokenizer(GEMMA_SPECIAL, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                      extra_special_tokens={"boi_token": "<start_of_image>",
                                            "eoi_token": "<end_of_image>",
                                            "image_token": "<image_soft_token>"})


def _gemma3_configs(tok: Any) -> dict[str, Any]:
    from transformers import Gemma3TextConfig, SiglipVisionConfig

    return {
        "text_config": Gemma3TextConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, vocab_size=len(tok), sliding_window=64,
            max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id),
        "vision_config": SiglipVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            image_size=GEMMA_IMAGE, patch_size=GEMMA_PATCH),
        "mm_tokens_per_image": GEMMA_IMAGE_TOKENS,
        "boi_token_index": tok.convert_tokens_to_ids("<start_of_image>"),
        "eoi_token_index": tok.convert_tokens_to_ids("<end_of_image>"),
        "image_token_index": tok.convert_tokens_to_ids("<image_soft_token>"),
    }


def build_tiny_shieldgemma2(path: Path, *, seed: int = 0) -> Path:
    """A tiny ShieldGemma 2: `ShieldGemma2ForImageClassification` (a Gemma 3 inside, SigLIP
    vision) and `ShieldGemma2Processor` with the policy-wrapping chat template, its `Yes`/`No`
    token ids set from this tokenizer."""
    import torch
    from transformers import (
        ShieldGemma2Config,
        ShieldGemma2ForImageClassification,
        ShieldGemma2Processor,
    )
    from transformers.models.gemma3 import Gemma3ImageProcessorPil

    tok = _gemma_tokenizer()
    yes, no = (tok.encode(w, add_special_tokens=False)[0] for w in ("Yes", "No"))
    config = ShieldGemma2Config(**_gemma3_configs(tok))
    # Read by the classifier (ShieldGemma 2's own are 10784 and 3771 in Gemma's vocabulary).
    config.yes_token_index, config.no_token_index = yes, no
    torch.manual_seed(seed)
    model = ShieldGemma2ForImageClassification(config)
    _spread_head(model.model)
    processor = ShieldGemma2Processor(
        image_processor=Gemma3ImageProcessorPil(
            size={"height": GEMMA_IMAGE, "width": GEMMA_IMAGE}),
        tokenizer=tok, chat_template=SHIELDGEMMA2_TEMPLATE, image_seq_length=GEMMA_IMAGE_TOKENS)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


# --- LlavaGuard 1.2 (LLaVA-OneVision) --------------------------------------------------------

LLAVA_OV_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
OV_IMAGE, OV_PATCH = 32, 8


def build_tiny_llava_onevision(path: Path, *, seed: int = 0) -> Path:
    """A tiny LlavaGuard 1.2: `LlavaOnevisionForConditionalGeneration` (SigLIP + Qwen2) with the
    files of AIML-TUDA/LlavaGuard-v1.2-*-OV-hf (`LlavaOnevisionProcessor`, its image processor
    with anyres grid pinpoints, the LLaVA-OneVision chat template)."""
    import torch
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )
    from transformers.models.llava_onevision import LlavaOnevisionImageProcessorPil

    tok = _tokenizer(LLAVA_OV_SPECIAL, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                     extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})
    pinpoints = [[OV_IMAGE, OV_IMAGE], [OV_IMAGE, 2 * OV_IMAGE], [2 * OV_IMAGE, OV_IMAGE]]
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            image_size=OV_IMAGE, patch_size=OV_PATCH),
        text_config=Qwen2Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, vocab_size=len(tok), max_position_embeddings=4096,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints, vision_feature_select_strategy="full",
        vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9", tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    _spread_head(model)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    LlavaOnevisionImageProcessorPil(
        size={"height": OV_IMAGE, "width": OV_IMAGE}, crop_size=None,
        image_grid_pinpoints=pinpoints, do_pad=True).save_pretrained(path)
    _edit_json(path / "preprocessor_config.json",
               image_processor_type="LlavaOnevisionImageProcessor",
               processor_class="LlavaOnevisionProcessor")
    (path / "processor_config.json").write_text(json.dumps({
        "processor_class": "LlavaOnevisionProcessor",
        "num_image_tokens": (OV_IMAGE // OV_PATCH) ** 2,
        "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_9"}))
    (path / "chat_template.json").write_text(
        json.dumps({"chat_template": LLAVA_ONEVISION_TEMPLATE}))
    return path
