"""Sweep files: strict keys, domains, and every value probed against the run config before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from fairdiff_ray.errors import ConfigError
from fairdiff_ray.sweep.spec import load_sweep, override_for

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "s.yaml"
    p.write_text(f"sweep:\n  name: t\n  base: {ROOT / 'configs/synthetic_gender.yaml'}\n{body}")
    return p


def test_shipped_sweep_loads() -> None:
    spec = load_sweep(ROOT / "configs/sweep_synthetic.yaml")
    assert spec.grid_size() == 4 and spec.search == "grid"


def test_override_formatting_round_trips() -> None:
    assert override_for("target.gender.probs", [0.25, 0.75]) == "target.gender.probs=[0.25, 0.75]"
    assert override_for("adaptor.rank", 4) == "adaptor.rank=4"
    assert override_for("adaptor.kind", "soft_prompt") == "adaptor.kind=soft_prompt"


@pytest.mark.parametrize(
    ("body", "pattern"),
    [
        ("  space:\n    adaptor.rnak: {grid: [2, 4]}\n", r"adaptor.rnak.*did you mean 'rank'"),
        ("  space:\n    adaptor.rank: {grid: [0, 4]}\n", r"sweep.space.adaptor.rank value 0"),
        ("  space:\n    target.gender.probs: {grid: [[0.5, 0.6]]}\n", r"sums to 1.1"),
        ("  space:\n    train.lr: {loguniform: [0.1, 0.01]}\n", r"lo < hi"),
        ("  space:\n    train.lr: {uniform: [0.001, 0.01]}\n", r"search 'grid' takes only grid"),
        ("  space: {}\n", r"space is empty"),
        ("  serach: grid\n  space:\n    adaptor.rank: {grid: [2]}\n", r"unknown key 'sweep.serach'.*search"),
        ("  space:\n    adaptor.rank: {grid: [2], choice: [3]}\n", r"exactly one of"),
    ],
)
def test_bad_sweeps_name_the_key(tmp_path: Path, body: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_sweep(write(tmp_path, body))


def test_missing_base(tmp_path: Path) -> None:
    p = tmp_path / "s.yaml"
    p.write_text("sweep:\n  name: t\n  base: nowhere.yaml\n  space:\n    adaptor.rank: {grid: [2]}\n")
    with pytest.raises(ConfigError, match="sweep.base 'nowhere.yaml' does not exist"):
        load_sweep(p)


def test_the_objective_needs_periodic_validation(tmp_path: Path) -> None:
    p = tmp_path / "s.yaml"
    base = ROOT / "configs/synthetic_gender.yaml"
    p.write_text(f"sweep:\n  name: t\n  base: {base}\n  space:\n    adaptor.rank: {{grid: [2]}}\n")
    with pytest.raises(ConfigError, match=r"train.validate_every is 0.*sweep.overrides"):
        load_sweep(p)
    p.write_text(f"sweep:\n  name: t\n  base: {base}\n  overrides: [train.validate_every=10]\n"
                 "  asha: {grace_period: 5}\n  space:\n    adaptor.rank: {grid: [2]}\n")
    with pytest.raises(ConfigError, match=r"grace_period=5 is below train.validate_every=10"):
        load_sweep(p)
    assert load_sweep(p, ["asha.grace_period=10"]).asha.grace_period == 10


def test_concurrency_from_cluster_resources() -> None:
    from fairdiff_ray.dist.tune import max_concurrent

    spec = load_sweep(ROOT / "configs/sweep_synthetic.yaml")
    one = spec.base_config(["ray.num_workers=1", "ray.cpus_per_worker=1"])
    assert max_concurrent(spec, one, {"CPU": 4.0}) == 3  # one CPU of head-room for Ray Data tasks
    assert max_concurrent(spec, one, {"CPU": 1.0}) == 1  # no room for head-room: one trial at a time
    two = spec.base_config(["ray.num_workers=1", "ray.cpus_per_worker=2"])
    assert max_concurrent(spec, two, {"CPU": 2.0}) == 1 and max_concurrent(spec, two, {"CPU": 16.0}) == 7
    gpu = spec.base_config(["ray.use_gpu=true", "ray.num_workers=2", "ray.cpus_per_worker=1"])
    assert max_concurrent(spec, gpu, {"CPU": 64.0, "GPU": 4.0}) == 2
    with pytest.raises(ConfigError, match=r"needs ray.num_workers x ray.cpus_per_worker = 2 CPUs.*has 1"):
        max_concurrent(spec, two, {"CPU": 1.0})
    with pytest.raises(ConfigError, match=r"needs 2 GPUs"):
        max_concurrent(spec, gpu, {"CPU": 64.0, "GPU": 1.0})
    fixed = load_sweep(ROOT / "configs/sweep_synthetic.yaml", ["max_concurrent_trials=2"])
    assert max_concurrent(fixed, one, {"CPU": 16.0}) == 2


def test_reweighed_objective_and_asha_clock() -> None:
    from fairdiff_ray.dist.tune import reweigh

    m = {"step": 9, "distance": 0.25, "drift": 0.5, "objective": 0.75, "loss/total": 1.0}
    assert reweigh(m, 2.0) == {**m, "steps_done": 10, "objective": 1.25}
    assert reweigh({"step": 0, "objective": 0.3}, 2.0) == {"step": 0, "steps_done": 1, "objective": 0.3}
    # relative distance: divided by the distance before training (floored at 0.01)
    assert reweigh({**m, "distance_start": 0.5}, 2.0, relative=True)["objective"] == pytest.approx(0.25 / 0.5 + 1.0)
    assert reweigh({**m, "distance_start": 0.0}, 2.0, relative=True)["objective"] == pytest.approx(25.0 + 1.0)
    with pytest.raises(ValueError, match="distance_start"):
        reweigh(m, 2.0, relative=True)
    assert m["objective"] == 0.75  # a copy


def test_finalize_run_exports_a_finished_trial_from_its_last_checkpoint(tmp_path: Path) -> None:
    import json

    from fairdiff_ray.dist.ckpt import write_manifest
    from fairdiff_ray.dist.tune import finalize_run

    def checkpoint(name: str, step: int, weights: bytes, manifest: bool = True) -> Path:
        d = run / name
        (d / "adaptor").mkdir(parents=True)
        (d / "adaptor" / "pytorch_lora_weights.safetensors").write_bytes(weights)
        (d / "state.json").write_text(json.dumps({"step": step, "skipped": 1}))
        if manifest:
            write_manifest(d, rank=0, world_size=1, step=step)
        return d

    run = tmp_path / "trial_x"
    assert not finalize_run(run, 4)
    checkpoint("checkpoint_00000002", 2, b"early")  # an earlier checkpoint: not finished
    assert not finalize_run(run, 4)
    checkpoint("checkpoint_00000004", 4, b"torn", manifest=False)  # an unfinished save of the last step
    assert not finalize_run(run, 4)
    last = checkpoint("checkpoint_00000004-1", 4, b"w")  # the last step saved again after a fall-back
    assert finalize_run(run, 4)
    assert (run / "adaptor" / "pytorch_lora_weights.safetensors").read_bytes() == b"w"
    done = json.loads((run / "finished.json").read_text())
    assert done["steps"] == 4 and done["skipped"] == 1 and done["checkpoint"] == str(last)
    (last / "adaptor" / "pytorch_lora_weights.safetensors").write_bytes(b"changed")
    assert finalize_run(run, 4)  # finished.json: nothing copied again
    assert (run / "adaptor" / "pytorch_lora_weights.safetensors").read_bytes() == b"w"


def test_pareto_front() -> None:
    from fairdiff_ray.sweep.results import pareto_front

    pts = [(0.5, 0.1), (0.2, 0.3), (0.6, 0.05), (0.4, 0.4), (0.2, 0.3), (0.1, 0.9)]
    assert pareto_front(pts) == [5, 1, 4, 0, 2]  # (0.4, 0.4) is dominated by (0.2, 0.3); ties both stay


def test_asha_stops_on_steps_done_and_never_at_the_final_report() -> None:
    from ray.tune.schedulers import TrialScheduler

    from fairdiff_ray.dist.tune import asha_scheduler

    spec = load_sweep(ROOT / "configs/sweep_synthetic.yaml")
    base = spec.base_config()
    asha = asha_scheduler(spec, base)
    asha.set_search_properties("objective", "min")

    class Trial:  # what ASHA reads of a trial
        def __init__(self, i: int):
            self.trial_id = f"t{i}"

    good, bad = Trial(0), Trial(1)
    for t in (good, bad):
        asha.on_trial_add(None, t)
    g = spec.asha.grace_period
    assert g < base.train.steps
    result = {"steps_done": g, "objective": 0.2}
    assert asha.on_trial_result(None, good, result) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, bad, {**result, "objective": 0.9}) == TrialScheduler.STOP  # cut at rung g
    final = {"steps_done": base.train.steps, "objective": 0.2}
    assert asha.on_trial_result(None, good, {"steps_done": g + 1, "objective": 0.2}) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, good, final) == TrialScheduler.CONTINUE  # left to finish and export
    assert asha_scheduler(load_sweep(ROOT / "configs/sweep_synthetic.yaml", ["asha=null"]), base) is None


def test_sweep_joins_ray_by_the_cluster_rule(monkeypatch, tmp_path) -> None:
    """run_sweep picks its cluster with dist.cluster.connect (ray.address, else RAY_ADDRESS, else a private local
    one): a bare ray.init() joined the cluster recorded in /tmp/ray/ray_current_cluster even when its head was
    gone, and the sweep hung retrying it."""
    import fairdiff_ray.dist.cluster as cluster
    from fairdiff_ray.dist.tune import run_sweep

    class Joined(Exception):
        pass

    seen: list[str | None] = []

    def fake_connect(address, **kw):
        seen.append(address)
        raise Joined

    monkeypatch.setattr(cluster, "connect", fake_connect)
    spec = load_sweep(ROOT / "configs/sweep_synthetic.yaml", [f"storage={tmp_path}"])
    monkeypatch.chdir(ROOT)  # the base config's relative prompt paths
    with pytest.raises(Joined):
        run_sweep(spec)
    assert seen == [spec.base_config().ray.address]
    assert not (tmp_path / spec.name).exists()  # nothing written before a cluster is reached
