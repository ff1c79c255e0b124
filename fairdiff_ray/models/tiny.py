"""Tiny Stable-Diffusion-architecture components built from config (tests, benchmarks, the synthetic world).

Shapes follow diffusers' own dummy components: 32x32 images, a 2-level VAE (latents 4 x 16 x 16), a 2-level
UNet with cross-attention, and a 5-layer CLIP text encoder of width 32. The tokenizer is a real CLIP BPE
tokenizer whose vocabulary is built from a word list, so no file is downloaded.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

BASE_WORDS = (
    "a photo of the face person an and with in on at for portrait picture image man woman"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    # The byte -> printable-unicode table of byte-level BPE (GPT-2 / CLIP), rebuilt here.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build_tokenizer(words: list[str] | tuple[str, ...] = (), model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose merges spell every word of ``words`` (plus BASE_WORDS) as one token.

    Unknown words fall back to sub-word pieces, single bytes, or the unknown token; nothing is downloaded.
    """
    byte_chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for ch in byte_chars:
        vocab.setdefault(ch, len(vocab))
    for ch in byte_chars:
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    seen = set()
    all_words = sorted({w for text in (*BASE_WORDS, *words) for w in re.findall(r"[a-z]+|[0-9]", text.lower())})
    for w in all_words:
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        cur = pieces[0]
        for nxt in pieces[1:]:
            pair = (cur, nxt)
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            cur = cur + nxt
            vocab.setdefault(cur, len(vocab))
    vocab.setdefault("<|startoftext|>", len(vocab))
    vocab.setdefault("<|endoftext|>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def tiny_unet(cross_attention_dim: int = 32, sample_size: int = 16, channels: tuple[int, ...] = (32, 64)) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        block_out_channels=channels,
        layers_per_block=1,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def tiny_vae(channels: tuple[int, ...] = (32, 64), sample_size: int = 32) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=list(channels),
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(channels),
        up_block_types=["UpDecoderBlock2D"] * len(channels),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size,
    )


def tiny_text_encoder(vocab_size: int, hidden: int = 32, layers: int = 5) -> CLIPTextModel:
    cfg = CLIPTextConfig(
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_size=hidden,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=layers,
        vocab_size=vocab_size,
        max_position_embeddings=77,
        projection_dim=hidden,
    )
    return CLIPTextModel(cfg)


def tiny_scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def tiny_components(seed: int = 0, words: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Components for ``StableDiffusionPipeline(**components)``, deterministic in ``seed``.

    Returns unet, vae, text_encoder, tokenizer, scheduler, plus safety_checker=None,
    feature_extractor=None and image_encoder=None so the stock pipeline accepts them.
    """
    tokenizer = build_tokenizer(words)
    torch.manual_seed(seed)
    unet = tiny_unet()
    torch.manual_seed(seed + 1)
    vae = tiny_vae()
    torch.manual_seed(seed + 2)
    text_encoder = tiny_text_encoder(vocab_size=len(tokenizer))
    for m in (unet, vae, text_encoder):
        m.eval()
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": tiny_scheduler(),
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }
