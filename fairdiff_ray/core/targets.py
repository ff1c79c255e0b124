"""Target distributions over one or several protected attributes (METHOD.md section 1-2).

Notation:
- attribute a has K_a ordered classes; several attributes form J = prod_a K_a joint classes, flattened in
  row-major (C) order of ``attributes``;
- ``probs`` is the joint table (K_1, ..., K_A), float64, non-negative, summing to 1.
Independent marginals are stored as their outer product.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch

_TOL = 1e-6


def _check_probs(name: str, probs: torch.Tensor) -> None:
    if not torch.isfinite(probs).all():
        raise ValueError(f"target.{name}.probs contains NaN or inf: give finite probabilities")
    if (probs < 0).any():
        raise ValueError(f"target.{name}.probs has a negative entry: probabilities must be >= 0")
    total = float(probs.sum())
    if abs(total - 1.0) > _TOL:
        raise ValueError(f"target.{name}.probs sums to {total:.6g}, not 1: rescale the probabilities")


def _check_classes(name: str, classes: Any) -> list[str]:
    if not isinstance(classes, (list, tuple)) or len(classes) < 2:
        raise ValueError(f"target.{name}.classes must be a list of at least 2 class names")
    classes = [str(c) for c in classes]
    if len(set(classes)) != len(classes):
        raise ValueError(f"target.{name}.classes has duplicate names {classes}: class names must be unique")
    return classes


def _numbers(x: Any) -> Any:
    """Nested lists with number-like strings made floats: YAML 1.1 reads 1e-1 (no dot) as the string '1e-1'."""
    if isinstance(x, list | tuple):
        return [_numbers(v) for v in x]
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return x
    return x


@dataclass(frozen=True)
class TargetDistribution:
    """A user-defined target distribution D over the classes of one or more attributes."""

    attributes: dict[str, list[str]]
    probs: torch.Tensor  # (K_1, ..., K_A), float64
    independent: bool

    @staticmethod
    def from_spec(spec: dict[str, Any]) -> TargetDistribution:
        """Build from a config spec.

        Independent: ``{"gender": {"classes": [...], "probs": [...]}, "age": {...}}``.
        Joint: ``{"joint": {"attributes": {"gender": [...], "race": [...]}, "probs": [[...], ...]}}``.
        Raises ValueError naming the offending key.
        """
        if not isinstance(spec, dict) or not spec:
            raise ValueError("target must be a non-empty mapping of attribute -> {classes, probs} or {joint: ...}")
        if "joint" in spec:
            if len(spec) != 1:
                raise ValueError("target.joint cannot be combined with other attributes: put them all in the joint table")
            joint = spec["joint"]
            if not isinstance(joint, dict) or set(joint) != {"attributes", "probs"}:
                raise ValueError("target.joint needs exactly the keys 'attributes' and 'probs'")
            attrs = {str(a): _check_classes(f"joint.attributes.{a}", c) for a, c in joint["attributes"].items()}
            if not attrs:
                raise ValueError("target.joint.attributes is empty: name at least one attribute")
            try:
                probs = torch.as_tensor(_numbers(joint["probs"]), dtype=torch.float64)
            except (TypeError, ValueError) as e:
                raise ValueError(f"target.joint.probs is not a rectangular table of numbers ({e})") from None
            shape = tuple(len(c) for c in attrs.values())
            if tuple(probs.shape) != shape:
                raise ValueError(
                    f"target.joint.probs has shape {tuple(probs.shape)} but the attributes need {shape}: "
                    "one axis per attribute, in the order listed"
                )
            _check_probs("joint", probs)
            return TargetDistribution(attrs, probs, independent=False)
        attrs: dict[str, list[str]] = {}
        marginals = []
        for name, sub in spec.items():
            if not isinstance(sub, dict) or set(sub) != {"classes", "probs"}:
                raise ValueError(f"target.{name} needs exactly the keys 'classes' and 'probs'")
            classes = _check_classes(name, sub["classes"])
            try:
                p = torch.as_tensor(_numbers(sub["probs"]), dtype=torch.float64)
            except (TypeError, ValueError) as e:
                raise ValueError(f"target.{name}.probs is not a list of numbers ({e})") from None
            if p.shape != (len(classes),):
                raise ValueError(
                    f"target.{name}.probs has {p.numel()} entries for {len(classes)} classes: give one per class"
                )
            _check_probs(name, p)
            attrs[str(name)] = classes
            marginals.append(p)
        probs = marginals[0]
        for p in marginals[1:]:
            probs = probs.unsqueeze(-1) * p
        return TargetDistribution(attrs, probs, independent=True)

    @staticmethod
    def uniform(attributes: dict[str, list[str]]) -> TargetDistribution:
        shape = tuple(len(c) for c in attributes.values())
        probs = torch.full(shape, 1.0 / math.prod(shape), dtype=torch.float64)
        return TargetDistribution({a: list(c) for a, c in attributes.items()}, probs, independent=True)

    @property
    def names(self) -> list[str]:
        return list(self.attributes)

    @property
    def num_classes(self) -> dict[str, int]:
        return {a: len(c) for a, c in self.attributes.items()}

    @property
    def num_joint(self) -> int:
        return int(self.probs.numel())

    @property
    def joint_probs(self) -> torch.Tensor:
        """(J,) flattened joint probabilities, row-major over ``attributes``."""
        return self.probs.reshape(-1)

    def joint_classes(self) -> list[tuple[int, ...]]:
        """Per joint class j, the class index of every attribute (row-major, matching ``joint_probs``)."""
        return list(itertools.product(*(range(len(c)) for c in self.attributes.values())))

    def marginal(self, attribute: str) -> torch.Tensor:
        """(K_a,) marginal probabilities of one attribute."""
        if attribute not in self.attributes:
            raise ValueError(f"attribute {attribute!r} is not in the target (has {self.names})")
        axis = self.names.index(attribute)
        other = tuple(i for i in range(self.probs.dim()) if i != axis)
        return self.probs.sum(dim=other) if other else self.probs.clone()

    def to_spec(self) -> dict[str, Any]:
        """Inverse of from_spec (always the joint form when not independent)."""
        if self.independent:
            return {a: {"classes": c, "probs": self.marginal(a).tolist()} for a, c in self.attributes.items()}
        return {"joint": {"attributes": dict(self.attributes), "probs": self.probs.tolist()}}
