"""The evaluation pipeline on real stand-in models: same noise across models, stable seeds across
processes, resume after a crash, the Ray Data path equals the in-process path, the job's input errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fairdiff_ray.config import FairDiffConfig, load_config
from fairdiff_ray.core.seeding import stable_seed
from fairdiff_ray.errors import UserError
from fairdiff_ray.eval.records import png_to_array
from fairdiff_ray.eval.run import parse_adaptors, run_evaluation
from tests._helpers_eval import standin_gen_loader, standin_score_loader, write_prompts

ROOT = Path(__file__).resolve().parents[1]


def make_cfg(tmp_path: Path, *extra: str) -> FairDiffConfig:
    prompts = write_prompts(tmp_path / "prompts.jsonl", n=4)
    (tmp_path / "model").mkdir(exist_ok=True)
    return load_config(None, [f"model.path={tmp_path / 'model'}", f"data.prompt_sets=[{{path: {prompts}}}]",
                              "eval.images_per_prompt=3", "eval.batch_size=4", "eval.prompts_per_part=2",
                              "eval.grid_images=2", "eval.steps=2",
                              "target={gender: {classes: [female, male], probs: [0.5, 0.5]}}", *extra])


def adaptor_dir(tmp_path: Path) -> str:
    d = tmp_path / "adaptor"
    d.mkdir(exist_ok=True)
    (d / "weights.safetensors").write_bytes(b"stand-in")
    return str(d)


def run(cfg: FairDiffConfig, tmp_path: Path, out: Path, executor: str = "local", **spec_extra: object) -> dict:
    def gen_loader(spec: dict, adaptor: str | None):
        return standin_gen_loader({**spec, **spec_extra}, adaptor)

    return run_evaluation(cfg, {"debiased": adaptor_dir(tmp_path)}, out, executor=executor, report=False,
                          gen_loader=gen_loader, score_loader=standin_score_loader, log=lambda s: None)


def test_records_same_noise_and_seeds(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    s = run(cfg, tmp_path, tmp_path / "out")
    rec = pd.read_parquet(tmp_path / "out" / "records.parquet")
    assert len(rec) == 4 * 3 * 2 and set(rec["model"]) == {"base", "debiased"}
    for _, r in rec.iterrows():
        assert r["seed"] == stable_seed(r["prompt"], r["j"])
    # thumbnails only for j < grid_images; the j-th images of both models share the noise (correlated)
    assert rec["thumb"].notna().sum() == 4 * 2 * 2
    a = rec[(rec.model == "base") & (rec.j == 0)].sort_values("prompt")
    b = rec[(rec.model == "debiased") & (rec.j == 0)].sort_values("prompt")
    ia, ib = (np.stack([png_to_array(t).astype(float) for t in x["thumb"]]) for x in (a, b))
    other = np.stack([png_to_array(t).astype(float) for t in
                      rec[(rec.model == "debiased") & (rec.j == 1)].sort_values("prompt")["thumb"]])
    corr_same = np.corrcoef(ia[..., 2].ravel(), ib[..., 2].ravel())[0, 1]  # blue: not shifted by the adaptor
    corr_other = np.corrcoef(ia[..., 2].ravel(), other[..., 2].ravel())[0, 1]
    assert corr_same > 0.9 > 0.5 > corr_other
    # similarity to the base image: < 1 for the adaptor; none for base itself (not a measurement)
    assert rec[rec.model == "base"]["sem_toy_sim"].isna().all()
    assert (rec[rec.model == "debiased"]["sem_toy_sim"] < 0.999).all()
    assert s["models"]["base"]["semantics"]["toy_sim"] is None
    assert 0.0 < s["models"]["debiased"]["semantics"]["toy_sim"] < 0.999
    assert s["prompts"] == {"split": "test", "count": 4}
    assert set(s["models"]) == {"base", "debiased"}
    assert set(s["models"]["base"]["semantics"]) == {"fidelity", "toy_sim"}


def test_resume_after_crash_reuses_finished_parts(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, "eval.batch_size=3")  # one prompt per batch
    out, log = tmp_path / "out", tmp_path / "gen.log"
    crash_prompt = "A photo of the face of a geologist, a person"  # in the second chunk
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg, tmp_path, out, log=str(log), fail_on=crash_prompt)
    done = sorted(out.glob("parts/*/*/*.parquet"))
    assert len(done) == 1  # base, chunk 0 finished and was written before the crash
    assert not list(out.glob("parts/**/*.tmp"))
    log.write_text("")
    run(cfg, tmp_path, out, log=str(log))
    generated = [tuple(json.loads(x)) for x in log.read_text().splitlines()]
    assert (True, "A photo of the face of a senator, a person") not in generated  # reused
    assert len(generated) == 3 * 3 * 2  # the other three parts, 2 prompts x 3 images each
    fresh = tmp_path / "fresh"
    run(cfg, tmp_path, fresh)
    cols = ["model", "prompt", "j", "seed", "face_found", "label_gender", "label_race"]
    pd.testing.assert_frame_equal(pd.read_parquet(out / "records.parquet")[cols],
                                  pd.read_parquet(fresh / "records.parquet")[cols])
    # a changed setting makes new parts instead of reusing stale ones
    run(make_cfg(tmp_path, "eval.batch_size=3", "eval.steps=3"), tmp_path, out)
    assert len(list(out.glob("parts/base/*"))) == 2


def test_eval_dtype_is_its_own_setting(tmp_path: Path) -> None:
    """eval.dtype generates in its dtype (default model.dtype) and keys the parts: no float32 part is reused
    for a bfloat16 evaluation."""
    from fairdiff_ray.eval.pipeline import eval_spec, plan_for
    from fairdiff_ray.eval.prompts import EvalPrompt

    models = {"base": None}
    assert eval_spec(make_cfg(tmp_path), models)["dtype"] == "float32"
    assert eval_spec(make_cfg(tmp_path, "model.dtype=float16"), models)["dtype"] == "float16"
    assert eval_spec(make_cfg(tmp_path, "model.dtype=float16", "eval.dtype=bfloat16"), models)["dtype"] == "bfloat16"
    prompts = [EvalPrompt(concept="occupations", prompt="A photo of the face of a nurse, a person")]
    paths = {dt: plan_for(make_cfg(tmp_path, *dt), models, prompts, tmp_path / "out")[0].path
             for dt in [(), ("eval.dtype=bfloat16",)]}
    assert paths[()] != paths[("eval.dtype=bfloat16",)]


def test_parts_keyed_by_scorer_files(tmp_path: Path) -> None:
    """A scorer net retrained in place (same path, new file) makes new parts: its labels are not reused; the
    shipped synthetic nets count where a synthetic scorer names no path."""
    from fairdiff_ray.eval.pipeline import _scorer_dirs, eval_spec, plan_for
    from fairdiff_ray.eval.prompts import EvalPrompt
    from fairdiff_ray.synthetic.world import DEFAULT_DIR

    nets = tmp_path / "nets"
    nets.mkdir()
    (nets / "classifier-eval.safetensors").write_bytes(b"old net")
    prompts = [EvalPrompt(concept="occupations", prompt="A photo of the face of a nurse, a person")]
    cfg = make_cfg(tmp_path, f"eval.classifier.path={nets}", "features.synthetic=default")
    dirs = _scorer_dirs(eval_spec(cfg, {"base": None}))
    assert dirs["classifier"] == str(nets) and dirs["detector"] == str(DEFAULT_DIR)
    assert dirs["features.synthetic"] == str(DEFAULT_DIR)
    before = plan_for(cfg, {"base": None}, prompts, tmp_path / "out")[0].path
    assert plan_for(cfg, {"base": None}, prompts, tmp_path / "out")[0].path == before  # stable
    (nets / "classifier-eval.safetensors").write_bytes(b"retrained net")
    after = plan_for(cfg, {"base": None}, prompts, tmp_path / "out")[0].path
    assert after != before and after.name == before.name  # same chunk, new fingerprint directory


def test_eval_nets_apart_from_training(tmp_path: Path) -> None:
    """eval.features replaces the training feature nets in the scorer's spec; summary and log say when the
    evaluation scores with the training's own classifier or feature nets (METHOD.md: different ones)."""
    from fairdiff_ray.eval.pipeline import eval_spec
    from fairdiff_ray.eval.run import same_as_training

    cfg = make_cfg(tmp_path)  # eval.classifier defaults to the eval variant; no feature nets
    assert same_as_training(cfg) == {"classifier_as_training": False, "features_as_training": False}
    same = make_cfg(tmp_path, "eval.classifier.variant=train", "features.synthetic=default")
    assert same_as_training(same) == {"classifier_as_training": True, "features_as_training": True}
    apart = make_cfg(tmp_path, "features.synthetic=default", f"eval.features={{synthetic: {tmp_path / 'nets'}}}")
    assert same_as_training(apart)["features_as_training"] is False
    assert eval_spec(apart, {"base": None})["features"]["synthetic"] == str(tmp_path / "nets")
    assert eval_spec(same, {"base": None})["features"]["synthetic"] == "default"
    lines: list[str] = []
    s = run_evaluation(make_cfg(tmp_path, "eval.classifier.variant=train"), {"debiased": adaptor_dir(tmp_path)},
                       tmp_path / "out", executor="local", report=False, gen_loader=standin_gen_loader,
                       score_loader=standin_score_loader, log=lines.append)
    assert s["eval"]["classifier_as_training"] is True and s["eval"]["features_as_training"] is False
    assert any("eval.classifier is the training classifier" in x for x in lines)


