"""Evaluation metrics against hand-computed values: faces missing, joint attributes, non-uniform targets,
and the paper's per-prompt-then-average rule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fairdiff_ray.core.targets import TargetDistribution
from fairdiff_ray.eval.aggregate import per_prompt, summarize, target_gap
from fairdiff_ray.eval.compare import compare_main, flatten_model
from fairdiff_ray.eval.pipeline import merge_parts

ATTRS = {"gender": ["female", "male"], "race": ["white", "black", "indian", "asian"]}


def rows(model: str, prompt: str, gender: list[int], race: list[int], fidelity: list[float]) -> list[dict]:
    """gender/race label -1 = no face in that image."""
    return [{"model": model, "concept": "occ", "prompt": prompt, "j": j, "face_found": g >= 0,
             "label_gender": g, "label_race": r, "sem_fidelity": f}
            for j, (g, r, f) in enumerate(zip(gender, race, fidelity))]


@pytest.fixture
def records() -> pd.DataFrame:
    r = []
    # P1: 3 of 4 faces; gender [f, f, m], race [white, black, black]
    r += rows("base", "P1", [0, 0, 1, -1], [0, 1, 1, -1], [1.0, 1.0, 0.0, 0.0])
    # P2: 4 faces, all male; race [indian, indian, asian, asian]
    r += rows("base", "P2", [1, 1, 1, 1], [2, 2, 3, 3], [1.0, 1.0, 1.0, 1.0])
    # P3: no face at all: no frequencies, left out of the bias means
    r += rows("base", "P3", [-1, -1, -1, -1], [-1, -1, -1, -1], [0.5, 0.5, 0.5, 0.5])
    # the debiased model: balanced gender in P1 and P2, P3 with 2 faces
    r += rows("debiased", "P1", [0, 1, 0, 1], [0, 1, 2, 3], [1.0, 1.0, 1.0, 0.0])
    r += rows("debiased", "P2", [0, 1, -1, -1], [0, 0, -1, -1], [1.0, 0.0, 1.0, 0.0])
    r += rows("debiased", "P3", [0, -1, -1, 1], [1, -1, -1, 1], [1.0, 1.0, 1.0, 1.0])
    return pd.DataFrame(r)


def test_per_prompt_hand_computed(records: pd.DataFrame) -> None:
    pp = per_prompt(records, ATTRS, [["gender", "race"]]).set_index(["model", "prompt"])
    p1 = pp.loc[("base", "P1")]
    assert p1["faces"] == 3 and p1["face_rate"] == pytest.approx(0.75)
    assert p1["freq.gender.female"] == pytest.approx(2 / 3)
    assert p1["bias.gender"] == pytest.approx(1 / 3)
    # race freq [1/3, 2/3, 0, 0]: pair sums 1/3 + 2*(1/3) + 2*(2/3) = 7/3 over C(4,2) = 6
    assert p1["bias.race"] == pytest.approx(7 / 18)
    # joint labels 0, 1, 5 -> 3 classes at 1/3, 5 at 0: 15 pairs of 1/3 over C(8,2) = 28
    assert p1["bias.gender_x_race"] == pytest.approx(5 / 28)
    p2 = pp.loc[("base", "P2")]
    assert p2["bias.gender"] == pytest.approx(1.0) and p2["bias.race"] == pytest.approx(1 / 3)
    assert p2["bias.gender_x_race"] == pytest.approx(6 / 28)
    p3 = pp.loc[("base", "P3")]
    assert p3["faces"] == 0 and np.isnan(p3["bias.gender"]) and np.isnan(p3["freq.gender.male"])
    assert p3["sem_fidelity"] == pytest.approx(0.5)


def test_summary_per_prompt_then_average(records: pd.DataFrame) -> None:
    target = TargetDistribution.from_spec({"gender": {"classes": ["female", "male"], "probs": [0.5, 0.5]}})
    s, _ = summarize(records, ATTRS, target, "test")
    base = s["models"]["base"]
    # mean and population std over the prompts that have faces: biases 1/3 and 1
    assert base["bias"]["gender"]["mean"] == pytest.approx(2 / 3)
    assert base["bias"]["gender"]["std"] == pytest.approx(1 / 3)
    # pooling all 7 faces would give female 2/7 and bias 3/7: the paper averages per prompt
    assert base["freq"]["gender"]["female"] == pytest.approx(1 / 3)
    assert base["bias"]["gender_x_race"]["mean"] == pytest.approx((5 / 28 + 6 / 28) / 2)
    assert base["face_rate"] == pytest.approx((0.75 + 1.0 + 0.0) / 3)
    assert base["semantics"]["fidelity"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert base["prompts_without_faces"] == 1
    deb = s["models"]["debiased"]
    assert deb["bias"]["gender"]["mean"] == pytest.approx(0.0) and deb["bias"]["gender"]["std"] == 0.0
    assert s["prompts"] == {"split": "test", "count": 3}
    assert s["target_gap"]["base"]["gender"] == pytest.approx(0.5 * (abs(1 / 3 - 0.5) + abs(2 / 3 - 0.5)))


def test_summary_has_the_demo_keys(records: pd.DataFrame) -> None:
    s, _ = summarize(records, ATTRS, None, "test")
    s = json.loads(json.dumps(s, allow_nan=False))  # NaN never reaches the JSON
    for m in ("base", "debiased"):
        for a in ("gender", "race", "gender_x_race"):
            assert set(s["models"][m]["bias"][a]) == {"mean", "std"}
        assert set(s["models"][m]["freq"]["race"]) == set(ATTRS["race"])
        assert isinstance(s["models"][m]["face_rate"], float)
        assert "fidelity" in s["models"][m]["semantics"]
    assert set(s["concepts"]["occ"]["models"]) == {"base", "debiased"}


def test_non_uniform_target() -> None:
    attrs = {"age": ["young", "old"]}
    r = pd.DataFrame(
        [{"model": "base", "concept": "c", "prompt": "A", "j": j, "face_found": True, "label_age": a}
         for j, a in enumerate([0, 0, 1, 1])]
        + [{"model": "base", "concept": "c", "prompt": "B", "j": j, "face_found": True, "label_age": a}
           for j, a in enumerate([0, 0, 0, 1])]
    )
    target = TargetDistribution.from_spec({"age": {"classes": ["young", "old"], "probs": [0.75, 0.25]}})
    s, _ = summarize(r, attrs, target, "test")
    assert s["models"]["base"]["freq"]["age"]["old"] == pytest.approx((0.5 + 0.25) / 2)
    assert s["target"]["age"] == {"young": 0.75, "old": 0.25}
    assert s["target_gap"]["base"]["age"] == pytest.approx(0.125)
    # a target whose classes are not the classifier's is refused, naming the attribute
    bad = TargetDistribution.from_spec({"age": {"classes": ["old", "young"], "probs": [0.25, 0.75]}})
    with pytest.raises(ValueError, match="target.age classes"):
        summarize(r, attrs, bad, "test")


def test_uncertain_share_per_prompt_then_average() -> None:
    """uncertain.<a>: share of face images whose top probability is < 0.9, per prompt, then the mean; it shows
    in the demo table and the report's Table 1 for the aligned attributes."""
    from fairdiff_ray.demo import before_after_table
    from fairdiff_ray.eval.report import table1

    attrs = {"gender": ["female", "male"]}
    probs = {"A": [[0.95, 0.05], [0.5, 0.5], [0.2, 0.8], [0.0, 1.0]],  # 2 of 4 below 0.9
             "B": [[0.6, 0.4], [0.97, 0.03], [0.1, 0.9], [0.3, 0.7]]}   # the 3rd has no face: 2 of 3
    found = {"A": [True] * 4, "B": [True, True, False, True]}
    r = pd.DataFrame([{"model": m, "concept": "c", "prompt": pr, "j": j, "face_found": found[pr][j],
                       "label_gender": int(np.argmax(p)) if found[pr][j] else -1, "prob_gender": p}
                      for m in ("base", "debiased") for pr, ps in probs.items() for j, p in enumerate(ps)])
    target = TargetDistribution.from_spec({"gender": {"classes": ["female", "male"], "probs": [0.5, 0.5]}})
    s, pp = summarize(r, attrs, target, "test")
    got = pp.set_index(["model", "prompt"])["uncertain.gender"]
    assert got[("base", "A")] == pytest.approx(0.5) and got[("base", "B")] == pytest.approx(2 / 3)
    assert s["models"]["debiased"]["uncertain"]["gender"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert "uncertain gender" in before_after_table(s).splitlines()[0]
    header, rows = table1(s)
    assert rows[0][header.index("uncertain gender")] == ".58"
    # records without probabilities (older parts) have no uncertain entry
    s2, _ = summarize(r.drop(columns=["prob_gender"]), attrs, target, "test")
    assert "uncertain" not in s2["models"]["base"] and "uncertain" not in before_after_table(s2)


def test_target_gap_missing_frequency_is_none() -> None:
    assert target_gap({"a": None, "b": 1.0}, {"a": 0.5, "b": 0.5}) is None


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(-1, 3), min_size=1, max_size=12), min_size=1, max_size=6))
def test_summary_mean_is_mean_of_prompt_biases(labels: list[list[int]]) -> None:
    """Property: the summary's mean/std are exactly those of the per-prompt biases (prompts with faces)."""
    attrs = {"race": ATTRS["race"]}
    df = pd.DataFrame([{"model": "base", "concept": "c", "prompt": f"P{i}", "j": j, "face_found": lab >= 0,
                        "label_race": lab} for i, ls in enumerate(labels) for j, lab in enumerate(ls)])
    s, pp = summarize(df, attrs, None, "test")
    vals = pp["bias.race"].dropna().to_numpy()
    got = s["models"]["base"]["bias"]["race"]
    if vals.size == 0:
        assert got["mean"] is None
    else:
        assert got["mean"] == pytest.approx(vals.mean()) and got["std"] == pytest.approx(vals.std())
        assert 0.0 <= got["mean"] <= 1.0


