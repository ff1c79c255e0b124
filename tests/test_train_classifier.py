"""fairdiff train-classifier: dataset layouts, and heads trained with Ray Train on a tiny CLIP backbone."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
from _helpers_features import tiny_clip_dir
from PIL import Image

from fairdiff_ray.cli import main as cli_main
from fairdiff_ray.errors import DataError
from fairdiff_ray.models.features import load_clip_heads_classifier
from fairdiff_ray.models.protocols import AttributeClassifier
from fairdiff_ray.training.classifier import class_names, decode, load_labelled, split


def _png(gender: str, age: str, rng: np.random.Generator) -> bytes:
    """Gender = hue (female red, male blue), age = brightness (young bright, old dark), plus noise."""
    base = np.array([200, 40, 60] if gender == "female" else [50, 60, 200], dtype=np.float64)
    base *= 1.0 if age == "young" else 0.45
    img = np.clip(base + rng.normal(0, 25, size=(48, 48, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _dataset(n: int = 64, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    genders = rng.choice(["female", "male"], size=n)
    ages = rng.choice(["young", "old"], size=n, p=[0.6, 0.4])
    rows = [{"image": _png(g, a, rng), "gender": g, "age": a} for g, a in zip(genders, ages)]
    rows[0]["age"] = None  # unlabelled for one attribute
    return pd.DataFrame(rows)


def test_image_folder_layout_and_class_order(tmp_path) -> None:
    df = _dataset(6)
    for i, b in enumerate(df["image"]):
        (tmp_path / f"{i}.png").write_bytes(b)
    labels = pd.DataFrame({"file": [f"{i}.png" for i in range(6)], "gender": df["gender"],
                           "age": df["age"].fillna("")})
    labels.to_csv(tmp_path / "labels.csv", index=False)
    got = load_labelled(tmp_path, ["gender", "age"])
    assert len(got) == 6 and got["age"][0] is None and got["image"][3] == df["image"][3]
    assert class_names(["male", "female", None], "gender") == ["female", "male"]
    assert class_names(["old", "young"], "age") == ["young", "old"]
    assert class_names(["b", "a"], "hair") == ["a", "b"]
    assert decode(got["image"].to_numpy()[:2], 32).shape == (2, 3, 32, 32)
    with pytest.raises(DataError, match="race"):
        load_labelled(tmp_path, ["race"])
    with pytest.raises(DataError, match="at least 2"):
        class_names(["male", None], "gender")
    tr, va = split(10, 0.2, 0)
    assert len(va) == 2 and sorted([*tr, *va]) == list(range(10))


@pytest.mark.slow
def test_train_classifier_beats_chance_on_held_out_images(tmp_path, ray_cluster) -> None:
    backbone = tiny_clip_dir(tmp_path)
    data = tmp_path / "faces.parquet"
    _dataset(64).to_parquet(data)
    out = tmp_path / "heads"
    code = cli_main(["train-classifier", "--data", str(data), "--backbone", str(backbone), "--out", str(out),
                     "--attributes", "gender,age", "--epochs", "60", "--val-fraction", "0.25", "--num-workers", "2"])
    assert code == 0
    card = json.loads((out / "card.json").read_text())
    assert card["n_train"] == 48 and card["n_val"] == 16
    for attr in ("gender", "age"):
        val = card["accuracy"]["val"][attr]
        assert val["n"] >= 15 and set(val["per_class"]) == set(card["attributes"][attr])
        assert val["overall"] > max(val["chance"], 0.5) + 0.15, (attr, val)
    # the heads load as an AttributeClassifier with gradients to the face pixels
    clf = load_clip_heads_classifier(str(out), str(backbone))
    assert isinstance(clf, AttributeClassifier) and clf.attributes == {"gender": ["female", "male"],
                                                                      "age": ["young", "old"]}
    faces = decode(_dataset(4, seed=1)["image"].to_numpy()).requires_grad_()
    logits = clf(faces)
    logits["gender"][:, 0].sum().backward()
    assert faces.grad.abs().sum() > 0 and all(not p.requires_grad for p in clf.parameters())
    # a second run into the same directory is refused without --overwrite, and nothing is written
    assert cli_main(["train-classifier", "--data", str(data), "--backbone", str(backbone), "--out", str(out)]) == 2
    # the CLI's card agrees with its own held-out predictions
    heldout = _dataset(64).iloc[np.sort(np.random.default_rng(0).permutation(64)[:16])]
    with torch.no_grad():
        pred = clf(decode(heldout["image"].to_numpy()))["gender"].argmax(-1).numpy()
    want = (heldout["gender"] == "male").to_numpy().astype(int)
    assert float((pred == want).mean()) == pytest.approx(card["accuracy"]["val"]["gender"]["overall"], abs=1e-6)
