"""Prompt sets through Ray Data: formats, the weighted mix, deterministic per-(seed, epoch) order, the
identical stream every worker reads, and one-line DataErrors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from fairdiff_ray.config import load_config
from fairdiff_ray.dist.data import iter_rows, materialize, read_split, take_prompts, train_stream, val_stream
from fairdiff_ray.errors import DataError


@pytest.fixture(autouse=True)
def _ray(ray_cluster):
    yield


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _rows(concept: str, n_train: int, n_val: int = 1) -> list[dict]:
    return [{"concept": concept, "prompt": f"a photo of {concept} {i}", "subject": f"{concept}{i}",
             "split": "train" if i < n_train else "val"} for i in range(n_train + n_val)]


def _cfg(*sets: tuple[str, float], seed: int = 0, steps: int = 100):
    spec = ", ".join(f"{{path: {p}, weight: {w}}}" for p, w in sets)
    return load_config(None, [f"data.prompt_sets=[{spec}]", f"run.seed={seed}", f"train.steps={steps}"])


def _stream(cfg) -> list[dict]:
    return list(iter_rows(materialize(train_stream(cfg)).iterator()))


def test_weighted_mix_and_deterministic_order(tmp_path):
    big = _jsonl(tmp_path / "big.jsonl", _rows("big", 30))
    small = _jsonl(tmp_path / "small.jsonl", _rows("small", 5))
    cfg = _cfg((big, 1.0), (small, 1.0), steps=200)
    rows = _stream(cfg)
    assert len(rows) >= 200  # enough epochs for the whole run
    epochs = Counter(r["epoch"] for r in rows)
    first = [r for r in rows if r["epoch"] == 0]
    share = Counter(r["concept"] for r in first)
    # equal weights: each set gets about half of an epoch although one set is 6x larger
    assert abs(share["small"] / len(first) - 0.5) < 0.15, share
    assert all(abs(n - 35) <= 12 for n in epochs.values()), epochs
    assert [r["epoch"] for r in rows] == sorted(r["epoch"] for r in rows)
    # the same seed gives the same stream; another seed, or the next epoch, another order
    assert [r["prompt"] for r in _stream(cfg)] == [r["prompt"] for r in rows]
    other = _stream(_cfg((big, 1.0), (small, 1.0), seed=1, steps=200))
    assert [r["prompt"] for r in other[:20]] != [r["prompt"] for r in rows[:20]]
    e0 = [r["prompt"] for r in rows if r["epoch"] == 0 and r["concept"] == "big"]
    e1 = [r["prompt"] for r in rows if r["epoch"] == 1 and r["concept"] == "big"]
    assert e0 != e1
    # weights 3:1 shift the mix
    skew = _stream(_cfg((big, 3.0), (small, 1.0), steps=10))
    first = [r for r in skew if r["epoch"] == 0]
    assert abs(Counter(r["concept"] for r in first)["big"] / len(first) - 0.75) < 0.15
    # every worker iterates the same materialised stream; resuming at row k continues it exactly
    ds = materialize(train_stream(cfg))
    it = iter_rows(ds.iterator(), start=7)
    assert take_prompts(it, 3) == rows[7:10]


def test_formats_templates_and_val_split(tmp_path):
    import pandas as pd

    rows = _rows("occ", 3, 2)
    rows[0] = {**rows[0], "prompt": "", "template": "a portrait of a {subject}", "weight": 2.0}
    df = pd.DataFrame(rows)
    df.to_parquet(tmp_path / "p.parquet")
    df.to_csv(tmp_path / "p.csv", index=False)
    _jsonl(tmp_path / "p.jsonl", rows)
    got = {}
    for ext in ("parquet", "csv", "jsonl"):
        base, stats = read_split(_cfg((str(tmp_path / f"p.{ext}"), 1.0)), "train")
        got[ext] = sorted((r["prompt"], r["weight"]) for r in base.iter_rows())
        assert stats == [(3, 4.0)]
    assert got["parquet"] == got["csv"] == got["jsonl"]
    assert ("a portrait of a occ0", 2.0) in got["jsonl"]
    val = [r["prompt"] for r in materialize(val_stream(_cfg((str(tmp_path / "p.jsonl"), 1.0)), 1)).iter_rows()]
    assert len(val) == 1 and val[0] in {"a photo of occ 3", "a photo of occ 4"}


def test_bad_prompt_sets_are_one_line_data_errors(tmp_path):
    good = _jsonl(tmp_path / "good.jsonl", _rows("g", 2))
    cases = {
        str(tmp_path / "missing.jsonl"): "does not exist",
        _jsonl(tmp_path / "nocol.jsonl", [{"concept": "x", "split": "train"}]): "lacks column",
        _jsonl(tmp_path / "noval.jsonl", _rows("t", 2, 0)): "no rows with split 'val'",
        str(tmp_path / "prompts.txt"): "unknown extension",
    }
    (tmp_path / "prompts.txt").write_text("hello\n")
    for path, msg in cases.items():
        with pytest.raises(DataError, match=msg) as e:
            read_split(_cfg((good, 1.0), (path, 1.0)), "val")
        assert "data.prompt_sets.1" in str(e.value) and "\n" not in str(e.value)
