"""Procedural portraits with known ground truth: the synthetic world's "photographs" (issue 4).

Every image is a head-and-shoulders portrait drawn from closed-form soft masks, so the protected attributes,
the prompt's content and the face geometry are known exactly:

- gender (protected): female = long hair framing the face down to the shoulders; male = short hair cap;
- race (protected): four skin tones that differ in hue as well as brightness (robust to the lighting);
- age (protected): young = near-black hair, old = grey-white hair;
- content (asked for by the prompt, NOT protected): the shirt, one of 6 hues x {plain, striped};
- nuisance: head position and scale, background colour gradient, lighting level and direction, pixel noise.

Geometry is defined on a 32 x 32 canvas and scaled to ``size``; the face ellipse is 10-18 px wide at 32.
Rendering is numpy, vectorised over the batch, deterministic in ``seed`` (one ``default_rng(seed)`` draw
per nuisance variable, in a fixed order), and independent of the attribute values given.
"""

from __future__ import annotations

import numpy as np
import torch

ATTRIBUTES: dict[str, list[str]] = {
    "gender": ["female", "male"],
    "race": ["white", "black", "indian", "asian"],
    "age": ["young", "old"],
}

# Skin tones (RGB in [0, 1]): pinkish light, dark brown, mid brown, yellowish light.
SKIN = np.array(
    [[0.96, 0.76, 0.72], [0.36, 0.22, 0.14], [0.68, 0.44, 0.24], [0.93, 0.80, 0.50]], dtype=np.float64
)
HAIR = np.array([[0.10, 0.07, 0.06], [0.88, 0.88, 0.90]], dtype=np.float64)  # young, old
SHIRT_HUES = np.array([0.0, 1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6])  # red, yellow, green, cyan, blue, magenta
SHIRT_PATTERNS = ("plain", "striped")
N_CONTENT: int = len(SHIRT_HUES) * len(SHIRT_PATTERNS)
CONTENT_NAMES: list[str] = [
    f"{pat} {name} shirt"
    for name in ("red", "yellow", "green", "cyan", "blue", "magenta")
    for pat in SHIRT_PATTERNS
]
CANVAS = 32.0  # geometry is specified on this canvas and scaled to the output size


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB; inputs (B,) in [0, 1], output (B, 3)."""
    k = (np.array([5.0, 3.0, 1.0])[None, :] + h[:, None] * 6.0) % 6.0
    return v[:, None] - v[:, None] * s[:, None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _soft(d: np.ndarray, width: float) -> np.ndarray:
    """Coverage of a shape from its signed distance d (negative inside), anti-aliased over ``width`` px."""
    return np.clip(0.5 - d / width, 0.0, 1.0)


def _ellipse(xx, yy, cx, cy, rx, ry, width):
    """Soft mask of axis-aligned ellipses; xx, yy (H, W); cx.. (B,) -> (B, H, W)."""
    dx = (xx[None] - cx[:, None, None]) / rx[:, None, None]
    dy = (yy[None] - cy[:, None, None]) / ry[:, None, None]
    r = np.sqrt(dx * dx + dy * dy)
    return _soft((r - 1.0) * np.minimum(rx, ry)[:, None, None], width)


def _box(xx, yy, x0, y0, x1, y1, width):
    """Soft mask of axis-aligned rectangles (B, H, W)."""
    d = np.maximum.reduce(
        [x0[:, None, None] - xx[None], xx[None] - x1[:, None, None], y0[:, None, None] - yy[None], yy[None] - y1[:, None, None]]
    )
    return _soft(d, width)


def _paint(img: np.ndarray, mask: np.ndarray, color: np.ndarray) -> None:
    """In place: img (B, H, W, 3) <- blend of img and ``color`` (B, 3) or (B, H, W, 3) by mask (B, H, W)."""
    c = color[:, None, None, :] if color.ndim == 2 else color
    img += mask[..., None] * (c - img)


def _check(name: str, a: np.ndarray, n_classes: int, batch: int) -> np.ndarray:
    a = np.asarray(a)
    if a.shape != (batch,) or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be an integer array of shape ({batch},), got {a.dtype} {a.shape}")
    if batch and (a.min() < 0 or a.max() >= n_classes):
        raise ValueError(f"{name} values must lie in [0, {n_classes - 1}], got [{a.min()}, {a.max()}]")
    return a.astype(np.int64)


def _nuisance(rng: np.random.Generator, b: int) -> dict[str, np.ndarray]:
    """All random scene parameters, drawn in a fixed order so they never depend on the attributes."""
    u = lambda lo, hi: rng.uniform(lo, hi, size=b)  # noqa: E731
    return {
        "rx": u(5.0, 9.0),  # face half-width: 10-18 px wide on the 32 px canvas
        "aspect": u(1.18, 1.32),
        "cx": u(-2.5, 2.5),  # offset of the face centre from the canvas centre
        "cy": u(-2.0, 1.5),
        "bg_h0": u(0.0, 1.0),
        "bg_h1": u(0.0, 1.0),
        "bg_s": u(0.1, 0.4),
        "bg_v0": u(0.35, 0.7),
        "bg_v1": u(0.35, 0.7),
        "bg_dir": u(0.0, 2 * np.pi),
        "light": u(0.88, 1.12),
        "light_dir": u(-0.08, 0.08),
        "shirt_v": u(0.7, 0.95),
        "shirt_w": u(2.3, 2.9),
        "hair_len": u(0.6, 1.0),
    }


def render(
    gender: np.ndarray,
    race: np.ndarray,
    age: np.ndarray,
    content: np.ndarray,
    seed: int,
    size: int = 32,
    face: np.ndarray | None = None,
    noise_std: float = 0.02,
) -> dict[str, torch.Tensor]:
    """Render a batch of B portraits.

    gender, race, age, content: (B,) integer class indices (ATTRIBUTES order; content in [0, N_CONTENT)).
    seed: all nuisance (position, scale, background, lighting, noise) comes from ``default_rng(seed)``; the
    same seed and batch size give the same scene whatever the attributes, so changing one attribute changes
    only the pixels that attribute owns.
    face: (B,) bool, default all True; False rows show background and shirt only.
    Returns {"images": (B, 3, size, size) float32 in [-1, 1], "boxes": (B, 4) float32 xyxy pixels of the face
    ellipse (NaN where no face), "landmarks": (B, 5, 2) float32 pixels (left eye, right eye, nose, left and
    right mouth corner; NaN where no face), "face": (B,) bool}.
    """
    b = int(np.asarray(gender).shape[0]) if np.asarray(gender).ndim == 1 else -1
    gender = _check("gender", gender, 2, b)
    race = _check("race", race, 4, b)
    age = _check("age", age, 2, b)
    content = _check("content", content, N_CONTENT, b)
    face = np.ones(b, dtype=bool) if face is None else np.asarray(face, dtype=bool)
    if face.shape != (b,):
        raise ValueError(f"face must have shape ({b},), got {face.shape}")
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    rng = np.random.default_rng(int(seed))
    p = _nuisance(rng, b)
    s = size / CANVAS  # canvas px -> output px
    aa = 1.0  # anti-aliasing width in output pixels
    coords = (np.arange(size, dtype=np.float64) + 0.5) / s  # pixel centres in canvas units
    xx, yy = np.meshgrid(coords, coords)  # canvas units below; masks use width aa / s

    w = aa / s
    rx, ry = p["rx"], p["rx"] * p["aspect"]
    cx, cy = CANVAS / 2 + p["cx"], 13.5 + p["cy"]

    # 1. Background: a linear gradient between two muted colours along a random direction.
    c0 = _hsv_to_rgb(p["bg_h0"], p["bg_s"], p["bg_v0"])
    c1 = _hsv_to_rgb(p["bg_h1"], p["bg_s"], p["bg_v1"])
    t = ((xx[None] - 16) * np.cos(p["bg_dir"])[:, None, None] + (yy[None] - 16) * np.sin(p["bg_dir"])[:, None, None]) / 32 + 0.5
    t = np.clip(t, 0.0, 1.0)[..., None]
    img = c0[:, None, None, :] * (1 - t) + c1[:, None, None, :] * t

    # 2. Long hair (female) behind the head, down past the shoulders' top.
    long_hair = (gender == 0) & face
    hair_col = HAIR[age]
    hair_bottom = cy + ry + 1.0 + 5.0 * p["hair_len"]
    back = _box(xx, yy, cx - rx - 2.2, cy - 0.2 * ry, cx + rx + 2.2, hair_bottom, w)
    back = np.maximum(back, _ellipse(xx, yy, cx, cy - 0.1 * ry, rx + 2.2, ry + 1.6, w))
    _paint(img, back * long_hair[:, None, None], hair_col)

    # 3. Shirt (content): shoulders as a wide ellipse under the head, plain or with horizontal stripes.
    hue, pattern = SHIRT_HUES[content // 2], content % 2
    shirt = _hsv_to_rgb(hue, np.full(b, 0.85), p["shirt_v"])
    sh_top = cy + ry + 1.2
    sh_mask = _ellipse(xx, yy, cx, sh_top + 9.0, rx * p["shirt_w"], np.full(b, 9.0), w)
    stripes = (np.floor((yy[None] - sh_top[:, None, None]) / 2.0) % 2 == 1) & (pattern[:, None, None] == 1)
    shirt_px = np.where(stripes[..., None], 0.92, shirt[:, None, None, :])
    _paint(img, sh_mask, shirt_px)

    # 4. Neck, head, face details (only where there is a face).
    f = face[:, None, None].astype(np.float64)
    skin = SKIN[race]
    _paint(img, f * _box(xx, yy, cx - 0.45 * rx, cy, cx + 0.45 * rx, sh_top + 0.8, w), skin * 0.85)
    _paint(img, f * _ellipse(xx, yy, cx, cy, rx, ry, w), skin)
    # Hair cap on top of the head; long hair adds side locks in front of the ears.
    cap = _ellipse(xx, yy, cx, cy - 0.35 * ry, rx * 1.08, ry * 0.75, w) * (yy[None] < (cy - 0.35 * ry)[:, None, None])
    _paint(img, f * cap, hair_col)
    locks = _box(xx, yy, cx - rx - 1.0, cy - 0.5 * ry, cx - 0.72 * rx, cy + 0.9 * ry, w)
    locks = np.maximum(locks, _box(xx, yy, cx + 0.72 * rx, cy - 0.5 * ry, cx + rx + 1.0, cy + 0.9 * ry, w))
    _paint(img, long_hair[:, None, None] * locks, hair_col)
    lm = np.stack(
        [
            np.stack([cx - 0.42 * rx, cy - 0.12 * ry], -1),
            np.stack([cx + 0.42 * rx, cy - 0.12 * ry], -1),
            np.stack([cx, cy + 0.22 * ry], -1),
            np.stack([cx - 0.32 * rx, cy + 0.52 * ry], -1),
            np.stack([cx + 0.32 * rx, cy + 0.52 * ry], -1),
        ],
        axis=1,
    )  # (B, 5, 2) canvas units
    er = np.maximum(0.09 * rx, 0.6)
    for k in (0, 1):
        _paint(img, f * _ellipse(xx, yy, lm[:, k, 0], lm[:, k, 1], er, er, w), np.full((b, 3), 0.05))
    _paint(img, f * _ellipse(xx, yy, lm[:, 2, 0], lm[:, 2, 1] - 0.05 * ry, 0.08 * rx, 0.14 * ry, w), skin * 0.8)
    mouth = _box(xx, yy, lm[:, 3, 0], lm[:, 3, 1] - 0.45, lm[:, 4, 0], lm[:, 4, 1] + 0.45, w)
    _paint(img, f * mouth, np.tile([[0.6, 0.12, 0.12]], (b, 1)))

    # 5. Lighting (global level and a left-right ramp), pixel noise, clip, to [-1, 1].
    ramp = 1.0 + p["light_dir"][:, None, None] * (xx[None] - 16) / 16
    img = img * (p["light"][:, None, None] * ramp)[..., None]
    img = img + noise_std * rng.standard_normal(img.shape)
    img = np.clip(img, 0.0, 1.0) * 2.0 - 1.0

    boxes = np.stack([cx - rx, cy - ry, cx + rx, cy + ry], -1) * s
    lm = lm * s
    boxes[~face] = np.nan
    lm[~face] = np.nan
    return {
        "images": torch.from_numpy(np.ascontiguousarray(img.transpose(0, 3, 1, 2), dtype=np.float32)),
        "boxes": torch.from_numpy(boxes.astype(np.float32)),
        "landmarks": torch.from_numpy(lm.astype(np.float32)),
        "face": torch.from_numpy(face.copy()),
    }


def sample_batch(n: int, seed: int, face_prob: float = 1.0) -> dict[str, np.ndarray]:
    """Uniformly random attributes and content for ``n`` renders (training the world's nets)."""
    rng = np.random.default_rng(int(seed))
    return {
        "gender": rng.integers(0, 2, n),
        "race": rng.integers(0, 4, n),
        "age": rng.integers(0, 2, n),
        "content": rng.integers(0, N_CONTENT, n),
        "face": rng.uniform(size=n) < face_prob,
    }
