"""Typed config: strict keys and types, invariants, overrides, one-line errors, every shipped YAML validates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from fairdiff_ray.config import load_config
from fairdiff_ray.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_are_valid_and_frozen() -> None:
    cfg = load_config()
    assert cfg.train.lr == 5e-5 and cfg.adaptor.rank == 50 and cfg.adaptor.ema_decay == 0.996
    assert cfg.sampler.guidance_scale == 7.5 and cfg.loss.threshold == 0.8 and cfg.loss.lambda_img == 8.0
    with pytest.raises(ValidationError):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_unknown_key_is_named_with_suggestion(tmp_path: Path) -> None:
    p = write(tmp_path, "train:\n  stpes: 10\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.stpes'.*did you mean 'steps'"):
        load_config(p)


def test_unknown_section_suggests(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'sampeler'.*'sampler'"):
        load_config(write(tmp_path, "sampeler:\n  steps: 3\n"))


def test_wrong_type_names_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train.steps: .*integer"):
        load_config(write(tmp_path, "train:\n  steps: many\n"))


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("adaptor.rank=0", r"adaptor.rank"),
        ("adaptor.rank=-3", r"adaptor.rank"),
        ("sampler.steps=0", r"sampler.steps"),
        ("train.images_per_prompt=5", r"does not divide over ray.num_workers"),
        ("target.gender.probs=[0.7,0.7]", r"sums to 1.4"),
        ("target.gender.probs=[1.5,-0.5]", r"negative"),
        ("target.gender.probs=[.nan,0.5]", r"NaN"),
        ("target.gender.classes=[f,f]", r"duplicate"),
        ("sampler.estimator=truncated", r"truncate_k"),
        ("sampler.estimator=adjusted_subsampled", r"subsample_k"),
        ("sampler.subsample_k=0", r"subsample_k"),
        ("sampler.checkpoint_mode=reentrant", r"checkpoint_mode 'reentrant'.*zero_stage 0 or 1"),
        ("run.name=", r"run.name: must be a directory name"),
        ("run.name=../x", r"run.name: must be a directory name"),
        ("run.name=..", r"run.name: must be a directory name"),
        ("run.storage=", r"run.storage"),
        ("model.device=gpu", r"model.device: must be auto, cpu, cuda or cuda:N"),
    ],
)
def test_invariants(override: str, pattern: str) -> None:
    overrides = [override] + (["ray.num_workers=2"] if "images_per_prompt" in override else [])
    if "checkpoint_mode" in override:  # refused with ZeRO-2 and a trained UNet only
        load_config(None, [override, "deepspeed.zero_stage=1", "adaptor.kind=unet_lora"])
        load_config(None, [override, "deepspeed.zero_stage=2", "adaptor.kind=text_lora"])
        overrides += ["deepspeed.zero_stage=2", "adaptor.kind=unet_lora"]
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, overrides)


def test_names_numbers_and_duplicate_keys(tmp_path: Path) -> None:
    """A number as run.name is its text; 1e-1 (YAML 1.1: a string) counts as a number in target lists; a key given
    twice in one YAML section is refused instead of silently keeping the last."""
    assert load_config(None, ["run.name=2024"]).run.name == "2024"
    assert load_config(None, ["model.device=cuda:1"]).model.device == "cuda:1"
    cfg = load_config(None, ["target.gender.probs=[1e-1,9e-1]"])
    assert cfg.target_distribution().marginal("gender").tolist() == pytest.approx([0.1, 0.9])
    with pytest.raises(ConfigError, match="is a directory: pass a YAML file"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="key 'train' appears twice in one section \\(line 2\\)"):
        load_config(write(tmp_path, "train: {steps: 5}\ntrain: {lr: 0.1}\n"))


def test_overrides_parse_yaml_values() -> None:
    cfg = load_config(None, ["train.steps=7", "adaptor.kind=soft_prompt", "sampler.checkpoint=false",
                             "target.gender.probs=[0.25, 0.75]"])
    assert cfg.train.steps == 7 and cfg.adaptor.kind == "soft_prompt" and cfg.sampler.checkpoint is False
    assert cfg.target_distribution().marginal("gender").tolist() == [0.25, 0.75]


def test_joint_target_shape_checked() -> None:
    bad = {"joint": {"attributes": {"gender": ["f", "m"], "race": ["a", "b", "c", "d"]}, "probs": [[0.5, 0.5]]}}
    with pytest.raises(ConfigError, match=r"shape"):
        load_config(None, [f"target={bad}"])


def test_round_trip_yaml(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.steps=3"])
    again = load_config(write(tmp_path, cfg.to_yaml()))
    assert again == cfg


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and ("fairdiff" in first or "jobs/" in first or "make" in first), (
        f"{path.name} must open with a comment giving the command that runs it"
    )
    try:
        cfg = load_config(path)
    except ConfigError:
        cfg = None
        from fairdiff_ray.config import load_yaml

        data = load_yaml(path)
        if "sweep" not in data:  # sweep files hold a base config + search space, checked by the sweep tests
            raise
    if cfg is not None:
        cfg.target_distribution()
        from fairdiff_ray.config import load_yaml

        # shipped files never hard-code a machine's absolute path (loading makes relative paths absolute)
        assert not Path(load_yaml(path).get("model", {}).get("path", "x")).is_absolute()
        assert Path(cfg.model.path).is_absolute()


def test_cli_validate_one_line_error(tmp_path: Path) -> None:
    p = write(tmp_path, "adaptor:\n  rnak: 4\n")
    r = subprocess.run([sys.executable, "-m", "fairdiff_ray.cli", "config", "validate", str(p)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "adaptor.rnak" in lines[0] and "rank" in lines[0], r.stderr
    ok = write(tmp_path, "train:\n  steps: 3\n")
    r = subprocess.run([sys.executable, "-m", "fairdiff_ray.cli", "config", "validate", str(ok)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout


def test_cli_help_on_every_subcommand() -> None:
    from fairdiff_ray.cli import SUBCOMMANDS

    r = subprocess.run([sys.executable, "-m", "fairdiff_ray.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for name in ["config", *SUBCOMMANDS]:
        assert name in r.stdout


def test_relative_paths_resolve_against_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    """Ray workers and Tune trials run in their own directories: paths are made absolute where the config loads."""
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: {path: m/sd}\ndata: {prompt_sets: [{path: p.jsonl}, {path: 's3://b/q.jsonl'}]}\n"
                        "features: {synthetic: default, clip: /abs/clip}\nrun: {storage: 'gs://bucket/runs'}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(cfg_file.name, ["eval.classifier.path=heads"])
    assert cfg.model.path == str(tmp_path / "m" / "sd")
    assert [p.path for p in cfg.data.prompt_sets] == [str(tmp_path / "p.jsonl"), "s3://b/q.jsonl"]
    assert cfg.features.synthetic == "default" and cfg.features.clip == "/abs/clip"
    assert cfg.run.storage == "gs://bucket/runs" and cfg.eval.classifier.path == str(tmp_path / "heads")
    # the evaluation's own feature nets resolve too; "default" / "eval" name the shipped synthetic nets, and only
    # in features.synthetic: a directory called "eval" elsewhere is a path like any other
    cfg = load_config(cfg_file.name, ["eval.features={synthetic: eval, dino: nets/dino}", "model.path=eval"])
    assert cfg.eval.features.synthetic == "eval" and cfg.eval.features.dino == str(tmp_path / "nets" / "dino")
    assert cfg.model.path == str(tmp_path / "eval")
    cfg = load_config(cfg_file.name, ["eval.features={synthetic: mynets}"])
    assert cfg.eval.features.synthetic == str(tmp_path / "mynets")


def test_checkpoint_mode_auto_is_reentrant_where_allowed() -> None:
    assert load_config(None, []).checkpoint_mode() == "reentrant"
    zero2 = ["deepspeed.zero_stage=2"]
    assert load_config(None, [*zero2, "adaptor.kind=text_lora"]).checkpoint_mode() == "reentrant"
    assert load_config(None, [*zero2, "adaptor.kind=both"]).checkpoint_mode() == "non_reentrant"
    assert load_config(None, [*zero2, "adaptor.kind=both", "deepspeed.enabled=false"]).checkpoint_mode() == "reentrant"
    cfg = load_config(None, [*zero2, "adaptor.kind=both", "sampler.checkpoint_mode=non_reentrant"])
    assert cfg.checkpoint_mode() == "non_reentrant"
