"""Ray Tune driver for sweeps (Ray Train V2 pattern): each trial is a function that builds and fits its own
TorchTrainer, whose reports reach Tune through a TuneReportCallback.

Layout of ``<sweep.storage>/<sweep.name>/``: ``sweep.json`` (the sweep as started), ``tune/`` (Tune's experiment
state: what makes a second invocation resume; finished trials are not re-run, unfinished and errored ones
resume from their last checkpoint), ``trials/<trial>/`` (each trial's Ray Train run directory: checkpoints,
``metrics.jsonl``, ``adaptor/``, ``finished.json``), ``trials.parquet`` + ``trials.md``, the plots,
``best.json`` and ``best_adaptor/``.

Objective (minimised, and what ASHA stops on): ``distance + sweep.semantic_weight x drift`` from the workers'
periodic validation (``core.metrics.validation_objective``: distance of the held-out prompts' attribute
shares to the target, plus semantic drift of the images against the base model from the same noise).

Resources: a trial's own function only drives its trainer, so it reserves no CPU (1 MiB of memory: Tune needs
some resource); the trainer's worker group asks for ``ray.num_workers x ray.cpus_per_worker`` (and GPUs).
``max_concurrent_trials`` defaults to how many worker groups fit in the cluster with one CPU of head-room
for Ray Data tasks (prompt streams are materialised by each trial's driver). How long a worker group may wait
for its resources is ``ray.worker_start_timeout_s`` (Ray Train's ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``,
unless that is already set in the environment).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from fairdiff_ray.config import FairDiffConfig
from fairdiff_ray.core.metrics import validation_objective
from fairdiff_ray.errors import ConfigError
from fairdiff_ray.io import atomic_write_text
from fairdiff_ray.sweep.spec import SweepSpec, override_for

TRIAL_DRIVER_RESOURCES = {"cpu": 0, "memory": 2**20}
WORKER_GROUP_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
HEADROOM_CPUS = 1.0
SPEC_FILE = "sweep.json"  # the sweep as started: a resume must match it


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


def trial_name(trial: Any) -> str:
    """Tune trial name == trial directory name == the trial's Ray Train run name."""
    return f"trial_{trial.trial_id}"


class ObjectiveReport(TuneReportCallback):
    """TuneReportCallback that re-weights the objective as distance + weight x drift (sweep.semantic_weight),
    the distance relative to the one before training with ``relative`` (sweep.distance)."""

    def __init__(self, weight: float, relative: bool = False):
        super().__init__()
        self.weight, self.relative = weight, relative

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        super().after_report(run_context, [reweigh(metrics[0], self.weight, self.relative), *metrics[1:]],
                             checkpoint)


def reweigh(metrics: dict[str, Any], weight: float, relative: bool = False) -> dict[str, Any]:
    """A copy of a worker report with ``steps_done`` (ASHA's clock: survives a resumed run, unlike Tune's
    training_iteration) and, once validated, objective = distance + weight x drift; with ``relative`` the
    distance is divided by ``distance_start`` (the validation before the first step; floored at 0.01 so a
    trial that starts on its target does not divide by ~0)."""
    m = dict(metrics)
    if "step" in m:
        m["steps_done"] = int(m["step"]) + 1
    if m.get("distance") is not None and m.get("drift") is not None:
        d = m["distance"]
        if relative:
            if m.get("distance_start") is None:
                raise ValueError("sweep.distance is relative but the report has no distance_start (the validation "
                                 "before the first step)")
            d = d / max(float(m["distance_start"]), 0.01)
        m["objective"] = validation_objective(d, m["drift"], weight)
    return m


def finalize_run(run: Path, steps: int) -> bool:
    """True when the trial's training finished; exports its adaptor if the trial stopped before doing so.

    The last checkpoint (``checkpoint_<steps>[-<attempt>]``, intact) already holds the exported EMA adaptor, so a trial whose actor
    was stopped after its final report (by Tune, or an interruption) is completed here from that checkpoint,
    the way dist.trainer.export_result would have (``<run>/adaptor`` + ``finished.json``)."""
    from fairdiff_ray.dist.ckpt import checkpoint_for_step
    from fairdiff_ray.dist.trainer import FINISHED
    from fairdiff_ray.dist.worker import CKPT_STATE, EXPORT_DIR

    if (run / FINISHED).is_file():
        return True
    ckpt = checkpoint_for_step(run, steps)  # intact (manifests match), also after a fall-back re-save
    if ckpt is None or not (ckpt / EXPORT_DIR).is_dir():
        return False
    state = json.loads((ckpt / CKPT_STATE).read_text())
    tmp = run / f".{EXPORT_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(ckpt / EXPORT_DIR, tmp)
    shutil.rmtree(run / EXPORT_DIR, ignore_errors=True)
    tmp.replace(run / EXPORT_DIR)
    finished = {"adaptor": str(run / EXPORT_DIR), "steps": steps, "skipped": state.get("skipped", 0),
                "checkpoint": str(ckpt), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "exported_by": "sweep"}
    atomic_write_text(run / FINISHED, json.dumps(finished, indent=2) + "\n")
    return True


