"""Differentiable face crops: square box crops and five-point similarity alignment (METHOD.md section 7).

Both are a single ``grid_sample`` of the image, so gradients flow to every pixel that contributes to the
output; the boxes and landmarks are detached inputs (detection runs without gradients by design).

Coordinate conventions (shared with ``fairdiff_ray.models.protocols``):
- boxes (x0, y0, x1, y1) are edges in pixels: an integer box covers the pixels ``image[y0:y1, x0:x1]``;
- landmarks are pixel *centres*: pixel k of a row sits at x = k (the OpenCV / InsightFace / dlib convention).
Outside the image the crop is padded with -1 (black in [-1, 1]).

When the source region is larger than the output (a 300 px face into 112 px) plain bilinear sampling
aliases; we supersample by an integer factor k and average-pool k x k, a box filter over each output
pixel's footprint that stays exact (k = 1) when the scales match.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# The standard ArcFace 112x112 five-point template (left eye, right eye, nose tip, left and right mouth
# corners; "left" = smaller x in the image), in pixel-centre coordinates. These are the widely published
# values of InsightFace's `arcface_dst` (python-package/insightface/utils/face_align.py), which is the
# SphereFace 96x112 template shifted right by 8 px to centre it in a 112x112 square.
ARCFACE_TEMPLATE = (
    (38.2946, 51.6963),
    (73.5318, 51.5014),
    (56.0252, 71.7366),
    (41.5493, 92.3655),
    (70.7299, 92.2041),
)
ARCFACE_SIZE = 112
MAX_SUPERSAMPLE = 4


def arcface_template(size: int = ARCFACE_SIZE, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The five template points scaled to a ``size`` x ``size`` output: (5, 2) pixel centres."""
    scale = size / ARCFACE_SIZE
    # Scale about the pixel-centre origin -0.5 so the template covers the same fraction of the square.
    return (torch.tensor(ARCFACE_TEMPLATE, dtype=torch.float64) + 0.5).mul(scale).sub(0.5).to(dtype)


def largest_face_index(boxes: torch.Tensor) -> int:
    """boxes: (N, 4) xyxy, N >= 1 -> index of the largest box by area."""
    if boxes.ndim != 2 or boxes.shape[-1] != 4 or boxes.shape[0] == 0:
        raise ValueError(f"boxes must be (N >= 1, 4), got {tuple(boxes.shape)}")
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    return int(area.argmax())


def _supersample_factor(source_px_per_output_px: torch.Tensor) -> int:
    ratio = float(source_px_per_output_px.detach().max()) if source_px_per_output_px.numel() else 1.0
    if not math.isfinite(ratio):
        return 1
    return int(min(max(math.ceil(ratio - 1e-6), 1), MAX_SUPERSAMPLE))


def _warp(images: torch.Tensor, theta: torch.Tensor, size: int, k: int) -> torch.Tensor:
    """Sample ``images`` on the affine grid ``theta`` (B, 2, 3) (normalised coords), pad with -1, box-filter."""
    b, c = images.shape[:2]
    grid = F.affine_grid(theta.to(images.dtype), [b, c, size * k, size * k], align_corners=False)
    # grid_sample pads with 0; shifting by +1 makes that padding -1 after shifting back.
    out = F.grid_sample(images + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0
    return F.avg_pool2d(out, k) if k > 1 else out


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")


def crop_square(
    images: torch.Tensor, boxes: torch.Tensor, expand: float = 0.5, size: int = 224
) -> torch.Tensor:
    """Square crops around the box centres, differentiable in the pixels.

    images: (B, 3, H, W) in [-1, 1]; boxes: (B, 4) xyxy pixel edges (detached).
    The side is max(w, h) * (1 + expand); outside the image the crop is -1.
    Returns (B, 3, size, size) in [-1, 1].
    """
    _check_images(images)
    if boxes.shape != (images.shape[0], 4):
        raise ValueError(f"boxes must be ({images.shape[0]}, 4), got {tuple(boxes.shape)}")
    if expand < 0 or size <= 0:
        raise ValueError(f"need expand >= 0 and size > 0, got expand={expand}, size={size}")
    h, w = images.shape[-2:]
    boxes = boxes.detach().to(torch.float64)
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    side = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]).clamp(min=0) * (1 + expand)
    # Output normalised v in [-1, 1] -> continuous source x = cx + v * side / 2 -> normalised u = 2x / W - 1.
    zero = torch.zeros_like(cx)
    theta = torch.stack(
        [
            torch.stack([side / w, zero, 2 * cx / w - 1], dim=-1),
            torch.stack([zero, side / h, 2 * cy / h - 1], dim=-1),
        ],
        dim=1,
    )
    return _warp(images, theta, size, _supersample_factor(side / size))