def test_merge_parts_similarity_to_base_image(tmp_path: Path) -> None:
    def part(model: str, embs: list[list[float]]) -> Path:
        t = pa.Table.from_pylist([
            {"model": model, "concept": "c", "prompt": "P", "j": j, "emb_clip": e, "emb_toy": e,
             "attributes": json.dumps({"gender": ["female", "male"]})} for j, e in enumerate(embs)])
        path = tmp_path / f"{model}.parquet"
        pq.write_table(t, path)
        return path

    paths = [part("debiased", [[0.0, 1.0], [1.0, 1.0]]), part("base", [[1.0, 0.0], [1.0, 1.0]])]
    df, attrs = merge_parts(paths)
    assert attrs == {"gender": ["female", "male"]}
    d = df[df["model"] == "debiased"].sort_values("j")
    assert d["sem_clip_i"].tolist() == pytest.approx([0.0, 1.0])  # orthogonal, then identical
    assert d["sem_toy_sim"].tolist() == pytest.approx([0.0, 1.0])
    assert df[df["model"] == "base"]["sem_clip_i"].isna().all()  # the reference against itself: not measured
    assert not [c for c in df.columns if c.startswith("emb_")]


def test_compare_prints_both_runs(records: pd.DataFrame, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    s, _ = summarize(records, ATTRS, None, "test")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (b / "eval").mkdir(parents=True)
    (a / "summary.json").write_text(json.dumps(s))
    s2 = json.loads(json.dumps(s))
    s2["models"]["debiased"]["bias"]["gender"]["mean"] = 0.25
    (b / "eval" / "summary.json").write_text(json.dumps(s2))
    assert compare_main([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "[base]" in out and "[debiased]" in out and "+0.250" in out
    assert flatten_model(s["models"]["base"])["bias gender"] == pytest.approx(2 / 3)
