"""The evaluation's prompt list: the configured prompt sets, one split, in file order.

A prompt set is JSON lines with the keys ``concept``, ``prompt``, ``split`` (and optional ``weight``,
``subject``). Evaluation needs every prompt of the split exactly once, in a stable order, so this reads the
files directly (small) instead of through a shuffled training stream.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fairdiff_ray.config import FairDiffConfig, PromptSetConfig
from fairdiff_ray.errors import DataError


@dataclass(frozen=True)
class EvalPrompt:
    prompt: str
    concept: str


def _read_set(ps: PromptSetConfig, split: str, key: str) -> list[EvalPrompt]:
    path = Path(ps.path)
    if not path.is_file():
        raise DataError(f"{key}.path: prompt set {str(path)!r} does not exist: give an existing JSON-lines file")
    out: list[EvalPrompt] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}:{n}: not valid JSON: one object per line") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or "split" not in row:
            raise DataError(f"{path}:{n}: needs string keys 'prompt' and 'split' (and 'concept')")
        if row["split"] != split:
            continue
        concept = ps.concept or str(row.get("concept") or path.stem)
        out.append(EvalPrompt(prompt=row["prompt"], concept=concept))
    return out


def load_eval_prompts(cfg: FairDiffConfig) -> list[EvalPrompt]:
    """Every prompt of ``cfg.eval.split`` over ``cfg.data.prompt_sets`` (at most ``eval.max_prompts`` per set).

    Duplicates within a concept are dropped (the seed depends on the prompt text only, so a duplicate would
    just repeat the same images). Raises DataError if the split is empty.
    """
    split, cap = cfg.eval.split, cfg.eval.max_prompts
    prompts: list[EvalPrompt] = []
    seen: set[tuple[str, str]] = set()
    for i, ps in enumerate(cfg.data.prompt_sets):
        rows = _read_set(ps, split, f"data.prompt_sets.{i}")
        kept = 0
        for r in rows:
            if (r.concept, r.prompt) in seen or (cap is not None and kept >= cap):
                continue
            seen.add((r.concept, r.prompt))
            prompts.append(r)
            kept += 1
    if not prompts:
        files = ", ".join(ps.path for ps in cfg.data.prompt_sets)
        raise DataError(f"no prompts with split {split!r} in {files}: set eval.split to a split the files contain")
    return prompts
