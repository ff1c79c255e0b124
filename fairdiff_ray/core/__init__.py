"""The pure math of the method (METHOD.md): torch / numpy / scipy / POT only.

No Ray, no torch.distributed, no model loading here. Collectives are injected as callables.
Public API (stable names used across the project and by external checks):
- TargetDistribution.from_spec(spec)                         targets.py
- stable_seed(*parts), noise_from_seeds(seeds, shape)      seeding.py
- expected_targets(probs, target, ...), expected_targets_separated, assign_targets(q)    ot.py
- alignment_loss(logits, targets)                            losses.py
- bias(labels, num_classes), joint_bias, frequencies         metrics.py
- grad_coefficients(alphas_cumprod, alphas, timesteps)       sampler.py
- sample_with_grad(eps_fn, x_T, scheduler, ...)              sampler.py
"""

import importlib
from typing import Any

# Lazy re-exports (PEP 562): importing one core module never drags in the others.
_EXPORTS = {
    "alignment_loss": "losses",
    "bias": "metrics",
    "frequencies": "metrics",
    "joint_bias": "metrics",
    "joint_labels": "metrics",
    "assign_targets": "ot",
    "expected_targets": "ot",
    "grad_coefficients": "sampler",
    "sample_with_grad": "sampler",
    "noise_from_seeds": "seeding",
    "stable_seed": "seeding",
    "TargetDistribution": "targets",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"fairdiff_ray.core.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'fairdiff_ray.core' has no attribute {name!r}")


__all__ = [
    "TargetDistribution",
    "alignment_loss",
    "assign_targets",
    "bias",
    "expected_targets",
    "frequencies",
    "grad_coefficients",
    "joint_bias",
    "joint_labels",
    "noise_from_seeds",
    "sample_with_grad",
    "stable_seed",
]
