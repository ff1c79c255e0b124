"""The evaluation pipeline: plan resumable parts, run the Ray Data stages, merge the parts into records.

Work is cut into parts, one per (model, chunk of ``eval.prompts_per_part`` prompts), each a parquet file
written atomically (temp + rename) as soon as all its rows have come back. A part's path carries a
fingerprint of everything that determines its content (model files, adaptor files, sampler and scorer
settings, the chunk's prompts, M), so a rerun reuses finished parts and recomputes only what is missing or
stale. Ray Data: prompts -> GenerateImages actors (ActorPoolStrategy) -> ScoreImages actor -> driver.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fairdiff_ray.config import SHIPPED_FEATURES, FairDiffConfig
from fairdiff_ray.core.seeding import stable_seed
from fairdiff_ray.eval.prompts import EvalPrompt
from fairdiff_ray.eval.records import sem_col, similarity_metric
from fairdiff_ray.eval.stages import GenerateImages, ScoreImages
from fairdiff_ray.io import atomic_write_bytes

BASE = "base"


def _dir_identity(path: str | None) -> list[Any]:
    """(relative path, size, mtime) of every file under a model / adaptor directory: cheap and changes
    whenever the weights are rewritten."""
    if path is None:
        return []
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return [[str(p.relative_to(root)) if p != root else p.name, p.stat().st_size, p.stat().st_mtime_ns]
            for p in files]


def _digest(obj: Any, n: int = 12) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def eval_spec(cfg: FairDiffConfig, models: dict[str, str | None]) -> dict[str, Any]:
    """Everything the stages need, as plain JSON-able data (workers read only this)."""
    ev = cfg.eval
    return {
        "models": dict(models),
        "model_path": cfg.model.path,
        "dtype": ev.dtype or cfg.model.dtype,
        "device": cfg.model.device,
        "scheduler": ev.scheduler,
        "steps": ev.steps,
        "guidance_scale": ev.guidance_scale,
        "grid_images": ev.grid_images,
        "faces": cfg.faces.model_dump(mode="json"),
        "classifier": ev.classifier.model_dump(mode="json"),
        "features": (ev.features or cfg.features).model_dump(mode="json"),
        "fidelity": cfg.faces.detector == "synthetic",  # the synthetic world ships a prompt-fidelity net
    }


@dataclass(frozen=True)
class Part:
    model: str
    prompts: tuple[EvalPrompt, ...]
    path: Path

    def rows(self, m: int) -> list[dict[str, Any]]:
        return [{"model": self.model, "concept": p.concept, "prompt": p.prompt, "j": j,
                 "seed": stable_seed(p.prompt, j), "part": str(self.path)}
                for p in self.prompts for j in range(m)]


def _scorer_dirs(spec: dict[str, Any]) -> dict[str, str]:
    """The weight files or directories of every scorer ``spec`` names (face detector, classifier and its backbone,
    feature nets, the synthetic world's prompt-fidelity net): the shipped synthetic nets where a synthetic scorer
    names no path of its own."""
    from fairdiff_ray.synthetic.world import DEFAULT_DIR

    faces, clf, feats = spec["faces"], spec["classifier"], spec["features"]
    dirs = {"detector": faces["path"] or (str(DEFAULT_DIR) if faces["detector"] == "synthetic" else None),
            "insightface": faces.get("insightface_pack"),
            "classifier": clf["path"] or (str(DEFAULT_DIR) if clf["kind"] == "synthetic" else None),
            "backbone": clf.get("backbone"),
            "fidelity": str(DEFAULT_DIR) if spec["fidelity"] else None}
    for k, v in feats.items():
        dirs[f"features.{k}"] = str(DEFAULT_DIR) if (k == "synthetic" and v in SHIPPED_FEATURES) else v
    return {k: v for k, v in dirs.items() if v}


def plan_parts(spec: dict[str, Any], prompts: list[EvalPrompt], m: int, per_part: int, root: Path) -> list[Part]:
    """Model-major list of parts under ``root/parts/<model>/<fingerprint>/``. The fingerprint holds the files
    (name, size, mtime) of the model, the adaptor and every scorer: a net retrained in place (``jobs/
    train_synthetic_nets.py --only``, new classifier heads in the same directory) makes new parts instead of
    reusing the old net's labels."""
    shared = {k: v for k, v in spec.items() if k != "models"}
    shared["model_files"] = _dir_identity(spec["model_path"])
    shared["scorer_files"] = {k: _dir_identity(v) for k, v in _scorer_dirs(spec).items()}
    parts = []
    for name, adaptor in spec["models"].items():
        fp = _digest({**shared, "adaptor": adaptor, "adaptor_files": _dir_identity(adaptor)})
        for i in range(0, len(prompts), per_part):
            chunk = tuple(prompts[i: i + per_part])
            key = _digest([[p.concept, p.prompt] for p in chunk] + [m])
            parts.append(Part(name, chunk, root / "parts" / name / fp / f"chunk-{i // per_part:04d}-{key}.parquet"))
    return parts


def plan_for(cfg: FairDiffConfig, models: dict[str, str | None], prompts: list[EvalPrompt], out_dir: Path) -> list[Part]:
    """The parts an evaluation of ``models`` on ``prompts`` with ``cfg`` consists of (nothing is written)."""
    return plan_parts(eval_spec(cfg, models), prompts, cfg.eval.images_per_prompt, cfg.eval.prompts_per_part,
                      out_dir)


def _write_part(path: Path, rows: list[dict[str, Any]]) -> None:
    rows = sorted(rows, key=lambda r: (r["concept"], r["prompt"], r["j"]))
    for r in rows:
        r.pop("part", None)
    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    atomic_write_bytes(path, buf.getvalue().to_pybytes())


def _batch_rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    cols = {k: (v.tolist() if isinstance(v, np.ndarray) and v.dtype != object else list(v)) for k, v in batch.items()}
    n = len(next(iter(cols.values())))
    return [{k: cols[k][i] for k in cols} for i in range(n)]


class _Collector:
    """Buffers scored rows per part; writes a part the moment it is complete and reports progress.

    Rows are keyed by (concept, prompt, j) within their part, so a batch delivered twice (a task retried after its
    actor died mid-stream) cannot duplicate or overflow a part; rows of an already written part are dropped.
    """

    def __init__(self, pending: list[Part], m: int, log: Callable[[str], None]):
        self.expected = {str(p.path): len(p.prompts) * m for p in pending}
        self.names = {str(p.path): f"{p.model}/{p.path.name}" for p in pending}
        self.buf: dict[str, dict[tuple[str, str, int], dict[str, Any]]] = {k: {} for k in self.expected}
        self.done, self.images, self.t0, self.log = 0, 0, time.perf_counter(), log

    def add(self, batch: dict[str, np.ndarray]) -> None:
        for row in _batch_rows(batch):
            key = row["part"]
            if key not in self.buf:
                continue  # a repeat of a part already written
            ident = (row["concept"], row["prompt"], int(row["j"]))  # one text may be a prompt of two concepts
            if ident in self.buf[key]:
                continue
            self.buf[key][ident] = row
            self.images += 1
            if len(self.buf[key]) == self.expected[key]:
                _write_part(Path(key), list(self.buf.pop(key).values()))
                self.done += 1
                rate = self.images / max(time.perf_counter() - self.t0, 1e-9)
                self.log(f"[evaluate] part {self.done}/{len(self.expected)} done: {self.names[key]} "
                         f"({self.images} images, {rate:.2f} images/s)")


def run_local(rows: list[dict[str, Any]], spec: dict[str, Any], batch_size: int, sink: _Collector,
              gen_loader: Any = None, score_loader: Any = None) -> None:
    """The same stages in this process, one batch at a time (small runs, tests, debugging)."""
    gen, score = GenerateImages(spec, gen_loader), ScoreImages(spec, score_loader)
    for i in range(0, len(rows), batch_size):
        chunk = rows[i: i + batch_size]
        batch = {k: np.array([r[k] for r in chunk], dtype=object if k in ("prompt", "concept", "model", "part")
                             else None) for k in chunk[0]}
        sink.add(score(gen(batch)))


# An actor that dies (OOM, a lost node, a killed process) is restarted and its batches are run again, a few
# times: Ray Data's own default retries forever, which turns a deterministic crash into a hang.
ACTOR_RESTARTS = 3
TASK_RETRIES = 3


def _retry_args(map_batches: Callable[..., Any]) -> dict[str, int]:
    """max_restarts / max_task_retries for map_batches while it still takes them as ``**ray_remote_args``.

    Ray 2.60 warns that ``**ray_remote_args`` goes away in Ray 2.64, and its named replacements (label_selector,
    resources, runtime_env, ...) include no restart or retry bound. So: passed, with that one warning silenced
    (at the call, see run_ray), while the signature accepts them; once it does not, Ray Data's own defaults
    apply (unbounded restarts and retries) rather than a TypeError."""
    import inspect

    takes_extra = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(map_batches).parameters.values())
    return {"max_restarts": ACTOR_RESTARTS, "max_task_retries": TASK_RETRIES} if takes_extra else {}


