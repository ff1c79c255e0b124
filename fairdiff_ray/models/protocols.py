"""The small seams every model sits behind (STYLE.md: protocols with more than one implementation).

Conventions, shared by every implementation (real and synthetic-world):
- images are float tensors (B, 3, H, W) in [-1, 1];
- boxes are (x0, y0, x1, y1) in pixels of the image they were detected in;
- landmarks are five (x, y) points in pixels: left eye, right eye, nose, left mouth corner, right mouth corner
  (the ArcFace / InsightFace order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class Faces:
    """The largest face of every image of a batch.

    boxes: (B, 4) float, scores: (B,) float, landmarks: (B, 5, 2) float, found: (B,) bool.
    Rows where ``found`` is False hold zeros and must be ignored.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    landmarks: torch.Tensor
    found: torch.Tensor

    @staticmethod
    def empty(batch: int) -> Faces:
        return Faces(
            boxes=torch.zeros(batch, 4),
            scores=torch.zeros(batch),
            landmarks=torch.zeros(batch, 5, 2),
            found=torch.zeros(batch, dtype=torch.bool),
        )


@runtime_checkable
class FaceDetector(Protocol):
    """Finds the largest face per image. Runs without gradients (the box is detached by design)."""

    def detect(self, images: torch.Tensor) -> Faces:
        """images: (B, 3, H, W) in [-1, 1] -> Faces of the largest face per image."""
        ...


@runtime_checkable
class AttributeClassifier(Protocol):
    """Differentiable attribute classifier on face crops.

    ``attributes`` maps attribute name -> ordered class names, e.g. {"gender": ["female", "male"]}.
    ``input_size`` is the side of the square crop it expects. ``crop_expand`` is how much the detected box
    is expanded before cropping (METHOD.md section 7: 0.5).
    """

    attributes: dict[str, list[str]]
    input_size: int
    crop_expand: float

    def __call__(self, faces: torch.Tensor) -> dict[str, torch.Tensor]:
        """faces: (B, 3, S, S) in [-1, 1] -> logits per attribute, each (B, K_a). Carries gradients."""
        ...


@runtime_checkable
class ImageFeatures(Protocol):
    """Differentiable image embedding (CLIP / DINOv2 / a synthetic-world stand-in)."""

    name: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) in [-1, 1] -> (B, D) L2-normalised embeddings. Carries gradients."""
        ...


@runtime_checkable
class FaceEmbedder(Protocol):
    """Differentiable face-recognition embedding on 112x112 aligned faces (ArcFace-style)."""

    def __call__(self, aligned: torch.Tensor) -> torch.Tensor:
        """aligned: (B, 3, 112, 112) in [-1, 1] -> (B, D) L2-normalised embeddings."""
        ...
