"""The synthetic world's small CNNs and how they are trained (issue 4): detector, attribute classifiers,
feature net and prompt-fidelity net. ``world.py`` loads the shipped weights behind the model protocols.

Every net reads a 32 x 32 image in [-1, 1] (other sizes are resized first) through ``ConvNet``: stages of
conv - activation (x depth) - pool, then one hidden fully connected layer and linear heads. The hyper-parameters
live in a JSON ``arch`` dict saved beside the safetensors weights, so loading needs no code changes.

Training data are renders (render.py), drawn once per net into a pool and augmented on the fly (blur, noise,
colour gain / offset, a down-up resample that mimics a VAE's smoothing), so the nets keep working on a
diffusion model's imperfect samples. The classifiers are trained on crops made exactly as
``models.classifiers.classify_images`` makes them: the trained detector's box on the augmented image, expanded
by ``crop_expand`` with ``core.crop.crop_square``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fairdiff_ray.core.crop import crop_square
from fairdiff_ray.core.seeding import stable_seed
from fairdiff_ray.models.protocols import Faces
from fairdiff_ray.synthetic.render import ATTRIBUTES, N_CONTENT, render, sample_batch

SIZE = 32  # every net's input side
THUMB = 4  # the feature net regresses a THUMB x THUMB colour thumbnail of the scene
ACTIVATIONS = {"gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU}
POOLS = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}


# ----------------------------------------------------------------------------------------------------------------
# Architecture


class ConvNet(nn.Module):
    """(B, 3, 32, 32) -> {head: (B, n)}; arch keys: widths, depth, kernel, act, pool, hidden, heads, stem_stride."""

    def __init__(self, arch: dict) -> None:
        super().__init__()
        act, pool, k = ACTIVATIONS[arch["act"]], POOLS[arch["pool"]], int(arch["kernel"])
        layers: list[nn.Module] = []
        c, side = 3, SIZE
        stem = int(arch.get("stem_stride", 1))
        for i, w in enumerate(arch["widths"]):
            for d in range(int(arch["depth"])):
                stride = stem if (i == 0 and d == 0) else 1
                layers += [nn.Conv2d(c, w, k, stride=stride, padding=k // 2), act()]
                c, side = w, side // stride
            if i > 0 or stem == 1:  # a strided stem already halved the first stage
                layers.append(pool(2))
                side //= 2
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * side * side, arch["hidden"]), act())
        self.heads = nn.ModuleDict({name: nn.Linear(arch["hidden"], n) for name, n in arch["heads"].items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        return {name: head(h) for name, head in self.heads.items()}


def to_input(images: torch.Tensor) -> torch.Tensor:
    """images: (B, 3, H, W) -> (B, 3, 32, 32), antialiased bilinear when the size differs (differentiable)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if images.shape[-2:] == (SIZE, SIZE):
        return images
    return F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)


DETECTOR_HEADS = {"score": 1, "box": 4, "landmarks": 10}
CLASSIFIER_HEADS = {a: len(c) for a, c in ATTRIBUTES.items()}
FEATURE_HEADS = {"embed": 64}
FEATURE_AUX = {"content": N_CONTENT, "face": 1, "box": 4, "thumb": 3 * THUMB * THUMB}
FIDELITY_HEADS = {"content": N_CONTENT}

# Default architectures. The eval-time classifier and feature net differ from the train-time ones in every choice
# (METHOD.md section 6: evaluation uses classifiers and feature models different from the ones used in training).
ARCHS: dict[str, dict] = {
    "detector": dict(widths=[24, 48, 64], depth=1, kernel=3, act="gelu", pool="max", hidden=128, stem_stride=2),
    "classifier-train": dict(widths=[16, 32, 48], depth=1, kernel=3, act="gelu", pool="max", hidden=64, stem_stride=2),
    "classifier-eval": dict(widths=[24, 32, 64], depth=1, kernel=5, act="silu", pool="avg", hidden=96, stem_stride=2),
    "features": dict(widths=[24, 48, 64], depth=1, kernel=3, act="silu", pool="avg", hidden=128, stem_stride=2),
    # the eval-time feature net (semantic similarities of the evaluation): other architecture, seed and renders
    "features-eval": dict(widths=[32, 48, 80], depth=1, kernel=5, act="gelu", pool="max", hidden=96, stem_stride=2),
    "fidelity": dict(widths=[16, 32, 32], depth=1, kernel=3, act="relu", pool="max", hidden=64, stem_stride=2),
}
HEADS = {
    "detector": DETECTOR_HEADS,
    "classifier-train": CLASSIFIER_HEADS,
    "classifier-eval": CLASSIFIER_HEADS,
    "features": FEATURE_HEADS,
    "features-eval": FEATURE_HEADS,
    "fidelity": FIDELITY_HEADS,
}


