"""Bias metrics (METHOD.md section 6).

Notation: labels are class indices per image, -1 for images without a face (left out everywhere);
freq_k = share of class k among the labelled images; for K classes
    bias = (1 / C(K, 2)) * sum_{k < l} |freq_k - freq_l|,
0 for a perfectly balanced prompt, 1 for a binary attribute with one class only.
Joint labels of several attributes are flattened row-major (the order of ``TargetDistribution``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fairdiff_ray.core.targets import TargetDistribution


def _valid_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    labels = torch.as_tensor(labels).reshape(-1).long()
    labels = labels[labels != -1]
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be -1 or in [0, {num_classes}), got values {labels.unique().tolist()}")
    return labels


def frequencies(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K,) float64 class shares among the labels != -1; all NaN when there is none.

    labels: (M,) long.
    """
    labels = _valid_labels(labels, num_classes)
    if labels.numel() == 0:
        return torch.full((num_classes,), math.nan, dtype=torch.float64)
    return torch.bincount(labels.cpu(), minlength=num_classes).double() / labels.numel()


def bias(labels: torch.Tensor, num_classes: int) -> float:
    """bias(P) = mean over class pairs k < l of |freq_k - freq_l|; NaN when no label is valid.

    labels: (M,) long, -1 ignored. Gender 60/40 -> 0.2; four classes .4/.3/.2/.1 -> 0.1667.
    """
    freq = frequencies(labels, num_classes)
    pair_diffs = (freq[:, None] - freq[None, :]).abs().triu(diagonal=1)
    return float(pair_diffs.sum() / math.comb(num_classes, 2))


def joint_labels(labels: dict[str, torch.Tensor], num_classes: dict[str, int]) -> torch.Tensor:
    """(M,) row-major joint label over the attributes of ``labels`` (in its order); -1 if any label is -1.

    labels: attribute -> (M,) long; num_classes: attribute -> K_a (must cover every attribute of labels).
    """
    if not labels:
        raise ValueError("joint_labels needs at least one attribute")
    missing = [a for a in labels if a not in num_classes]
    if missing:
        raise ValueError(f"num_classes has no entry for {missing}")
    names = list(labels)
    size = labels[names[0]].numel()
    joint = torch.zeros(size, dtype=torch.long)
    unknown = torch.zeros(size, dtype=torch.bool)
    for a in names:
        lab = torch.as_tensor(labels[a]).reshape(-1).long().cpu()
        if lab.numel() != size:
            raise ValueError(f"labels[{a!r}] has {lab.numel()} entries, {names[0]!r} has {size}")
        _valid_labels(lab, num_classes[a])  # range check
        unknown |= lab == -1
        joint = joint * num_classes[a] + lab.clamp(min=0)
    return torch.where(unknown, torch.full_like(joint, -1), joint)


def joint_bias(labels: dict[str, torch.Tensor], num_classes: dict[str, int]) -> float:
    """bias of the joint label (e.g. gender x race: 8 classes); images with any -1 are left out."""
    return bias(joint_labels(labels, num_classes), math.prod(num_classes[a] for a in labels))


def bias_over_prompts(per_prompt: Sequence[float]) -> tuple[float, float]:
    """(mean, std) of per-prompt biases, NaN prompts (no face at all) left out; (nan, nan) if none remain.

    std is the population std (ddof=0) as "mean +- std over the test prompts" reports the spread of the set.
    """
    values = torch.tensor([float(v) for v in per_prompt], dtype=torch.float64)
    values = values[~torch.isnan(values)]
    if values.numel() == 0:
        return math.nan, math.nan
    return float(values.mean()), float(values.std(unbiased=False))


def freq_vs_target(
    labels: torch.Tensor, target_probs: torch.Tensor | Sequence[float]
) -> dict[str, list[float]]:
    """Per class: observed frequency, target probability and their difference (freq - target).

    labels: (M,) long, -1 ignored; target_probs: (K,) e.g. ``TargetDistribution.marginal("age")``.
    Returns {"freq": [K], "target": [K], "diff": [K]} (NaN freq/diff when no label is valid).
    """
    target = torch.as_tensor(target_probs, dtype=torch.float64).reshape(-1)
    freq = frequencies(labels, target.numel())
    return {"freq": freq.tolist(), "target": target.tolist(), "diff": (freq - target).tolist()}


def target_distance(labels: dict[str, torch.Tensor], target: TargetDistribution) -> float:
    """Total-variation distance between the observed joint class shares and the target's joint table.

    labels: attribute -> (M,) long (-1 ignored) for every attribute of ``target`` (extra ones are ignored).
    0 means the images follow the target exactly; 1 is the largest possible. NaN when no image has all labels.
    Over several attributes it compares the joint table, so a gender-only-fair but race-skewed set is not 0.
    """
    names = target.names
    missing = [a for a in names if a not in labels]
    if missing:
        raise ValueError(f"target_distance: no labels for target attribute(s) {missing}")
    joint = joint_labels({a: labels[a] for a in names}, target.num_classes)
    freq = frequencies(joint, target.num_joint)
    return float(0.5 * (freq - target.joint_probs.double().reshape(-1)).abs().sum())


def validation_objective(distance: float, drift: float, drift_weight: float = 1.0) -> float:
    """The sweep's objective (lower is better): distance to the target plus ``drift_weight`` x semantic drift.

    distance: target_distance on held-out prompts, in [0, 1]; drift: mean cosine distance between debiased
    and original images' features from the same noise, in [0, 2]. A model that ignores the target scores
    high through ``distance``; one that reaches it by destroying the image scores high through ``drift``.
    """
    if not drift_weight >= 0:
        raise ValueError(f"drift_weight must be >= 0, got {drift_weight}")
    return float(distance + drift_weight * drift)
