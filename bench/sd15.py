"""Stable Diffusion v1.5-architecture components with random weights (nothing is downloaded), for benchmarks.

The configs are those of the published SD v1.5 ``unet/``, ``vae/`` and ``text_encoder/`` config.json files.
``size="dry"`` keeps the same structure (4-level UNet with 3 cross-attention levels, 4-level VAE, CLIP text
encoder) at toy widths, so scripts meant for a GPU can be checked end to end on a CPU in seconds.
The tokenizer is the word-level CLIP BPE tokenizer of models/tiny.py (ids fit the 49408-token embedding).
"""

from __future__ import annotations

from typing import Any

import torch

WORDS = ("nurse", "doctor", "pilot", "chef", "farmer", "judge", "senator")

UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=512, scaling_factor=0.18215,
)
TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                 set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000, prediction_type="epsilon")

# same structure, toy widths (CPU dry runs)
DRY = {
    "unet": {**UNET, "sample_size": 8, "block_out_channels": (32, 32, 64, 64), "cross_attention_dim": 64,
             "norm_num_groups": 8},
    "vae": {**VAE, "sample_size": 64, "block_out_channels": (16, 16, 32, 32), "norm_num_groups": 8},
    "text": {**TEXT, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "projection_dim": 64},
}


def configs(size: str) -> tuple[dict, dict, dict]:
    if size == "full":
        return UNET, VAE, TEXT
    if size == "dry":
        return DRY["unet"], DRY["vae"], DRY["text"]
    raise ValueError(f"size must be 'full' or 'dry', got {size!r}")


def build(size: str = "full", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
          seed: int = 0) -> Any:
    """fairdiff Components of the SD v1.5 architecture with random weights, frozen, on ``device`` in ``dtype``.

    Weights are initialised directly on ``device`` (a GPU initialises the 860M-parameter UNet in a second)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from fairdiff_ray.models.sd import components_from_dict
    from fairdiff_ray.models.tiny import build_tokenizer

    unet_cfg, vae_cfg, text_cfg = configs(size)
    tok = build_tokenizer(WORDS)
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        text = CLIPTextModel(CLIPTextConfig(**text_cfg, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                            pad_token_id=tok.eos_token_id))
    for m in (unet, vae, text):
        m.to(device=device, dtype=dtype).eval()
    return components_from_dict({"unet": unet, "vae": vae, "text_encoder": text, "tokenizer": tok,
                                 "scheduler": DDIMScheduler(**SCHEDULER)})


def full_components(cfg: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """dist.worker.Builders.components for the full-size SD v1.5 architecture."""
    return build("full", device, dtype)


def dry_components(cfg: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """dist.worker.Builders.components for the toy-width SD v1.5 architecture (CPU dry runs)."""
    return build("dry", device, dtype)


def fast_unet(unet_cfg: dict, seed: int = 0) -> torch.nn.Module:
    """The UNet of ``unet_cfg`` on CPU with quickly made random weights: built on the meta device, then every
    matrix / kernel filled from one shared pool of N(0, 1) draws scaled by 1/sqrt(fan_in) (values repeat across
    tensors; for memory and timing that does not matter), norm scales 1, biases 0. Building the 860M-parameter
    SD v1.5 UNet with its own initialisers takes 30-50 s on a loaded CPU core; this takes a few."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_cfg)
    unet = unet.to_empty(device="cpu")
    pool = torch.randn(1 << 20, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            flat = p.view(-1)
            if p.dim() > 1:
                for i in range(0, flat.numel(), pool.numel()):
                    part = flat[i:i + pool.numel()]
                    part.copy_(pool[: part.numel()])
                flat.mul_(p[0].numel() ** -0.5)
            else:
                flat.fill_(1.0 if name.endswith("weight") else 0.0)
        for b in unet.buffers():
            b.zero_()
    return unet.eval().requires_grad_(False)