def default_arch(name: str) -> dict:
    if name not in ARCHS:
        raise ValueError(f"unknown synthetic net {name!r}; use one of {sorted(ARCHS)}")
    extra = {"threshold": 0.5} if name == "detector" else {"crop_expand": 0.5} if name.startswith("classifier") else {}
    return {"name": name, **ARCHS[name], "heads": dict(HEADS[name]), "input_size": SIZE, **extra}


# ----------------------------------------------------------------------------------------------------------------
# The nets behind the model protocols (models/protocols.py); weights are frozen, gradients reach the pixels.


class _Wrapped(nn.Module):
    def __init__(self, arch: dict) -> None:
        super().__init__()
        self.arch = arch
        self.net = ConvNet(arch)

    def _run(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        p = next(self.net.parameters())
        return self.net(to_input(images.to(device=p.device, dtype=p.dtype)))


class SyntheticDetector(_Wrapped):
    """Face presence, box and five landmarks of the (only) face; implements FaceDetector.

    The net regresses one face per image (a synthetic portrait has at most one), so that face is the largest.
    ``found`` = sigmoid(score) >= ``threshold``; rows without a face hold zeros.
    """

    def __init__(self, arch: dict) -> None:
        super().__init__(arch)
        self.threshold = float(arch.get("threshold", 0.5))

    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images: (B, 3, H, W) -> (score (B,) in [0, 1], boxes (B, 4) px, landmarks (B, 5, 2) px)."""
        out = self._run(images)
        h, w = images.shape[-2:]
        scale = torch.tensor([w / SIZE, h / SIZE], device=out["box"].device, dtype=out["box"].dtype) * SIZE
        boxes = (out["box"].view(-1, 2, 2) * scale).flatten(1)
        boxes = torch.cat([boxes[:, :2], torch.maximum(boxes[:, 2:], boxes[:, :2])], dim=1)
        return torch.sigmoid(out["score"][:, 0]), boxes, out["landmarks"].view(-1, 5, 2) * scale

    def presence_logit(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) in [-1, 1] -> (B,) face-presence logit, differentiable in the pixels."""
        return self._run(images)["score"][:, 0]

    @torch.no_grad()
    def detect(self, images: torch.Tensor) -> Faces:
        """images: (B, 3, H, W) in [-1, 1] -> Faces (on the images' device)."""
        score, boxes, lm = self.predict(images.detach())
        found = score >= self.threshold
        keep = found.to(boxes.dtype)
        d = images.device
        return Faces(boxes=(boxes * keep[:, None]).float().to(d), scores=(score * keep).float().to(d),
                     landmarks=(lm * keep[:, None, None]).float().to(d), found=found.to(d))  # fmt: skip


class SyntheticClassifier(_Wrapped):
    """Gender, race and age logits on square face crops; implements AttributeClassifier (differentiable)."""

    def __init__(self, arch: dict) -> None:
        super().__init__(arch)
        self.attributes = {a: list(c) for a, c in ATTRIBUTES.items()}
        self.input_size = int(arch.get("input_size", SIZE))
        self.crop_expand = float(arch.get("crop_expand", 0.5))

    def forward(self, faces: torch.Tensor) -> dict[str, torch.Tensor]:
        """faces: (B, 3, S, S) in [-1, 1] -> {attribute: (B, K_a) logits}."""
        out = self._run(faces)
        return {a: out[a] for a in self.attributes}


class SyntheticFeatures(_Wrapped):
    """The synthetic world's CLIP / DINO stand-in; implements ImageFeatures (differentiable)."""

    name = "synthetic"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) in [-1, 1] -> (B, D) L2-normalised embeddings."""
        return F.normalize(self._run(images)["embed"], dim=-1)


class SyntheticFidelity(_Wrapped):
    """Prompt fidelity: which content (shirt) class the image shows."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) in [-1, 1] -> (B, N_CONTENT) logits."""
        return self._run(images)["content"]


