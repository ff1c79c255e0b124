"""Ray Tune driver for sweeps (Train V2 pattern): each trial is a function that builds and fits its own
TorchTrainer, whose reports reach Tune through TuneReportCallback.

Resources: a trial's own function needs almost nothing (it only drives the trainer); the trainer's worker group asks
for ``ray.num_workers x cpus_per_worker`` (and GPUs). ``max_concurrent_trials`` defaults to how many worker groups
fit in the cluster at once, minus one worker group of head-room when that leaves at least one, so worker groups of
running trials are never starved by trial drivers.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from fairdiff_ray.config import FairDiffConfig
from fairdiff_ray.io import atomic_write_text
from fairdiff_ray.sweep.spec import SweepSpec, override_for

TRIAL_DRIVER_CPUS = 0.01


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """Tune search space keyed p0, p1, ... (config paths may contain characters Tune treats specially)."""
    from ray import tune

    out: dict[str, Any] = {}
    for i, (_, dom) in enumerate(spec.space.items()):
        kind = dom.kind
        if kind == "grid":
            out[f"p{i}"] = tune.grid_search(dom.values)
        elif kind == "choice":
            out[f"p{i}"] = tune.choice(dom.values)
        elif kind == "uniform":
            out[f"p{i}"] = tune.uniform(*dom.uniform)  # type: ignore[misc]
        elif kind == "loguniform":
            out[f"p{i}"] = tune.loguniform(*dom.loguniform)  # type: ignore[misc]
        else:
            out[f"p{i}"] = tune.randint(dom.randint[0], dom.randint[1] + 1)  # type: ignore[index]
    return out


def trial_overrides(spec: SweepSpec, params: dict[str, Any]) -> list[str]:
    return [override_for(path, params[f"p{i}"]) for i, path in enumerate(spec.space)]


def trial_config(spec: SweepSpec, params: dict[str, Any], trial_name: str, sweep_dir: Path) -> FairDiffConfig:
    extra = [*trial_overrides(spec, params), f"run.name={trial_name}", f"run.storage={sweep_dir / 'trials'}"]
    return spec.base_config(extra)


def _trial_fn(config: dict[str, Any]) -> None:
    """One Tune trial: build this trial's run config and fit its own TorchTrainer (reports flow to Tune)."""
    from fairdiff_ray.dist.trainer import build_trainer, export_result
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    spec = SweepSpec.model_validate(config["__spec"])
    sweep_dir = Path(config["__sweep_dir"])
    name = tune.get_context().get_trial_name()
    cfg = trial_config(spec, config, name, sweep_dir)
    trainer = build_trainer(cfg, callbacks=[TuneReportCallback()])
    result = trainer.fit()
    export_result(cfg, result)


def max_concurrent(spec: SweepSpec, cfg: FairDiffConfig, resources: dict[str, float]) -> int:
    if spec.max_concurrent_trials:
        return spec.max_concurrent_trials
    need_cpu = cfg.ray.num_workers * cfg.ray.cpus_per_worker
    fits = math.floor(resources.get("CPU", 1) / need_cpu)
    if cfg.ray.use_gpu:
        fits = min(fits, math.floor(resources.get("GPU", 0) / cfg.ray.num_workers))
    return max(1, fits - 1 if fits > 2 else fits)


def run_sweep(spec: SweepSpec) -> Path:
    """Run (or resume) the sweep; write the table, plots and the best trial's adaptor into the sweep dir."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from fairdiff_ray.dist.cluster import connect
    from fairdiff_ray.sweep.results import write_plots, write_table

    sweep_dir = (Path(spec.storage) / spec.name).resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    base = spec.base_config()
    connect(base.ray.address)
    trainable = tune.with_resources(_trial_fn, {"cpu": TRIAL_DRIVER_CPUS})
    exp_dir = sweep_dir / "tune"
    if tune.Tuner.can_restore(str(exp_dir)):
        print(f"[sweep] resuming {exp_dir} (finished trials are not re-run)", flush=True)
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_errored=True)
    else:
        space = {**param_space(spec), "__spec": spec.model_dump(mode="json"), "__sweep_dir": str(sweep_dir)}
        search_alg = None
        if spec.search == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            search_alg = OptunaSearch(seed=spec.seed)
        scheduler = (ASHAScheduler(time_attr="training_iteration", grace_period=spec.asha.grace_period,
                                   reduction_factor=spec.asha.reduction_factor, max_t=base.train.steps)
                     if spec.asha else None)
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric="objective", mode="min", search_alg=search_alg, scheduler=scheduler,
                num_samples=spec.num_samples,
                max_concurrent_trials=max_concurrent(spec, base, ray.cluster_resources()),
            ),
            run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir), verbose=1),
        )
    grid = tuner.fit()
    rows, requested = collect_rows(spec, grid)
    df = write_table(rows, sweep_dir)
    write_plots(df, sweep_dir, requested)
    export_best(df, sweep_dir)
    print(f"[sweep] {len(rows)} trials -> {sweep_dir / 'trials.md'}", flush=True)
    return sweep_dir


def collect_rows(spec: SweepSpec, grid: Any) -> tuple[list[dict[str, Any]], dict[int, dict[str, float]]]:
    rows: list[dict[str, Any]] = []
    requested: dict[int, dict[str, float]] = {}
    for r in grid:
        cfg_params = {k: v for k, v in (r.config or {}).items() if not k.startswith("__")}
        row: dict[str, Any] = {"trial": Path(r.path).name, "status": "ERROR" if r.error else "OK"}
        for i, path in enumerate(spec.space):
            row[f"cfg:{path}"] = cfg_params.get(f"p{i}")
        metrics = r.metrics or {}
        for k, v in metrics.items():
            if k in ("objective", "drift") or k.startswith(("bias/", "freq/", "loss/")):
                row[k] = v
        row["adaptor"] = str(Path(spec.storage).resolve() / spec.name / "trials" / row["trial"] / "adaptor")
        # requested shares of non-uniform targets, for the achieved-vs-requested plot
        for i, path in enumerate(spec.space):
            if path.startswith("target.") and path.endswith(".probs"):
                attr = path.split(".")[1]
                base = spec.base_config([override_for(path, cfg_params.get(f"p{i}"))])
                classes = base.target_distribution().attributes[attr]
                requested.setdefault(len(rows), {}).update(
                    {f"{attr}/{c}": float(p) for c, p in zip(classes, cfg_params.get(f"p{i}"))})
        rows.append(row)
    return rows, requested


def export_best(df: Any, sweep_dir: Path) -> Path | None:
    ok = df[(df["status"] == "OK") & df.get("objective", df["status"]).notna()] if "objective" in df else df.iloc[0:0]
    if ok.empty:
        return None
    best = ok.iloc[0]
    src = Path(best["adaptor"])
    dst = sweep_dir / "best_adaptor"
    if src.is_dir():
        tmp = sweep_dir / ".best_adaptor.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        shutil.rmtree(dst, ignore_errors=True)
        tmp.replace(dst)
    atomic_write_text(sweep_dir / "best.json", json.dumps({k: (v if not hasattr(v, "item") else v.item())
                                                          for k, v in best.to_dict().items()}, indent=2, default=str))
    return dst
