"""Tiny CLIP / DINOv2 / IResNet checkpoints built from config and saved like real ones (never downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_clip_dir(root: Path, seed: int = 0) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, projection_dim=16)
    path = root / "tiny-clip"
    CLIPVisionModelWithProjection(cfg).save_pretrained(path)
    return path


def tiny_full_clip_dir(root: Path, seed: int = 0) -> Path:
    """A full CLIP (text and vision towers, CLIPModel layout) with the synthetic world's CLIP tokenizer."""
    import shutil

    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    tok_dir = Path(__file__).resolve().parents[1] / "assets" / "synthetic-sd" / "tokenizer"
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(seed)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    path = root / "tiny-clip-full"
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    for f in tok_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path


def tiny_dino_dir(root: Path, seed: int = 0) -> Path:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                       image_size=28, patch_size=14)
    path = root / "tiny-dino"
    Dinov2Model(cfg).save_pretrained(path)
    return path


def tiny_embedder_dir(root: Path, seed: int = 0) -> Path:
    from fairdiff_ray.models.features import IResNet, save_embedder

    torch.manual_seed(seed)
    layers, widths = [1, 1, 1, 1], [8, 8, 16, 16]
    net = IResNet(layers, widths, embedding_size=32, input_size=112)
    with torch.no_grad():  # non-trivial BatchNorm statistics, as in a trained net
        for m in net.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return save_embedder(net, root / "tiny-arcface", layers, widths)
