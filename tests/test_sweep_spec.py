"""Sweep files: strict keys, domains, and every value probed against the run config before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from fairdiff_ray.errors import ConfigError
from fairdiff_ray.sweep.spec import load_sweep, override_for

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "s.yaml"
    p.write_text(f"sweep:\n  name: t\n  base: {ROOT / 'configs/synthetic_gender.yaml'}\n{body}")
    return p


def test_shipped_sweep_loads() -> None:
    spec = load_sweep(ROOT / "configs/sweep_synthetic.yaml")
    assert spec.grid_size() == 4 and spec.search == "grid"


def test_override_formatting_round_trips() -> None:
    assert override_for("target.gender.probs", [0.25, 0.75]) == "target.gender.probs=[0.25, 0.75]"
    assert override_for("adaptor.rank", 4) == "adaptor.rank=4"
    assert override_for("adaptor.kind", "soft_prompt") == "adaptor.kind=soft_prompt"


@pytest.mark.parametrize(
    ("body", "pattern"),
    [
        ("  space:\n    adaptor.rnak: {grid: [2, 4]}\n", r"adaptor.rnak.*did you mean 'rank'"),
        ("  space:\n    adaptor.rank: {grid: [0, 4]}\n", r"sweep.space.adaptor.rank value 0"),
        ("  space:\n    target.gender.probs: {grid: [[0.5, 0.6]]}\n", r"sums to 1.1"),
        ("  space:\n    train.lr: {loguniform: [0.1, 0.01]}\n", r"lo < hi"),
        ("  space:\n    train.lr: {uniform: [0.001, 0.01]}\n", r"search 'grid' takes only grid"),
        ("  space: {}\n", r"space is empty"),
        ("  serach: grid\n  space:\n    adaptor.rank: {grid: [2]}\n", r"unknown key 'sweep.serach'.*search"),
        ("  space:\n    adaptor.rank: {grid: [2], choice: [3]}\n", r"exactly one of"),
    ],
)
def test_bad_sweeps_name_the_key(tmp_path: Path, body: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_sweep(write(tmp_path, body))


def test_missing_base(tmp_path: Path) -> None:
    p = tmp_path / "s.yaml"
    p.write_text("sweep:\n  name: t\n  base: nowhere.yaml\n  space:\n    adaptor.rank: {grid: [2]}\n")
    with pytest.raises(ConfigError, match="sweep.base 'nowhere.yaml' does not exist"):
        load_sweep(p)
