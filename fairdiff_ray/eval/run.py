"""`fairdiff evaluate`: generate with the base model and adaptors, score, aggregate, report."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from fairdiff_ray.config import FairDiffConfig
from fairdiff_ray.errors import ModelFileError, UserError
from fairdiff_ray.eval.aggregate import summarize
from fairdiff_ray.eval.pipeline import BASE, generate_and_score, merge_parts, plan_for
from fairdiff_ray.eval.prompts import load_eval_prompts
from fairdiff_ray.io import atomic_write_bytes, atomic_write_text, is_uri, swap_in_dir

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def parse_adaptors(items: list[str]) -> dict[str, str]:
    """``["debiased=runs/x/adaptor", ...]`` -> {name: dir}; names unique, not 'base', dirs existing."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not _NAME.match(name) or not path:
            raise UserError(f"--adaptor {item!r} is not NAME=DIR (NAME: letters, digits, _ . -)")
        if name == BASE or name in out:
            raise UserError(f"--adaptor name {name!r} is {'reserved' if name == BASE else 'given twice'}: pick another")
        if is_uri(path):
            raise UserError(f"--adaptor {name}={path}: the evaluation reads a local directory (on a cluster: one every "
                            "node can read); copy the adaptor there first")
        if not Path(path).exists():
            raise ModelFileError(f"--adaptor {name}={path}: no such adaptor directory: pass the adaptor a debias run wrote")
        out[name] = path
    return out


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    import io

    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(path, buf.getvalue())


def same_as_training(cfg: FairDiffConfig) -> dict[str, bool]:
    """Whether the evaluation scores with the training's own attribute classifier / feature nets (METHOD.md asks
    for different ones: numbers measured with the nets the adaptor was trained against flatter it)."""
    feats = cfg.eval.features or cfg.features
    return {"classifier_as_training": cfg.eval.classifier == cfg.classifier,
            "features_as_training": any(v is not None for v in feats.model_dump().values())
            and feats == cfg.features}


