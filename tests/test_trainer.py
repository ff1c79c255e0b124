"""Ray Train end to end on the tiny model (2 CPU workers, DeepSpeed ZeRO-2 over gloo): data parallelism is
exact, an interrupted run resumes to the same adaptor, a killed worker is replaced (max_failures=1), a
finished run is not clobbered."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fairdiff_ray.dist.metrics import read_metrics
from fairdiff_ray.dist.trainer import build_trainer, export_result, run_debias, run_dir
from fairdiff_ray.errors import UserError
from tests._helpers_train import FailOnce, StartEnv, builders, tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base(tmp_path_factory, ray_cluster):
    """The reference: 1 worker x N=4 images, 3 steps, uninterrupted."""
    tmp = tmp_path_factory.mktemp("train")
    cfg = tiny_config(tmp, "run.name=one")
    (tmp / "env").mkdir()
    result = build_trainer(cfg, builders=builders(StartEnv(str(tmp / "env")))).fit()
    export_result(cfg, result)
    return tmp, cfg


def _final_state(cfg) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir(cfg) / f"checkpoint_{cfg.train.steps:08d}" / "adaptor_state.safetensors"))


def _assert_same_adaptor(a, b, atol=1e-5):
    sa, sb = _final_state(a), _final_state(b)
    assert sa.keys() == sb.keys()
    moved = max(float((sa[k] - _initial(k, sa)).abs().max()) for k in sa)
    assert moved > 1e-4  # the adaptor trained at all, so equality is not vacuous
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=atol, rtol=atol, msg=k)


def _initial(key: str, state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.zeros_like(state[key]) if "lora_B" in key else state[key]


def test_training_workers_trim_threshold_only_when_asked(base, monkeypatch):
    """Workers start with glibc's default allocator unless ray.worker_malloc_trim (MALLOC_TRIM_THRESHOLD_=0) is
    set; a value the caller exported is passed on either way."""
    from fairdiff_ray.dist.trainer import training_worker_env

    tmp, cfg = base
    env = dict(kv.split("=", 1) for kv in (tmp / "env" / "rank0.env").read_text().split("\0") if "=" in kv)
    assert env.get("MALLOC_TRIM_THRESHOLD_") == os.environ.get("MALLOC_TRIM_THRESHOLD_")  # the base run: default
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    assert training_worker_env(cfg) == {}
    trim = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"worker_malloc_trim": True})})
    assert training_worker_env(trim) == {"MALLOC_TRIM_THRESHOLD_": "0"}
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert training_worker_env(cfg) == {"MALLOC_TRIM_THRESHOLD_": "131072"}
    assert training_worker_env(trim) == {"MALLOC_TRIM_THRESHOLD_": "131072"}


def test_two_workers_equal_one_worker_with_twice_the_images(base):
    tmp, one = base
    two = tiny_config(tmp, "run.name=two", "ray.num_workers=2")
    result = build_trainer(two, builders=builders()).fit()
    assert result.error is None
    m1, m2 = read_metrics(run_dir(one)), read_metrics(run_dir(two))
    assert [m["step"] for m in m1] == [m["step"] for m in m2] == [0, 1, 2]
    for a, b in zip(m1, m2):
        assert a["targets/gender"] == b["targets/gender"]  # the same global OT targets
        assert a["sampling_steps"] == b["sampling_steps"]
        assert a["loss/total"] == pytest.approx(b["loss/total"], abs=1e-5)
    assert any(t != -1 for m in m1 for t in m["targets/gender"])
    _assert_same_adaptor(one, two)


def test_interrupted_run_resumes_to_the_same_adaptor(base, tmp_path):
    tmp, one = base
    cfg = tiny_config(tmp, "run.name=interrupted")
    fault = FailOnce(str(tmp_path / "failed"), step=2)
    with pytest.raises(Exception, match="injected failure"):
        build_trainer(cfg, builders=builders(fault)).fit()
    assert (run_dir(cfg) / "checkpoint_00000002").is_dir()
    assert not (run_dir(cfg) / "finished.json").exists()
    out = run_debias(cfg, builders=builders())  # same name + storage: resumes from step 2
    assert (out / "fairdiff_adaptor.json").is_file()
    assert [m["step"] for m in read_metrics(run_dir(cfg))] == [0, 1, 2]
    _assert_same_adaptor(one, cfg)
    meta = json.loads((out / "fairdiff_adaptor.json").read_text())
    assert meta["step"] == 3 and meta["ema"] is True
    with pytest.raises(UserError, match="already finished"):
        run_debias(cfg, builders=builders())


def test_killed_worker_is_replaced_and_the_run_completes(base, tmp_path):
    tmp, one = base
    cfg = tiny_config(tmp, "run.name=killed", "ray.num_workers=2", "ray.max_failures=1")
    fault = FailOnce(str(tmp_path / "killed"), step=1, rank=1, kill=True)
    result = build_trainer(cfg, builders=builders(fault)).fit()
    assert result.error is None and (tmp_path / "killed").exists()
    assert result.metrics["step"] == 2
    assert [m["step"] for m in read_metrics(run_dir(cfg))] == [0, 1, 2]
    _assert_same_adaptor(one, cfg)
    assert Path(export_result(cfg, result), "pytorch_lora_weights.safetensors").is_file()
