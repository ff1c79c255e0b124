"""Learning-rate schedules (training/lr.py) and the engines' set_lr."""

from __future__ import annotations

import math

import pytest
import torch

from fairdiff_ray.config import ConfigError, FairDiffConfig, TrainConfig, from_dict
from fairdiff_ray.dist.engine import PlainEngine
from fairdiff_ray.training.lr import lr_at


def test_constant_is_the_paper_default() -> None:
    t = TrainConfig(steps=10, lr=1e-3)
    assert [lr_at(s, t) for s in range(10)] == [1e-3] * 10


def test_warmup_is_linear_then_constant() -> None:
    t = TrainConfig(steps=10, lr=1e-3, warmup_steps=4)
    assert [lr_at(s, t) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_decay_runs_from_lr_to_the_floor_monotonically(kind: str) -> None:
    t = TrainConfig(steps=11, lr=1e-2, lr_schedule=kind, min_lr_ratio=0.1)
    lrs = [lr_at(s, t) for s in range(11)]
    assert lrs[0] == pytest.approx(1e-2) and lrs[-1] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    mid = 1e-3 + (1e-2 - 1e-3) * (0.5 * (1 + math.cos(math.pi / 2)) if kind == "cosine" else 0.5)
    assert lrs[5] == pytest.approx(mid)


def test_warmup_then_cosine() -> None:
    t = TrainConfig(steps=12, lr=1.0, lr_schedule="cosine", warmup_steps=2)
    assert lr_at(0, t) == pytest.approx(0.5) and lr_at(1, t) == pytest.approx(1.0)
    assert lr_at(2, t) == pytest.approx(1.0) and lr_at(11, t) == pytest.approx(0.0)
    assert lr_at(50, t) == pytest.approx(0.0)  # past the end: the floor


def test_bad_schedules_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="warmup_steps"):
        from_dict({"train": {"steps": 5, "warmup_steps": 5}})
    with pytest.raises(ConfigError, match="lr_schedule"):
        from_dict({"train": {"lr_schedule": "cosin"}})
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, TrainConfig())


def test_plain_engine_applies_the_rate() -> None:
    w = torch.nn.Parameter(torch.ones(3))
    cfg = FairDiffConfig.model_validate({"train": {"lr": 0.5, "weight_decay": 0.0}})
    eng = PlainEngine(cfg, [w], micro_steps=1, rank=0)
    eng.set_lr(0.0)
    w.sum().backward()
    eng.step()
    assert torch.equal(w.detach(), torch.ones(3))  # lr 0: AdamW moves nothing
    eng.set_lr(0.1)
    w.sum().backward()
    eng.step()
    assert torch.allclose(w.detach(), torch.full((3,), 0.9), atol=1e-6)  # Adam's first step moves by lr
