"""A Ray Tune sweep end to end on the synthetic world (issue 7): the shipped sweep, shrunk to 4-step trials of
2 age targets x 2 LoRA ranks, writes the table, the plots and a best adaptor that stock diffusers loads; a second
invocation with the same name resumes and re-runs nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from fairdiff_ray.errors import ConfigError
from fairdiff_ray.sweep.spec import load_sweep, override_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "configs" / "sweep_synthetic.yaml"
# 4 SGD steps of 4 images x 4 sampling steps; validation on 2 held-out prompts before step 1 and after steps 2 and 4
TINY = ["train.steps=4", "train.checkpoint_every=2", "train.validate_every=2", "train.val_prompts=2",
        "train.images_per_prompt=4", "train.chunk_size=4", "sampler.steps=4", "ray.cpus_per_worker=1",
        "ray.num_workers=1"]


def _state(sweep_dir: Path) -> dict[str, tuple[int, ...]]:
    """What trials write: each Ray Train run (mtime + size of every file: nothing rewritten) and each trial's Tune
    results (size + content: Tune re-uploads its trial files on restore, but an extra report would change them)."""
    out: dict[str, tuple[int, ...]] = {}
    for p in (sweep_dir / "trials").rglob("*"):
        if p.is_file():
            out[str(p.relative_to(sweep_dir))] = (p.stat().st_mtime_ns, p.stat().st_size)
    for p in (sweep_dir / "tune").glob("*/*"):
        if p.is_file():
            out[str(p.relative_to(sweep_dir))] = (p.stat().st_size, hash(p.read_bytes()))
    return out


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, ray_cluster):
    from fairdiff_ray.dist.tune import run_sweep

    shipped = load_sweep(SHIPPED)
    # without ASHA every trial runs to the end (and trial drivers are reused: a faster test); the scheduler's
    # settings are tested in test_sweep_spec.py and the shipped sweep's early stopping is measured in the report
    spec = load_sweep(SHIPPED, [f"storage={tmp_path_factory.mktemp('sweeps')}", "name=ci",
                                override_for("overrides", [*shipped.overrides, *TINY]),
                                "asha=null", "max_concurrent_trials=2"])
    assert spec.asha is None and spec.grid_size() == 4
    out = run_sweep(spec)
    return spec, out


def test_table_has_every_trial_config_and_final_metrics(sweep):
    spec, out = sweep
    df = pd.read_parquet(out / "trials.parquet")
    assert len(df) == spec.grid_size() == 4
    assert set(df["status"]) == {"OK"}
    got = {(tuple(json.loads(p)), int(r)) for p, r in zip(df["cfg:target.age.probs"], df["cfg:adaptor.rank"])}
    assert got == {((0.9, 0.1), 2), ((0.9, 0.1), 8), ((0.5, 0.5), 2), ((0.5, 0.5), 8)}
    assert (df["rank"] == df["cfg:adaptor.rank"]).all() and set(df["kind"]) == {spec.base_config([]).adaptor.kind}
    assert list(df["objective"]) == sorted(df["objective"])  # best first
    for _, r in df.iterrows():
        assert r["steps_done"] == 4
        assert r["want/age/old"] == pytest.approx(json.loads(r["cfg:target.age.probs"])[1])
        assert r["freq/age/young"] + r["freq/age/old"] == pytest.approx(1.0)
        for attr, spec_a in spec.base_config([]).target.items():
            assert sum(r[f"freq/{attr}/{c}"] for c in spec_a["classes"]) == pytest.approx(1.0)
        assert 0 <= r["bias/age"] <= 1 and 0 <= r["first/age/old"] <= 1 and r["drift"] >= 0
        d = r["distance"] / max(r["distance_start"], 0.01) if spec.relative_distance else r["distance"]
        assert r["objective"] == pytest.approx(d + spec.semantic_weight * r["drift"])
        run = Path(r["adaptor"]).parent
        assert json.loads((run / "finished.json").read_text())["steps"] == 4
        assert (run / "checkpoint_00000004" / "config.yaml").is_file()
    # the first validation runs before the first step: every trial starts from the same base model (LoRA B = 0)
    assert df["first/age/old"].nunique() == 1
    md = (out / "trials.md").read_text()
    assert md.count("\n| trial_") == 4 and "cfg:target.age.probs" in md and "freq/age/old" in md


def test_plots_are_pngs(sweep):
    import matplotlib.image

    _, out = sweep
    for name in ("bias_vs_rank.png", "pareto.png", "shares.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        h, w, _ = matplotlib.image.imread(out / name).shape
        assert h > 200 and w > 200


def test_best_adaptor_is_the_best_trial_and_loads_in_stock_diffusers(sweep):
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from fairdiff_ray.core.seeding import noise_from_seeds

    _, out = sweep
    best = json.loads((out / "best.json").read_text())
    df = pd.read_parquet(out / "trials.parquet")
    assert best["trial"] == df["trial"][0] and best["objective"] == pytest.approx(df["objective"].min())
    lora = load_file(str(out / "best_adaptor" / "pytorch_lora_weights.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in lora.items())  # it trained
    pipe = StableDiffusionPipeline.from_pretrained(str(ROOT / "assets" / "synthetic-sd"), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a photo of the face of a nurse"

    def images() -> torch.Tensor:
        c = pipe.unet.config
        latents = noise_from_seeds([1, 2], (c.in_channels, c.sample_size, c.sample_size))
        with torch.no_grad():
            return pipe([prompt] * 2, latents=latents, num_inference_steps=4, output_type="pt").images

    before = images()
    pipe.load_lora_weights(str(out / "best_adaptor"))
    assert pipe.get_list_adapters()["text_encoder"]
    after = images()
    assert after.shape == before.shape and torch.isfinite(after).all()
    assert (after - before).abs().max() > 0


def test_second_invocation_resumes_and_reruns_nothing(sweep, capsys):
    from fairdiff_ray.dist.tune import run_sweep

    spec, out = sweep
    before = _state(out)
    assert sum(k.endswith("finished.json") for k in before) == 4
    assert sum(k.endswith("result.json") for k in before) == 4
    table = pd.read_parquet(out / "trials.parquet")
    capsys.readouterr()
    assert run_sweep(spec) == out
    assert "resuming" in capsys.readouterr().out
    assert _state(out) == before  # no trial trained, reported or exported again
    pd.testing.assert_frame_equal(pd.read_parquet(out / "trials.parquet"), table)
    changed = spec.model_copy(update={"semantic_weight": 2.0})
    with pytest.raises(ConfigError, match="was started with different sweep.semantic_weight"):
        run_sweep(changed)  # a resume replays the stored space: a changed sweep file is refused
    assert _state(out) == before
