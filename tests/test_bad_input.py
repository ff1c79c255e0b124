"""Bad input corpus (issue 9): every case is a one-line error naming what was wrong, exit code 2, no traceback,
and nothing written. Each row: (id, config YAML text or None, overrides, extra files, regex the line must match).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASE = (ROOT / "configs" / "synthetic_gender.yaml").read_text()

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
