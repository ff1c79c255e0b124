"""`make demo` end to end, shortened (issue 4): jobs/demo.py's own entry point on the shipped synthetic world
through a local Ray cluster - debias a few steps, evaluate base and debiased on held-out occupations with the
eval-time classifier, print the before/after table, and write runs/<name>/ with a diffusers-loadable adaptor,
eval/summary.json (the keys the issue names) and a report with grids and bars. The full-length numbers are
README's (measured by `make demo`); here only the pipeline and its outputs are checked, not the debiasing."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

SHORT = ["train.steps=2", "train.checkpoint_every=2", "train.prompts_per_step=2", "train.images_per_prompt=4",
         "train.chunk_size=4", "sampler.steps=3", "sampler.steps_jitter=0", "eval.max_prompts=3",
         "eval.images_per_prompt=2", "eval.steps=3", "eval.grid_images=2", "ray.cpus_per_worker=1",
         "eval.cpus_per_actor=0.5"]


def _demo_main():
    spec = importlib.util.spec_from_file_location("demo_job", ROOT / "jobs" / "demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_short_demo_writes_adaptor_summary_and_report(tmp_path, ray_cluster, capsys, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)  # the shipped config's relative paths, as `make demo` runs it
    code = _demo_main()([*SHORT, f"run.storage={tmp_path}"])
    assert code == 0
    out = capsys.readouterr().out
    run = tmp_path / "demo"
    assert "| model | bias gender" in out and "| base |" in out and "| debiased |" in out

    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert summary["prompts"] == {"split": "test", "count": 3}
    for name in ("base", "debiased"):
        m = summary["models"][name]
        b = m["bias"]["gender"]
        assert 0.0 <= b["mean"] <= 1.0 and b["std"] >= 0.0
        freq = m["freq"]["gender"]
        assert set(freq) == {"female", "male"} and abs(sum(freq.values()) - 1.0) < 1e-6
        assert 0.0 <= m["face_rate"] <= 1.0
        assert m["semantics"], m  # the synthetic world's stand-ins for CLIP / DINO / fidelity
    timing = json.loads((run / "demo.json").read_text())["timing"]
    assert timing["total_s"] >= timing["train_s"] > 0

    # the adaptor loads in stock diffusers with no code of ours
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(ROOT / "assets" / "synthetic-sd"), safety_checker=None)
    pipe.load_lora_weights(str(run / "adaptor"))
    meta = json.loads((run / "adaptor" / "fairdiff_adaptor.json").read_text())
    assert meta["step"] == 2 and meta["attributes"] == {"gender": ["female", "male"]}

    html = (run / "eval" / "report.html").read_text()
    assert "<table" in html and ("<img" in html) and (run / "report.html").is_file()

    # `make demo` again: the finished run is reused (no training), the evaluation rebuilt from its parts
    adaptor = (run / "adaptor" / "pytorch_lora_weights.safetensors").read_bytes()
    assert _demo_main()([*SHORT, f"run.storage={tmp_path}"]) == 0
    again = json.loads((run / "demo.json").read_text())
    assert again["reused_adaptor"] is True
    assert (run / "adaptor" / "pytorch_lora_weights.safetensors").read_bytes() == adaptor
    assert json.loads((run / "eval" / "summary.json").read_text())["models"] == summary["models"]
    # with other training settings it is refused, before anything runs
    from fairdiff_ray.errors import UserError

    with pytest.raises(UserError, match=r"finished with other settings \(train.lr\)"):
        _demo_main()([*SHORT, f"run.storage={tmp_path}", "train.lr=0.5"])
