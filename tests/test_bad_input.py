"""Bad input corpus (issue 9): every case is a one-line error naming what was wrong, exit code 2, no traceback,
and nothing written.

- CONFIG_CASES: `fairdiff config validate` on a config text plus overrides;
- RUNTIME_CASES: `fairdiff debias / evaluate / generate` on the synthetic world (assets/synthetic-sd,
  configs/synthetic_gender.yaml) with one thing broken each - classes the classifier lacks, prompt files (empty,
  missing columns, not UTF-8, wrong format), model directories (missing, incomplete, truncated or corrupt
  safetensors), adaptors (missing, corrupt, made for another base model), face packs, --seeds, an existing --out.
  Every check runs before Ray starts (asserted) and before any output directory is made (the case's tmp dir is
  compared file by file, sizes and mtimes, before and after).
- A long prompt is not an error: it is truncated with one warning line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASE = (ROOT / "configs" / "synthetic_gender.yaml").read_text()
CFG = str(ROOT / "configs" / "synthetic_gender.yaml")
MODEL = ROOT / "assets" / "synthetic-sd"
NETS = ROOT / "assets" / "synthetic-nets"
PROMPTS = ROOT / "data" / "prompts" / "occupations.jsonl"

# (id, yaml text (None = the demo config), overrides, pattern)
CONFIG_CASES: list[tuple[str, str | None, list[str], str]] = [
    ("unknown-section", "trian:\n  steps: 3\n", [], r"unknown key 'trian'.*'train'"),
    ("misspelt-key", "train:\n  stpes: 3\n", [], r"train.stpes.*'steps'"),
    ("misspelt-nested", "adaptor:\n  rnak: 3\n", [], r"adaptor.rnak.*'rank'"),
    ("wrong-type-int", None, ["train.steps=abc"], r"train.steps"),
    ("wrong-type-float", None, ["train.lr=fast"], r"train.lr"),
    ("wrong-type-bool", None, ["sampler.checkpoint=maybe"], r"sampler.checkpoint"),
    ("wrong-enum", None, ["adaptor.kind=lora_everything"], r"adaptor.kind"),
    ("wrong-estimator", None, ["sampler.estimator=magic"], r"sampler.estimator"),
    ("probs-not-summing", None, ["target.gender.probs=[0.6,0.6]"], r"sums to 1.2"),
    ("probs-negative", None, ["target.gender.probs=[1.2,-0.2]"], r"negative"),
    ("probs-nan", None, ["target.gender.probs=[.nan,0.5]"], r"NaN"),
    ("probs-count", None, ["target.gender.probs=[0.2,0.3,0.5]"], r"3 entries for 2 classes"),
    ("duplicate-classes", None, ["target.gender.classes=[a,a]"], r"duplicate"),
    ("one-class", None, ["target.gender.classes=[a]", "target.gender.probs=[1.0]"], r"at least 2"),
    ("target-missing-probs", "target:\n  gender: {classes: [f, m]}\n", [], r"target.gender needs exactly"),
    ("joint-wrong-shape", "target:\n  joint:\n    attributes: {gender: [f, m], race: [a, b]}\n    probs: [0.5, 0.5]\n",
     [], r"shape"),
    ("joint-plus-marginal",
     "target:\n  joint: {attributes: {gender: [f, m]}, probs: [0.5, 0.5]}\n  age: {classes: [y, o], probs: [0.5, 0.5]}\n",
     [], r"cannot be combined"),
    ("joint-ragged", "target:\n  joint:\n    attributes: {gender: [f, m], race: [a, b]}\n    probs: [[0.5], [0.25, 0.25]]\n",
     [], r"rectangular"),
    ("rank-zero", None, ["adaptor.rank=0"], r"adaptor.rank"),
    ("rank-negative", None, ["adaptor.rank=-4"], r"adaptor.rank"),
    ("steps-zero", None, ["train.steps=0"], r"train.steps"),
    ("sampler-steps-zero", None, ["sampler.steps=0", "sampler.steps_jitter=0"], r"sampler.steps"),
    ("jitter-too-large", None, ["sampler.steps=3", "sampler.steps_jitter=5"], r"steps_jitter"),
    ("images-not-divisible", None, ["ray.num_workers=5"], r"does not divide over ray.num_workers"),
    ("truncated-without-k", None, ["sampler.estimator=truncated"], r"truncate_k"),
    ("threshold-above-one", None, ["loss.threshold=1.5"], r"loss.threshold"),
    ("thresholds-not-a-target", None, ["loss.thresholds.age=0.5"], r"loss.thresholds names 'age'"),
    ("thresholds-above-one", None, ["loss.thresholds.gender=1.5"], r"loss.thresholds.gender=1.5"),
    ("ot-separate-not-a-target", None, ["loss.ot_separate=[age]"], r"loss.ot_separate names 'age'"),
    ("ema-decay-one", None, ["adaptor.ema_decay=1.0"], r"adaptor.ema_decay"),
    ("zero-stage-4", None, ["deepspeed.zero_stage=4"], r"deepspeed.zero_stage"),
    ("bad-precision", None, ["deepspeed.precision=fp8"], r"deepspeed.precision"),
    ("override-no-equals", None, ["train.steps"], r"not of the form key.sub=value"),
    ("override-into-value", None, ["train.steps.x=3"], r"'steps' is a value, not a section"),
    ("not-a-mapping", "- a\n- b\n", [], r"mapping of sections"),
    ("bad-yaml", "train: [\n", [], r"not valid YAML at line"),
]


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """The real console entry point in a fresh interpreter (exit code, stderr, no traceback)."""
    return subprocess.run([sys.executable, "-m", "fairdiff_ray.cli", *args], capture_output=True, text=True, cwd=cwd)


def run_inproc(args: list[str], cwd: Path, capsys: pytest.CaptureFixture[str],
               monkeypatch: pytest.MonkeyPatch) -> subprocess.CompletedProcess[str]:
    """Same entry point in-process (fast); exceptions other than UserError would propagate and fail the test."""
    from fairdiff_ray.cli import main

    monkeypatch.chdir(cwd)
    capsys.readouterr()
    code = main(args)
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def assert_one_line_error(r: subprocess.CompletedProcess[str], pattern: str) -> None:
    import re

    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert re.search(pattern, lines[0]), (pattern, lines[0])


@pytest.mark.parametrize(("case", "text", "overrides", "pattern"), CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_errors(tmp_path: Path, case: str, text: str | None, overrides: list[str], pattern: str,
                       capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(BASE if text is None else text)
    before = sorted(p.name for p in tmp_path.iterdir())
    r = run_inproc(["config", "validate", str(cfg), *overrides], tmp_path, capsys, monkeypatch)
    assert_one_line_error(r, pattern)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_missing_config_file(tmp_path: Path) -> None:
    assert_one_line_error(run_cli(["config", "validate", str(tmp_path / "nope.yaml")], tmp_path), r"does not exist")


def test_non_utf8_config(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_bytes(b"train:\n  steps: \xff\xfe\n")
    assert_one_line_error(run_cli(["config", "validate", str(p)], tmp_path), r"not UTF-8")


def test_unknown_command(tmp_path: Path) -> None:
    r = run_cli(["debais"], tmp_path)
    assert r.returncode == 2 and "unknown command 'debais'" in r.stderr


# --------------------------------------------------------------------------------------------------------------
# Runtime inputs: the real entry points on the synthetic world, one thing broken per case


@dataclass(frozen=True)
class World:
    adaptor: Path  # a text-LoRA export for assets/synthetic-sd
    soft: Path  # a soft-prompt export for assets/synthetic-sd
    other: Path  # a text-LoRA export for the tiny test model (another base model: other widths and depth)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    from fairdiff_ray.config import AdaptorConfig
    from fairdiff_ray.models.adaptors import attach_adaptor
    from fairdiff_ray.models.sd import components_from_dict, load_components
    from fairdiff_ray.models.tiny import tiny_components

    root = tmp_path_factory.mktemp("world")
    attach_adaptor(load_components(str(MODEL)), AdaptorConfig(kind="text_lora", rank=2)).export(
        str(root / "adaptor"), {"step": 0})
    attach_adaptor(load_components(str(MODEL)), AdaptorConfig(kind="soft_prompt", soft_tokens=3)).export(
        str(root / "soft"), {"step": 0})
    attach_adaptor(components_from_dict(tiny_components(seed=0)), AdaptorConfig(kind="text_lora", rank=2)).export(
        str(root / "other"), {"step": 0})
    return World(root / "adaptor", root / "soft", root / "other")


def _ps(*paths: Path | str) -> str:
    return "data.prompt_sets=[" + ", ".join(f"{{path: {json.dumps(str(p))}}}" for p in paths) + "]"


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(n: int = 2, split: str = "train") -> list[dict]:
    return [{"concept": "occupation", "prompt": f"a photo of the face of a nurse {i}", "split": split}
            for i in range(n)]


def _debias(*overrides: str, prompts: Path | str = PROMPTS, model: Path | str = MODEL) -> list[str]:
    return ["debias", "--config", CFG, f"model.path={model}", _ps(prompts), *overrides]


def _evaluate(tmp: Path, *overrides: str, adaptors: tuple[str, ...] = (), prompts: Path | str = PROMPTS,
              model: Path | str = MODEL) -> list[str]:
    flags = [x for a in adaptors for x in ("--adaptor", a)]
    return ["evaluate", "--config", CFG, "--out", str(tmp / "eval"), "--executor", "local", *flags,
            f"model.path={model}", _ps(prompts), *overrides]


def _generate(tmp: Path, *flags: str, model: Path | str = MODEL) -> list[str]:
    return ["generate", "--model", str(model), "--prompt", "a photo of the face of a nurse", "--seeds", "0",
            "--steps", "1", "--scheduler", "ddim", "--device", "cpu", "--out", str(tmp / "out"), *flags]


def _model(tmp: Path, change: Callable[[Path], object]) -> Path:
    """A copy of the synthetic model with one thing changed."""
    d = Path(shutil.copytree(MODEL, tmp / "model"))
    change(d)
    return d


def _copy(src: Path, dst: Path, change: Callable[[Path], object]) -> Path:
    d = Path(shutil.copytree(src, dst))
    change(d)
    return d


def _truncate(f: Path) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _garble(f: Path) -> None:  # the 8-byte header length replaced by noise
    data = f.read_bytes()
    f.write_bytes(b"\x9f\x13\xee\x07\xa1\x00\x5c\xf2" + data[8:])


def _unlink(rel: str) -> Callable[[Path], None]:
    return lambda d: (d / rel).unlink()


def _finished_run(tmp: Path) -> list[str]:
    run = tmp / "runs" / "synthetic-gender"
    run.mkdir(parents=True)
    (run / "finished.json").write_text('{"adaptor": "adaptor"}\n')
    return _debias("run.storage=runs")


def _existing_out(tmp: Path) -> list[str]:
    (tmp / "out").mkdir()
    (tmp / "out" / "seed_0.png").write_bytes(b"an earlier result")
    return _generate(tmp)


UNET = "unet/diffusion_pytorch_model.safetensors"
LORA = "pytorch_lora_weights.safetensors"
NOT_UTF8 = b'{"concept": "occupation", "prompt": "a photo of a caf\xe9 owner", "split": "train"}\n'
CSV_NOT_UTF8 = b"concept,prompt,split\noccupation,a photo of a caf\xe9 owner,train\n"
Setup = Callable[[Path, World], list[str]]

# (id, setup(tmp, world) -> argv for fairdiff_ray.cli.main, regex the one stderr line must match)
RUNTIME_CASES: list[tuple[str, Setup, str]] = [
    # classes and attributes the classifier does not have
    ("debias-class-not-in-classifier", lambda t, w: _debias("target.gender.classes=[woman,man]"),
     r"target\.gender\.classes: \['woman', 'man'\] not among the classifier \(synthetic\)'s gender classes "
     r"\['female', 'male'\]"),
    ("debias-classes-out-of-order", lambda t, w: _debias("target.gender.classes=[male,female]"),
     r"target\.gender\.classes: \['male', 'female'\] must list .*in its order \['female', 'male'\]"),
    ("debias-attribute-not-predicted",
     lambda t, w: _debias("target={hair: {classes: [dark, fair], probs: [0.5, 0.5]}}"),
     r"target\.hair: the classifier \(synthetic\) does not predict 'hair'"),
    ("debias-joint-class-unknown",
     lambda t, w: _debias("target={joint: {attributes: {gender: [female, male], age: [young, middle]}, "
                          "probs: [[0.25, 0.25], [0.25, 0.25]]}}"),
     r"target\.joint\.attributes\.age: \['middle'\] not among"),
    ("evaluate-class-not-in-eval-classifier", lambda t, w: _evaluate(t, "target.gender.classes=[woman,man]"),
     r"target\.gender\.classes: \['woman', 'man'\] not among the eval\.classifier \(synthetic\)'s gender"),
    # prompt files
    ("debias-prompt-set-missing", lambda t, w: _debias(prompts=t / "nope.jsonl"),
     r"data\.prompt_sets\.0: prompt set '.*nope\.jsonl' does not exist"),
    ("debias-prompt-set-empty", lambda t, w: _debias(prompts=_jsonl(t / "p.jsonl", [])),
     r"data\.prompt_sets\.0: prompt set '.*p\.jsonl' is empty"),
    ("debias-prompt-set-blank-csv",
     lambda t, w: (t / "p.csv").write_text("\n") and _debias(prompts=t / "p.csv"),
     r"data\.prompt_sets\.0: prompt set '.*p\.csv' is empty"),
    ("debias-no-rows-in-split", lambda t, w: _debias(prompts=_jsonl(t / "p.jsonl", _rows(2, "test"))),
     r"data\.prompt_sets\.0: prompt set '.*p\.jsonl' has no rows with split 'train' \(it has \['test'\]\)"),
    ("debias-empty-prompt",
     lambda t, w: _debias(prompts=_jsonl(t / "p.jsonl", [*_rows(1), {"concept": "c", "prompt": " ", "split": "train"}])),
     r"p\.jsonl': row 2 \(split 'train'\) has an empty prompt"),
    ("debias-missing-column-jsonl",
     lambda t, w: _debias(prompts=_jsonl(t / "p.jsonl", [{"concept": "c", "prompt": "a nurse"}])),
     r"data\.prompt_sets\.0: prompt set '.*p\.jsonl' lacks column\(s\) \['split'\]"),
    ("debias-missing-column-csv",
     lambda t, w: (t / "p.csv").write_text("concept,split\nc,train\n") and _debias(prompts=t / "p.csv"),
     r"data\.prompt_sets\.0: prompt set '.*p\.csv' lacks column\(s\) \['prompt'\]"),
    ("debias-not-utf8-jsonl", lambda t, w: (t / "p.jsonl").write_bytes(NOT_UTF8) and _debias(prompts=t / "p.jsonl"),
     r"data\.prompt_sets\.0: prompt set '.*p\.jsonl' is not UTF-8 text \(byte 0xe9 at offset \d+\)"),
    ("debias-not-utf8-csv", lambda t, w: (t / "p.csv").write_bytes(CSV_NOT_UTF8) and _debias(prompts=t / "p.csv"),
     r"data\.prompt_sets\.0: prompt set '.*p\.csv' is not UTF-8 text"),
    ("debias-txt-format", lambda t, w: (t / "p.txt").write_text("a nurse\n") and _debias(prompts=t / "p.txt"),
     r"data\.prompt_sets\.0: prompt set '.*p\.txt' has unknown extension '\.txt'"),
    ("debias-parquet-not-parquet",
     lambda t, w: (t / "p.parquet").write_text("concept,prompt,split\n") and _debias(prompts=t / "p.parquet"),
     r"data\.prompt_sets\.0: prompt set '.*p\.parquet' is not a readable parquet file"),
    ("debias-jsonl-holding-csv",
     lambda t, w: (t / "p.jsonl").write_text("concept,prompt,split\n") and _debias(prompts=t / "p.jsonl"),
     r"data\.prompt_sets\.0: .*p\.jsonl:1: not valid JSON"),
    ("debias-bad-weight",
     lambda t, w: _debias(prompts=_jsonl(t / "p.jsonl", [{**r, "weight": -1} for r in _rows(2)])),
     r"p\.jsonl': column 'weight' must be finite, >= 0"),
    ("evaluate-prompts-not-utf8",
     lambda t, w: (t / "p.jsonl").write_bytes(NOT_UTF8) and _evaluate(t, prompts=t / "p.jsonl"),
     r"data\.prompt_sets\.0: prompt set '.*p\.jsonl' is not UTF-8 text"),
    ("evaluate-no-test-split", lambda t, w: _evaluate(t, prompts=_jsonl(t / "p.jsonl", _rows(2, "train"))),
     r"p\.jsonl' has no rows with split 'test'"),
    # model directories
    ("debias-model-dir-missing", lambda t, w: _debias(model=t / "nope"),
     r"model directory '.*nope' does not exist .*huggingface-cli download"),
    ("debias-model-file-missing", lambda t, w: _debias(model=_model(t, _unlink("unet/config.json"))),
     r"model directory '.*model' is incomplete: unet/config\.json is missing"),
    ("debias-model-weights-missing", lambda t, w: _debias(model=_model(t, _unlink(
        "vae/diffusion_pytorch_model.safetensors"))), r"incomplete: vae/ weights \(\*\.safetensors or \*\.bin\)"),
    ("debias-model-weights-truncated", lambda t, w: _debias(model=_model(t, lambda d: _truncate(d / UNET))),
     r"model/unet/diffusion_pytorch_model\.safetensors is not a valid safetensors file \(.*truncated"),
    ("evaluate-model-weights-corrupt",
     lambda t, w: _evaluate(t, model=_model(t, lambda d: _garble(d / "text_encoder/model.safetensors"))),
     r"model/text_encoder/model\.safetensors is not a valid safetensors file"),
    ("generate-model-dir-missing", lambda t, w: _generate(t, model=t / "nope"),
     r"model directory '.*nope' does not exist"),
    ("generate-model-tokenizer-missing",
     lambda t, w: _generate(t, model=_model(t, _unlink("tokenizer/tokenizer.json"))),
     r"incomplete: tokenizer/vocab\.json \+ tokenizer/merges\.txt \(or tokenizer/tokenizer\.json\) is missing"),
    # classifier / detector files
    ("debias-classifier-weights-truncated",
     lambda t, w: _debias(f"classifier.path={_copy(NETS, t / 'nets', lambda d: _truncate(d / 'classifier-train.safetensors'))}"),
     r"nets/classifier-train\.safetensors is not a valid safetensors file .*train_synthetic_nets"),
    ("debias-clip-heads-missing",
     lambda t, w: _debias("classifier.kind=clip_heads", f"classifier.path={t}", f"classifier.backbone={t}"),
     r"classifier\.path: .* needs heads\.json and heads\.safetensors"),
    ("debias-detector-missing", lambda t, w: (t / "nets").mkdir() or _debias(f"faces.path={t / 'nets'}"),
     r"faces\.path: synthetic-world detector file .*nets/detector\.safetensors is missing"),
    ("debias-face-pack-without-detector",
     lambda t, w: (t / "pack").mkdir() or (t / "pack" / "w600k_r50.onnx").write_bytes(b"recognition only") and _debias(
         "faces.detector=insightface", f"faces.insightface_pack={t / 'pack'}"),
     r"faces\.insightface_pack: .*pack holds no detector \(det_\*\.onnx or scrfd\*\.onnx\)"),
    ("debias-face-pack-missing", lambda t, w: _debias("faces.detector=insightface", f"faces.insightface_pack={t / 'nope'}"),
     r"faces\.insightface_pack: .*nope is not a directory"),
    ("debias-face-pack-not-given", lambda t, w: _debias("faces.detector=insightface"),
     r"faces\.detector=insightface needs faces\.insightface_pack=DIR"),
    ("debias-preserve-aligned", lambda t, w: _debias("loss.preserve=[gender]"),
     r"loss\.preserve: 'gender' is aligned by the target; list attributes of \['age', 'race'\]"),
    ("debias-soft-replace-not-in-prompts", lambda t, w: _debias(
        "adaptor.kind=soft_prompt", "adaptor.soft_position=replace", "adaptor.soft_replace=a nurse",
        "adaptor.soft_tokens=2"),
     r"data\.prompt_sets \(split train\): prompt '.*' does not start with adaptor\.soft_replace 'a nurse'"),
    ("debias-soft-replace-token-count", lambda t, w: _debias(
        "adaptor.kind=soft_prompt", "adaptor.soft_position=replace", "adaptor.soft_replace=a photo of the face",
        "adaptor.soft_tokens=9"),
     r"adaptor\.soft_replace 'a photo of the face' is 5 tokens but adaptor\.soft_tokens is 9: set "
     r"adaptor\.soft_tokens=5"),
    # adaptors
    ("evaluate-adaptor-dir-missing", lambda t, w: _evaluate(t, adaptors=(f"debiased={t / 'nope'}",)),
     r"--adaptor debiased=.*nope: no such adaptor directory"),
    ("evaluate-adaptor-bad-spec", lambda t, w: _evaluate(t, adaptors=(str(w.adaptor),)),
     r"--adaptor '.*adaptor' is not NAME=DIR"),
    ("evaluate-adaptor-other-base", lambda t, w: _evaluate(t, adaptors=(f"debiased={w.other}",)),
     r"adaptor '.*other' does not fit model '.*synthetic-sd': text_encoder\..*lora_A\.weight has shape \[2, 32\]"),
    ("evaluate-adaptor-truncated",
     lambda t, w: _evaluate(t, adaptors=(f"debiased={_copy(w.adaptor, t / 'ad', lambda d: _truncate(d / LORA))}",)),
     r"ad/pytorch_lora_weights\.safetensors is not a valid safetensors file \(.*re-export the adaptor"),
    ("generate-adaptor-dir-missing", lambda t, w: _generate(t, "--adaptor", str(t / "nope")),
     r"adaptor directory '.*nope' does not exist"),
    ("generate-adaptor-other-base", lambda t, w: _generate(t, "--adaptor", str(w.other)),
     r"adaptor '.*other' does not fit model"),
    ("generate-adaptor-corrupt",
     lambda t, w: _generate(t, "--adaptor", str(_copy(w.adaptor, t / "ad", lambda d: _garble(d / LORA)))),
     r"ad/pytorch_lora_weights\.safetensors is not a valid safetensors file"),
    ("generate-soft-prompt-truncated",
     lambda t, w: _generate(t, "--adaptor", str(_copy(w.soft, t / "ad", lambda d: _truncate(d / "learned_embeds.safetensors")))),
     r"ad/learned_embeds\.safetensors is not a valid safetensors file"),
    ("generate-adaptor-meta-missing",
     lambda t, w: _generate(t, "--adaptor", str(_copy(w.adaptor, t / "ad", _unlink("fairdiff_adaptor.json")))),
     r"ad/fairdiff_adaptor\.json is missing: .*not a fairdiff adaptor export"),
    ("generate-adaptor-meta-not-json", lambda t, w: _generate(t, "--adaptor", str(_copy(
        w.adaptor, t / "ad", lambda d: (d / "fairdiff_adaptor.json").write_text("{kind: text_lora")))),
     r"ad/fairdiff_adaptor\.json is unreadable \(.*\); re-export the adaptor"),
    ("generate-adaptor-weights-missing",
     lambda t, w: _generate(t, "--adaptor", str(_copy(w.adaptor, t / "ad", _unlink(LORA)))),
     r"adaptor file .*ad/pytorch_lora_weights\.safetensors is missing"),
    # flags and outputs
    ("generate-bad-seeds", lambda t, w: _generate(t, "--seeds", "5-2"), r"--seeds '5-2': expected N, N-M \(M >= N\)"),
    ("generate-huge-seed", lambda t, w: _generate(t, "--seeds", "99999999999999999999"), r"seeds must be below 2\*\*63"),
    ("generate-nan-guidance", lambda t, w: _generate(t, "--guidance", "nan"), r"--guidance nan: give a finite number"),
    ("generate-bad-device", lambda t, w: _generate(t, "--device", "gpu"), r"--device 'gpu': use auto, cpu, cuda"),
    ("generate-existing-out", lambda t, w: _existing_out(t),
     r"--out '.*out' already exists: pass --overwrite"),
    ("evaluate-out-is-a-file", lambda t, w: (t / "eval").write_text("x") and _evaluate(t), r"--out '.*eval' is a file"),
    ("debias-finished-run", lambda t, w: _finished_run(t),
     r"run 'synthetic-gender' in .*runs already finished .*pass run\.overwrite=true"),
]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file and directory under ``root``."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_size if p.is_file() else 0, st.st_mtime_ns)
    return out


class RayReached(Exception):
    """Raised by the patched ray.init of ``no_ray``."""


@dataclass
class NoRay:
    refused: list  # the ray.init calls refused
    was_started: bool  # Ray was initialised in this process before the test
    is_initialized: Callable[[], bool]  # the real ray.is_initialized


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> NoRay:
    """Makes reaching Ray fail the test, also in a process that already runs the suite's shared cluster (other
    test files ran first in it, e.g. under pytest-xdist): ray.is_initialized says no and ray.init raises
    RayReached, so starting a cluster, joining one (dist.cluster.connect) or Ray's auto-init all end there."""
    import ray

    state = NoRay([], ray.is_initialized(), ray.is_initialized)

    def refuse(*args, **kwargs):
        state.refused.append((args, kwargs))
        raise RayReached("Ray was reached before the input checks failed")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    return state


