"""Small REAL stand-ins for the training tests (no mocks): the tiny SD model of models/tiny.py, a detector
that finds the central square of every not-black image, a seeded conv attribute classifier and a conv feature
net. Module-level so Ray workers can import them (``tests._helpers_train``; the repository root is on the
workers' path)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from fairdiff_ray.config import FairDiffConfig, load_config
from fairdiff_ray.core.crop import arcface_template
from fairdiff_ray.models.protocols import Faces

WORDS = ("nurse", "doctor", "pilot", "chef", "farmer", "judge")


class CenterDetector:
    """The central square is 'the face' of every image whose mean is above -0.95."""

    def detect(self, images: torch.Tensor) -> Faces:
        b, _, h, w = images.shape
        box = torch.tensor([w * 0.25, h * 0.25, w * 0.75, h * 0.75])
        lm = arcface_template(int(w // 2)) + torch.tensor([w * 0.25, h * 0.25])
        found = (images.float().mean(dim=(1, 2, 3)) > -0.95).cpu()
        return Faces(boxes=box.expand(b, 4).clone(), scores=found.float(), landmarks=lm.expand(b, 5, 2).clone(),
                     found=found)


class TinyClassifier(torch.nn.Module):
    attributes = {"gender": ["female", "male"]}
    input_size = 16
    crop_expand = 0.5

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.head = torch.nn.Linear(8, 2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.requires_grad_(False).eval()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return {"gender": self.head(h) * 4.0}


class TinyFeatures(torch.nn.Module):
    name = "tiny"

    def __init__(self, seed: int = 1):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 16, 5, stride=4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        self.requires_grad_(False).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.conv(x).flatten(1), dim=-1)


def tiny_components(cfg: FairDiffConfig, device: torch.device, dtype: torch.dtype) -> Any:
    from fairdiff_ray.models.sd import components_from_dict
    from fairdiff_ray.models.tiny import tiny_components as build

    comp = components_from_dict(build(seed=0, words=WORDS))
    for m in (comp.text_encoder, comp.unet, comp.vae):
        m.to(device=device, dtype=dtype)
    return comp


def tiny_loss(cfg: FairDiffConfig, device: torch.device) -> Any:
    from fairdiff_ray.training.loss import FairnessLoss

    return FairnessLoss(cfg, CenterDetector(), TinyClassifier(), {"tiny": TinyFeatures()}).to(device)


def builders(fault: Any = None) -> Any:
    from fairdiff_ray.dist.worker import Builders

    return Builders(components=tiny_components, loss=tiny_loss, fault=fault)


class FailOnce:
    """fault(step, rank): at ``step`` on ``rank``, the first time only (a marker file remembers), either kill
    the worker process (``kill=True``, os._exit) or raise."""

    def __init__(self, marker: str, step: int, rank: int = 0, kill: bool = False):
        self.marker, self.step, self.rank, self.kill = marker, step, rank, kill

    def __call__(self, step: int, rank: int) -> None:
        if step == self.step and rank == self.rank and not os.path.exists(self.marker):
            Path(self.marker).write_text("failed once\n")
            if self.kill:
                os._exit(1)
            raise RuntimeError(f"injected failure at step {step} on rank {rank}")


class StartEnv:
    """fault(step, rank) that records, once per rank, the environment the worker process was started with
    (/proc/self/environ: what glibc read at start-up, not later os.environ changes) into ``<dir>/rank<r>.env``."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def __call__(self, step: int, rank: int) -> None:
        path = Path(self.out_dir) / f"rank{rank}.env"
        if not path.exists():
            path.write_bytes(Path("/proc/self/environ").read_bytes())


def write_prompts(path: Path, n_train: int = 4, n_val: int = 2) -> Path:
    rows = [{"concept": "occupations", "prompt": f"a photo of the face of a {w}", "subject": w,
             "split": "train" if i < n_train else "val"} for i, w in enumerate(WORDS[: n_train + n_val])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_config(tmp: Path, *overrides: str) -> FairDiffConfig:
    prompts = write_prompts(tmp / "prompts.jsonl")
    return load_config(None, [
        f"run.storage={tmp / 'runs'}", "run.name=tiny", "adaptor.rank=4", "adaptor.ema_decay=0.5",
        "sampler.scheduler=ddim", "sampler.steps=3", "sampler.steps_jitter=1", "loss.lambda_face=0",
        "loss.lambda_img=1.0", "train.images_per_prompt=4", "train.chunk_size=2", "train.lr=0.01",
        "train.steps=3", "train.checkpoint_every=1", "deepspeed.zero_stage=2", "ray.cpus_per_worker=1",
        f"data.prompt_sets=[{{path: {prompts}}}]", *overrides,
    ])
