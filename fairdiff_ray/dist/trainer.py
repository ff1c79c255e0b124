"""Driver side of the fairness finetuning: the Ray Train V2 TorchTrainer, the export and ``run_debias``.

Run directory ``<run.storage>/<run.name>/`` (Ray Train's own run directory too): ``checkpoint_*/`` (the last
``train.num_to_keep``), ``metrics.jsonl``, ``tensorboard/``, and after the run ``adaptor/`` (the EMA
adaptor, stock-diffusers loadable) and ``finished.json``. Starting a run whose directory holds checkpoints
but no ``finished.json`` resumes it from its last checkpoint (Ray Train V2 restores by name + storage path);
a finished run is refused unless ``run.overwrite=true``, which starts it afresh.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from fairdiff_ray.config import FairDiffConfig
from fairdiff_ray.errors import UserError
from fairdiff_ray.io import atomic_write_text

FINISHED = "finished.json"


def _is_uri(path: str) -> bool:
    return "://" in path


def storage_path(cfg: FairDiffConfig) -> str:
    """run.storage as Ray wants it: a URI as given, a local path made absolute."""
    s = cfg.run.storage
    return s if _is_uri(s) else str(Path(s).resolve())


def run_dir(cfg: FairDiffConfig) -> Path:
    """The local run directory (for URI storage: a local mirror for metrics and the export)."""
    if _is_uri(cfg.run.storage):
        return Path.home() / ".cache" / "fairdiff" / "runs" / cfg.run.name
    return Path(storage_path(cfg)) / cfg.run.name


def _datasets(cfg: FairDiffConfig) -> dict[str, Any]:
    from fairdiff_ray.dist.data import materialize, train_stream, val_stream

    out = {"train": materialize(train_stream(cfg))}
    if cfg.train.validate_every:
        out["val"] = materialize(val_stream(cfg, cfg.train.val_prompts))
    return out


def build_trainer(cfg: FairDiffConfig, callbacks: list | None = None, run_config_overrides: dict | None = None,
                  builders: Any = None) -> Any:
    """A TorchTrainer for ``cfg``: workers run dist.worker.train_loop on the identical prompt stream.

    callbacks: extra Ray Train callbacks (e.g. Tune's TuneReportCallback); run_config_overrides: RunConfig
    fields to replace; builders: dist.worker.Builders (tests: tiny models), shipped to the workers.
    """
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from fairdiff_ray.dist.metrics import ProgressCallback
    from fairdiff_ray.dist.worker import train_loop

    run_kwargs: dict[str, Any] = {
        "name": cfg.run.name,
        "storage_path": storage_path(cfg),
        "failure_config": FailureConfig(max_failures=cfg.ray.max_failures),
        "checkpoint_config": CheckpointConfig(num_to_keep=cfg.train.num_to_keep),
        "callbacks": [ProgressCallback(cfg.train.log_every, cfg.train.steps), *(callbacks or [])],
    }
    run_kwargs.update(run_config_overrides or {})
    resources = {"CPU": cfg.ray.cpus_per_worker, **({"GPU": 1} if cfg.ray.use_gpu else {})}
    return TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.to_dict(), "builders": builders, "run_dir": str(run_dir(cfg))},
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(**run_kwargs),
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo",
                                 timeout_s=int(cfg.ray.worker_start_timeout_s)),
        datasets=_datasets(cfg),
        # every worker reads the whole, identical stream (METHOD.md 5: all workers on the same prompts)
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)),
    )


def export_result(cfg: FairDiffConfig, result: Any) -> Path:
    """Copy the EMA adaptor the final checkpoint holds to <run>/adaptor; write <run>/finished.json."""
    from fairdiff_ray.dist.worker import CKPT_STATE, EXPORT_DIR

    if result.error is not None:
        raise RuntimeError(f"training run {cfg.run.name!r} failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training run {cfg.run.name!r} produced no checkpoint")
    out = run_dir(cfg) / EXPORT_DIR
    with result.checkpoint.as_directory() as d:
        src = Path(d) / EXPORT_DIR
        state = json.loads((Path(d) / CKPT_STATE).read_text())
        if not src.is_dir() or int(state["step"]) != cfg.train.steps:
            raise RuntimeError(f"the last checkpoint of {cfg.run.name!r} is at step {state['step']} of "
                               f"{cfg.train.steps}: the run did not finish")
        tmp = out.with_name(f".{EXPORT_DIR}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    if _is_uri(cfg.run.storage):
        import pyarrow.fs as pafs

        pafs.copy_files(str(out), f"{cfg.run.storage.rstrip('/')}/{cfg.run.name}/{EXPORT_DIR}")
    finished = {"adaptor": str(out), "steps": cfg.train.steps, "skipped": state.get("skipped", 0),
                "checkpoint": result.checkpoint.path, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write_text(run_dir(cfg) / FINISHED, json.dumps(finished, indent=2) + "\n")
    return out


def check_run_dir(cfg: FairDiffConfig) -> str:
    """'new', 'resume' or (run.overwrite) 'overwrite'; UserError for a finished run without run.overwrite."""
    d = run_dir(cfg)
    if (d / FINISHED).is_file():
        if not cfg.run.overwrite:
            raise UserError(f"run {cfg.run.name!r} in {d.parent} already finished (adaptor: {d / 'adaptor'}): "
                            "pass run.overwrite=true to train it again, or choose another run.name")
        return "overwrite"
    return "resume" if d.is_dir() and any(d.glob("checkpoint_*")) else "new"


def run_debias(cfg: FairDiffConfig, builders: Any = None) -> Path:
    """Connect to Ray (ray.address, else RAY_ADDRESS, else a local cluster), fit (resuming an unfinished run
    of the same name), export the EMA adaptor to <run>/adaptor and print its path."""
    import ray

    from fairdiff_ray.dist.cluster import connect
    from fairdiff_ray.dist.data import check_prompt_sets

    check_prompt_sets(cfg)
    mode = check_run_dir(cfg)
    if mode == "overwrite":
        shutil.rmtree(run_dir(cfg))
    connect(cfg.ray.address)
    if mode == "resume":
        print(f"[fairdiff] resuming run {cfg.run.name!r} from its last checkpoint in {run_dir(cfg)}", flush=True)
    result = build_trainer(cfg, builders=builders).fit()
    out = export_result(cfg, result)
    print(f"adaptor: {out}", flush=True)
    return out
