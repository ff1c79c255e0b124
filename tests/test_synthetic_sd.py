"""The synthetic world's vocabulary, prompt files and pretrained tiny Stable Diffusion (issue 4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

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


def test_content_class_of_prompts() -> None:
    s = subjects("sports")[3]
    assert subject_of_prompt(s.prompt) == s and content_class(s.prompt) == s.content
    assert content_class("  " + s.prompt.upper() + " ") == s.content
    longer = "A photo of the face of a nurse, a person, oil painting"
    assert content_class(longer) == content_class("A photo of the face of a nurse, a person")
    assert 0 <= content_class("something else entirely") < N_CONTENT