def _trial_fn(config: dict[str, Any]) -> None:
    """One Tune trial: build this trial's run config and fit its own TorchTrainer (reports flow to Tune).

    A trial whose training already finished (Tune stopped or lost it after the last checkpoint) reports its
    final metrics again instead of training; an unfinished run resumes from its last checkpoint (Ray Train V2
    restores by run name + storage path)."""
    from ray import tune

    from fairdiff_ray.dist.metrics import read_metrics
    from fairdiff_ray.dist.trainer import build_trainer, export_result, run_dir

    spec = SweepSpec.model_validate_json(config["__spec"])
    cfg = trial_config(spec, config, tune.get_context().get_trial_name(), Path(config["__sweep_dir"]))
    if finalize_run(run_dir(cfg), cfg.train.steps):
        tune.report(reweigh(read_metrics(run_dir(cfg))[-1], spec.semantic_weight, spec.relative_distance))
        return
    os.environ.setdefault(WORKER_GROUP_START_TIMEOUT_ENV, str(cfg.ray.worker_start_timeout_s))
    trainer = build_trainer(cfg, callbacks=[ObjectiveReport(spec.semantic_weight, spec.relative_distance)])
    export_result(cfg, trainer.fit())


def max_concurrent(spec: SweepSpec, cfg: FairDiffConfig, resources: dict[str, float]) -> int:
    """sweep.max_concurrent_trials, else the number of worker groups that fit beside HEADROOM_CPUS."""
    need_cpu = cfg.ray.num_workers * cfg.ray.cpus_per_worker
    cpus = resources.get("CPU", 0.0)
    if need_cpu > cpus:
        raise ConfigError(f"one trial needs ray.num_workers x ray.cpus_per_worker = {need_cpu:g} CPUs but the Ray "
                          f"cluster has {cpus:g}: lower ray.cpus_per_worker or ray.num_workers in sweep.overrides")
    if cfg.ray.use_gpu and cfg.ray.num_workers > resources.get("GPU", 0.0):
        raise ConfigError(f"one trial needs {cfg.ray.num_workers} GPUs (ray.num_workers with ray.use_gpu) but the "
                          f"Ray cluster has {resources.get('GPU', 0.0):g}: lower ray.num_workers")
    if spec.max_concurrent_trials:
        return spec.max_concurrent_trials
    spare = cpus - HEADROOM_CPUS if cpus - HEADROOM_CPUS >= need_cpu else cpus
    fits = math.floor(spare / need_cpu)
    if cfg.ray.use_gpu:
        fits = min(fits, math.floor(resources.get("GPU", 0.0) / cfg.ray.num_workers))
    return max(1, fits)


def asha_scheduler(spec: SweepSpec, base: FairDiffConfig) -> Any:
    """ASHA on the objective, clocked by steps_done; None without sweep.asha.

    stop_last_trials=False: ASHA would otherwise stop every trial at its final report (steps_done == max_t),
    before the trial exports its adaptor."""
    from ray.tune.schedulers import ASHAScheduler

    if spec.asha is None:
        return None
    return ASHAScheduler(time_attr="steps_done", grace_period=spec.asha.grace_period,
                         reduction_factor=spec.asha.reduction_factor, max_t=base.train.steps, stop_last_trials=False)


def _tuner(spec: SweepSpec, base: FairDiffConfig, sweep_dir: Path, trainable: Any, limit: int) -> Any:
    from ray import tune

    space = {**param_space(spec), "__spec": spec.model_dump_json(), "__sweep_dir": str(sweep_dir)}
    if spec.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg: Any = OptunaSearch(seed=spec.seed)
        tune_limit: int | None = limit  # Tune wraps a Searcher in a ConcurrencyLimiter
    else:
        from ray.tune.search import BasicVariantGenerator

        # Tune ignores max_concurrent_trials when handed a BasicVariantGenerator: the limit goes in here
        search_alg, tune_limit = BasicVariantGenerator(max_concurrent=limit, random_state=spec.seed), None
    scheduler = asha_scheduler(spec, base)
    print(f"[sweep] {spec.search} search, at most {limit} trials at a time", flush=True)
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric="objective", mode="min", search_alg=search_alg, scheduler=scheduler,
            num_samples=spec.num_samples, trial_name_creator=trial_name, trial_dirname_creator=trial_name,
            # Reusing a trial's driver process for the next trial saves its start-up (imports, Ray Data set-up),
            # but only when no scheduler stops trials: a reused actor keeps a stopped trial's trainer running,
            # blocked on Tune's report queue, and the sweep stalls.
            reuse_actors=scheduler is None,
            max_concurrent_trials=tune_limit,
        ),
        run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir), verbose=1),
    )


