"""A tiny real Stable Diffusion pipeline, built offline in a second and saved to a folder.

Random weights, real architecture: the diffusers backend loads it through the same
`AutoPipelineForText2Image.from_pretrained(path)` call that loads a real checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

_VOCAB = ["<|startoftext|>", "<|endoftext|>", "!", "a", "an", "the", "cat", "dog", "red", "blue",
          "photo", "of", "sky", "house", "tree", "lighthouse", "bicycle", "sunset", "hat"]


def _tokenizer(directory: Path):  # type: ignore[no-untyped-def]
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for word in _VOCAB:
        vocab.setdefault(word, len(vocab))
        if not word.startswith("<|"):
            vocab.setdefault(word + "</w>", len(vocab))
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"),
                         model_max_length=16)


def build_tiny_sd(path: Path) -> Path:
    """Save a tiny StableDiffusionPipeline (about 6.5 MB) at `path` and return the path."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        norm_num_groups=8, attention_head_dim=4)
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=8,
        sample_size=64)
    tokenizer = _tokenizer(path / "_vocab")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer),
        max_position_embeddings=16, projection_dim=32))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)  # type: ignore[attr-defined]
    return path
