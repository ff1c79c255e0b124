"""Pure pieces of the training losses (METHOD.md sections 2 and 3); the feature nets live in models/loss.py.

Notation:
- n local images (this worker), N the images of the whole step across workers (the OT batch);
- y_i^a the confident OT target of attribute a (-1: none), h_a(face(x_i)) the classifier logits;
- L_align = (1/N) sum_a sum_i 1[y_i^a != -1] CE(h_a(face(x_i)), y_i^a)           (METHOD.md section 2.4);
- w_i = 1 if y_i^a equals the original image's prediction for every aligned a, else min over the
  mismatched attributes of their factor (gender 0.2, race 0.6, age 0.6)           (METHOD.md section 3);
- inside the face region (intersection of the expanded face boxes of x_i and o_i) the L_img gradient is
  scaled further (gender 0.2, race 0.3, age 0.3).
Boxes are (x0, y0, x1, y1) pixel edges, as in ``fairdiff_ray.models.protocols``: an integer box covers
``image[y0:y1, x0:x1]``; a row of NaNs means "no box".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def alignment_loss(
    logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], normalizer: int | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """L_align: CE summed over attributes and over images with a target, divided by ``normalizer``.

    logits: attribute -> (n, K_a); targets: attribute -> (n,) long, -1 = no target (every attribute of
    targets must be in logits). normalizer: the global N of the step, so that summing the workers'
    losses gives exactly the paper's (1/N) sum; None = n (single process).
    Returns (scalar loss, metrics {"ce_<a>": mean CE over this worker's confident images (0 if none),
    "confident_<a>": fraction of this worker's images with a target}). The loss stays connected to every
    logit even without confident images, so data-parallel backward sees the same graph on every worker.
    """
    missing = [a for a in targets if a not in logits]
    if missing:
        raise ValueError(f"alignment_loss: no logits for target attribute(s) {missing}")
    if not targets:
        raise ValueError("alignment_loss needs at least one attribute")
    n = next(iter(targets.values())).shape[0]
    denom = n if normalizer is None else normalizer
    if denom <= 0:
        raise ValueError(f"alignment_loss normalizer must be positive, got {denom}")
    total = None
    metrics: dict[str, float] = {}
    for a, y in targets.items():
        z = logits[a]
        if z.dim() != 2 or y.shape != (z.shape[0],) or z.shape[0] != n:
            raise ValueError(
                f"alignment_loss: logits[{a!r}] {tuple(z.shape)} and targets {tuple(y.shape)} need (n, K), (n,)"
            )
        y = y.to(z.device)
        has = y != -1
        if has.any() and (y[has].min() < 0 or y[has].max() >= z.shape[1]):
            raise ValueError(f"alignment_loss: targets[{a!r}] out of range [0, {z.shape[1]}) or -1")
        # CE in float32 even under fp16/bf16 autocast; -1 replaced by class 0 and masked out
        ce = F.cross_entropy(z.float(), y.clamp(min=0).long(), reduction="none") * has.to(torch.float32)
        part = ce.sum() / denom
        total = part if total is None else total + part
        count = int(has.sum())
        metrics[f"ce_{a}"] = float(ce.detach().sum()) / count if count else 0.0
        metrics[f"confident_{a}"] = count / n if n else 0.0
    return total, metrics


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,) 1 - cos(a_i, b_i) for embeddings a, b: (B, D) (need not be normalised)."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(
            f"cosine_distance needs two (B, D) tensors of equal shape, got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    return 1.0 - F.cosine_similarity(a, b, dim=1, eps=1e-8)


def detail_energy(images: torch.Tensor) -> torch.Tensor:
    """(B,) mean squared response of the luminance to a 3x3 Laplacian: the images' fine detail (blur lowers it).

    images: (B, C, H, W), C = 3 (RGB, luminance by the Rec. 601 weights) or 1; 'valid' borders (H, W >= 3).
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3) or min(images.shape[-2:]) < 3:
        raise ValueError(f"detail_energy needs (B, 1 or 3, H >= 3, W >= 3) images, got {tuple(images.shape)}")
    x = images.float()
    if x.shape[1] == 3:
        x = (x * x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    lap = x.new_tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    return F.conv2d(x, lap).square().mean(dim=(1, 2, 3))


def detail_loss(images: torch.Tensor, ref_energy: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(B,) |log E(x_i) - log E(o_i)| with E = detail_energy: 0 when x_i keeps its original's amount of fine
    detail, growing as it blurs (or turns noisy). ref_energy: (B,) detail_energy of the originals (no grad)."""
    e = detail_energy(images)
    if ref_energy.shape != e.shape:
        raise ValueError(f"detail_loss: ref_energy {tuple(ref_energy.shape)} does not match {tuple(e.shape)}")
    return (torch.log(e + eps) - torch.log(ref_energy.to(e).detach() + eps)).abs()


def mismatch_weights(
    targets: dict[str, torch.Tensor], ref_labels: dict[str, torch.Tensor], factors: dict[str, float],
    unconfident_as_match: bool = False,
) -> torch.Tensor:
    """(B,) per-image weight w_i of L_img.

    targets: attribute -> (B,) long OT targets (-1: no target: no face, or the expected-OT confidence below C);
    ref_labels: attribute -> (B,) long predicted classes of the original images (-1: no face there);
    factors: attribute -> weight for a mismatch (config loss.mismatch_weight).
    w_i = 1 if the target equals the original's class for every attribute, else the min of factors[a] over the
    attributes where it does not (METHOD.md): a target where the original has no face is a mismatch, and so is
    no target (-1) where the original has a face - the image sits at the class boundary and is not held to its
    original (the reference code gives every -1 target the factor). ``unconfident_as_match``: -1 targets count
    as a match (w = 1; this code's rule before 2026-12-07).
    With ``loss.face_region_scale`` as factors the same rule gives the per-image ``scale`` for
    ``scale_grad_in_boxes`` (the face region is damped only where the attributes are asked to change).
    """
    if not targets:
        raise ValueError("mismatch_weights needs at least one attribute")
    weight = None
    for a, y in targets.items():
        if a not in ref_labels or a not in factors:
            raise ValueError(
                f"mismatch_weights: attribute {a!r} needs ref_labels and a factor (loss.mismatch_weight.{a})"
            )
        if factors[a] < 0:
            raise ValueError(f"loss.mismatch_weight.{a} must be >= 0, got {factors[a]}")
        mismatch = y != ref_labels[a].to(y.device)
        if unconfident_as_match:
            mismatch &= y != -1
        w = torch.where(
            mismatch,
            torch.full(y.shape, float(factors[a]), device=y.device),
            torch.ones(y.shape, device=y.device),
        )
        weight = w if weight is None else torch.minimum(weight, w)
    return weight


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by a fixed mask."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(mask)
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return grad * mask, None


def _boxes_tensor(boxes: torch.Tensor | Sequence[torch.Tensor | None], batch: int) -> torch.Tensor:
    """(B, 4) float boxes with NaN rows for "no box"."""
    if isinstance(boxes, torch.Tensor):
        out = boxes.detach().to(torch.float64)
    else:
        rows = [
            torch.full((4,), float("nan")) if b is None else torch.as_tensor(b).reshape(4).double()
            for b in boxes
        ]
        out = torch.stack(rows) if rows else torch.zeros(0, 4, dtype=torch.float64)
    if out.shape != (batch, 4):
        raise ValueError(
            f"boxes must be (B, 4) = ({batch}, 4) or B rows of (4,) / None, got {tuple(out.shape)}"
        )
    return out.cpu()


def box_mask(boxes: torch.Tensor | Sequence[torch.Tensor | None], height: int, width: int) -> torch.Tensor:
    """(B, 1, H, W) bool: pixels touched by each box (partly covered pixels count; NaN / empty: none)."""
    b = _boxes_tensor(boxes, len(boxes))
    ok = ~torch.isnan(b).any(dim=1)
    b = torch.nan_to_num(b)
    x0, y0 = b[:, 0].floor().clamp(0, width), b[:, 1].floor().clamp(0, height)
    x1, y1 = b[:, 2].ceil().clamp(0, width), b[:, 3].ceil().clamp(0, height)
    xs = torch.arange(width, dtype=torch.float64)
    ys = torch.arange(height, dtype=torch.float64)
    in_x = (xs[None] >= x0[:, None]) & (xs[None] < x1[:, None])  # (B, W)
    in_y = (ys[None] >= y0[:, None]) & (ys[None] < y1[:, None])  # (B, H)
    return (in_y[:, :, None] & in_x[:, None, :] & ok[:, None, None]).unsqueeze(1)


def scale_grad_in_boxes(
    images: torch.Tensor, boxes: torch.Tensor | Sequence[torch.Tensor | None], scale: torch.Tensor
) -> torch.Tensor:
    """Identity on images (B, 3, H, W); backward multiplies the gradient inside box i by scale[i].

    boxes: (B, 4) (NaN rows: no box) or a length-B sequence of (4,) tensors / None; scale: (B,).
    Used on the images fed to the L_img feature nets, so the face region contributes less to L_img.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    batch, _, height, width = images.shape
    scale = torch.as_tensor(scale, dtype=images.dtype).reshape(-1).to(images.device)
    if scale.shape != (batch,):
        raise ValueError(f"scale must be (B,) = ({batch},), got {tuple(scale.shape)}")
    inside = box_mask(_boxes_tensor(boxes, batch), height, width).to(images.device)
    mask = torch.where(
        inside, scale[:, None, None, None], torch.ones((), dtype=images.dtype, device=images.device)
    )
    return _ScaleGrad.apply(images, mask)


def box_intersection(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, 4) intersection of boxes a, b: (B, 4); disjoint boxes give an empty (zero-area) box, NaN rows stay NaN."""
    if a.shape != b.shape or a.dim() != 2 or a.shape[1] != 4:
        raise ValueError(f"box_intersection needs two (B, 4) tensors, got {tuple(a.shape)}, {tuple(b.shape)}")
    lo = torch.maximum(a[:, :2], b[:, :2])  # NaN-propagating
    hi = torch.minimum(a[:, 2:], b[:, 2:])
    return torch.cat([lo, torch.maximum(hi, lo)], dim=1)


def expand_boxes(boxes: torch.Tensor, expand: float, height: int, width: int, square: bool = True) -> torch.Tensor:
    """(B, 4) squares about the boxes' centres with side max(w, h) * (1 + expand), clipped to the image: the
    region ``core.crop.crop_square`` gives the classifier (0.5 = half the box size added in total; METHOD.md and
    the reference code expand the face box to a square); ``square=False``: each side grown by (1 + expand)."""
    if expand < 0:
        raise ValueError(f"expand must be >= 0, got {expand}")
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (B, 4), got {tuple(boxes.shape)}")
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    size = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0)
    if square:
        size = size.amax(dim=1, keepdim=True).expand(-1, 2)
    half = size * (1 + expand) / 2
    limit = torch.tensor([width, height], dtype=boxes.dtype, device=boxes.device)
    lo = torch.minimum((centre - half).clamp(min=0), limit)
    hi = torch.minimum((centre + half).clamp(min=0), limit)
    return torch.cat([lo, hi], dim=1)