@pytest.mark.parametrize(("case", "setup", "pattern"), RUNTIME_CASES, ids=[c[0] for c in RUNTIME_CASES])
def test_runtime_errors(tmp_path: Path, world: World, case: str, setup: Setup, pattern: str,
                        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, no_ray: NoRay) -> None:
    argv = setup(tmp_path, world)
    before = snapshot(tmp_path)
    r = run_inproc(argv, tmp_path, capsys, monkeypatch)
    assert_one_line_error(r, pattern)
    assert r.stderr.startswith(f"fairdiff {argv[0]}: error: ")
    assert snapshot(tmp_path) == before  # nothing written, nothing touched
    # every check ran before a cluster could start (or be joined)
    assert not no_ray.refused
    assert no_ray.was_started or not no_ray.is_initialized()


def test_corpus_size() -> None:
    assert len(CONFIG_CASES) + len(RUNTIME_CASES) >= 40


def test_job_script_fails_before_ray(tmp_path: Path) -> None:
    """`python jobs/debias.py` (what `ray job submit` runs) refuses a non-UTF-8 prompt set in one line, before
    it connects to or starts any Ray cluster (no session directory appears)."""
    (tmp_path / "p.jsonl").write_bytes(NOT_UTF8)
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path / "ray"), "RAY_ADDRESS": ""}
    before = snapshot(tmp_path)
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "debias.py"), "--config", CFG, f"model.path={MODEL}",
                        _ps(tmp_path / "p.jsonl")], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert_one_line_error(r, r"^error: data\.prompt_sets\.0: prompt set '.*p\.jsonl' is not UTF-8 text")
    assert snapshot(tmp_path) == before


