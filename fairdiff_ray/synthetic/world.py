"""The synthetic world's models behind the protocols of models/protocols.py (issue 4).

Every net is a small CNN (nets.py) trained on renders (render.py) by ``python jobs/train_synthetic_nets.py``,
shipped as ``assets/synthetic-nets/<name>.safetensors`` plus ``<name>.json`` (the architecture and what was
measured). Names: detector, classifier-train, classifier-eval, features, features-eval, fidelity.

A ``path`` argument may be a directory holding ``<name>.safetensors`` or the ``.safetensors`` file itself;
``None`` is the shipped default. Loaded nets are frozen and in eval mode; the classifier, feature and fidelity
nets still carry gradients to their input pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fairdiff_ray.config import SHIPPED_FEATURES
from fairdiff_ray.errors import ModelFileError
from fairdiff_ray.io import atomic_write_text
from fairdiff_ray.models.protocols import AttributeClassifier, FaceDetector, ImageFeatures
from fairdiff_ray.synthetic.nets import (
    WRAPPERS,
    SyntheticClassifier,
    SyntheticDetector,
    SyntheticFeatures,
    SyntheticFidelity,
)
from fairdiff_ray.synthetic.render import ATTRIBUTES, N_CONTENT
from fairdiff_ray.synthetic.vocab import content_class

__all__ = [
    "ATTRIBUTES",
    "N_CONTENT",
    "DEFAULT_DIR",
    "content_class",
    "load_classifier",
    "load_detector",
    "load_features",
    "load_fidelity",
    "save_net",
]

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "assets" / "synthetic-nets"
REBUILD = "python jobs/train_synthetic_nets.py"
VARIANTS = ("train", "eval")
FEATURE_NAMES = tuple(SHIPPED_FEATURES.values())  # the feature nets of a nets directory: training, evaluation


def net_files(path: str | Path | None, name: str) -> tuple[Path, Path]:
    """(weights, json) of net ``name`` for a directory, a .safetensors file, or None (the shipped default)."""
    p = DEFAULT_DIR if path is None else Path(path).expanduser()
    weights = p if p.suffix == ".safetensors" else p / f"{name}.safetensors"
    return weights, weights.with_suffix(".json")


def save_net(module: torch.nn.Module, out_dir: str | Path, name: str, info: dict | None = None) -> Path:
    """Write ``<name>.safetensors`` (contiguous float32) and ``<name>.json`` (arch + info) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / f"{name}.safetensors"
    state = {k: v.detach().float().contiguous().cpu() for k, v in module.state_dict().items()}
    tmp = weights.with_suffix(".safetensors.tmp")
    save_file(state, str(tmp), metadata={"name": name})
    tmp.replace(weights)
    atomic_write_text(weights.with_suffix(".json"), json.dumps({"arch": module.arch, **(info or {})}, indent=2) + "\n")
    return weights


def _load(path: str | Path | None, name: str) -> torch.nn.Module:
    weights, meta = net_files(path, name)
    for f in (weights, meta):
        if not f.is_file():
            raise ModelFileError(f"synthetic-world net {f} is missing; rebuild the nets with `{REBUILD}`")
    try:
        arch = json.loads(meta.read_text())["arch"]
        kind = arch.get("name", name)
        module = WRAPPERS[kind](arch)
        module.load_state_dict(load_file(str(weights)))
    except (KeyError, ValueError, RuntimeError, OSError) as e:
        raise ModelFileError(
            f"synthetic-world net {weights} does not load ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            f"rebuild the nets with `{REBUILD}`"
        ) from None
    module.requires_grad_(False)
    return module.eval()


def load_detector(path: str | None = None) -> FaceDetector:
    """The synthetic face detector (runs under no_grad; found = score >= its threshold)."""
    net = _load(path, "detector")
    if not isinstance(net, SyntheticDetector):
        raise ModelFileError(f"{net_files(path, 'detector')[0]} is not a detector; rebuild with `{REBUILD}`")
    return net


def load_classifier(path: str | None = None, variant: str = "train") -> AttributeClassifier:
    """The gender / race / age classifier on face crops; ``variant`` "eval" is the separately trained
    evaluation-time net (different architecture, seed and renders)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    net = _load(path, f"classifier-{variant}")
    if not isinstance(net, SyntheticClassifier):
        raise ModelFileError(f"{net_files(path, f'classifier-{variant}')[0]} is not a classifier; rebuild with `{REBUILD}`")
    return net


def feature_source(value: str) -> tuple[str | None, str]:
    """``features.synthetic`` -> (path, net name) for load_features / net_files: a keyword (SHIPPED_FEATURES) names
    a shipped net, anything else is a directory or file holding ``features``."""
    shipped = SHIPPED_FEATURES.get(value)
    return (None, shipped) if shipped else (value, "features")


def load_features(path: str | None = None, name: str = "features") -> ImageFeatures:
    """The CLIP / DINO stand-in (name "synthetic"): images -> (B, D) L2-normalised embeddings. ``name`` in a
    directory: "features" (the training's) or "features-eval" (the separately trained evaluation-time net)."""
    if name not in FEATURE_NAMES:
        raise ValueError(f"name must be one of {FEATURE_NAMES}, got {name!r}")
    net = _load(path, name)
    if not isinstance(net, SyntheticFeatures):
        raise ModelFileError(f"{net_files(path, name)[0]} is not a feature net; rebuild with `{REBUILD}`")
    return net


def load_fidelity(path: str | None = None) -> torch.nn.Module:
    """Prompt fidelity: images (B, 3, H, W) in [-1, 1] -> (B, N_CONTENT) content-class logits."""
    net = _load(path, "fidelity")
    if not isinstance(net, SyntheticFidelity):
        raise ModelFileError(f"{net_files(path, 'fidelity')[0]} is not a fidelity net; rebuild with `{REBUILD}`")
    return net
