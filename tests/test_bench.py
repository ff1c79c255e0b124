"""The prepared GPU benchmark script (bench/gpu.sh, issue 8): its CPU dry run drives the same benchmark scripts with
the GPU run's options at toy sizes and writes both sections; without a GPU the real run refuses in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import section_text  # noqa: E402


def _env() -> dict[str, str]:
    return {**os.environ, "PY": sys.executable, "OMP_NUM_THREADS": "1"}


def test_gpu_script_dry_run_writes_both_sections(tmp_path: Path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run", "--out", str(out)], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "dry run OK" in r.stdout
    for section in ("step-gpu", "memory-gpu"):
        body = section_text(out, section)
        assert body is not None, f"no section {section} in {out.read_text()[:2000]}"
        rows = [line for line in body.splitlines() if line.startswith("| sd15")]
        assert rows, f"no sd15 row in section {section}:\n{body}"


def test_gpu_script_refuses_without_cuda(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the refusal cannot happen here")
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--out", str(tmp_path / "B.md")], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "no CUDA device" in r.stderr and "--dry-run" in r.stderr
    assert not (tmp_path / "B.md").exists()
