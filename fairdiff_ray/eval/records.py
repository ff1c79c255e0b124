"""The per-image record layout shared by the pipeline, the aggregation and the report.

One row per generated image (model, prompt, j):
- ``prompt``, ``concept``, ``model`` (str), ``j`` (int), ``seed`` (int64: stable_seed(prompt, j));
- ``face_found`` (bool), ``face_box`` (4 floats, pixels), ``face_score`` (float);
- per attribute a: ``prob_<a>`` (K_a floats, eval-classifier softmax) and ``label_<a>`` (int, -1: no face);
- ``emb_<net>`` (D floats) per image-feature net, in the parts only; the merged table replaces them with
  ``sem_<metric>`` similarities to the base model's image from the same noise;
- ``sem_fidelity`` (synthetic world: probability that the prompt's own content is present), ``sem_clip_t``
  (real CLIP: image-prompt cosine);
- ``thumb`` (PNG bytes) for the first ``eval.grid_images`` images of every prompt, else null.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

KEY_COLUMNS = ("model", "concept", "prompt", "j")


def prob_col(attribute: str) -> str:
    return f"prob_{attribute}"


def label_col(attribute: str) -> str:
    return f"label_{attribute}"


def emb_col(net: str) -> str:
    return f"emb_{net}"


def sem_col(metric: str) -> str:
    return f"sem_{metric}"


def joint_name(attributes: list[str]) -> str:
    """``["gender", "race"]`` -> ``"gender_x_race"`` (the summary key of a joint attribute)."""
    return "_x_".join(attributes)


def similarity_metric(net: str) -> str:
    """The paper's name for the similarity measured with a feature net: clip -> clip_i, dino -> dino."""
    return {"clip": "clip_i", "dino": "dino"}.get(net, f"{net}_sim")


def to_uint8(images: np.ndarray) -> np.ndarray:
    """images: (B, 3, H, W) float in [-1, 1] -> (B, H, W, 3) uint8 (what a saved PNG would hold)."""
    x = np.clip((np.asarray(images, dtype=np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def from_uint8(images: np.ndarray) -> np.ndarray:
    """images: (B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1]."""
    return (np.asarray(images, dtype=np.float32).transpose(0, 3, 1, 2) / 127.5) - 1.0


def png_bytes(image: np.ndarray, max_side: int = 128) -> bytes:
    """image: (H, W, 3) uint8 -> PNG bytes, shrunk (never enlarged) so its longer side is <= max_side."""
    im = Image.fromarray(image)
    if max(im.size) > max_side:
        scale = max_side / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def png_to_array(data: bytes) -> np.ndarray:
    """PNG bytes -> (H, W, 3) uint8."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