def test_valid_inputs_pass_every_check(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    """The checks refuse only what is wrong: the demo config, the shipped nets and fitting adaptors pass."""
    from fairdiff_ray.config import load_config
    from fairdiff_ray.models.adaptors import check_adaptor
    from fairdiff_ray.preflight import check_debias_inputs, check_eval_inputs

    cfg = load_config(CFG, [f"model.path={MODEL}", _ps(PROMPTS)])
    check_debias_inputs(cfg)
    check_eval_inputs(cfg, {"debiased": str(world.adaptor), "soft": str(world.soft)})
    assert check_adaptor(str(world.adaptor), str(MODEL))["kind"] == "text_lora"
    assert check_adaptor(str(world.other))["kind"] == "text_lora"  # whole, just for another model
    assert capsys.readouterr().err == ""


def test_long_prompts_are_truncated_with_one_warning(tmp_path: Path, world: World, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from fairdiff_ray.config import load_config
    from fairdiff_ray.preflight import check_debias_inputs

    long = "a photo of the face of a " + " ".join(["nurse"] * 90)
    # a prompt set: the debias checks pass, with one warning naming the set and the limit
    p = _jsonl(tmp_path / "p.jsonl", [*_rows(2), {"concept": "occupation", "prompt": long, "split": "train"}])
    capsys.readouterr()
    check_debias_inputs(load_config(CFG, [f"model.path={MODEL}", _ps(p)]))
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("fairdiff: warning: data.prompt_sets.0 (")
    assert "1 prompt(s) longer than the tokenizer's 77 tokens are truncated" in err[0] and "99 tokens" in err[0]
    # a soft prompt takes 3 of the 77 positions: a 76-token prompt fits the base model but not the adaptor
    fits = "a " + " ".join(["nurse"] * 73)
    r = run_inproc(_generate(tmp_path, "--adaptor", str(world.soft), "--prompt", fits), tmp_path, capsys, monkeypatch)
    assert r.returncode == 0, r.stderr
    warned = [ln for ln in r.stderr.splitlines() if "warning" in ln.lower()]  # (transformers adds progress bars)
    assert len(warned) == 1 and "--prompt: 1 prompt(s) longer than the tokenizer's 74 tokens" in warned[0], r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(x.name for x in (tmp_path / "out").iterdir()) == ["generate.json", "seed_0.png"]


def test_worker_side_config_errors_are_caught_before_ray(tmp_path: Path, world: World) -> None:
    """Settings that used to fail only inside a Ray worker (a traceback, a run directory left behind) are refused
    by the debias checks: the presence term without a differentiable detector, feature net paths that do not
    exist, more soft tokens than the tokenizer holds."""
    from fairdiff_ray.config import load_config
    from fairdiff_ray.errors import ConfigError, ModelFileError
    from fairdiff_ray.preflight import check_debias_inputs

    def check(*extra: str) -> None:
        check_debias_inputs(load_config(CFG, [f"model.path={MODEL}", _ps(PROMPTS), *extra]))

    with pytest.raises(ConfigError, match=r"loss.lambda_presence=8.0 needs a detector .* faces.detector=dlib"):
        check("faces.detector=dlib")
    for key in ("clip", "dino", "face_embedder", "face_bank"):
        with pytest.raises(ModelFileError, match=f"features.{key}"):
            check(f"features.{key}={tmp_path / 'missing'}")
    with pytest.raises(ConfigError, match="adaptor.soft_tokens=500 leaves no room .* 77 tokens"):
        check("adaptor.kind=soft_prompt", "adaptor.soft_tokens=500", "adaptor.soft_position=prefix")
