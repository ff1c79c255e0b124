"""The worker's one-line training progress (what `make demo` and `ray job logs` show while a run trains)."""

from __future__ import annotations

from fairdiff_ray.dist.worker import progress_line


def test_progress_line_has_step_loss_bias_speed_and_time_left() -> None:
    m = {"loss/total": 1.23456, "train/bias/gender": 0.25, "train/bias/race": float("nan"), "lr": 0.005}
    line = progress_line(30, 120, m, elapsed=60.0, steps_run=20)
    assert line.startswith("[train] step 30/120  loss 1.235")
    assert "gender 0.25" in line and "race" not in line  # an attribute without a face this step is left out
    assert "lr 5.00e-03" in line and "3.0 s/step" in line and "4.5 min left" in line  # 90 steps x 3 s


def test_progress_line_without_metrics_yet() -> None:
    line = progress_line(1, 1, {}, elapsed=0.0, steps_run=0)
    assert "batch bias: -" in line and "0.0 min left" in line
