"""Prompt sets as Ray Data datasets: read, validate, mix by weight, shuffle per (seed, epoch), stream to workers.

A prompt set is a table with the columns ``concept``, ``prompt``, ``split`` and optional ``subject``,
``weight`` (per-row sampling weight, default 1) and ``template`` (a ``str.format`` pattern over ``subject``
that builds ``prompt`` where the prompt is empty or missing). Formats by extension: ``.parquet``, ``.jsonl``
/ ``.json`` (JSON lines), ``.csv``; paths are local or pyarrow filesystem URIs (``s3://``, ``gs://``, ...).

Mixing (config ``data.prompt_sets[i].weight`` = W_i): an epoch has L = (number of rows of the split over all
sets) draws; set i gets L * W_i / sum(W) of them, spread over its rows by row weight. Row r of set i is
repeated floor(c_r) times plus once more with probability frac(c_r), c_r = L * W_i / sum(W) * w_r / sum_i(w).
Every draw gets a key uniform in [0, 1) from stable_seed(run.seed, epoch, set, row, copy); the stream is all
epochs sorted by (epoch, key). Everything is a pure function of the config: no RNG state, no row order.

Worker layout (METHOD.md section 5: every worker works on the SAME prompts each step): every worker gets the
whole, identical stream (Ray Train ``DataConfig(datasets_to_split=[])``, order preserved) and takes rows
[step * prompts_per_step, (step + 1) * prompts_per_step); no broadcast is needed and resuming at step k
skips k * prompts_per_step rows. The stream is materialised in the object store before training starts (so
no Ray Data task has to compete with the training workers for CPUs); it is never collected on the driver.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from typing import Any

from fairdiff_ray.config import FairDiffConfig, PromptSetConfig
from fairdiff_ray.core.seeding import stable_seed
from fairdiff_ray.errors import DataError
from fairdiff_ray.io import is_uri

REQUIRED = ("concept", "prompt", "split")
COLUMNS = ("concept", "prompt", "split", "subject", "weight", "set")
FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
EPOCH_MARGIN = 1  # extra epochs materialised beyond the expected need (the Bernoulli copies make L vary)


def _resolve(path: str, key: str) -> tuple[str, Any]:
    """(path, filesystem) with local paths made absolute; DataError if nothing is there."""
    import pyarrow.fs as pafs

    try:
        if is_uri(path):
            fs, inner = pafs.FileSystem.from_uri(path)
        else:
            fs, inner = pafs.LocalFileSystem(), os.path.abspath(path)
        info = fs.get_file_info(inner)
    except Exception as e:  # noqa: BLE001 - any filesystem error is the user's path
        raise DataError(f"{key}: cannot open prompt set {path!r} ({str(e).splitlines()[0]})") from None
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{key}: prompt set {path!r} does not exist: give an existing parquet / JSONL / CSV file")
    return (path if is_uri(path) else inner), fs


def _format(path: str, key: str) -> str:
    ext = os.path.splitext(path.rstrip("/"))[1].lower()
    if ext not in FORMATS:
        raise DataError(f"{key}: prompt set {path!r} has unknown extension {ext!r}: use .parquet, .jsonl, .json or .csv")
    return FORMATS[ext]


def _missing_columns(names: list[str], ps: PromptSetConfig) -> list[str]:
    have = set(names)
    need = [c for c in REQUIRED if c not in have and not (c == "prompt" and "template" in have)]
    return [c for c in need if not (c == "concept" and ps.concept is not None)]


def _columns_error(key: str, ps: PromptSetConfig, need: list[str], names: list[str]) -> DataError:
    return DataError(f"{key}: prompt set {ps.path!r} lacks column(s) {need} (has {sorted(names)}): "
                     f"every row needs {list(REQUIRED)}")


def _file_bytes(path: str, key: str) -> list[bytes]:
    """The bytes of the file at ``path`` (of every file in it, for a directory)."""
    import pyarrow.fs as pafs

    resolved, fs = _resolve(path, key)
    inner = pafs.FileSystem.from_uri(path)[1] if is_uri(path) else resolved
    try:
        if fs.get_file_info(inner).type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
            names = sorted(i.path for i in infos if i.type == pafs.FileType.File
                           and not os.path.basename(i.path).startswith((".", "_")))
        else:
            names = [inner]
        out = []
        for name in names:
            with fs.open_input_stream(name) as f:
                out.append(f.read())
        return out
    except Exception as e:  # noqa: BLE001 - any filesystem error is the user's path
        raise DataError(f"{key}: cannot read prompt set {path!r} ({str(e).splitlines()[0][:200]})") from None


def _text(data: bytes, key: str, path: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{key}: prompt set {path!r} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                        f"{e.start}): save it as UTF-8") from None


def _json_rows(text: str, key: str, path: str) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataError(f"{key}: {path}:{n}: not valid JSON ({str(e).split(':')[0]}): write one JSON object "
                            "per line (JSON lines)") from None
        if not isinstance(row, dict):
            raise DataError(f"{key}: {path}:{n}: a JSON {type(row).__name__}, not an object: write one object "
                            "per line (JSON lines)")
        rows.append(row)
    return rows


def _table_rows(data: bytes, fmt: str, key: str, path: str) -> tuple[list[dict[str, Any]], list[str]]:
    """(rows, column names) of one parquet / CSV file, read as Ray Data reads it (pyarrow)."""
    import io

    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if fmt == "csv":
        _text(data, key, path)
        if not data.strip():
            return [], []
    try:
        table = pq.read_table(io.BytesIO(data)) if fmt == "parquet" else pacsv.read_csv(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - a malformed file is one line naming the file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DataError(f"{key}: prompt set {path!r} is not a readable {fmt} file ({first}): check its format "
                        "and extension") from None
    return table.to_pylist(), list(table.column_names)


def _rows(ps: PromptSetConfig, key: str) -> list[dict[str, Any]]:
    """Every row of a prompt set read on the driver (prompt sets are small), columns checked."""
    fmt = _format(ps.path, key)
    rows: list[dict[str, Any]] = []
    names: set[str] = set()
    for data in _file_bytes(ps.path, key):
        if fmt == "json":
            part = _json_rows(_text(data, key, ps.path), key, ps.path)
            cols = [c for r in part for c in r]
        else:
            part, cols = _table_rows(data, fmt, key, ps.path)
        rows.extend(part)
        names.update(cols)
    if not rows:
        raise DataError(f"{key}: prompt set {ps.path!r} is empty: add rows with the columns {list(REQUIRED)}")
    need = _missing_columns(sorted(names), ps)
    if need:
        raise _columns_error(key, ps, need, sorted(names))
    return rows


def check_prompt_sets(cfg: FairDiffConfig, splits: list[str] | None = None) -> list[list[str]]:
    """Fail fast, before any cluster starts, with one line naming the set: every configured prompt set exists,
    has a known format, decodes (UTF-8 for JSON lines / CSV), has the required columns, rows in each of
    ``splits`` (default: data.split, plus 'val' when train.validate_every is set), non-empty prompts and usable
    weights. Returns each set's prompts of ``splits[0]`` (for the tokenizer-length warning)."""
    if splits is None:
        splits = [cfg.data.split] + (["val"] if cfg.train.validate_every and cfg.data.split != "val" else [])
    out = []
    for i, ps in enumerate(cfg.data.prompt_sets):
        key = f"data.prompt_sets.{i}"
        norm, rows = _Normalise(i, ps.concept), []
        for n, row in enumerate(_rows(ps, key), start=1):
            try:
                rows.append((n, norm(row)))
            except (ValueError, TypeError, KeyError, IndexError) as e:
                raise DataError(f"{key}: prompt set {ps.path!r}: row {n} is malformed ({type(e).__name__}: "
                                f"{str(e)[:100]}): fix its weight / template") from None
        for split in splits:
            mine = [(n, r) for n, r in rows if r["split"] == split]
            if not mine:
                have = sorted({r["split"] for _, r in rows})
                raise DataError(f"{key}: prompt set {ps.path!r} has no rows with split {split!r} (it has {have}): "
                                "add some or remove the set")
            empty = next((n for n, r in mine if not r["prompt"].strip()), None)
            if empty is not None:
                raise DataError(f"{key}: prompt set {ps.path!r}: row {empty} (split {split!r}) has an empty prompt "
                                "and no template: give every row a prompt")
            w = [r["weight"] for _, r in mine]
            if not all(math.isfinite(x) and x >= 0 for x in w) or sum(w) <= 0:
                raise DataError(f"{key}: prompt set {ps.path!r}: column 'weight' must be finite, >= 0, not all 0")
        out.append([r["prompt"] for _, r in rows if r["split"] == splits[0]])
    return out


