"""A sweep file: a base run config plus a search space over config paths.

```yaml
# fairdiff sweep --config configs/sweep_synthetic.yaml
sweep:
  name: synthetic-sweep
  storage: runs/sweeps
  base: configs/synthetic_age_75_25.yaml
  overrides: [train.steps=40, train.validate_every=10]   # the objective needs periodic validation
  search: grid            # grid | random | optuna
  num_samples: 1          # grid: repeats of the grid; random / optuna: number of trials
  space:
    target.age.probs: {grid: [[0.9, 0.1], [0.75, 0.25]]}
    adaptor.rank: {grid: [2, 8]}
    train.lr: {loguniform: [1.0e-4, 1.0e-2]}     # random / optuna only
  asha: {grace_period: 10, reduction_factor: 2}  # optional early stopping on the objective
```

Trials are ranked (and ASHA stops them) on the objective of the workers' periodic validation, distance to the
target (``distance: relative``: divided by the trial's distance before training, for sweeps over target
distributions) + ``semantic_weight`` x semantic drift (see dist/tune.py), so ``train.validate_every`` must be set.
Every value of the space is checked against the run config before anything starts, so a misspelt path or a
value of the wrong type fails at once with the key named.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fairdiff_ray.config import FairDiffConfig, load_config, load_yaml
from fairdiff_ray.errors import ConfigError

DOMAIN_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


class _S(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Domain(_S):
    """Exactly one of the kinds: grid / choice (lists of values), uniform / loguniform / randint ([lo, hi])."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _one(self) -> Domain:
        set_ = [k for k in DOMAIN_KINDS if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError(f"give exactly one of {', '.join(DOMAIN_KINDS)} (got {set_ or 'none'})")
        if self.kind in ("grid", "choice") and not self.values:
            raise ValueError(f"{self.kind} needs at least one value")
        if self.kind in ("uniform", "loguniform", "randint"):
            lo, hi = getattr(self, self.kind)
            if not lo < hi or (self.kind == "loguniform" and lo <= 0):
                raise ValueError(f"{self.kind} needs 0 < lo < hi for loguniform, lo < hi otherwise (got [{lo}, {hi}])")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in DOMAIN_KINDS if getattr(self, k) is not None)

    @property
    def values(self) -> list[Any]:
        return list(getattr(self, self.kind) or [])

    def probe_values(self) -> list[Any]:
        """Values to check against the run config before the sweep starts."""
        if self.kind in ("grid", "choice"):
            return self.values
        lo, hi = getattr(self, self.kind)
        return [lo, hi]


class AshaSpec(_S):
    grace_period: int = Field(5, gt=0)
    reduction_factor: float = Field(2.0, gt=1)


class SweepSpec(_S):
    name: str
    storage: str = "runs/sweeps"
    base: str
    overrides: list[str] = []
    search: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = Field(1, gt=0)
    max_concurrent_trials: int | None = Field(None, gt=0)  # None: as many as the cluster's CPUs/GPUs allow
    semantic_weight: float = Field(1.0, ge=0)  # objective = distance to target + semantic_weight * drift
    # absolute: the distance as measured; relative: divided by the trial's distance before training, so trials
    # asking for different target distributions are ranked (and cut by ASHA) on progress, not on how far their
    # target happens to be from the base model
    distance: Literal["absolute", "relative"] = "absolute"
    asha: AshaSpec | None = None
    space: dict[str, Domain]
    seed: int = 0

    @model_validator(mode="after")
    def _search_fits_space(self) -> SweepSpec:
        if not self.space:
            raise ValueError("space is empty: name at least one config path to sweep")
        kinds = {d.kind for d in self.space.values()}
        if self.search == "grid" and kinds - {"grid"}:
            raise ValueError("search 'grid' takes only grid domains; use search: random or optuna for ranges")
        if self.search == "optuna" and "grid" in kinds:
            raise ValueError("search 'optuna' does not take grid domains; use choice instead")
        return self

    @property
    def relative_distance(self) -> bool:
        return self.distance == "relative"

    def base_config(self, extra: list[str] | None = None) -> FairDiffConfig:
        return load_config(self.base, [*self.overrides, *(extra or [])])

    def grid_size(self) -> int:
        sizes = [len(d.values) for d in self.space.values() if d.kind == "grid"]
        return (int(__import__("math").prod(sizes)) if sizes else 1) * self.num_samples


def check_validation(cfg: FairDiffConfig, spec: SweepSpec, where: str) -> None:
    """The objective comes from the workers' periodic validation: it must run, and before ASHA's first cut."""
    every = cfg.train.validate_every
    if every == 0:
        raise ConfigError(f"{where}: train.validate_every is 0 in the sweep's run config, so trials report no "
                          "objective: add e.g. train.validate_every=10 to sweep.overrides")
    if spec.asha and spec.asha.grace_period < every:
        raise ConfigError(f"{where}: sweep.asha.grace_period={spec.asha.grace_period} is below "
                          f"train.validate_every={every}: ASHA would cut trials before their first validation; "
                          f"use a grace_period of at least {every}")


def override_for(path: str, value: Any) -> str:
    """``path=value`` with the value written as one-line YAML (lists and dicts in flow style)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    if text.endswith("\n...") or text.endswith("..."):
        text = text.removesuffix("...").strip()
    return f"{path}={text}"


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> SweepSpec:
    """Load and fully check a sweep file: its own keys, the base config, and every value of the space."""
    from fairdiff_ray.config import _format_error, apply_overrides

    data = load_yaml(path)
    if set(data) != {"sweep"}:
        raise ConfigError(f"{path}: a sweep file holds one top-level key 'sweep' (got {sorted(data)})")
    data = apply_overrides(data, [f"sweep.{o.removeprefix('sweep.')}" for o in overrides or []], defaults={})
    try:
        spec = SweepSpec.model_validate(data["sweep"])
    except ValidationError as err:
        raise ConfigError(_format_error(err, str(path), root=SweepSpec, prefix="sweep.")) from None
    base = Path(spec.base)
    if not base.is_file():
        raise ConfigError(f"{path}: sweep.base {spec.base!r} does not exist: point it at a run config in configs/")
    spec.base_config()
    # Probe each value on its own, and the grid's corners together, against the run config.
    for key, dom in spec.space.items():
        for v in dom.probe_values():
            try:
                spec.base_config([override_for(key, v)])
            except ConfigError as e:
                raise ConfigError(f"{path}: sweep.space.{key} value {v!r} is not valid for the run config: {e}") from None
    grid_keys = [k for k, d in spec.space.items() if d.kind == "grid"]
    for combo in itertools.product(*(spec.space[k].values for k in grid_keys)):
        try:
            spec.base_config([override_for(k, v) for k, v in zip(grid_keys, combo)])
        except ConfigError as e:
            raise ConfigError(f"{path}: sweep grid point {dict(zip(grid_keys, combo))} is invalid: {e}") from None
    check_validation(spec.base_config(), spec, str(path))
    return spec
