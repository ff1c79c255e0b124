"""Fault injectors for tests/test_faults.py, module-level so Ray workers and actors can import them
(``tests._helpers_faults``; the repository root is on the workers' path). Each fires once: a marker file
remembers that it did, so the restarted worker or actor runs normally."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from fairdiff_ray.config import FairDiffConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC_SD = ROOT / "assets" / "synthetic-sd"
# occupations the synthetic world was pretrained on: its faces are found from the first step on
TRAIN_PROMPTS = ("nurse", "doctor", "pilot", "chef")


def write_config(tmp: Path, name: str = "faults") -> Path:
    """A YAML config for a 3-step debias run of the shipped synthetic SD (faces found at 8 sampling steps),
    one checkpoint per step, all three kept; run.storage is ``tmp/runs``."""
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"concept": "occupations", "prompt": f"A photo of the face of a {w}, a person",
                                           "split": "train"}) + "\n" for w in TRAIN_PROMPTS))
    path = tmp / "config.yaml"
    path.write_text(f"""run: {{name: {name}, storage: {tmp / 'runs'}}}
model: {{path: {SYNTHETIC_SD}}}
adaptor: {{kind: text_lora, rank: 4, ema_decay: 0.5}}
sampler: {{scheduler: ddim, steps: 8, steps_jitter: 1}}
loss: {{lambda_face: 0.0}}
train: {{steps: 3, lr: 0.01, images_per_prompt: 4, chunk_size: 2, checkpoint_every: 1, num_to_keep: 3}}
data: {{prompt_sets: [{{path: {prompts}}}]}}
ray: {{num_workers: 1, cpus_per_worker: 1}}
deepspeed: {{zero_stage: 2}}
""")
    return path


def config(path: Path, *overrides: str) -> FairDiffConfig:
    return load_config(path, list(overrides))


class KillInSave:
    """save_fault(steps_done, rank): kill the worker process in the middle of the save of ``steps_done``
    (after the adaptor state is written, before the RNG / optimizer state and the manifest), once."""

    def __init__(self, marker: str, steps_done: int, rank: int = 0):
        self.marker, self.steps_done, self.rank = marker, steps_done, rank

    def __call__(self, steps_done: int, rank: int) -> None:
        if steps_done == self.steps_done and rank == self.rank and not os.path.exists(self.marker):
            Path(self.marker).write_text("killed during a checkpoint save\n")
            os._exit(1)


class NaNLossAt:
    """Makes the loss of every chunk of training step ``step`` NaN. Use one instance as both the ``fault``
    hook (which tells it the current step) and, through ``loss``, the loss builder; Builders ships them to the
    worker in one pickle, so they stay one object there."""

    def __init__(self, step: int):
        self.step, self.now = step, -1

    def __call__(self, step: int, rank: int) -> None:
        self.now = step

    def loss(self, cfg: FairDiffConfig, device: torch.device) -> Any:
        from fairdiff_ray.dist.worker import default_loss

        return _NaNLoss(default_loss(cfg, device), self)


class _NaNLoss:
    def __init__(self, inner: Any, clock: NaNLossAt):
        self.inner, self.clock = inner, clock

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        loss, parts = self.inner(*args, **kwargs)
        if self.clock.now == self.clock.step:
            loss = loss * float("nan")
        return loss, parts


class FaultyGenerator:
    """An evaluation generator loader (tests._helpers_eval's stand-in) that logs every generated
    (base?, prompt) to ``log``; raises on ``fail`` after ``delay`` seconds (the batches before it reach the
    driver first): an evaluation interrupted part of the way through; and kills its actor process the first
    time it is asked for an adaptor image of ``kill`` (``marker`` remembers)."""

    def __init__(self, log: str, fail: str | None = None, delay: float = 0.0, kill: str | None = None,
                 marker: str | None = None):
        self.log, self.fail, self.delay, self.kill, self.marker = log, fail, delay, kill, marker

    def __call__(self, spec: dict[str, Any], adaptor_dir: str | None) -> Any:
        from tests._helpers_eval import standin_gen_loader

        inner = standin_gen_loader({**spec, "log": self.log}, adaptor_dir)
        fail, delay, kill, marker = self.fail, self.delay, self.kill, self.marker

        def generate(prompts: list[str], seeds: list[int]) -> torch.Tensor:
            if fail is not None and fail in prompts:
                time.sleep(delay)
                raise RuntimeError(f"evaluation interrupted at {fail!r}")
            if kill is not None and adaptor_dir is not None and kill in prompts and not os.path.exists(str(marker)):
                Path(str(marker)).write_text("actor killed\n")
                os._exit(1)
            return inner(prompts, seeds)

        return generate