def run_evaluation(
    cfg: FairDiffConfig,
    adaptors: dict[str, str],
    out_dir: str | Path,
    executor: str = "ray",
    report: bool = True,
    gen_loader: Any = None,
    score_loader: Any = None,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
    overwrite: bool | None = None,
) -> dict[str, Any]:
    """Evaluate ``base`` and every adaptor on ``cfg.eval.split``; write into ``out_dir``:
    parts/ (resumable), records.parquet, per_prompt.parquet, per_prompt.csv, summary.json, parts.json,
    config.yaml and (``report``) report.html, report.md, figures/. Returns the summary dict.

    ``overwrite`` False (the CLI without --overwrite): an ``out_dir`` holding the finished evaluation of the
    same plan (same models, settings and prompts: the same parts) is rebuilt from its parts, one holding
    another evaluation, or files that are not an evaluation, is refused before anything is written; True:
    replaced; None (library callers such as the demo): not checked. Either way the results are staged and
    moved in only when complete, so a failed run leaves the previous results as they were."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file: give a directory")
    if not Path(cfg.model.path).exists():
        raise ModelFileError(f"model.path {cfg.model.path!r} does not exist: point it at a diffusers model directory")
    from fairdiff_ray.preflight import check_eval_inputs

    # every input checked before anything is generated or written (stand-in loaders skip their part)
    check_eval_inputs(cfg, adaptors, models=gen_loader is None, scorer=score_loader is None)
    same = same_as_training(cfg)
    if same["classifier_as_training"]:
        log("[evaluate] note: eval.classifier is the training classifier (METHOD.md evaluates with another one)")
    if same["features_as_training"]:
        log("[evaluate] note: the semantic similarities use the training feature nets (set eval.features for "
            "others, as METHOD.md does)")
    models: dict[str, str | None] = {BASE: None, **adaptors}
    prompts = load_eval_prompts(cfg)
    plan = [str(p.path.relative_to(out)) for p in plan_for(cfg, models, prompts, out)]
    if overwrite is not None:
        _check_out(out, plan, overwrite)
    t0 = time.perf_counter()
    paths = generate_and_score(cfg, models, prompts, out, executor, gen_loader, score_loader, log)
    seconds = time.perf_counter() - t0
    records, attributes = merge_parts(paths)
    extra = {"eval": {"steps": cfg.eval.steps, "guidance_scale": cfg.eval.guidance_scale,
                      "scheduler": cfg.eval.scheduler, "model_path": cfg.model.path,
                      "adaptors": dict(adaptors), "seconds": round(seconds, 2), **same}}
    summary, pp = summarize(records, attributes, _target(cfg, attributes), cfg.eval.split, extra)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(".results.*.tmp"):  # left by a process killed while staging
        shutil.rmtree(old, ignore_errors=True)
    stage = Path(tempfile.mkdtemp(prefix=".results.", suffix=".tmp", dir=out))
    try:
        _write_parquet(records, stage / "records.parquet")
        _write_parquet(pp, stage / "per_prompt.parquet")
        atomic_write_text(stage / "per_prompt.csv", pp.to_csv(index=False))
        atomic_write_text(stage / "config.yaml", cfg.to_yaml())
        atomic_write_text(stage / "summary.json", json.dumps(summary, indent=2) + "\n")
        atomic_write_text(stage / PLAN, json.dumps(plan, indent=1) + "\n")
        if report:
            from fairdiff_ray.eval.report import write_report

            write_report(stage)
        _publish(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return summary


PLAN = "parts.json"  # the finished evaluation's parts: what identifies it
_RESULTS = ("records.parquet", "per_prompt.parquet", "per_prompt.csv", "config.yaml", "report.html", "report.md",
            "figures")


def _check_out(out: Path, plan: list[str], overwrite: bool) -> None:
    """Refuse (UserError, before anything is written) an --out holding other results, unless ``overwrite``."""
    if overwrite or not out.is_dir() or not any(out.iterdir()):
        return
    if (out / "summary.json").is_file():
        try:
            same = json.loads((out / PLAN).read_text(encoding="utf-8")) == plan
        except (OSError, ValueError):
            same = False
        if not same:
            raise UserError(f"--out {str(out)!r} holds a finished evaluation of other models, settings or prompts: "
                            "pass --overwrite (or run.overwrite=true) to replace it, or choose another --out")
    elif not (out / "parts").is_dir():
        raise UserError(f"--out {str(out)!r} exists and is not an evaluation directory: pass --overwrite (or "
                        "run.overwrite=true) to write into it anyway, or choose another --out")


def _publish(stage: Path, out: Path) -> None:
    """Move the staged results into ``out`` (renames); summary.json and parts.json last, so they only ever
    describe complete results. Results the new run does not make (a report) are removed with the old ones."""
    for name in _RESULTS:
        src, dst = stage / name, out / name
        if src.is_dir():
            swap_in_dir(src, dst)
        elif src.exists():
            os.replace(src, dst)
        elif dst.is_dir():
            shutil.rmtree(dst)
        elif dst.exists():
            dst.unlink()
    os.replace(stage / PLAN, out / PLAN)
    os.replace(stage / "summary.json", out / "summary.json")


def _target(cfg: FairDiffConfig, attributes: dict[str, list[str]]) -> Any:
    """The configured target, restricted to what the eval classifier predicts (None if nothing overlaps)."""
    from fairdiff_ray.eval.aggregate import check_target

    target = cfg.target_distribution()
    try:
        check_target(attributes, target)
    except ValueError as e:
        raise UserError(f"target vs eval.classifier: {e}") from None
    return target


def add_eval_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--adaptor", action="append", default=[], metavar="NAME=DIR",
                   help="an adaptor to evaluate against the base model (repeatable), e.g. debiased=runs/x/adaptor")
    p.add_argument("--out", default=None, help="output directory (default: <run.storage>/<run.name>/eval)")
    p.add_argument("--executor", choices=["ray", "local"], default="ray",
                   help="ray: the Ray Data pipeline (default); local: the same stages in this process")
    p.add_argument("--no-report", action="store_true", help="skip report.html / report.md")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the finished evaluation of other models or settings in --out")
    return p


def default_out(cfg: FairDiffConfig) -> Path:
    """<run.storage>/<run.name>/eval; runs/<run.name>/eval when the storage is a URI (the evaluation writes local
    files)."""
    storage = "runs" if is_uri(cfg.run.storage) else cfg.run.storage
    return Path(storage) / cfg.run.name / "eval"
