"""TargetDistribution (core/targets.py): independent and joint specs, validation errors, joint layout."""

import math

import pytest
import torch

from fairdiff_ray.core.targets import TargetDistribution

RACE = ["white", "black", "indian", "asian"]


def test_independent_spec_is_the_outer_product():
    t = TargetDistribution.from_spec(
        {
            "gender": {"classes": ["female", "male"], "probs": [0.5, 0.5]},
            "age": {"classes": ["young", "old"], "probs": [0.75, 0.25]},
        }
    )
    assert t.independent and t.names == ["gender", "age"] and t.num_joint == 4
    assert t.joint_classes() == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert t.joint_probs.tolist() == pytest.approx([0.375, 0.125, 0.375, 0.125])
    assert t.marginal("age").tolist() == pytest.approx([0.75, 0.25])
    assert TargetDistribution.from_spec(t.to_spec()).joint_probs.tolist() == pytest.approx(
        t.joint_probs.tolist()
    )


def test_joint_spec_keeps_the_table():
    probs = [[0.2, 0.1, 0.1, 0.1], [0.2, 0.1, 0.1, 0.1]]
    t = TargetDistribution.from_spec(
        {"joint": {"attributes": {"gender": ["f", "m"], "race": RACE}, "probs": probs}}
    )
    assert not t.independent and t.probs.shape == (2, 4)
    # row-major: joint class j = gender * 4 + race, matching joint_classes()
    assert t.joint_classes()[5] == (1, 1) and t.joint_probs[5].item() == pytest.approx(0.1)
    assert t.marginal("race").tolist() == pytest.approx([0.4, 0.2, 0.2, 0.2])
    assert t.marginal("gender").tolist() == pytest.approx([0.5, 0.5])
    with pytest.raises(ValueError, match="not in the target"):
        t.marginal("age")


def test_uniform():
    t = TargetDistribution.uniform({"gender": ["f", "m"], "race": RACE})
    assert torch.allclose(t.joint_probs, torch.full((8,), 1 / 8, dtype=torch.float64))


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"gender": {"classes": ["f", "m"], "probs": [0.6, 0.6]}}, "sums to"),
        ({"gender": {"classes": ["f", "m"], "probs": [1.2, -0.2]}}, "negative"),
        ({"gender": {"classes": ["f", "m"], "probs": [math.nan, 1.0]}}, "NaN"),
        ({"gender": {"classes": ["f", "m"], "probs": [1.0]}}, "entries"),
        ({"gender": {"classes": ["f", "f"], "probs": [0.5, 0.5]}}, "duplicate"),
        ({"gender": {"classes": ["f"], "probs": [1.0]}}, "at least 2"),
        ({"gender": {"classes": ["f", "m"]}}, "keys"),
        ({"gender": {"classes": ["f", "m"], "probs": ["a", "b"]}}, "numbers"),
        ({}, "non-empty"),
        ({"joint": {"attributes": {"gender": ["f", "m"], "race": RACE}, "probs": [[0.5, 0.5]]}}, "shape"),
        ({"joint": {"attributes": {"gender": ["f", "m"]}, "probs": [0.5, 0.6]}}, "sums to"),
        (
            {"joint": {"attributes": {"gender": ["f", "m"]}, "probs": [0.5, 0.5]}, "age": {}},
            "cannot be combined",
        ),
        ({"joint": {"attributes": {"gender": ["m", "m"]}, "probs": [0.5, 0.5]}}, "duplicate"),
        ({"joint": {"attributes": {}, "probs": []}}, "empty"),
    ],
)
def test_bad_specs_name_the_problem(spec, match):
    with pytest.raises(ValueError, match=match):
        TargetDistribution.from_spec(spec)


def test_sum_tolerance_is_1e6():
    TargetDistribution.from_spec({"g": {"classes": ["f", "m"], "probs": [0.5, 0.5 + 5e-7]}})
    with pytest.raises(ValueError):
        TargetDistribution.from_spec({"g": {"classes": ["f", "m"], "probs": [0.5, 0.5 + 5e-6]}})
