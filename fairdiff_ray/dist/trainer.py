"""Driver side of the fairness finetuning: the Ray Train V2 TorchTrainer, the export and ``run_debias``.

Run directory ``<run.storage>/<run.name>/`` (Ray Train's own run directory too): ``checkpoint_*/`` (the last
``train.num_to_keep``), ``metrics.jsonl``, ``tensorboard/``, and after the run ``adaptor/`` (the EMA
adaptor, stock-diffusers loadable) and ``finished.json``. Starting a run whose directory holds checkpoints
but no ``finished.json`` resumes it from its last checkpoint (Ray Train V2 restores by name + storage path),
or from the newest intact one before it when the last is damaged (dist.ckpt; said on the driver and in the
worker log). A finished run is refused unless ``run.overwrite=true``, which trains it afresh while the
finished run waits in ``.<run.name>.previous/`` (local storage): it is deleted when the new run has exported
its adaptor, and put back if the new run fails or is interrupted (the failed attempt is kept in
``.<run.name>.failed/``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fairdiff_ray.config import PATH_FIELDS, FairDiffConfig, load_yaml
from fairdiff_ray.errors import UserError
from fairdiff_ray.io import atomic_write_text, is_uri, swap_in_dir

FINISHED = "finished.json"


def storage_path(cfg: FairDiffConfig) -> str:
    """run.storage as Ray wants it: a URI as given, a local path made absolute."""
    s = cfg.run.storage
    return s if is_uri(s) else str(Path(s).resolve())


def remote_run_uri(cfg: FairDiffConfig) -> str:
    """<run.storage>/<run.name> for URI storage: the run's directory where Ray keeps its checkpoints."""
    return f"{cfg.run.storage.rstrip('/')}/{cfg.run.name}"


def run_dir(cfg: FairDiffConfig) -> Path:
    """The local run directory (for URI storage: a local mirror for metrics and the export)."""
    if is_uri(cfg.run.storage):
        return Path.home() / ".cache" / "fairdiff" / "runs" / cfg.run.name
    return Path(storage_path(cfg)) / cfg.run.name


def _datasets(cfg: FairDiffConfig) -> dict[str, Any]:
    from fairdiff_ray.dist.data import materialize, train_stream, val_stream

    out = {"train": materialize(train_stream(cfg))}
    if cfg.train.validate_every:
        out["val"] = materialize(val_stream(cfg, cfg.train.val_prompts))
    return out


def training_worker_env(cfg: FairDiffConfig) -> dict[str, str]:
    """Environment of the training workers. ``ray.worker_malloc_trim``: glibc's trim threshold at 0
    (MALLOC_TRIM_THRESHOLD_=0), so freed memory goes back to the OS and a CPU step's peak tracks its live tensors
    (issue 8: the checkpointed chain at T=80 peaked at 2.0 GB with glibc's default, 0.66 GB with 0) at the price
    of speed (glibc then mmaps every block over 128 KiB afresh: the demo's training step 2.3 s -> 4.2 s). Off by
    default. A MALLOC_TRIM_THRESHOLD_ the caller set is passed on either way."""
    if "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return {"MALLOC_TRIM_THRESHOLD_": os.environ["MALLOC_TRIM_THRESHOLD_"]}
    return {"MALLOC_TRIM_THRESHOLD_": "0"} if cfg.ray.worker_malloc_trim else {}