def run_ray(rows: list[dict[str, Any]], spec: dict[str, Any], cfg: FairDiffConfig, sink: _Collector,
            gen_loader: Any = None, score_loader: Any = None) -> None:
    """Ray Data: generation actors -> scoring actor -> streamed to the driver, which writes parts. Actors are
    restarted (``ACTOR_RESTARTS``) and their batches retried (``TASK_RETRIES``) after a crash; images depend
    only on (model, prompt, seed), so a retried batch gives the same rows."""
    import ray
    import ray.data

    from fairdiff_ray.dist.cluster import connect

    connect(cfg.ray.address, log_to_driver=False)
    ev = cfg.eval
    blocks = max(1, min(len(rows) // ev.batch_size, 200))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    retry = _retry_args(ray.data.Dataset.map_batches)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*ray_remote_args.* is deprecated")
        ds = ds.map_batches(
            GenerateImages, fn_constructor_kwargs={"spec": spec, "loader": gen_loader},
            batch_size=ev.batch_size, compute=ray.data.ActorPoolStrategy(size=ev.num_actors),
            num_cpus=ev.cpus_per_actor, num_gpus=ev.gpus_per_actor or None, **retry,
        )
        ds = ds.map_batches(
            ScoreImages, fn_constructor_kwargs={"spec": spec, "loader": score_loader},
            batch_size=ev.batch_size, compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=ev.cpus_per_actor, num_gpus=ev.gpus_per_actor or None, **retry,
        )
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        sink.add(batch)


def generate_and_score(
    cfg: FairDiffConfig,
    models: dict[str, str | None],
    prompts: list[EvalPrompt],
    out_dir: Path,
    executor: str = "ray",
    gen_loader: Any = None,
    score_loader: Any = None,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> list[Path]:
    """Make sure every part of the plan exists (reusing finished ones); returns all part paths in order."""
    spec = eval_spec(cfg, models)
    m = cfg.eval.images_per_prompt
    parts = plan_for(cfg, models, prompts, out_dir)
    pending = [p for p in parts if not p.path.is_file()]
    log(f"[evaluate] {len(prompts)} prompts x {m} images x {len(models)} models: "
        f"{len(parts) - len(pending)}/{len(parts)} parts already done")
    if pending:
        rows = [r for p in pending for r in p.rows(m)]
        sink = _Collector(pending, m, log)
        if executor == "local":
            run_local(rows, spec, cfg.eval.batch_size, sink, gen_loader, score_loader)
        else:
            run_ray(rows, spec, cfg, sink, gen_loader, score_loader)
        missing = [p for p in pending if not p.path.is_file()]
        if missing:
            raise RuntimeError(f"{len(missing)} evaluation parts did not complete (first: {missing[0].path})")
    return [p.path for p in parts]


def merge_parts(paths: list[Path]) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """All parts -> one per-image table with ``sem_<metric>`` similarities to the base image of the same
    (prompt, j), NaN on the base model's own rows (the reference compared with itself is no measurement);
    returns it and the eval classifier's attributes. ``emb_*`` columns are dropped."""
    df = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
    attributes = json.loads(df["attributes"].iloc[0])
    df = df.drop(columns=["attributes"])
    key = ["concept", "prompt", "j"]
    for col in [c for c in df.columns if c.startswith("emb_")]:
        emb = np.stack(df[col].to_numpy()).astype(np.float64)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True).clip(min=1e-12)
        base_idx = pd.Series(np.flatnonzero(df["model"].to_numpy() == BASE),
                             index=pd.MultiIndex.from_frame(df.loc[df["model"] == BASE, key]))
        ref = base_idx.reindex(pd.MultiIndex.from_frame(df[key])).to_numpy()
        sim = np.full(len(df), np.nan)
        ok = ~np.isnan(ref) & (df["model"].to_numpy() != BASE)
        sim[ok] = np.einsum("nd,nd->n", emb[ok], emb[ref[ok].astype(int)])
        df[sem_col(similarity_metric(col.removeprefix("emb_")))] = sim
        df = df.drop(columns=[col])
    return df, attributes
