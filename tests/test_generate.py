"""`fairdiff generate` on the tiny SD model: seed-named PNGs equal to the evaluation images of the same seeds,
and one-line errors (exit 2, nothing written) for bad --seeds, missing directories and an existing --out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fairdiff_ray.cli import main as cli_main
from fairdiff_ray.errors import ConfigError
from fairdiff_ray.eval.records import png_to_array, to_uint8
from fairdiff_ray.generate import generate_images, parse_seeds
from fairdiff_ray.models.sd import save_tiny_model

PROMPT = "a photo of the face of a nurse"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("gen") / "model", seed=0, words=["nurse"])


def test_parse_seeds() -> None:
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("5") == [5]
    assert parse_seeds("0-1,7, 9") == [0, 1, 7, 9]
    for bad in ("3-1", "a", "1,,2", "-2", "1-2,2"):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)


def test_generate_writes_seed_named_pngs_matching_batched_generation(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["generate", "--model", str(model_dir), "--prompt", PROMPT, "--seeds", "2-4", "--steps", "3",
            "--scheduler", "ddim", "--device", "cpu", "--batch-size", "2", "--out", str(out)]
    assert cli_main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["generate.json", "seed_2.png", "seed_3.png", "seed_4.png"]
    # seed 3's image does not depend on which other seeds were generated with it
    ref = to_uint8(generate_images(str(model_dir), PROMPT, [3], steps=3, scheduler="ddim", device="cpu").numpy())[0]
    got = png_to_array((out / "seed_3.png").read_bytes())
    assert got.shape == (32, 32, 3) and np.abs(got.astype(int) - ref.astype(int)).max() <= 1
    assert got.std() > 1
    # an existing non-empty --out is refused (exit 2) and left alone, unless --overwrite
    before = (out / "seed_2.png").read_bytes()
    assert cli_main(argv) == 2 and (out / "seed_2.png").read_bytes() == before
    assert cli_main([*argv[:-4], "--seeds", "2", "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["generate.json", "seed_2.png"]


@pytest.mark.parametrize("change,message", [
    (("--seeds", "7-3"), "--seeds '7-3'"),
    (("--model", "MISSING"), "does not exist"),
    (("--adaptor", "MISSING"), "adaptor directory"),
])
def test_user_errors_are_one_line_and_write_nothing(model_dir: Path, tmp_path: Path, capsys, change, message) -> None:
    opts = {"--model": str(model_dir), "--prompt": PROMPT, "--seeds": "0-1", "--steps": "2",
            "--out": str(tmp_path / "out")}
    key, value = change
    opts[key] = str(tmp_path / "missing") if value == "MISSING" else value
    code = cli_main(["generate", *[x for kv in opts.items() for x in kv]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