def build_trainer(cfg: FairDiffConfig, callbacks: list | None = None, run_config_overrides: dict | None = None,
                  builders: Any = None) -> Any:
    """A TorchTrainer for ``cfg``: workers run dist.worker.train_loop on the identical prompt stream.

    callbacks: extra Ray Train callbacks (e.g. Tune's TuneReportCallback); run_config_overrides: RunConfig
    fields to replace; builders: dist.worker.Builders (tests: tiny models), shipped to the workers.
    """
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from fairdiff_ray.dist.worker import train_loop

    run_kwargs: dict[str, Any] = {
        "worker_runtime_env": {"env_vars": training_worker_env(cfg)},
        "name": cfg.run.name,
        "storage_path": storage_path(cfg),
        "failure_config": FailureConfig(max_failures=cfg.ray.max_failures),
        "checkpoint_config": CheckpointConfig(num_to_keep=cfg.train.num_to_keep),
        "callbacks": list(callbacks or []),
    }
    run_kwargs.update(run_config_overrides or {})
    resources = {"CPU": cfg.ray.cpus_per_worker, **({"GPU": 1} if cfg.ray.use_gpu else {})}
    with _no_data_progress_bars():  # the datasets (and the trainer) capture the Ray Data context here
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
    from fairdiff_ray.dist.ckpt import verify_checkpoint
    from fairdiff_ray.dist.worker import CKPT_STATE, EXPORT_DIR

    if result.error is not None:
        raise RuntimeError(f"training run {cfg.run.name!r} failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training run {cfg.run.name!r} produced no checkpoint")
    out = run_dir(cfg) / EXPORT_DIR
    with result.checkpoint.as_directory() as d:
        damage = verify_checkpoint(d)
        if damage is not None:
            raise RuntimeError(f"the final checkpoint {result.checkpoint.path} is damaged ({damage}): run "
                               f"{cfg.run.name!r} again to retrain from the checkpoint before it")
        src = Path(d) / EXPORT_DIR
        state = json.loads((Path(d) / CKPT_STATE).read_text())
        if not src.is_dir() or int(state["step"]) != cfg.train.steps:
            raise RuntimeError(f"the last checkpoint of {cfg.run.name!r} is at step {state['step']} of "
                               f"{cfg.train.steps}: the run did not finish")
        tmp = out.with_name(f".{EXPORT_DIR}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
    swap_in_dir(tmp, out)
    if is_uri(cfg.run.storage):
        import pyarrow.fs as pafs

        pafs.copy_files(str(out), f"{remote_run_uri(cfg)}/{EXPORT_DIR}")
    finished = {"adaptor": str(out), "steps": cfg.train.steps, "skipped": state.get("skipped", 0),
                "recovered": state.get("recovered", []), "checkpoint": result.checkpoint.path,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write_text(run_dir(cfg) / FINISHED, json.dumps(finished, indent=2) + "\n")
    return out


# settings a resumed (or reused) run may change: where and how it runs and reports, what evaluates it, its length,
# and where its files are (paths resolve against the working directory, which `ray job submit` makes anew per job)
FREE_KEYS = ("run.", "ray.", "eval.", "train.steps", "train.log_every", "train.checkpoint_every", "train.num_to_keep",
             "data.prompt_sets", *(f"{section}.{key}" for section, key in PATH_FIELDS))


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def config_changes(cfg: FairDiffConfig, saved_yaml: Path) -> list[str]:
    """The keys (dotted) whose values differ between ``cfg`` and a run's saved config.yaml, apart from FREE_KEYS;
    [] when the file is missing (a run from before configs were saved)."""
    if not saved_yaml.is_file():
        return []
    raw = load_yaml(saved_yaml)
    try:
        then = _flat(FairDiffConfig.model_validate(raw).model_dump(mode="json"))
    except ValueError:  # a key this version no longer has: compare what is there
        then = _flat(raw)
    now = _flat(cfg.model_dump(mode="json"))
    return sorted(k for k in set(now) | set(then) if not k.startswith(FREE_KEYS) and now.get(k) != then.get(k))


def _changed_error(cfg: FairDiffConfig, changed: list[str], what: str) -> UserError:
    keys = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
    return UserError(f"run {cfg.run.name!r} {what} with other settings ({keys}): pass run.overwrite=true to train "
                     "it afresh, or choose another run.name")


def finished_adaptor(cfg: FairDiffConfig) -> Path | None:
    """The adaptor of a finished local run of ``cfg.run.name`` trained with these settings (None when the run has
    not finished); UserError when it finished with other settings."""
    d = run_dir(cfg)
    if is_uri(cfg.run.storage) or not (d / FINISHED).is_file():
        return None
    from fairdiff_ray.dist.worker import CKPT_CONFIG

    info = json.loads((d / FINISHED).read_text())
    changed = config_changes(cfg, Path(info.get("checkpoint", "")) / CKPT_CONFIG)
    if changed:
        raise _changed_error(cfg, changed, "finished")
    return Path(info["adaptor"])


def check_run_dir(cfg: FairDiffConfig) -> str:
    """'new', 'resume' or (run.overwrite, any existing run directory, finished or not) 'overwrite'; UserError for
    a finished run without run.overwrite."""
    from fairdiff_ray.dist.ckpt import SNAPSHOT

    d = run_dir(cfg)
    if (d / FINISHED).is_file() and not cfg.run.overwrite:
        raise UserError(f"run {cfg.run.name!r} in {d.parent} already finished (adaptor: {d / 'adaptor'}): "
                        "pass run.overwrite=true to train it again, or choose another run.name")
    if cfg.run.overwrite and _remote_run(cfg) is not None:
        return "overwrite"  # URI storage: Ray would resume the bucket's run even without a local mirror
    if not d.is_dir():
        return "new"
    if cfg.run.overwrite:
        return "overwrite"
    return "resume" if any(d.glob("checkpoint_*")) or (d / SNAPSHOT).exists() else "new"


def _resume_note(cfg: FairDiffConfig) -> str:
    """Which checkpoint a resume starts from; names the damaged newer ones (local storage; for URI storage the
    workers check and say so in their log)."""
    from fairdiff_ray.dist.ckpt import newest_intact

    d = run_dir(cfg)
    if is_uri(cfg.run.storage):
        return f"[fairdiff] resuming run {cfg.run.name!r} from its last intact checkpoint in {cfg.run.storage}"
    try:
        name, damaged = newest_intact(d)
    except ValueError as e:
        raise UserError(f"run {cfg.run.name!r}: {e}: delete that file to restart the run from step 0, or pass "
                        "run.overwrite=true") from None
    if damaged and name is None:
        raise UserError(f"run {cfg.run.name!r} in {d} has no intact checkpoint ("
                        f"{'; '.join(f'{n}: {r}' for n, r in damaged)}): pass run.overwrite=true to start it afresh")
    if name is not None:
        from fairdiff_ray.dist.ckpt import parse_name
        from fairdiff_ray.dist.worker import CKPT_CONFIG

        changed = config_changes(cfg, d / name / CKPT_CONFIG)
        if changed:
            raise _changed_error(cfg, changed, "was started")
        done = parse_name(name)
        if done is not None and done[0] >= cfg.train.steps:
            raise UserError(f"run {cfg.run.name!r} has a checkpoint at step {done[0]}, train.steps is "
                            f"{cfg.train.steps}: give more steps to go on, or pass run.overwrite=true")
    note = f"[fairdiff] resuming run {cfg.run.name!r} from {name or 'step 0 (no checkpoint was registered)'} in {d}"
    if damaged:
        note = (f"[fairdiff] WARNING: checkpoint {', '.join(n for n, _ in damaged)} of run {cfg.run.name!r} is damaged "
                f"({'; '.join(r for _, r in damaged)}): resuming from {name} instead\n" + note)
    return note


def _aside(cfg: FairDiffConfig, what: str) -> Path:
    d = run_dir(cfg)
    return d.with_name(f".{d.name}.{what}")


def _remote_run(cfg: FairDiffConfig) -> tuple[Any, str] | None:
    """(pyarrow filesystem, path) of the run's directory in URI storage when it exists there, else None."""
    if not is_uri(cfg.run.storage):
        return None
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(remote_run_uri(cfg))
    return (fs, path) if fs.get_file_info(path).type == pafs.FileType.Directory else None


def _set_aside_run(cfg: FairDiffConfig) -> Path | None:
    """run.overwrite: move the existing run (finished or not) out of Ray's way, so the new run cannot resume it;
    it comes back if the new run fails. URI storage: the run's directory there (Ray resumes from it) is deleted
    and the local mirror cleared; None (nothing to put back)."""
    d = run_dir(cfg)
    if is_uri(cfg.run.storage):
        remote = _remote_run(cfg)
        if remote is not None:
            remote[0].delete_dir(remote[1])
            print(f"[fairdiff] run.overwrite: deleted the previous run {remote_run_uri(cfg)}", flush=True)
        shutil.rmtree(d, ignore_errors=True)
        return None
    previous = _aside(cfg, "previous")
    shutil.rmtree(previous, ignore_errors=True)
    d.replace(previous)
    return previous


def _put_back(cfg: FairDiffConfig, previous: Path) -> None:
    d, failed = run_dir(cfg), _aside(cfg, "failed")
    shutil.rmtree(failed, ignore_errors=True)
    if d.exists():
        d.replace(failed)
    previous.replace(d)
    print(f"[fairdiff] run.overwrite: the new run of {cfg.run.name!r} did not finish; the previous run is "
          f"back in {d} (the failed attempt is in {failed})", flush=True)


def _fit(trainer: Any, cfg: FairDiffConfig) -> Any:
    """trainer.fit(), with Ctrl-C (SIGINT) surfacing as KeyboardInterrupt.

    Ray Train installs its own SIGINT handler for the fit: it aborts the run gracefully (the checkpoints
    already reported stay; running the same config again resumes) and the driver's wait then ends in
    SystemExit. The handler stays installed after the fit and would turn a later Ctrl-C (say, during an
    evaluation) into a silent exit, so the previous one is put back.
    """
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if main else None
    try:
        return trainer.fit()
    except SystemExit as e:
        raise KeyboardInterrupt(f"run {cfg.run.name!r} interrupted: run the same config again to resume") from e
    finally:
        if main and handler is not None:
            signal.signal(signal.SIGINT, handler)


@contextlib.contextmanager
def _no_data_progress_bars() -> Iterator[None]:
    """The prompt streams are consumed a few rows per step, so Ray Data's progress bar (drawn by the split
    coordinator, with the context the datasets capture when they are made) printed one line per step; the
    training's own progress line says where the run is. Restored after, for the evaluation's datasets."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    old = ctx.enable_progress_bars
    ctx.enable_progress_bars = False
    try:
        yield
    finally:
        ctx.enable_progress_bars = old


def run_debias(cfg: FairDiffConfig, builders: Any = None) -> Path:
    """Connect to Ray (ray.address, else RAY_ADDRESS, else a local cluster), fit (resuming an unfinished run
    of the same name), export the EMA adaptor to <run>/adaptor and print its path."""
    from fairdiff_ray.dist.cluster import connect
    from fairdiff_ray.dist.data import check_prompt_sets

    check_prompt_sets(cfg)
    mode = check_run_dir(cfg)
    note = _resume_note(cfg) if mode == "resume" else None  # UserErrors before Ray starts
    from fairdiff_ray.preflight import warn_ema_start

    warn_ema_start(cfg)
    connect(cfg.ray.address)
    if note:
        print(note, flush=True)
    previous = _set_aside_run(cfg) if mode == "overwrite" else None
    try:
        trainer = build_trainer(cfg, builders=builders)
        result = _fit(trainer, cfg)
        out = export_result(cfg, result)
    except BaseException:  # KeyboardInterrupt too: the previous run must come back
        if previous is not None:
            _put_back(cfg, previous)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    print(f"adaptor: {out}", flush=True)
    return out