WRAPPERS: dict[str, type[_Wrapped]] = {
    "detector": SyntheticDetector,
    "classifier-train": SyntheticClassifier,
    "classifier-eval": SyntheticClassifier,
    "features": SyntheticFeatures,
    "features-eval": SyntheticFeatures,
    "fidelity": SyntheticFidelity,
}


def build_net(name: str, seed: int) -> _Wrapped:
    """A freshly initialised net ``name`` with the default architecture; init drawn from a fork of the global
    RNG seeded with ``seed``, so the caller's RNG state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WRAPPERS[name](default_arch(name))


# ----------------------------------------------------------------------------------------------------------------
# Data: render pools and augmentation


@dataclass
class Pool:
    """Pre-rendered training scenes. images (N, 3, 32, 32); labels (N,) long; boxes (N, 4) / landmarks
    (N, 5, 2) pixels (zeros where no face); face (N,) bool."""

    images: torch.Tensor
    labels: dict[str, torch.Tensor]
    boxes: torch.Tensor
    landmarks: torch.Tensor
    face: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    def take(self, idx: torch.Tensor) -> Pool:
        return Pool(self.images[idx], {k: v[idx] for k, v in self.labels.items()}, self.boxes[idx],
                    self.landmarks[idx], self.face[idx])  # fmt: skip


def render_pool(n: int, seed: object, face_prob: float = 1.0, chunk: int = 512, flip_gender: bool = False) -> Pool:
    """``n`` renders with uniform attributes and content; chunk i uses render seed stable_seed(seed, i).
    ``flip_gender``: the same scenes (same seed, nuisance and other attributes) with the other gender."""
    parts = []
    for i in range(math.ceil(n / chunk)):
        m = min(chunk, n - i * chunk)
        s = stable_seed("synthetic-nets-pool", seed, i)
        a = sample_batch(m, s % (1 << 32), face_prob=face_prob)
        if flip_gender:
            a["gender"] = 1 - a["gender"]
        out = render(a["gender"], a["race"], a["age"], a["content"], seed=s, face=a["face"])
        parts.append((a, out))
    cat = lambda k: torch.cat([torch.nan_to_num(o[k]) for _, o in parts])  # noqa: E731
    labels = {k: torch.from_numpy(np.concatenate([a[k] for a, _ in parts])).long()
              for k in (*ATTRIBUTES, "content")}  # fmt: skip
    return Pool(cat("images"), labels, cat("boxes"), cat("landmarks"), cat("face").bool())


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image separable Gaussian blur; x (B, C, H, W), sigma (B,) in pixels (0 = unchanged)."""
    b, c, h, w = x.shape
    r = torch.arange(-3, 4, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (r[None] / sigma.clamp(min=1e-3)[:, None]) ** 2)
    k = (k / k.sum(-1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, 7)
    y = F.conv2d(F.pad(x.reshape(1, b * c, h, w), (3, 3, 0, 0), mode="replicate"), k[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, 3, 3), mode="replicate"), k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def augment(x: torch.Tensor, g: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Photometric corruption of renders (B, 3, H, W) in [-1, 1]; geometry is untouched so labels stay exact.

    Random per image: Gaussian blur (sigma up to 1.2 px), a down-up resample to half size, per-channel gain and
    offset (colour shift), contrast, and Gaussian pixel noise.
    """
    b = x.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    blur = (u(b) < 0.5) * u(b) * 1.2 * strength
    x = _gaussian_blur(x, blur)
    down = u(b) < 0.2 * strength
    if down.any():
        half = F.interpolate(x[down], scale_factor=0.5, mode="bilinear", antialias=True)
        x = x.clone()
        x[down] = F.interpolate(half, size=x.shape[-2:], mode="bilinear", align_corners=False)
    gain = 1 + (u(b, 3, 1, 1) - 0.5) * 0.2 * strength
    offset = (u(b, 3, 1, 1) - 0.5) * 0.16 * strength
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast = 1 + (u(b, 1, 1, 1) - 0.5) * 0.3 * strength
    x = (x - mean) * contrast + mean
    x = x * gain + offset
    x = x + torch.randn(x.shape, generator=g) * u(b, 1, 1, 1) * 0.08 * strength
    return x.clamp(-1, 1)


# ----------------------------------------------------------------------------------------------------------------
# Training


def fit(
    net: nn.Module, loss_fn: Callable[[torch.Generator], tuple[torch.Tensor, dict[str, float]]], steps: int,
    lr: float, seed: int, log: Callable[[str], None] = print, every: int = 250,
) -> None:
    """AdamW with linear warm-up and cosine decay; ``loss_fn(generator)`` draws its own batch from a generator
    seeded with ``seed`` (no global RNG)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    net.train()
    for step in range(steps):
        loss, parts = loss_fn(g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % every == 0 or step == 0:
            log(f"  step {step + 1}/{steps} loss {loss.item():.4f} " + " ".join(f"{k} {v:.3f}" for k, v in parts.items()))
    net.eval()


def _batch(pool: Pool, g: torch.Generator, n: int, strength: float) -> tuple[Pool, torch.Tensor]:
    sub = pool.take(torch.randint(len(pool), (n,), generator=g))
    return sub, augment(sub.images, g, strength)


def clutter(like: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Faceless images that are not renders, one per row of ``like`` (B, 3, H, W): coloured Gaussian noise at a
    random scale and blur (what an untrained diffusion model draws), or ``like``'s pixels spatially shuffled
    (a render's colours without its structure)."""
    b = like.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    noise = torch.randn(like.shape, generator=g) * (0.1 + 1.4 * u(b, 1, 1, 1)) + (u(b, 3, 1, 1) - 0.5)
    noise = _gaussian_blur(noise, u(b) * 2.0)
    shuffled = like.flatten(2)[:, :, torch.randperm(like[0, 0].numel(), generator=g)].view_as(like)
    return torch.where(u(b, 1, 1, 1) < 0.5, noise, shuffled).clamp(-1, 1)


def detector_loss(net: ConvNet, pool: Pool, batch: int = 128, strength: float = 1.0, clutter_frac: float = 0.2):
    """BCE on face presence; smooth-L1 (pixels) on the box and landmarks of images with a face. A fraction of
    every batch is replaced by ``clutter`` (no face), so anything that is not a face scores low, not only
    faceless renders."""

    def loss_fn(g: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        sub, x = _batch(pool, g, batch, strength)
        k = int(batch * clutter_frac)
        x = torch.cat([clutter(x[:k], g), x[k:]])
        f = torch.cat([torch.zeros(k, dtype=torch.bool), sub.face[k:]])
        out = net(x)
        bce = F.binary_cross_entropy_with_logits(out["score"][:, 0], f.float())
        geo = torch.tensor(0.0)
        if f.any():
            pred = torch.cat([out["box"], out["landmarks"]], dim=1)[f] * SIZE
            geo = F.smooth_l1_loss(pred, torch.cat([sub.boxes, sub.landmarks.flatten(1)], dim=1)[f])
        # Presence is weighted up: a missed face or a false one costs more downstream than a pixel of box error.
        return 4 * bce + geo, {"bce": bce.item(), "geo_px": geo.item()}

    return loss_fn


def detector_boxes(detector: SyntheticDetector, x: torch.Tensor) -> torch.Tensor:
    """The boxes ``models.faces.face_crops`` crops for (B, 3, H, W) images: detected, else the whole image."""
    faces = detector.detect(x)
    whole = torch.tensor([0.0, 0.0, float(x.shape[-1]), float(x.shape[-2])])
    return torch.where(faces.found[:, None], faces.boxes, whole)


def blend_labels(y: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """(B, 2) soft labels of blends a * render + (1 - a) * twin: ``a`` on the render's class y, 1 - a on the other."""
    return torch.where(y[:, None] == torch.arange(2, device=y.device), a[:, None], 1 - a[:, None])


def classifier_loss(net: ConvNet, pool: Pool, detector: nn.Module, expand: float, batch: int = 128,
                    strength: float = 1.0, jitter: float = 0.06, flipped: Pool | None = None,
                    gender_mix: float = 0.0):  # fmt: skip
    """Cross-entropy per attribute on crops of the detector's box (plus a little box jitter), as at run time.

    ``gender_mix`` (with ``flipped``, the same scenes as ``pool`` with the other gender): that fraction of every
    batch is a pixel blend a * render + (1 - a) * its other-gender twin, a ~ U(0, 1), with the soft gender label
    (a, 1 - a): the net learns to call an in-between image in-between (p ~ a) instead of confidently one gender,
    so a generator cannot reach a gender target with a faint, blurred halo of hair.
    """
    if gender_mix > 0 and (flipped is None or len(flipped) != len(pool)):
        raise ValueError("classifier_loss: gender_mix needs ``flipped``, the pool's scenes with the other gender")

    def loss_fn(g: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        soft = None
        if gender_mix > 0:
            assert flipped is not None
            idx = torch.randint(len(pool), (batch,), generator=g)
            sub = pool.take(idx)
            blend = torch.rand(batch, generator=g) < gender_mix
            a = torch.where(blend, torch.rand(batch, generator=g), torch.ones(batch))
            w = a[:, None, None, None]
            x = augment(w * sub.images + (1 - w) * flipped.images[idx], g, strength)
            soft = blend_labels(sub.labels["gender"], a)
        else:
            sub, x = _batch(pool, g, batch, strength)
        with torch.no_grad():
            boxes = detector_boxes(detector, x)
        side = (boxes[:, 2:] - boxes[:, :2]).amax(1, keepdim=True)
        boxes = boxes + (torch.rand(batch, 4, generator=g) - 0.5) * 2 * jitter * side
        out = net(crop_square(x, boxes, expand=expand, size=SIZE))
        parts = {k: F.cross_entropy(out[k], soft if k == "gender" and soft is not None else sub.labels[k])
                 for k in ATTRIBUTES}
        return sum(parts.values()), {k: v.item() for k, v in parts.items()}

    return loss_fn


def feature_targets(sub: Pool) -> dict[str, torch.Tensor]:
    """What the feature net's embedding must carry: content, face presence and geometry, a colour thumbnail."""
    thumb = F.adaptive_avg_pool2d(sub.images, THUMB).flatten(1)
    return {"content": sub.labels["content"], "face": sub.face.float(), "box": sub.boxes / SIZE, "thumb": thumb}


class FeatureTrainer(nn.Module):
    """Embedding net + auxiliary linear heads on the L2-normalised embedding (only the embedding is shipped)."""

    def __init__(self, net: ConvNet, dim: int) -> None:
        super().__init__()
        self.net = net
        self.aux = nn.ModuleDict({k: nn.Linear(dim, n) for k, n in FEATURE_AUX.items()})
        self.scale = nn.Parameter(torch.tensor(8.0))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        e = F.normalize(self.net(x)["embed"], dim=-1) * self.scale
        return {k: head(e) for k, head in self.aux.items()}


def features_loss(trainer: FeatureTrainer, pool: Pool, batch: int = 128, strength: float = 1.0):
    def loss_fn(g: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        sub, x = _batch(pool, g, batch, strength)
        out, t = trainer(x), feature_targets(sub)
        parts = {
            "content": F.cross_entropy(out["content"], t["content"]),
            "face": F.binary_cross_entropy_with_logits(out["face"][:, 0], t["face"]),
            "box": 10 * F.mse_loss(out["box"][sub.face], t["box"][sub.face]) if sub.face.any() else torch.tensor(0.0),
            "thumb": 10 * F.mse_loss(out["thumb"], t["thumb"]),
        }
        return sum(parts.values()), {k: v.item() for k, v in parts.items()}

    return loss_fn


def fidelity_loss(net: ConvNet, pool: Pool, batch: int = 128, strength: float = 1.0):
    def loss_fn(g: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        sub, x = _batch(pool, g, batch, strength)
        ce = F.cross_entropy(net(x)["content"], sub.labels["content"])
        return ce, {"ce": ce.item()}

    return loss_fn