def _read(ps: PromptSetConfig, key: str) -> Any:
    import ray.data

    path, fs = _resolve(ps.path, key)
    fmt = _format(ps.path, key)
    fs_arg = fs if is_uri(ps.path) else None
    try:
        if fmt == "parquet":
            ds = ray.data.read_parquet(path, filesystem=fs_arg)
        elif fmt == "json":
            ds = ray.data.read_json(path, filesystem=fs_arg, lines=True)
        else:
            ds = ray.data.read_csv(path, filesystem=fs_arg)
        names = ds.schema().names
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - malformed files surface as one line naming the file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{key}: cannot read prompt set {ps.path!r} as {fmt}: {first[:200]}") from None
    need = _missing_columns(list(names), ps)
    if need:
        raise _columns_error(key, ps, need, list(names))
    return ds


class _Normalise:
    """Row -> the COLUMNS schema (concept override, prompt from template, defaults for optional fields)."""

    def __init__(self, set_index: int, concept: str | None):
        self.set_index, self.concept = set_index, concept

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        subject = row.get("subject")
        subject = "" if subject is None or (isinstance(subject, float) and math.isnan(subject)) else str(subject)
        prompt = row.get("prompt")
        if (prompt is None or prompt == "") and row.get("template"):
            prompt = str(row["template"]).format(subject=subject)
        weight = row.get("weight")
        weight = 1.0 if weight is None or (isinstance(weight, float) and math.isnan(weight)) else float(weight)
        return {
            "concept": str(self.concept if self.concept is not None else row.get("concept")),
            "prompt": "" if prompt is None else str(prompt),
            "split": str(row.get("split")),
            "subject": subject,
            "weight": weight,
            "set": self.set_index,
        }