def similarity_fit(src: torch.Tensor, dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) mapping src to dst.

    src: (B, N, 2), dst: (N, 2) or (B, N, 2). Returns (w, t), each (B, 2) as complex numbers (re, im):
    dst ~= w * src + t. This is Umeyama's (1991) closed form specialised to 2-D, where a rotation-scale is
    multiplication by one complex number and the optimum is w = sum(conj(a) b) / sum(|a|^2) on centred
    points a (src) and b (dst).
    """
    dst = dst.expand_as(src)
    mu_s, mu_d = src.mean(dim=1, keepdim=True), dst.mean(dim=1, keepdim=True)
    a, b = src - mu_s, dst - mu_d
    denom = (a**2).sum(dim=(1, 2)).clamp(min=1e-12)
    w_re = (a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1]).sum(dim=1) / denom
    w_im = (a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]).sum(dim=1) / denom
    w = torch.stack([w_re, w_im], dim=-1)
    ms, md = mu_s[:, 0], mu_d[:, 0]
    t = md - torch.stack([w_re * ms[:, 0] - w_im * ms[:, 1], w_re * ms[:, 1] + w_im * ms[:, 0]], dim=-1)
    return w, t


def align_faces(images: torch.Tensor, landmarks: torch.Tensor, size: int = ARCFACE_SIZE) -> torch.Tensor:
    """Warp each face so its five landmarks land on the ArcFace template, differentiable in the pixels.

    images: (B, 3, H, W) in [-1, 1]; landmarks: (B, 5, 2) pixel centres in ArcFace order (detached).
    Returns (B, 3, size, size) in [-1, 1], padded with -1 outside the image.

    Steps: (1) fit the similarity source -> template by least squares (the direction InsightFace's
    ``norm_crop`` fits); (2) invert it analytically; (3) compose with the pixel <-> normalised-coordinate
    maps of grid_sample (align_corners=False) into one affine ``theta`` per image.
    """
    _check_images(images)
    if landmarks.shape != (images.shape[0], 5, 2):
        raise ValueError(f"landmarks must be ({images.shape[0]}, 5, 2), got {tuple(landmarks.shape)}")
    h, w = images.shape[-2:]
    src = landmarks.detach().to(torch.float64)
    wc, t = similarity_fit(src, arcface_template(size, torch.float64).to(src.device))
    # (2) inverse of z -> w z + t is z' -> (z' - t) / w, i.e. multiply by 1/w = conj(w) / |w|^2.
    abs2 = (wc**2).sum(dim=-1).clamp(min=1e-12)
    inv_re, inv_im = wc[:, 0] / abs2, -wc[:, 1] / abs2
    rot = torch.stack([torch.stack([inv_re, -inv_im], -1), torch.stack([inv_im, inv_re], -1)], dim=1)
    shift = -(rot @ t.unsqueeze(-1))  # (B, 2, 1)
    m_inv = torch.cat([rot, shift], dim=-1)  # output pixel centres -> source pixel centres
    # (3) theta = N_src o M_inv o D_out, with D_out: normalised v -> output index q = ((v + 1) S - 1) / 2 and
    # N_src: source index p -> u = (2 p + 1) / W - 1.
    d_out = torch.tensor(
        [[size / 2, 0, (size - 1) / 2], [0, size / 2, (size - 1) / 2], [0, 0, 1]],
        dtype=src.dtype,
        device=src.device,
    )
    n_src = torch.tensor(
        [[2 / w, 0, 1 / w - 1], [0, 2 / h, 1 / h - 1], [0, 0, 1]], dtype=src.dtype, device=src.device
    )
    bottom = torch.tensor([[[0.0, 0.0, 1.0]]], dtype=src.dtype, device=src.device).expand(src.shape[0], 1, 3)
    theta = (n_src @ torch.cat([m_inv, bottom], dim=1) @ d_out)[:, :2]
    return _warp(images, theta, size, _supersample_factor(abs2.rsqrt()))
