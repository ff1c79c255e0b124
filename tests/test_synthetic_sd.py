"""The synthetic world's vocabulary, prompt files and pretrained tiny Stable Diffusion (issue 4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fairdiff_ray.synthetic.render import ATTRIBUTES, N_CONTENT
from fairdiff_ray.synthetic.vocab import (
    CONCEPTS,
    TEST_OCCUPATIONS,
    bias,
    content_class,
    pretrain_distribution,
    subject_of_prompt,
    subjects,
    write_prompt_files,
)

ROOT = Path(__file__).resolve().parents[1]


def test_vocabulary_sizes_and_splits() -> None:
    occ = subjects("occupations")
    assert len(occ) >= 150 and len({s.subject for s in occ}) == len(occ)
    assert sorted(s.subject for s in occ if s.split == "test") == sorted(TEST_OCCUPATIONS) and len(TEST_OCCUPATIONS) == 50
    for c in ("sports", "descriptors"):
        ss = subjects(c)
        assert len(ss) >= 30 and {s.split for s in ss} == {"train", "val", "test"}
    assert all(0 <= s.content < N_CONTENT for s in subjects())


def test_pretraining_distribution_is_skewed_like_sd15() -> None:
    ss = subjects()
    for s in ss:
        for a, classes in ATTRIBUTES.items():
            p = s.probs[a]
            assert len(p) == len(classes) and all(x > 0 for x in p) and abs(sum(p) - 1) < 1e-5
    test = [s for s in ss if s.concept == "occupations" and s.split == "test"]
    assert np.mean([bias(s.probs["gender"]) for s in test]) >= 0.6
    assert np.mean([max(s.probs["gender"]) > 0.85 for s in ss]) > 0.7  # most subjects strongly one-sided
    assert np.mean([np.argmax(s.probs["race"]) == 0 for s in ss]) > 0.5  # 'white' dominates most subjects
    assert 0.15 < np.mean([s.probs["age"][1] for s in ss]) < 0.25  # about 20% old overall
    # deterministic (SHA-256 seeds): recomputing gives the same numbers
    assert pretrain_distribution("occupations", "nurse") == pretrain_distribution("occupations", "nurse")


def test_prompt_files_match_the_vocabulary(tmp_path) -> None:
    write_prompt_files(tmp_path)
    for c in CONCEPTS:
        shipped = (ROOT / "data" / "prompts" / f"{c}.jsonl").read_text(encoding="utf-8")
        assert (tmp_path / f"{c}.jsonl").read_text(encoding="utf-8") == shipped, f"regenerate data/prompts/{c}.jsonl"
        rows = [json.loads(line) for line in shipped.splitlines()]
        assert all(set(r) == {"concept", "prompt", "split", "subject"} and r["concept"] == c for r in rows)


def test_word_tokenizer_keeps_every_vocabulary_word_whole(tmp_path) -> None:
    from transformers import CLIPTokenizer

    from fairdiff_ray.synthetic.vocab import build_word_tokenizer, vocabulary_words

    tok = build_word_tokenizer()
    words = vocabulary_words()
    assert all(len(tok(w, add_special_tokens=False).input_ids) == 1 for w in words)
    longest = max((s.prompt for s in subjects()), key=lambda p: len(p.split()))
    ids = tok(longest).input_ids
    assert len(ids) == len(longest.replace(",", " ,").split()) + 2  # one token per word and comma, plus bos/eos
    assert ids[0] == len(tok) - 2 and ids[-1] == len(tok) - 1
    tok.save_pretrained(tmp_path)
    assert CLIPTokenizer.from_pretrained(tmp_path)(longest).input_ids == ids
    assert len(tok("a zebra astronaut").input_ids) > 4  # unknown words fall back to pieces, never fail


def test_content_class_of_prompts() -> None:
    s = subjects("sports")[3]
    assert subject_of_prompt(s.prompt) == s and content_class(s.prompt) == s.content
    assert content_class("  " + s.prompt.upper() + " ") == s.content
    longer = "A photo of the face of a nurse, a person, oil painting"
    assert content_class(longer) == content_class("A photo of the face of a nurse, a person")
    assert 0 <= content_class("something else entirely") < N_CONTENT


# ------------------------------------------------------------------------------------------ pretraining code
def test_pretraining_draws_follow_each_subjects_distribution() -> None:
    from fairdiff_ray.synthetic.pretrain import draw_attributes

    s = subjects("occupations")[0]
    a = draw_attributes([s] * 20000, seed=1)
    for name, p in s.probs.items():
        freq = np.bincount(a[name], minlength=len(p)) / 20000
        assert np.abs(freq - np.array(p)).max() < 0.015, (name, freq, p)
    assert (a["content"] == s.content).all()


def test_pretraining_batch_is_deterministic() -> None:
    import torch

    from fairdiff_ray.synthetic.pretrain import pretraining_batch

    ss = subjects()
    i1, x1 = pretraining_batch(ss, 8, seed=3)
    i2, x2 = pretraining_batch(ss, 8, seed=3)
    i3, x3 = pretraining_batch(ss, 8, seed=4)
    assert i1 == i2 and torch.equal(x1, x2) and not torch.equal(x1, x3)
    assert x1.shape == (8, 3, 32, 32)


def test_varied_captions_name_the_render_and_keep_the_subject() -> None:
    import re

    import torch

    from fairdiff_ray.synthetic.pretrain import PretrainSpec, _vary_captions, tokenize
    from fairdiff_ray.synthetic.vocab import (
        ATTRIBUTE_WORDS,
        build_word_tokenizer,
        varied_caption,
        vocabulary_words,
    )

    rng = np.random.default_rng(0)
    ss, seen_inline, seen_head = subjects(), 0, 0
    for k in range(300):
        s = ss[k % len(ss)]
        a = {"gender": k % 2, "race": k % 4, "age": (k // 3) % 2}
        cap = varied_caption(s.prompt, a, rng)
        words = re.findall(r"[a-z]+", cap.lower())
        assert s.subject in cap and set(words) <= set(vocabulary_words(captions=True)), cap
        for attr, names in ATTRIBUTE_WORDS.items():  # only the render's own class words, never another class's
            assert not ({n for i, n in enumerate(names) if i != a[attr]} & set(words) - set(s.prompt.lower().split())), cap
        seen_head += not cap.startswith("A photo")
        seen_inline += cap.startswith("A photo") and cap != s.prompt
    assert seen_head > 50 and seen_inline > 30
    assert varied_caption(ss[0].prompt, {"gender": 0}, np.random.default_rng(5)) == varied_caption(
        ss[0].prompt, {"gender": 0}, np.random.default_rng(5))  # fmt: skip
    # the pretraining batch re-captions only the chosen share of non-dropped rows
    tok = build_word_tokenizer(vocabulary_words(captions=True))
    assert len(tok) > len(build_word_tokenizer())  # the caption words are whole tokens of their own
    base = tokenize(tok, [s.prompt for s in ss] + [""])
    rows, ids = torch.arange(64), torch.arange(64) % len(ss)
    drop = torch.zeros(64, dtype=torch.bool)
    drop[:8] = True
    attrs = {"gender": torch.zeros(64, dtype=torch.long), "race": torch.zeros(64, dtype=torch.long),
             "age": torch.ones(64, dtype=torch.long)}  # fmt: skip
    pid = torch.where(drop, torch.full_like(rows, len(ss)), ids)

    def spec(mix: float) -> PretrainSpec:
        return PretrainSpec(caption_mix=mix)

    out = _vary_captions(tok, base[pid], rows, drop, ids, attrs, ss, spec(0.5), np.random.default_rng(1))
    changed = (out != base[pid]).any(1)
    assert not changed[:8].any() and 10 < int(changed.sum()) < 50
    assert torch.equal(_vary_captions(tok, base[pid], rows, drop, ids, attrs, ss, spec(0.0), np.random.default_rng(1)), base[pid])


def test_pretraining_sources_are_checked_before_any_work(tmp_path) -> None:
    import dataclasses
    import subprocess
    import sys

    import torch

    from fairdiff_ray.errors import ConfigError
    from fairdiff_ray.synthetic.pretrain import PretrainSpec, check_sources
    from fairdiff_ray.synthetic.vocab import build_word_tokenizer, vocabulary_words

    spec = PretrainSpec()
    check_sources(dataclasses.replace(spec, vae_from=str(ROOT / "assets" / "synthetic-sd")))  # the shipped one: fine
    with pytest.raises(ConfigError, match="vae_from=.*no vae/config.json"):
        check_sources(dataclasses.replace(spec, vae_from=str(tmp_path)))
    with pytest.raises(ConfigError, match="init_from=.*no such file"):
        check_sources(dataclasses.replace(spec, init_from=str(tmp_path / "state.pt")))
    key = "text_model.embeddings.token_embedding.weight"
    n_plain = len(build_word_tokenizer(vocabulary_words()))
    torch.save({"stage": "done", "text": {key: torch.zeros(n_plain, 4)}}, tmp_path / "state.pt")
    check_sources(dataclasses.replace(spec, init_from=str(tmp_path / "state.pt")))
    with pytest.raises(ConfigError, match="same caption_mix"):
        check_sources(dataclasses.replace(spec, init_from=str(tmp_path / "state.pt"), caption_mix=0.3))
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "pretrain_synthetic.py"), "--out", str(tmp_path / "out"),
                        f"init_from={tmp_path / 'missing.pt'}"], capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "no such file" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_spec_overrides() -> None:
    from fairdiff_ray.synthetic.pretrain import spec_from_overrides

    spec = spec_from_overrides({"steps": "10", "unet_channels": "(16,32)", "lr": "0.01", "cross_attn_levels": "true,true"})
    assert spec.steps == 10 and spec.unet_channels == (16, 32) and spec.lr == 0.01 and spec.cross_attn_levels == (True, True)
    with pytest.raises(KeyError, match="stepz"):
        spec_from_overrides({"stepz": "1"})
    for bad, match in [({"steps": "-5"}, "steps=-5 must be >= 1"), ({"lr": "0"}, "lr=0.0 must be > 0"),
                       ({"caption_mix": "1.5"}, r"caption_mix=1.5 must be in \[0, 1\]"),
                       ({"unet_channels": "8,16,32"}, "one entry per level")]:
        with pytest.raises(ValueError, match=match):
            spec_from_overrides(bad)


def test_pretraining_job_refuses_before_any_work(tmp_path) -> None:
    """Out-of-range keys, an existing --out without --overwrite (the shipped model is the default --out) and a
    run name started with other settings: one line, exit 2, nothing written."""
    import dataclasses
    import subprocess
    import sys

    from fairdiff_ray.errors import UserError
    from fairdiff_ray.synthetic.pretrain import SPEC_FILE, PretrainSpec, check_run_spec

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    job = [sys.executable, str(ROOT / "jobs" / "pretrain_synthetic.py"), "--storage", str(tmp_path / "store")]
    for args, said in [(["--out", str(tmp_path / "new"), "steps=-5"], "steps=-5 must be >= 1"),
                       (["--out", str(out)], "exists: pass --overwrite")]:
        r = subprocess.run([*job, *args], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and said in r.stderr, r.stderr
    assert not (tmp_path / "new").exists() and not (tmp_path / "store").exists()
    assert [f.name for f in out.iterdir()] == ["keep.txt"]
    run = tmp_path / "store" / "smoke"
    run.mkdir(parents=True)
    spec = PretrainSpec()
    (run / SPEC_FILE).write_text(json.dumps(dataclasses.asdict(spec)))
    check_run_spec(spec, str(tmp_path / "store"), "smoke")  # the same settings resume
    with pytest.raises(UserError, match=r"run 'smoke' .* other settings \(caption_mix, steps\)"):
        check_run_spec(dataclasses.replace(spec, steps=10, caption_mix=0.3), str(tmp_path / "store"), "smoke")


# ------------------------------------------------------------------------------------------ the shipped model
def _stock_pipeline(path: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(path), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, prompt: str, n: int, steps: int = 4):
    import torch

    from fairdiff_ray.core.seeding import noise_from_seeds, stable_seed

    c = pipe.unet.config
    latents = noise_from_seeds([stable_seed(prompt, j) for j in range(n)], (c.in_channels, c.sample_size, c.sample_size))
    with torch.no_grad():
        return pipe(prompt=[prompt] * n, latents=latents, num_inference_steps=steps, guidance_scale=7.5, output_type="pt").images


def test_shipped_model_loads_with_stock_pipeline_and_generates() -> None:
    path = ROOT / "assets" / "synthetic-sd"
    index = json.loads((path / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size <= 25 * 2**20 and list(path.rglob("*.safetensors")) and not list(path.rglob("*.bin"))
    pipe = _stock_pipeline(path)
    assert pipe.vae.config.scaling_factor != 0.18215  # measured on the synthetic latents, not SD's constant
    prompt = subjects("occupations")[0].prompt
    assert len(pipe.tokenizer(prompt).input_ids) < pipe.tokenizer.model_max_length  # every word is one token
    from fairdiff_ray.synthetic.vocab import build_word_tokenizer

    rebuilt = build_word_tokenizer()
    assert all(rebuilt(s.prompt).input_ids == pipe.tokenizer(s.prompt).input_ids for s in subjects())
    a, b = _generate(pipe, prompt, 3), _generate(pipe, prompt, 3)
    assert a.shape == (3, 3, 32, 32) and 0 <= a.min() and a.max() <= 1
    assert (a - b).abs().max() < 1e-5 and a.std() > 0.05  # deterministic per seed, not a blank image


@pytest.mark.slow
def test_pretraining_smoke_run_through_ray(tmp_path, ray_cluster) -> None:
    """The job's code path (Ray Train worker, checkpoints, stock save) at toy sizes, on the shared test cluster
    (run_pretraining joins a running Ray, as jobs/pretrain_synthetic.py under `ray job submit` does)."""
    from fairdiff_ray.synthetic.pretrain import run_pretraining, spec_from_overrides

    spec = spec_from_overrides(
        {"vae_channels": "8,8,8", "unet_channels": "8,16", "text_hidden": "16", "text_layers": "1", "vae_steps": "2",
         "vae_batch": "4", "n_latents": "16", "steps": "2", "batch": "4", "report_every": "1", "checkpoint_every": "1",
         "caption_mix": "0.5"}
    )  # fmt: skip
    out = run_pretraining(spec, tmp_path / "sd", storage=str(tmp_path / "store"), name="smoke")
    assert json.loads((out / "pretrain_spec.json").read_text())["steps"] == 2
    pipe = _stock_pipeline(out)
    assert pipe.unet.config.block_out_channels == [8, 16] and pipe.unet.config.sample_size == 8
    assert _generate(pipe, subjects("sports")[0].prompt, 2, steps=2).shape == (2, 3, 32, 32)
    assert not (tmp_path / "sd.tmp").exists()
    # vae_from: stage 1 skipped, the given pipeline's VAE taken as is
    import dataclasses

    import torch

    again = run_pretraining(dataclasses.replace(spec, vae_from=str(out), seed=1, steps=1), tmp_path / "sd2",
                            storage=str(tmp_path / "store"), name="smoke-vae-from")  # fmt: skip
    vae2 = _stock_pipeline(again).vae.state_dict()
    assert all(torch.equal(v, vae2[k]) for k, v in pipe.vae.state_dict().items())


def test_shipped_model_reproduces_the_pretraining_bias() -> None:
    """Generated attributes, labelled by the world's eval nets, follow the subject's skewed distribution."""
    import torch
    import torch.nn.functional as F

    from fairdiff_ray.core.crop import crop_square
    from fairdiff_ray.synthetic.world import load_classifier, load_detector, load_fidelity

    pipe = _stock_pipeline(ROOT / "assets" / "synthetic-sd")
    det, clf, fid = load_detector(), load_classifier(variant="eval"), load_fidelity()
    test = [s for s in subjects("occupations") if s.split == "test"]
    female = max(test, key=lambda s: s.probs["gender"][0])
    male = max(test, key=lambda s: s.probs["gender"][1])
    for s, majority in ((female, 0), (male, 1)):
        x = _generate(pipe, s.prompt, 8, steps=10) * 2 - 1
        with torch.no_grad():
            faces = det.detect(x)
            g = clf(crop_square(x, faces.boxes, expand=clf.crop_expand, size=clf.input_size))["gender"].argmax(1)
            content = F.softmax(fid(x), 1).argmax(1)
        assert faces.found.float().mean() >= 0.9
        assert (g[faces.found] == majority).float().mean() >= 0.75, (s.subject, g.tolist())
        assert (content == s.content).float().mean() >= 0.75
