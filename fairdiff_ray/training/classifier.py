"""Train attribute heads on a frozen CLIP vision backbone with Ray Train (``fairdiff train-classifier``).

Dataset layout (face crops, any size; the loss crops faces with the box expanded by 0.5 and resizes to 224,
so crops with a similar margin train the best heads):
- a parquet file, or a directory of parquet files, with a column ``image`` (PNG / JPEG bytes) and one string
  column per attribute holding class names (null or "" = unlabelled for that attribute); or
- an image folder with ``labels.csv``: a column ``file`` (path relative to the folder) + one column per
  attribute.
Class names: gender female / male; race white / black / indian / asian; age young / old (these orders are
used whenever the labels are a subset of them, so the heads match the target config; other names are sorted).

Mapping public datasets onto it:
- FairFace (``fairface_label_train.csv`` / ``_val.csv``: file, age, gender, race): gender Female / Male ->
  female / male; race White and Middle Eastern and Latino_Hispanic -> white (the paper's WMELH group), Black ->
  black, Indian -> indian, East Asian and Southeast Asian -> asian; age bins 0-2 .. 30-39 -> young, 40-49 and
  older -> old. Lower-case the names, write labels.csv beside the images.
- CelebA (``list_attr_celeba.txt``, values -1 / 1): Male 1 -> male, -1 -> female; Young 1 -> young,
  -1 -> old; no race column (leave it out of --attributes). Use the aligned 178x218 crops.

Parallelism: each Ray Train worker embeds its shard of the training set with the frozen backbone (the
expensive part); the features are all-gathered and every worker fits the same small heads (deterministic
given the seed), so rank 0's result is the model. Held-out accuracy (per class) is measured by rank 0 on the
validation split, which is not sharded.
"""

from __future__ import annotations

import io
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fairdiff_ray.errors import DataError

CANONICAL = {"gender": ["female", "male"], "race": ["white", "black", "indian", "asian"], "age": ["young", "old"]}
IMAGE_SIZE = 224


def load_labelled(path: str | Path, attributes: list[str]):
    """The dataset at ``path`` as a pandas DataFrame: ``image`` (bytes) + one string column per attribute."""
    import pandas as pd

    p = Path(path).expanduser()
    if p.is_dir() and (p / "labels.csv").is_file():
        df = pd.read_csv(p / "labels.csv", dtype=str, keep_default_na=False)
        if "file" not in df.columns:
            raise DataError(f"{p / 'labels.csv'} needs a column 'file' (image path relative to {p})")
        missing = [f for f in df["file"] if not (p / f).is_file()]
        if missing:
            raise DataError(f"{p / 'labels.csv'} names {len(missing)} missing image(s), e.g. {missing[0]!r}")
        df["image"] = [(p / f).read_bytes() for f in df["file"]]
    elif p.suffix == ".parquet" or (p.is_dir() and any(p.glob("*.parquet"))):
        df = pd.read_parquet(p)
        if "image" not in df.columns:
            raise DataError(f"{p}: the parquet data needs a column 'image' with PNG / JPEG bytes")
    else:
        raise DataError(f"--data {p}: give a parquet file / directory or a folder with labels.csv")
    absent = [a for a in attributes if a not in df.columns]
    if absent:
        raise DataError(f"{p}: no label column(s) {absent}; columns are {sorted(df.columns)}")
    if len(df) < 2:
        raise DataError(f"{p}: needs at least 2 labelled images, found {len(df)}")
    out = df[["image"]].copy()
    for a in attributes:
        vals = [None if v is None or (isinstance(v, float) and math.isnan(v)) or str(v) == "" else str(v)
                for v in df[a]]
        out[a] = pd.Series(vals, index=out.index, dtype=object)  # None, not NaN, for unlabelled
    return out.reset_index(drop=True)


def class_names(values: list[str | None], attribute: str) -> list[str]:
    """Canonical order when the labels are a subset of it, else sorted; needs >= 2 classes."""
    seen = sorted({v for v in values if v is not None})
    canon = CANONICAL.get(attribute)
    names = canon if canon is not None and set(seen) <= set(canon) else seen
    if len(seen) < 2:
        raise DataError(f"attribute {attribute!r} has {len(seen)} class(es) {seen} in the data; need at least 2")
    return list(names)


def split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, val) row indices; at least one row in each."""
    if not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def decode(images: np.ndarray, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Array of encoded images -> (B, 3, size, size) float32 in [-1, 1]."""
    from PIL import Image

    rows = []
    for b in images:
        im = Image.open(io.BytesIO(bytes(b))).convert("RGB").resize((size, size), Image.BICUBIC)
        rows.append(torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()))
    return torch.stack(rows).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _embed(shard: Any, clip: Any, attributes: dict[str, list[str]], batch_size: int) -> tuple[torch.Tensor, dict]:
    feats, labels = [], {a: [] for a in attributes}
    if shard is not None:
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
            with torch.no_grad():
                feats.append(clip.raw(decode(batch["image"])))
            for a, names in attributes.items():
                labels[a] += [names.index(v) if v in names else -1 for v in batch[a]]
    dim = clip.dim
    x = torch.cat(feats) if feats else torch.zeros(0, dim)
    return x, {a: torch.tensor(v, dtype=torch.long) for a, v in labels.items()}