def _set_stats(batch: Any) -> Any:
    """pandas batch of all sets -> one row per set: rows, sum and min of the row weights."""
    import pandas as pd

    g = batch.groupby("set")["weight"]
    return pd.DataFrame({"set": g.size().index, "rows": g.size().values, "sum_w": g.sum().values,
                         "min_w": g.min().values})


def read_split(cfg: FairDiffConfig, split: str) -> tuple[Any, list[tuple[int, float]]]:
    """(one-block dataset of the split's rows of all sets in COLUMNS schema, [(rows, sum of weights)] per set).

    Raises DataError for a missing / unreadable file, missing columns, bad weights or an empty split. Only the
    per-set counts reach the driver.
    """
    parts = []
    for i, ps in enumerate(cfg.data.prompt_sets):
        ds = _read(ps, f"data.prompt_sets.{i}").map(_Normalise(i, ps.concept))
        parts.append(ds.filter(lambda r, s=split: r["split"] == s))
    # Prompt sets are small (a million prompts is ~100 MB): one block keeps mixing and ordering a single task.
    base = (parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]).repartition(1).materialize()
    stats = {int(r["set"]): r for r in base.map_batches(_set_stats, batch_size=None, batch_format="pandas").take_all()}
    out = []
    for i, ps in enumerate(cfg.data.prompt_sets):
        key, r = f"data.prompt_sets.{i}", stats.get(i)
        if r is None or int(r["rows"]) == 0:
            raise DataError(f"{key}: prompt set {ps.path!r} has no rows with split {split!r}: "
                            "add some or remove the set")
        if not math.isfinite(float(r["sum_w"])) or float(r["min_w"]) < 0 or float(r["sum_w"]) <= 0:
            raise DataError(f"{key}: prompt set {ps.path!r}: column 'weight' must be finite, >= 0, not all 0")
        out.append((int(r["rows"]), float(r["sum_w"])))
    return base, out


