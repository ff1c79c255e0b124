"""Small REAL stand-ins for the evaluation tests (no mocks): a noise-driven image generator, a brightness
face detector, a colour attribute classifier and a pooled-pixel feature net. Module-level so Ray workers
can import them (``tests._helpers_eval``, the repository root is on the workers' path)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fairdiff_ray.core.seeding import noise_from_seeds
from fairdiff_ray.models.protocols import Faces

ATTRS = {"gender": ["female", "male"], "race": ["white", "black", "indian", "asian"]}


def standin_gen_loader(spec: dict[str, Any], adaptor_dir: str | None):
    """Images are a fixed function of the seed's noise, the prompt and the model: the j-th images of two
    models share their noise, so they are correlated but not equal. ``spec["log"]`` (optional) is a file
    that records every generated (model, prompt); ``spec["fail_on"]`` a prompt that raises."""
    shift = 0.0 if adaptor_dir is None else 0.6

    def generate(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        if spec.get("fail_on") in prompts:
            raise RuntimeError(f"simulated crash on {spec['fail_on']!r}")
        if spec.get("log"):
            with open(spec["log"], "a") as f:
                for p in prompts:
                    f.write(json.dumps([adaptor_dir is None, p]) + "\n")
        x = noise_from_seeds(seeds, (3, 32, 32))
        offset = torch.tensor([(len(p) % 5) / 5 - 0.4 for p in prompts]).view(-1, 1, 1, 1)
        return torch.tanh(0.8 * x + offset - shift * torch.tensor([1.0, -1.0, 0.0]).view(1, 3, 1, 1))

    return generate


class BrightnessDetector:
    """A 'face' is found when the centre is bright enough; the box is the centre square."""

    def detect(self, images: torch.Tensor) -> Faces:
        b, _, h, w = images.shape
        centre = images[:, :, h // 4: 3 * h // 4, w // 4: 3 * w // 4].mean(dim=(1, 2, 3))
        found = centre > -0.35
        boxes = torch.tensor([w / 4, h / 4, 3 * w / 4, 3 * h / 4]).expand(b, 4) * found[:, None]
        return Faces(boxes=boxes.float(), scores=torch.sigmoid(4 * centre) * found,
                     landmarks=torch.zeros(b, 5, 2), found=found)


class ColourClassifier:
    """Gender from red - green, race from the four quadrants' mean brightness."""

    attributes = ATTRS
    input_size = 16
    crop_expand = 0.0

    def __call__(self, faces: torch.Tensor) -> dict[str, torch.Tensor]:
        rg = (faces[:, 0] - faces[:, 1]).mean(dim=(1, 2))
        q = F.adaptive_avg_pool2d(faces.mean(dim=1, keepdim=True), 2).flatten(1)
        return {"gender": torch.stack([-4 * rg, 4 * rg], dim=1), "race": 8 * q}


def standin_classify(images: torch.Tensor, detector: Any, classifier: Any) -> tuple[Faces, dict[str, torch.Tensor]]:
    faces = detector.detect(images)
    crops = F.interpolate(images[:, :, 8:24, 8:24], size=classifier.input_size)
    return faces, classifier(crops)


class PooledFeatures:
    name = "toy"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(F.adaptive_avg_pool2d(images, 4).flatten(1), dim=1)


def standin_fidelity() -> tuple[Any, Any]:
    """Fidelity net: 5 'content classes' scored by brightness bands; a prompt's class is its length mod 5."""

    def net(images: torch.Tensor) -> torch.Tensor:
        m = images.mean(dim=(1, 2, 3))
        centres = torch.linspace(-0.6, 0.6, 5)
        return -20 * (m[:, None] - centres[None]) ** 2

    return net, lambda prompt: len(prompt) % 5


def standin_score_loader(spec: dict[str, Any]) -> dict[str, Any]:
    return {"detector": BrightnessDetector(), "classifier": ColourClassifier(), "classify": standin_classify,
            "features": [PooledFeatures()], "fidelity": standin_fidelity()}


OCCUPATIONS = ["senator", "violinist", "geologist", "butcher", "inventor", "sergeant", "custodian", "narrator"]


def write_prompts(path: Path, n: int = 4, concept: str = "occupations") -> Path:
    """A JSON-lines prompt set: n test prompts plus two train prompts."""
    rows = [{"concept": concept, "prompt": f"A photo of the face of a {o}, a person", "split": "test"}
            for o in OCCUPATIONS[:n]]
    rows += [{"concept": concept, "prompt": "A photo of the face of a baker, a person", "split": "train"},
             {"concept": concept, "prompt": "A photo of the face of a pilot, a person", "split": "train"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
