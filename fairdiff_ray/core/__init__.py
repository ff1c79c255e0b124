"""The pure math of the method (METHOD.md): torch / numpy / scipy / POT only.

No Ray, no torch.distributed, no model loading here. Collectives are injected as callables.
Public API (stable names used across the project and by external checks):
- TargetDistribution.from_spec(spec)                         targets.py
- stable_seed(*parts), noise_from_seeds(seeds, shape)      seeding.py
- expected_targets(probs, target, ...), assign_targets(q)    ot.py
- alignment_loss(logits, targets)                            losses.py
- bias(labels, num_classes), joint_bias, frequencies         metrics.py
- grad_coefficients(alphas_cumprod, alphas, timesteps)       sampler.py
- sample_with_grad(eps_fn, x_T, scheduler, ...)              sampler.py
"""

from fairdiff_ray.core.losses import alignment_loss
from fairdiff_ray.core.metrics import bias, frequencies, joint_bias, joint_labels
from fairdiff_ray.core.ot import assign_targets, expected_targets
from fairdiff_ray.core.sampler import grad_coefficients, sample_with_grad
from fairdiff_ray.core.seeding import noise_from_seeds, stable_seed
from fairdiff_ray.core.targets import TargetDistribution

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
