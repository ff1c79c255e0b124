"""The embedded default end to end: debias the synthetic Stable Diffusion, evaluate base vs debiased on the
held-out occupations with the eval-time classifier, print a before/after table and write a report.

    make demo            (= python jobs/demo.py --config configs/synthetic_gender.yaml)

Everything lands in ``<run.storage>/<run.name>`` (``runs/demo`` by default): ``adaptor/`` (diffusers-loadable),
``eval/summary.json``, ``eval/report.html`` (also linked as ``report.html``), checkpoints and ``metrics.jsonl``.
Running it again reuses the finished training run and the finished evaluation parts.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from fairdiff_ray.config import FairDiffConfig
from fairdiff_ray.eval.aggregate import uncertain_attributes
from fairdiff_ray.io import atomic_write_text

DEBIASED = "debiased"


def _fmt(v: float | None) -> str:
    return "   -  " if v is None else f"{v:6.3f}"


def before_after_table(summary: dict[str, Any]) -> str:
    """Markdown table: one row per model; bias per attribute (mean +- std), face rate, the share of uncertain
    (in-between) images of each aligned attribute, semantics."""
    models = summary["models"]
    attrs = list(next(iter(models.values()))["bias"])
    sems = sorted({k for m in models.values() for k in m.get("semantics", {})})
    unc = uncertain_attributes(summary)
    head = ["model", *[f"bias {a}" for a in attrs], "face rate", *[f"uncertain {a}" for a in unc], *sems]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in models.items():
        cells = [name]
        for a in attrs:
            b = m["bias"][a]
            cells.append("-" if b["mean"] is None else f"{b['mean']:.3f} ± {b['std']:.3f}")
        cells.append("-" if m["face_rate"] is None else f"{m['face_rate']:.3f}")
        cells += [_fmt(m["uncertain"][a]).strip() for a in unc]
        cells += [_fmt(m.get("semantics", {}).get(s)).strip() for s in sems]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_demo(cfg: FairDiffConfig, log: Any = None) -> dict[str, Any]:
    """Train (or reuse) the adaptor, evaluate base and debiased, write the report; returns summary.json's dict."""
    from fairdiff_ray.dist.trainer import finished_adaptor, run_debias
    from fairdiff_ray.eval.run import run_evaluation
    from fairdiff_ray.preflight import check_debias_inputs

    check_debias_inputs(cfg)  # one-line errors before any cluster starts

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    run_dir = Path(cfg.run.storage) / cfg.run.name
    t0 = time.perf_counter()
    reuse = None if cfg.run.overwrite else finished_adaptor(cfg)  # UserError: finished with other settings
    if reuse is not None:
        log(f"[demo] 1/2 run {cfg.run.name!r} already finished with these settings: reusing {reuse} "
            "(run.overwrite=true trains it again)")
        adaptor = reuse
    else:
        log(f"[demo] 1/2 debiasing {cfg.model.path} ({cfg.adaptor.kind}, {cfg.train.steps} steps) -> {run_dir}")
        adaptor = run_debias(cfg)
    t1 = time.perf_counter()
    log(f"[demo] 2/2 evaluating base vs debiased on the {cfg.eval.split} prompts -> {run_dir / 'eval'}")
    summary = run_evaluation(cfg, {DEBIASED: str(adaptor)}, run_dir / "eval", executor="ray", report=True, log=log)
    t2 = time.perf_counter()
    report = run_dir / "eval" / "report.html"
    link = run_dir / "report.html"
    if report.is_file():
        # a tiny redirect page, so the report's relative figure paths keep working
        atomic_write_text(link, '<meta http-equiv="refresh" content="0; url=eval/report.html">'
                                '<a href="eval/report.html">report</a>\n')
    timing = {"train_s": round(t1 - t0, 1), "eval_s": round(t2 - t1, 1), "total_s": round(t2 - t0, 1)}
    atomic_write_text(run_dir / "demo.json", json.dumps({"timing": timing, "adaptor": str(adaptor),
                                                            "reused_adaptor": reuse is not None}, indent=2) + "\n")
    print(before_after_table(summary))
    print(f"\nadaptor: {adaptor}\nsummary: {run_dir / 'eval' / 'summary.json'}\nreport:  {report}\n"
          f"time: train {timing['train_s']} s, eval {timing['eval_s']} s")
    return summary