def _gather(x: torch.Tensor, y: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, y
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (x, y))
    return torch.cat([p[0] for p in parts]), {a: torch.cat([p[1][a] for p in parts]) for a in y}


def fit_heads(x: torch.Tensor, y: dict[str, torch.Tensor], attributes: dict[str, list[str]], hidden: int,
              epochs: int, lr: float, seed: int, batch_size: int = 256) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """Heads on standardised features: AdamW, CE summed over attributes on the labelled rows."""
    from fairdiff_ray.models.features import make_heads

    torch.manual_seed(seed)
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mean) / std
    heads = make_heads(attributes, x.shape[1], hidden)
    opt = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(z), generator=g).split(batch_size):
            loss = sum(F.cross_entropy(heads[a](z[idx]), y[a][idx], ignore_index=-1, reduction="sum")
                       for a in attributes) / len(idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return heads.eval(), mean, std


def accuracy(heads: Any, z: torch.Tensor, y: dict[str, torch.Tensor], attributes: dict[str, list[str]]) -> dict:
    """{attribute: {"overall", "per_class": {name: acc or None}, "n", "chance"}} on standardised features z."""
    out = {}
    with torch.no_grad():
        for a, names in attributes.items():
            lab = y[a] >= 0
            pred = heads[a](z[lab]).argmax(-1) if lab.any() else torch.zeros(0, dtype=torch.long)
            t = y[a][lab]
            per = {c: (float((pred[t == k] == k).float().mean()) if (t == k).any() else None)
                   for k, c in enumerate(names)}
            counts = torch.bincount(t, minlength=len(names)).float()
            out[a] = {"overall": float((pred == t).float().mean()) if len(t) else None, "per_class": per,
                      "n": int(len(t)), "chance": float(counts.max() / counts.sum()) if len(t) else None}
    return out


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: embed the shard, gather, fit the heads, rank 0 reports accuracy + checkpoint."""
    import ray.train

    from fairdiff_ray.models.features import load_clip, save_heads

    attributes = config["attributes"]
    clip = load_clip(config["backbone"], key="--backbone")
    x, y = _gather(*_embed(ray.train.get_dataset_shard("train"), clip, attributes, config["batch_size"]))
    heads, mean, std = fit_heads(x, y, attributes, config["hidden"], config["epochs"], config["lr"], config["seed"])
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report({}, checkpoint=None)
        return
    xv, yv = _embed(ray.train.get_dataset_shard("val"), clip, attributes, config["batch_size"])
    metrics = {"train": accuracy(heads, (x - mean) / std, y, attributes),
               "val": accuracy(heads, (xv - mean) / std, yv, attributes)}
    with tempfile.TemporaryDirectory() as d:
        save_heads(d, heads, attributes, config["hidden"], mean, std)
        (Path(d) / "accuracy.json").write_text(json.dumps(metrics))
        flat = {f"val_acc_{a}": m["overall"] for a, m in metrics["val"].items()}
        ray.train.report(flat, checkpoint=ray.train.Checkpoint.from_directory(d))


def train_classifier(data: str, backbone: str, out: str, attributes: list[str], epochs: int = 30,
                     val_fraction: float = 0.2, hidden: int = 0, lr: float = 1e-3, num_workers: int = 1,
                     seed: int = 0, batch_size: int = 64, overwrite: bool = False) -> dict[str, Any]:
    """Fit the heads with a Ray TorchTrainer; write heads.safetensors, heads.json and card.json to ``out``."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from fairdiff_ray.io import atomic_dir, atomic_write_text, check_output_dir
    from fairdiff_ray.models.features import CLIP_HINT, check_hf_dir

    check_output_dir(out, overwrite, "--out")
    check_hf_dir(backbone, "--backbone", CLIP_HINT)
    df = load_labelled(data, attributes)
    classes = {a: class_names(df[a].tolist(), a) for a in attributes}
    tr, va = split(len(df), val_fraction, seed)
    from fairdiff_ray.dist.cluster import connect

    connect(None, log_to_driver=False)
    config = {"attributes": classes, "backbone": str(Path(backbone).resolve()), "epochs": epochs, "lr": lr,
              "hidden": hidden, "seed": seed, "batch_size": batch_size}
    with tempfile.TemporaryDirectory() as storage:
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=config,
            scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=False),
            datasets={"train": ray.data.from_pandas(df.iloc[tr]), "val": ray.data.from_pandas(df.iloc[va])},
            dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
            run_config=ray.train.RunConfig(name="train-classifier", storage_path=storage),
        )
        result = trainer.fit()
        with result.checkpoint.as_directory() as ckpt, atomic_dir(out, overwrite) as tmp:
            for name in ("heads.safetensors", "heads.json"):
                (tmp / name).write_bytes((Path(ckpt) / name).read_bytes())
            acc = json.loads((Path(ckpt) / "accuracy.json").read_text())
            card = {"backbone": str(Path(backbone).resolve()), "data": str(data), "attributes": classes,
                    "n_train": len(tr), "n_val": len(va), "epochs": epochs, "hidden": hidden, "seed": seed,
                    "num_workers": num_workers, "accuracy": acc,
                    "use": f"classifier.kind=clip_heads classifier.path={out} classifier.backbone={backbone}"}
            atomic_write_text(tmp / "card.json", json.dumps(card, indent=2))
    return card
