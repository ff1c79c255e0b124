"""Bias metrics (core/metrics.py): hand values from METHOD.md section 6 and properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fairdiff_ray.core.metrics import (
    bias,
    bias_over_prompts,
    freq_vs_target,
    frequencies,
    joint_bias,
    joint_labels,
)

FEW = settings(max_examples=40, deadline=None)


def counts_to_labels(counts: list[int]) -> torch.Tensor:
    return torch.cat([torch.full((c,), k, dtype=torch.long) for k, c in enumerate(counts)])


def test_bias_hand_values():
    assert bias(counts_to_labels([6, 4]), 2) == pytest.approx(0.2)
    assert bias(counts_to_labels([40, 30, 20, 10]), 4) == pytest.approx(1 / 6)  # (.1+.2+.3+.1+.2+.1)/6
    assert bias(counts_to_labels([5, 5]), 2) == pytest.approx(0.0)
    assert bias(counts_to_labels([7, 0]), 2) == pytest.approx(1.0)
    assert bias(counts_to_labels([1, 1, 1, 1]), 4) == pytest.approx(0.0)


def test_no_face_labels_are_ignored():
    labels = torch.cat([counts_to_labels([6, 4]), torch.full((5,), -1)])
    assert bias(labels, 2) == pytest.approx(0.2)
    assert frequencies(labels, 2).tolist() == pytest.approx([0.6, 0.4])
    assert math.isnan(bias(torch.full((3,), -1), 2))
    assert math.isnan(bias(torch.zeros(0, dtype=torch.long), 2))


def test_bad_labels_are_rejected():
    with pytest.raises(ValueError):
        bias(torch.tensor([0, 2]), 2)
    with pytest.raises(ValueError):
        bias(torch.tensor([0, -2]), 2)
    with pytest.raises(ValueError):
        bias(torch.tensor([0]), 1)


@FEW
@given(labels=st.lists(st.integers(-1, 3), min_size=1, max_size=60))
def test_bias_properties(labels):
    t = torch.tensor(labels)
    b = bias(t, 4)
    if (t == -1).all():
        assert math.isnan(b)
        return
    assert 0.0 <= b <= 1.0 + 1e-12
    # invariant to permuting the images and to relabelling the classes
    assert bias(t.flip(0), 4) == pytest.approx(b)
    relabel = torch.tensor([2, 0, 3, 1])
    assert bias(torch.where(t >= 0, relabel[t.clamp(min=0)], t), 4) == pytest.approx(b)
    assert frequencies(t, 4).sum().item() == pytest.approx(1.0)


def test_joint_labels_row_major_and_missing():
    g = torch.tensor([0, 1, 1, -1, 0])
    r = torch.tensor([3, 0, 2, 1, -1])
    assert joint_labels({"gender": g, "race": r}, {"gender": 2, "race": 4}).tolist() == [3, 4, 6, -1, -1]
    assert joint_labels({"race": r, "gender": g}, {"gender": 2, "race": 4}).tolist() == [6, 1, 5, -1, -1]
    with pytest.raises(ValueError):
        joint_labels({"gender": g, "race": r[:3]}, {"gender": 2, "race": 4})
    with pytest.raises(ValueError):
        joint_labels({"gender": g}, {"race": 4})


def test_joint_bias_hand_value():
    # all 8 gender x race cells equally filled -> 0; only two cells used -> pairs involving them
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    r = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    assert joint_bias({"gender": g, "race": r}, {"gender": 2, "race": 4}) == pytest.approx(0.0)
    g2, r2 = torch.tensor([0, 1]), torch.tensor([0, 0])
    # freqs .5, .5 and six zeros: pairs (0.5 vs 0) twice six = 12 * 0.5 = 6, over C(8,2)=28
    assert joint_bias({"gender": g2, "race": r2}, {"gender": 2, "race": 4}) == pytest.approx(6 / 28)


def test_bias_over_prompts_ignores_nan():
    mean, std = bias_over_prompts([0.2, float("nan"), 0.4])
    assert mean == pytest.approx(0.3) and std == pytest.approx(0.1)
    assert all(math.isnan(v) for v in bias_over_prompts([float("nan")]))


def test_freq_vs_target():
    out = freq_vs_target(torch.tensor([0, 0, 0, 1, -1]), torch.tensor([0.75, 0.25]))
    assert out["freq"] == pytest.approx([0.75, 0.25])
    assert out["target"] == pytest.approx([0.75, 0.25])
    assert out["diff"] == pytest.approx([0.0, 0.0])
    out = freq_vs_target(torch.tensor([1, 1]), [0.75, 0.25])
    assert out["diff"] == pytest.approx([-0.75, 0.75])


def test_target_distance_joint_and_objective():
    from fairdiff_ray.core.metrics import target_distance, validation_objective
    from fairdiff_ray.core.targets import TargetDistribution

    t = TargetDistribution.from_spec({"gender": {"classes": ["f", "m"], "probs": [0.5, 0.5]},
                                      "age": {"classes": ["y", "o"], "probs": [0.75, 0.25]}})
    # joint target (f,y) .375 (f,o) .125 (m,y) .375 (m,o) .125; observed: all (f, y), one unlabeled
    labels = {"gender": torch.tensor([0, 0, 0, -1]), "age": torch.tensor([0, 0, 0, 1])}
    assert target_distance(labels, t) == pytest.approx(0.625)
    # exactly on target -> 0
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    a = torch.tensor([0, 0, 0, 1, 0, 0, 0, 1])
    assert target_distance({"gender": g, "age": a, "race": g}, t) == pytest.approx(0.0)
    assert validation_objective(0.2, 0.1, drift_weight=2.0) == pytest.approx(0.4)
    with pytest.raises(ValueError):
        target_distance({"gender": g}, t)
    with pytest.raises(ValueError):
        validation_objective(0.1, 0.1, drift_weight=-1)