class _Expand:
    """All rows (one pandas batch) -> every epoch's draws, sorted by (epoch, key).

    Row r of set s is drawn floor(c_r) times plus once with probability frac(c_r) per epoch (see module doc).
    """

    def __init__(self, seed: int, epochs: int, share: list[float], total_w: list[float], length: int):
        self.seed, self.epochs = seed, epochs
        self.share, self.total_w, self.length = share, total_w, length

    def __call__(self, batch: Any) -> Any:
        import pandas as pd

        rows = []
        for row in batch.to_dict("records"):
            s = int(row["set"])
            c = self.length * self.share[s] * float(row["weight"]) / self.total_w[s]
            ident = (row["concept"], row["prompt"], row["subject"])
            for epoch in range(self.epochs):
                extra = stable_seed(self.seed, "extra", epoch, s, *ident) / 2.0**63 < c - math.floor(c)
                for copy in range(int(math.floor(c)) + int(extra)):
                    key = stable_seed(self.seed, "order", epoch, s, *ident, copy) / 2.0**63
                    rows.append({**row, "epoch": epoch, "key": key})
        df = pd.DataFrame(rows, columns=[*COLUMNS, "epoch", "key"])
        return df.sort_values(["epoch", "key", "set", "prompt"], kind="stable").reset_index(drop=True)


def train_stream(cfg: FairDiffConfig, rows_needed: int | None = None) -> Any:
    """The mixed, shuffled training stream (lazy ray.data.Dataset with COLUMNS + epoch, key), in order.

    rows_needed: prompts the run consumes (default train.steps * train.prompts_per_step); enough epochs are
    generated to cover them with margin.
    """
    base, stats = read_split(cfg, cfg.data.split)
    length = sum(n for n, _ in stats)
    weights = [ps.weight for ps in cfg.data.prompt_sets]
    share = [w / sum(weights) for w in weights]
    need = rows_needed if rows_needed is not None else cfg.train.steps * cfg.train.prompts_per_step
    epochs = math.ceil(need / length) + EPOCH_MARGIN
    expand = _Expand(cfg.run.seed, epochs, share, [tw for _, tw in stats], length)
    return base.map_batches(expand, batch_size=None, batch_format="pandas")


class _ValOrder:
    def __init__(self, seed: int, max_prompts: int):
        self.seed, self.max_prompts = seed, max_prompts

    def __call__(self, batch: Any) -> Any:
        keys = [stable_seed(self.seed, "val", s, c, p) / 2.0**63
                for s, c, p in zip(batch["set"], batch["concept"], batch["prompt"])]
        out = batch.assign(epoch=0, key=keys).sort_values(["key", "set", "prompt"], kind="stable")
        return out.head(self.max_prompts).reset_index(drop=True)


def val_stream(cfg: FairDiffConfig, max_prompts: int) -> Any:
    """The first ``max_prompts`` validation prompts ('val' split) of all sets, interleaved in key order."""
    base, _ = read_split(cfg, "val")
    return base.map_batches(_ValOrder(cfg.run.seed, max_prompts), batch_size=None, batch_format="pandas")


def materialize(ds: Any) -> Any:
    """Execute the pipeline into the object store with order preserved (nothing reaches the driver)."""
    from ray.data import DataContext

    DataContext.get_current().execution_options.preserve_order = True
    return ds.materialize()


def iter_rows(iterator: Any, start: int = 0) -> Iterator[dict[str, Any]]:
    """Rows of a worker's DataIterator (or any iterable of dicts) from row ``start`` on."""
    rows = iterator.iter_rows() if hasattr(iterator, "iter_rows") else iter(iterator)
    for i, row in enumerate(rows):
        if i >= start:
            yield row


def take_prompts(rows: Iterator[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The next ``n`` rows; RuntimeError if the stream ran out (train_stream sizes it for the whole run)."""
    out = []
    for _ in range(n):
        try:
            out.append(next(rows))
        except StopIteration:
            raise RuntimeError("the prompt stream ran out before train.steps; this is a bug in train_stream") from None
    return out