def run_sweep(spec: SweepSpec) -> Path:
    """Run (or resume) the sweep; write the table, plots and the best trial's adaptor into the sweep dir.

    Raises RuntimeError (after writing the table) when no trial finished."""
    import ray
    from ray import tune

    from fairdiff_ray.dist.cluster import connect
    from fairdiff_ray.dist.data import check_prompt_sets
    from fairdiff_ray.sweep.results import write_plots, write_table

    sweep_dir = (Path(spec.storage) / spec.name).resolve()
    base = spec.base_config()
    check_prompt_sets(base)
    connect(base.ray.address)  # dist.cluster's rule: never a stale cluster recorded in /tmp/ray
    limit = max_concurrent(spec, base, ray.cluster_resources())  # before anything is written
    # Trials read the model and prompt files by the paths the configs give (relative to where the sweep was
    # started); they write only under the sweep directory, so Tune must not move them into their trial dirs.
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    trainable = tune.with_resources(_trial_fn, TRIAL_DRIVER_RESOURCES)
    exp_dir = sweep_dir / "tune"
    if tune.Tuner.can_restore(str(exp_dir)):
        _check_same_sweep(spec, sweep_dir)
        print(f"[sweep] resuming {exp_dir}: finished trials are not re-run", flush=True)
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_errored=True)
    else:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(sweep_dir / SPEC_FILE, spec.model_dump_json(indent=1) + "\n")
        tuner = _tuner(spec, base, sweep_dir, trainable, limit)
    grid = tuner.fit()
    df = write_table(collect_rows(spec, grid, sweep_dir), sweep_dir)
    write_plots(df, sweep_dir)
    best = export_best(df, sweep_dir)
    counts = df["status"].value_counts().to_dict()
    print(f"[sweep] {len(df)} trials {counts} -> {sweep_dir / 'trials.md'}; best adaptor: {best}", flush=True)
    if best is None:
        raise RuntimeError(f"no trial of sweep {spec.name!r} finished ({counts}): see the error files under "
                           f"{sweep_dir / 'tune'} and run the sweep again to resume")
    return sweep_dir


def _check_same_sweep(spec: SweepSpec, sweep_dir: Path) -> None:
    """Resuming replays the stored search space, so the sweep file must be the one the sweep started with
    (sweep.max_concurrent_trials aside)."""
    try:
        old = SweepSpec.model_validate_json((sweep_dir / SPEC_FILE).read_text())
    except (OSError, ValueError):
        return  # started before sweep.json existed: nothing to compare against
    keep = {"max_concurrent_trials"}
    a, b = old.model_dump(exclude=keep), spec.model_dump(exclude=keep)
    diff = sorted(k for k in a if a[k] != b[k])
    if diff:
        raise ConfigError(f"sweep {spec.name!r} in {sweep_dir} was started with different sweep.{', sweep.'.join(diff)}: "
                          "resume it with the same sweep file, or give the new sweep another sweep.name")


def collect_rows(spec: SweepSpec, grid: Any, sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per trial: swept values (cfg:<path>), adaptor kind and rank, requested shares of every target
    attribute (want/<attr>/<class>, uniform ones too: a sweep may request 0.5 against a base model's 0.17),
    shares at the first validation (first/..., before the first step) and the final metrics."""
    from fairdiff_ray.dist.metrics import read_metrics

    rows: list[dict[str, Any]] = []
    for r in grid:
        params = {k: v for k, v in (r.config or {}).items() if not k.startswith("__")}
        name = Path(r.path).name
        run = sweep_dir / "trials" / name
        cfg = spec.base_config(trial_overrides(spec, params)) if len(params) == len(spec.space) else spec.base_config()
        status = "OK" if finalize_run(run, cfg.train.steps) else "ERROR" if r.error else "STOPPED"
        row: dict[str, Any] = {"trial": name, "status": status}
        for i, path in enumerate(spec.space):
            row[f"cfg:{path}"] = params.get(f"p{i}")
        row.update({"kind": cfg.adaptor.kind, "rank": cfg.adaptor.rank})
        target = cfg.target_distribution()
        for attr, classes in target.attributes.items():
            row.update({f"want/{attr}/{c}": float(p) for c, p in zip(classes, target.marginal(attr).tolist())})
        first = next((m for m in read_metrics(run) if any(k.startswith("freq/") for k in m)), {})
        row.update({f"first/{k.removeprefix('freq/')}": v for k, v in first.items() if k.startswith("freq/")})
        for k, v in reweigh(r.metrics or {}, spec.semantic_weight, spec.relative_distance).items():
            if k in ("objective", "distance", "distance_start", "drift", "steps_done") or k.startswith(
                    ("bias/", "freq/", "loss/")):
                row[k] = v
        row["adaptor"] = str(run / "adaptor")
        rows.append(row)
    return rows


def export_best(df: Any, sweep_dir: Path) -> Path | None:
    """Copy the best finished trial's adaptor to <sweep>/best_adaptor and describe it in best.json."""
    if "objective" not in df:
        return None
    ok = df[(df["status"] == "OK") & df["objective"].notna()]
    if ok.empty:
        return None
    best = ok.iloc[0]
    dst = sweep_dir / "best_adaptor"
    tmp = sweep_dir / ".best_adaptor.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(Path(best["adaptor"]), tmp)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.replace(dst)
    info = {k: (v.item() if hasattr(v, "item") else v) for k, v in best.to_dict().items()}
    atomic_write_text(sweep_dir / "best.json", json.dumps(info, indent=2, default=str) + "\n")
    return dst
