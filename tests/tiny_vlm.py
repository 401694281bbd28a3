"""A tiny random-weight LLaVA-style judge model, built on the fly and saved like a real checkpoint.

CLIP vision tower + Llama text model + a byte-level BPE tokenizer trained here on the judge
templates' own words, with a ChatML-style jinja chat template. It loads through `AutoProcessor` /
`AutoModelForImageTextToText` exactly as a downloaded model would, on CPU, without torchvision, in
well under a second. Random weights answer nonsense: tests assert mechanics, not judgements.
"""

from __future__ import annotations

from pathlib import Path

IMAGE_SIZE = 32
PATCH = 8

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>", "<image>"]

# Words the profiles' templates and answers use, so that answer words are single tokens as in a
# real vocabulary.
_CORPUS = """
system user assistant You are SafeEditor a safety judge for generated images
<judgement> </judgement> <thought> </thought> <refined_prompt> </refined_prompt>
sexual: no violence: yes self_harm: no shocking: no hate: no harassment: no
illegal_activity: no minors: no yes no keep Keep Yes No Safe Unsafe safe unsafe
{ "rating": "Safe", "category": "O1", "rationale": "NA: None applying" }
Original Prompt: Prompt: Round verdict flagged categories a photo of a cat on a sofa
a knight fighting a dragon with blood everywhere, a portrait, painting, landscape
Does the image violate the above policy? Your Answer must start with 'Yes' or 'No'.
Answer for each category yes or no, then your reasoning, then a refined prompt
O1 O2 O3 O4 O5 O6 O7 O8 O9 1 2 3 4 5 6 7 8 9 0 . , : ; ! ? ' " ( ) [ ] - _ /
"""


def build_tiny_vlm(path: Path, *, seed: int = 0) -> Path:
    """Save a tiny LLaVA-style model + processor under `path`; returns `path`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )
    from transformers.models.clip import CLIPImageProcessorPil

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", eos_token="<|im_end|>",
        bos_token="<|im_start|>", extra_special_tokens={"image_token": "<image>"})
    tokenizer.chat_template = CHAT_TEMPLATE

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE)

    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32),
        text_config=LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=2048,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(config)
    # Random weights with a wider spread than the init, so that answer probabilities vary.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 1.0)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def build_tiny_lora(base: Path, path: Path, *, seed: int = 1) -> Path:
    """Save a LoRA adapter over the tiny model's language layers, with non-zero weights so that
    it visibly changes the model's answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    peft_model.save_pretrained(path)
    return path


def tie_answer_tokens(model_dir: Path, first: str, second: str) -> None:
    """Rewrite a saved tiny model so that the first tokens of `first` and `second` get identical
    logits everywhere (their lm_head rows made equal): a judge reading P(first) against
    P(second) must then say exactly 0.5."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    a, b = (tok.encode(t, add_special_tokens=False)[0] for t in (first, second))
    with torch.no_grad():
        model.lm_head.weight[b] = model.lm_head.weight[a]
    model.save_pretrained(model_dir)
