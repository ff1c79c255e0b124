"""`fairdiff evaluate`: generate with the base model and adaptors, score, aggregate, report."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from fairdiff_ray.config import FairDiffConfig
from fairdiff_ray.errors import ModelFileError, UserError
from fairdiff_ray.eval.aggregate import summarize
from fairdiff_ray.eval.pipeline import BASE, generate_and_score, merge_parts
from fairdiff_ray.eval.prompts import load_eval_prompts
from fairdiff_ray.io import atomic_write_bytes, atomic_write_text

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
        if not Path(path).exists():
            raise ModelFileError(f"--adaptor {name}={path}: no such adaptor directory: pass the adaptor a debias run wrote")
        out[name] = path
    return out


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    import io

    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(path, buf.getvalue())


def run_evaluation(
    cfg: FairDiffConfig,
    adaptors: dict[str, str],
    out_dir: str | Path,
    executor: str = "ray",
    report: bool = True,
    gen_loader: Any = None,
    score_loader: Any = None,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> dict[str, Any]:
    """Evaluate ``base`` and every adaptor on ``cfg.eval.split``; write into ``out_dir``:
    parts/ (resumable), records.parquet, per_prompt.parquet, per_prompt.csv, summary.json, config.yaml and
    (``report``) report.html, report.md, figures/. Returns the summary dict."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file: give a directory")
    if not Path(cfg.model.path).exists():
        raise ModelFileError(f"model.path {cfg.model.path!r} does not exist: point it at a diffusers model directory")
    from fairdiff_ray.preflight import check_eval_inputs

    # every input checked before anything is generated or written (stand-in loaders skip their part)
    check_eval_inputs(cfg, adaptors, models=gen_loader is None, scorer=score_loader is None)
    models: dict[str, str | None] = {BASE: None, **adaptors}
    prompts = load_eval_prompts(cfg)
    t0 = time.perf_counter()
    paths = generate_and_score(cfg, models, prompts, out, executor, gen_loader, score_loader, log)
    seconds = time.perf_counter() - t0
    records, attributes = merge_parts(paths)
    extra = {"eval": {"steps": cfg.eval.steps, "guidance_scale": cfg.eval.guidance_scale,
                      "scheduler": cfg.eval.scheduler, "model_path": cfg.model.path,
                      "adaptors": dict(adaptors), "seconds": round(seconds, 2)}}
    summary, pp = summarize(records, attributes, _target(cfg, attributes), cfg.eval.split, extra)
    _write_parquet(records, out / "records.parquet")
    _write_parquet(pp, out / "per_prompt.parquet")
    atomic_write_text(out / "per_prompt.csv", pp.to_csv(index=False))
    atomic_write_text(out / "config.yaml", cfg.to_yaml())
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    if report:
        from fairdiff_ray.eval.report import write_report

        write_report(out)
    return summary


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
    return p


def default_out(cfg: FairDiffConfig) -> Path:
    return Path(cfg.run.storage) / cfg.run.name / "eval"
