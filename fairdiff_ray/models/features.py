"""Differentiable feature nets for the preservation losses (METHOD.md section 3) and CLIP attribute heads.

- ``ClipImageFeatures``: CLIP image embeddings (transformers ``CLIPVisionModelWithProjection``);
- ``DinoImageFeatures``: the DINOv2 CLS token (transformers ``Dinov2Model``);
- ``IResNetEmbedder``: an ArcFace-style face-recognition net in torch (``FaceEmbedder``);
- ``ClipHeadsClassifier``: linear / MLP attribute heads on a CLIP vision backbone (``AttributeClassifier``);
- face banks: (M, D) embeddings of real faces.

Every loader reads a LOCAL directory and never downloads; a missing or incomplete one is a one-line
ModelFileError that says how to fetch it. All nets are frozen (requires_grad False, eval mode) and take images
(B, 3, H, W) in [-1, 1]; their preprocessing (resize, mean / std) is written in torch so gradients reach the
pixels. Inputs are cast to the net's dtype, outputs are float32.

Face-embedder format (``features.face_embedder=DIR``): ``DIR/config.json`` =
``{"arch": "iresnet", "layers": [3, 4, 14, 3], "widths": [64, 128, 256, 512], "embedding_size": 512,
"input_size": 112}`` and ``DIR/model.safetensors``. The module and parameter names follow the IResNet
backbones of InsightFace's ``arcface_torch`` (conv1, bn1, prelu, layer1..4 of IBasicBlock, bn2, fc,
features), so a published arcface_torch checkpoint converts without renaming:
``python -m fairdiff_ray.models.features convert-arcface backbone.pth DIR --layers 3,4,14,3`` (r50;
r100 = 3,13,30,3; r18 = 2,2,2,2). InsightFace's ONNX packs cannot be used: ONNX Runtime carries no gradients.

Face-bank format (``features.face_bank=FILE``): a safetensors file with one tensor ``embeddings`` (M, D),
written by ``fairdiff build-face-bank``; rows are L2-normalised on load.

Heads format (``classifier.kind=clip_heads``, ``classifier.path=DIR``): ``DIR/heads.safetensors`` +
``DIR/heads.json`` (attributes -> class names, hidden width, feature dim), written by
``fairdiff train-classifier``; the backbone is a separate local CLIP directory (``classifier.backbone``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from fairdiff_ray.config import FeaturesConfig
from fairdiff_ray.errors import ModelFileError
from fairdiff_ray.models.protocols import AttributeClassifier, FaceEmbedder, ImageFeatures

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_SIZE = 224  # METHOD.md: DINOv2 on the 224 resize (the checkpoint's own image_size is 518)
CLIP_HINT = "huggingface-cli download openai/clip-vit-large-patch14 --local-dir {path}"
DINO_HINT = "huggingface-cli download facebook/dinov2-base --local-dir {path}"


# --------------------------------------------------------------------------------------------------------------
# Preprocessing and loading helpers


def resize_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, size, size): shortest side to ``size`` (bicubic, antialiased), centre crop.

    The CLIP / DINOv2 image processors' geometry, differentiable in the pixels.
    """
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        images = F.interpolate(images, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    return images[..., top : top + size, left : left + size]


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """[-1, 1] pixels -> ([0, 1] - mean) / std per channel."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return ((images + 1) / 2 - m) / s


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _param_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def check_hf_dir(path: str | Path | None, key: str, hint: str) -> Path:
    """A local transformers checkpoint directory (config.json + weights), else a one-line ModelFileError."""
    if path is None:
        raise ModelFileError(f"{key} is not set: give a local model directory ({hint.format(path='DIR')})")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ModelFileError(f"{key}: {p} is not a directory; fetch it with {hint.format(path=p)}")
    weights = list(p.glob("*.safetensors")) + list(p.glob("pytorch_model*.bin"))
    if not (p / "config.json").is_file() or not weights:
        raise ModelFileError(
            f"{key}: {p} lacks config.json or weights (*.safetensors); fetch it with {hint.format(path=p)}"
        )
    return p


def _from_pretrained(cls: Any, path: Path, key: str, hint: str) -> nn.Module:
    try:
        return cls.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        msg = f"{key}: {path} could not be loaded ({exc}); fetch it with {hint.format(path=path)}"
        raise ModelFileError(msg) from exc


# --------------------------------------------------------------------------------------------------------------
# CLIP and DINOv2 image features


class ClipImageFeatures(nn.Module):
    """CLIP image embedding, L2-normalised; implements ImageFeatures (name "clip").

    images: (B, 3, H, W) in [-1, 1] -> (B, D). ``raw`` returns the unnormalised projection (the heads' input).
    """

    name = "clip"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = _freeze(model)
        self.size = int(model.config.image_size)
        self.dim = int(model.config.projection_dim)

    def raw(self, images: torch.Tensor) -> torch.Tensor:
        x = normalize(resize_center_crop(images.to(_param_dtype(self.model)), self.size), CLIP_MEAN, CLIP_STD)
        return self.model(pixel_values=x).image_embeds.float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.raw(images), dim=-1)


class DinoImageFeatures(nn.Module):
    """DINOv2 CLS token (after the final layer norm), L2-normalised; implements ImageFeatures (name "dino").

    Input side: 224 (METHOD.md), or the checkpoint's image_size when smaller (tiny test models).
    """

    name = "dino"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = _freeze(model)
        self.size = min(DINO_SIZE, int(model.config.image_size))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = resize_center_crop(images.to(_param_dtype(self.model)), self.size)
        out = self.model(pixel_values=normalize(x, IMAGENET_MEAN, IMAGENET_STD))
        return F.normalize(out.pooler_output.float(), dim=-1)


def _tower_config(p: Path, tower: str) -> Any:
    """The text or vision tower's config of a full CLIP directory (CLIPModel layout), with the projection size of
    the shared embedding space (kept at the top level, where a tower's own default would be 512); None for a
    directory that holds one tower only."""
    from transformers import CLIPTextConfig, CLIPVisionConfig

    conf = json.loads((p / "config.json").read_text())
    if conf.get("model_type") != "clip":
        return None
    cls = CLIPTextConfig if tower == "text" else CLIPVisionConfig
    sub = cls(**conf.get(f"{tower}_config", {}))
    sub.projection_dim = int(conf.get("projection_dim", sub.projection_dim))
    return sub


def _load_tower(cls: Any, p: Path, key: str, config: Any) -> nn.Module:
    try:
        return cls.from_pretrained(str(p), local_files_only=True, **({"config": config} if config else {}))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(f"{key}: {p} could not be loaded ({first}); fetch it with {CLIP_HINT.format(path=p)}"
                             ) from exc


def load_clip(path: str | Path | None, key: str = "features.clip") -> ClipImageFeatures:
    """The image tower of a CLIP directory: a vision-only export or a full CLIPModel."""
    from transformers import CLIPVisionModelWithProjection

    p = check_hf_dir(path, key, CLIP_HINT)
    return ClipImageFeatures(_load_tower(CLIPVisionModelWithProjection, p, key, _tower_config(p, "vision")))


class ClipTextFeatures(nn.Module):
    """CLIP text embedding (the projection) of prompts, L2-normalised: the text side of CLIP-T (METHOD.md: the
    image-prompt cosine). prompts: list of B strings -> (B, D); each distinct prompt is embedded once."""

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.model, self.tokenizer = _freeze(model), tokenizer
        self.max_length = min(int(getattr(tokenizer, "model_max_length", 77)),
                              int(model.config.max_position_embeddings))
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> torch.Tensor:
        new = sorted({p for p in prompts if p not in self._cache})
        if new:
            tok = self.tokenizer(new, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            out = self.model(input_ids=tok.input_ids, attention_mask=tok.attention_mask).text_embeds
            self._cache.update(zip(new, F.normalize(out.float(), dim=-1)))
        return torch.stack([self._cache[p] for p in prompts])


def load_clip_text(path: str | Path | None, key: str = "features.clip") -> ClipTextFeatures | None:
    """The text tower and tokenizer of a full CLIP directory (transformers' CLIPModel layout with its tokenizer
    files); None for a vision-only export (CLIPVisionModelWithProjection), which has no text side."""
    p = check_hf_dir(path, key, CLIP_HINT)
    text_conf = _tower_config(p, "text")
    if text_conf is None:
        return None
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError):
        return None
    return ClipTextFeatures(_load_tower(CLIPTextModelWithProjection, p, key, text_conf), tokenizer)


def load_dino(path: str | Path | None, key: str = "features.dino") -> DinoImageFeatures:
    from transformers import Dinov2Model

    p = check_hf_dir(path, key, DINO_HINT)
    return DinoImageFeatures(_from_pretrained(Dinov2Model, p, key, DINO_HINT))


def build_features(
    cfg: FeaturesConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> dict[str, ImageFeatures]:
    """Only the configured nets: {"clip": ..., "dino": ..., "synthetic": ...} (null entries are off)."""
    nets: dict[str, Any] = {}
    if cfg.clip is not None:
        nets["clip"] = load_clip(cfg.clip)
    if cfg.dino is not None:
        nets["dino"] = load_dino(cfg.dino)
    if cfg.synthetic is not None:
        from fairdiff_ray.synthetic.world import feature_source, load_features

        nets["synthetic"] = load_features(*feature_source(cfg.synthetic))
    for net in nets.values():
        if isinstance(net, nn.Module):  # frozen whatever the loader did: gradients flow to the pixels only
            _freeze(net).to(device=device, dtype=dtype)
    return nets


# --------------------------------------------------------------------------------------------------------------
# Face-recognition embedder (IResNet, arcface_torch layout)


class IBasicBlock(nn.Module):
    """BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN, plus the (projected) identity."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes, eps=1e-5)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """ArcFace IResNet on (B, 3, 112, 112) faces in [-1, 1] -> (B, embedding_size) (not normalised)."""

    def __init__(
        self,
        layers: list[int],
        widths: list[int] | None = None,
        embedding_size: int = 512,
        input_size: int = 112,
    ) -> None:
        super().__init__()
        widths = list(widths or [64, 128, 256, 512])
        if len(layers) != 4 or len(widths) != 4 or input_size % 16:
            raise ValueError("IResNet needs 4 layers, 4 widths and an input_size divisible by 16")
        self.input_size = input_size
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-5)
        self.prelu = nn.PReLU(widths[0])
        inplanes = widths[0]
        for i, (n, planes) in enumerate(zip(layers, widths), start=1):
            blocks = [IBasicBlock(inplanes, planes, stride=2)] + [IBasicBlock(planes, planes) for _ in range(n - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            inplanes = planes
        self.bn2 = nn.BatchNorm2d(inplanes, eps=1e-5)
        side = input_size // 16
        self.fc = nn.Linear(inplanes * side * side, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.features(self.fc(torch.flatten(self.bn2(x), 1)))


class IResNetEmbedder(nn.Module):
    """FaceEmbedder: (B, 3, 112, 112) aligned faces in [-1, 1] -> (B, D), the L2-normalised mean of the
    embeddings of the face and its mirror image (METHOD.md section 3)."""

    def __init__(self, net: IResNet) -> None:
        super().__init__()
        self.net = _freeze(net)

    def forward(self, aligned: torch.Tensor) -> torch.Tensor:
        x = aligned.to(_param_dtype(self.net))
        if x.shape[-1] != self.net.input_size:
            x = F.interpolate(x, size=(self.net.input_size,) * 2, mode="bilinear", antialias=True)
        e = self.net(torch.cat([x, x.flip(-1)]))
        return F.normalize((e[: len(x)] + e[len(x) :]).float(), dim=-1)


EMBEDDER_HINT = "see fairdiff_ray/models/features.py for the format and convert-arcface"


def save_embedder(net: IResNet, out_dir: str | Path, layers: list[int], widths: list[int]) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arch = {"arch": "iresnet", "layers": list(layers), "widths": list(widths),
            "embedding_size": net.fc.out_features, "input_size": net.input_size}
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(arch, indent=2))
    return out


def load_face_embedder(path: str | Path, key: str = "features.face_embedder") -> IResNetEmbedder:
    """An IResNet face embedder from DIR/config.json + DIR/model.safetensors (format in the module docstring)."""
    p = Path(path).expanduser()
    if not (p / "config.json").is_file() or not (p / "model.safetensors").is_file():
        raise ModelFileError(f"{key}: {p} needs config.json and model.safetensors; {EMBEDDER_HINT}")
    arch = json.loads((p / "config.json").read_text())
    if arch.get("arch") != "iresnet":
        raise ModelFileError(f"{key}: {p}/config.json arch must be 'iresnet'; {EMBEDDER_HINT}")
    net = IResNet(arch["layers"], arch.get("widths"), arch.get("embedding_size", 512), arch.get("input_size", 112))
    try:
        net.load_state_dict(load_file(str(p / "model.safetensors")))
    except RuntimeError as exc:
        raise ModelFileError(f"{key}: {p} weights do not match config.json ({exc})") from exc
    return IResNetEmbedder(net)


def build_face_embedder(cfg: FeaturesConfig) -> FaceEmbedder | None:
    return None if cfg.face_embedder is None else load_face_embedder(cfg.face_embedder)


def load_face_bank(path: str | None) -> torch.Tensor | None:
    """(M, D) L2-normalised face embeddings from a safetensors file (key ``embeddings``), or None."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelFileError(f"features.face_bank: {p} does not exist; build one with fairdiff build-face-bank")
    try:
        bank = load_file(str(p)).get("embeddings")
    except Exception as exc:  # safetensors raises its own error type for a corrupt file
        raise ModelFileError(f"features.face_bank: {p} is not a readable safetensors file ({exc})") from exc
    if bank is None or bank.dim() != 2 or bank.shape[0] == 0:
        raise ModelFileError(f"features.face_bank: {p} needs a non-empty (M, D) tensor 'embeddings'")
    return F.normalize(bank.float(), dim=-1)


def save_face_bank(embeddings: torch.Tensor, path: str | Path) -> Path:
    from safetensors.torch import save

    from fairdiff_ray.io import atomic_write_bytes

    return atomic_write_bytes(path, save({"embeddings": F.normalize(embeddings.float(), dim=-1).contiguous()}))


# --------------------------------------------------------------------------------------------------------------
# CLIP attribute heads


def make_heads(attributes: dict[str, list[str]], dim: int, hidden: int = 0) -> nn.ModuleDict:
    """One head per attribute: Linear(dim, K) or Linear(dim, hidden) - GELU - Linear(hidden, K)."""
    def head(k: int) -> nn.Module:
        if hidden <= 0:
            return nn.Sequential(nn.Linear(dim, k))
        return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, k))

    return nn.ModuleDict({a: head(len(c)) for a, c in attributes.items()})


class ClipHeadsClassifier(nn.Module):
    """AttributeClassifier: standardised CLIP image embedding -> one head per attribute -> logits."""

    input_size = 224
    crop_expand = 0.5

    def __init__(self, backbone: ClipImageFeatures, heads: nn.ModuleDict, attributes: dict[str, list[str]],
                 mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = _freeze(heads)
        self.attributes = {a: list(c) for a, c in attributes.items()}
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", std.float())

    def forward(self, faces: torch.Tensor) -> dict[str, torch.Tensor]:
        z = (self.backbone.raw(faces) - self.mean) / self.std
        return {a: h(z) for a, h in self.heads.items()}


def save_heads(out_dir: str | Path, heads: nn.ModuleDict, attributes: dict[str, list[str]], hidden: int,
               mean: torch.Tensor, std: torch.Tensor) -> None:
    out = Path(out_dir)
    tensors = {f"heads.{k}": v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}
    tensors.update({"norm.mean": mean.detach().cpu().float(), "norm.std": std.detach().cpu().float()})
    save_file(tensors, str(out / "heads.safetensors"))
    meta = {"attributes": attributes, "hidden": hidden, "feature_dim": int(mean.numel()),
            "input_size": ClipHeadsClassifier.input_size, "crop_expand": ClipHeadsClassifier.crop_expand}
    (out / "heads.json").write_text(json.dumps(meta, indent=2))


def load_clip_heads_classifier(path: str, backbone: str) -> AttributeClassifier:
    """Heads from DIR/heads.safetensors + DIR/heads.json on the CLIP vision backbone in ``backbone``."""
    p = Path(path).expanduser()
    if not (p / "heads.json").is_file() or not (p / "heads.safetensors").is_file():
        raise ModelFileError(
            f"classifier.path: {p} needs heads.json and heads.safetensors; train them with fairdiff train-classifier"
        )
    meta = json.loads((p / "heads.json").read_text())
    clip = load_clip(backbone, key="classifier.backbone")
    if clip.dim != meta["feature_dim"]:
        raise ModelFileError(
            f"classifier.backbone: {backbone} gives {clip.dim}-d embeddings but the heads in {p} expect "
            f"{meta['feature_dim']}: use the backbone they were trained on"
        )
    tensors = load_file(str(p / "heads.safetensors"))
    heads = make_heads(meta["attributes"], meta["feature_dim"], meta.get("hidden", 0))
    heads.load_state_dict({k.removeprefix("heads."): v for k, v in tensors.items() if k.startswith("heads.")})
    return ClipHeadsClassifier(clip, heads, meta["attributes"], tensors["norm.mean"], tensors["norm.std"])


# --------------------------------------------------------------------------------------------------------------
# Conversion of an arcface_torch checkpoint


def convert_arcface(pth: str, out_dir: str, layers: list[int]) -> Path:
    """arcface_torch backbone.pth (a plain state dict) -> our face-embedder directory."""
    state = torch.load(pth, map_location="cpu", weights_only=True)
    widths = [int(state[f"layer{i}.0.conv1.weight"].shape[0]) for i in range(1, 5)]
    emb = int(state["fc.weight"].shape[0])
    net = IResNet(layers, widths, emb, 112)
    net.load_state_dict(state)
    return save_embedder(net, out_dir, layers, widths)


def _main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m fairdiff_ray.models.features")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert-arcface", help="arcface_torch backbone.pth -> face-embedder directory")
    c.add_argument("pth")
    c.add_argument("out_dir")
    c.add_argument("--layers", default="3,4,14,3", help="blocks per stage (r50: 3,4,14,3; r100: 3,13,30,3)")
    args = p.parse_args(argv)
    print(convert_arcface(args.pth, args.out_dir, [int(x) for x in args.layers.split(",")]))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