def test_same_text_in_two_concepts(tmp_path: Path) -> None:
    """One prompt text in two concept sets: both evaluated in full (rows keyed by concept too), counted apart,
    and the report's grids show each concept's own images."""
    from fairdiff_ray.eval.report import write_report

    a = write_prompts(tmp_path / "a.jsonl", n=2, concept="occupations")
    b = write_prompts(tmp_path / "b.jsonl", n=2, concept="descriptors")
    cfg = make_cfg(tmp_path, f"data.prompt_sets=[{{path: {a}}}, {{path: {b}}}]", "eval.prompts_per_part=4")
    out = tmp_path / "out"
    s = run(cfg, tmp_path, out)
    rec = pd.read_parquet(out / "records.parquet")
    assert len(rec) == 2 * 2 * 3 * 2  # 2 concepts x 2 prompts x 3 images x 2 models
    assert s["prompts"]["count"] == 4 and s["images_per_prompt"] == 3
    assert set(s["concepts"]) == {"occupations", "descriptors"}
    page = write_report(out).read_text()
    assert "[descriptors] A photo of the face of a" in page and "[occupations] A photo of the face of a" in page


SEED_SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
from fairdiff_ray.core.seeding import stable_seed, noise_from_seeds
from tests._helpers_eval import OCCUPATIONS
seeds = [stable_seed(f"A photo of the face of a {{o}}, a person", j) for o in OCCUPATIONS for j in range(3)]
x = noise_from_seeds(seeds[:4], (4, 8, 8))
print(json.dumps({{"seeds": seeds, "noise": x.flatten()[:64].tolist(), "hash": hash("x")}}))
"""


def test_seeds_identical_across_processes() -> None:
    outs = []
    for hashseed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hashseed, "OMP_NUM_THREADS": "1"}
        p = subprocess.run([sys.executable, "-c", SEED_SCRIPT.format(root=str(ROOT))], env=env, cwd=ROOT,
                           capture_output=True, text=True, check=True, timeout=120)
        outs.append(json.loads(p.stdout))
    assert outs[0]["hash"] != outs[1]["hash"]  # Python's hash() differs between these processes ...
    assert outs[0]["seeds"] == outs[1]["seeds"]  # ... our seeds and noise do not
    assert outs[0]["noise"] == outs[1]["noise"]
    assert len(set(outs[0]["seeds"])) == len(outs[0]["seeds"])


def test_adaptor_arguments_are_checked(tmp_path: Path) -> None:
    d = adaptor_dir(tmp_path)
    assert parse_adaptors([f"debiased={d}", f"other={d}"]) == {"debiased": d, "other": d}
    for bad, msg in [("debiased", "NAME=DIR"), (f"base={d}", "reserved"), ("x=/nonexistent/dir", "no such adaptor")]:
        with pytest.raises(UserError, match=msg):
            parse_adaptors([bad])
    with pytest.raises(UserError, match="given twice"):
        parse_adaptors([f"a={d}", f"a={d}"])


def test_job_script_bad_input_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("eval: {split: test}\n")
    p = subprocess.run([sys.executable, "jobs/evaluate.py", "--config", str(cfg), "--adaptor", "oops"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "NAME=DIR" in p.stderr


@pytest.mark.slow
def test_ray_data_pipeline_equals_local(tmp_path: Path, ray_cluster) -> None:
    cfg = make_cfg(tmp_path, "eval.num_actors=1", "eval.cpus_per_actor=0.5")
    local = run(cfg, tmp_path, tmp_path / "local")
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        distributed = run_evaluation(cfg, {"debiased": adaptor_dir(tmp_path)}, tmp_path / "ray", executor="ray",
                                     report=False, gen_loader=standin_gen_loader, score_loader=standin_score_loader,
                                     log=lambda s: None)  # fmt: skip
    assert not [w for w in caught if "ray_remote_args" in str(w.message)]  # Ray 2.64 removes them (_retry_args)
    assert distributed["models"] == local["models"]
    cols = ["model", "prompt", "j", "seed", "face_found", "label_gender", "label_race", "thumb"]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "ray" / "records.parquet")[cols],
                                  pd.read_parquet(tmp_path / "local" / "records.parquet")[cols])


def test_retry_bounds_only_while_map_batches_takes_them() -> None:
    from fairdiff_ray.eval.pipeline import ACTOR_RESTARTS, TASK_RETRIES, _retry_args

    def old_api(fn, *, batch_size=None, **ray_remote_args): ...

    def new_api(fn, *, batch_size=None, resources=None): ...

    assert _retry_args(old_api) == {"max_restarts": ACTOR_RESTARTS, "max_task_retries": TASK_RETRIES}
    assert _retry_args(new_api) == {}
