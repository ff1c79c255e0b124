"""Fault tests on the shipped synthetic SD (3 training steps, 1 Ray Train worker, DeepSpeed ZeRO-2) and on the
evaluation pipeline's stand-in models: after every fault the final adaptor equals the uninterrupted run's, bit
for bit, or the run says exactly what was lost; existing results are never replaced without --overwrite and
survive a failed run.

Faults: a worker killed inside a checkpoint save; the driver (jobs/debias.py) interrupted with SIGINT, its
newest checkpoint truncated on disk, and the run resumed; a NaN loss; an overwrite run interrupted; an
evaluation interrupted, and an evaluation actor killed while it resumes. (A worker killed during a step:
tests/test_trainer.py.) Ray Train runs are few and short: each costs ~30 s of fixed start-up on 2 cores."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from fairdiff_ray.config import load_config
from fairdiff_ray.dist.ckpt import (
    checkpoint_for_step,
    checkpoint_name,
    newest_intact,
    open_intact,
    parse_name,
    verify_checkpoint,
    write_manifest,
)
from fairdiff_ray.dist.metrics import read_metrics
from fairdiff_ray.dist.trainer import run_debias, run_dir
from fairdiff_ray.dist.worker import Builders
from fairdiff_ray.errors import UserError
from fairdiff_ray.eval.run import run_evaluation
from fairdiff_ray.io import atomic_dir
from tests._helpers_eval import OCCUPATIONS, standin_gen_loader, standin_score_loader, write_prompts
from tests._helpers_faults import ROOT, FaultyGenerator, KillInSave, NaNLossAt, config, write_config

# -- checkpoint integrity (no Ray) ------------------------------------------------------------------------------


def _fake_checkpoint(d: Path, step: int, world: int = 2) -> Path:
    """A checkpoint directory as Ray merges it: each rank's files plus its manifest."""
    for rank in range(world):
        part = d.parent / f".rank{rank}-{d.name}"
        (part / "engine").mkdir(parents=True)
        (part / f"rng_rank{rank}.pt").write_bytes(bytes(range(rank, rank + 40)))
        (part / "engine" / f"optim_rank{rank}.pt").write_bytes(b"x" * (100 + rank))
        if rank == 0:
            (part / "adaptor_state.safetensors").write_bytes(b"weights" * 10)
        write_manifest(part, rank, world, step)
        shutil.copytree(part, d, dirs_exist_ok=True)
        shutil.rmtree(part)
    return d


def test_resume_and_reuse_refuse_other_settings(tmp_path):
    """A run resumes, and the demo reuses a finished run, only with the settings it was trained with (run, ray,
    eval and the run's length aside): otherwise a one-line error names the changed keys, before Ray starts."""
    from fairdiff_ray.dist.trainer import _resume_note, finished_adaptor

    def cfg(*extra):
        return load_config(None, [f"run.storage={tmp_path}", "run.name=r", "train.steps=4", *extra])

    run = tmp_path / "r"
    ck = _fake_checkpoint(run / checkpoint_name(2), 2)
    (ck / "config.yaml").write_text(cfg().to_yaml())
    (run / "checkpoint_manager_snapshot.json").write_text(
        json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_00000002"}}))
    assert "resuming run 'r' from checkpoint_00000002" in _resume_note(cfg())
    assert "resuming" in _resume_note(cfg("train.steps=8", "ray.num_workers=2", "eval.steps=5", "train.log_every=2"))
    with pytest.raises(UserError, match=r"run 'r' was started with other settings \(adaptor.rank, train.lr\): pass "
                                        r"run.overwrite=true"):
        _resume_note(cfg("train.lr=0.5", "adaptor.rank=4"))
    with pytest.raises(UserError, match="checkpoint at step 2, train.steps is 2: give more steps"):
        _resume_note(cfg("train.steps=2"))
    assert finished_adaptor(cfg()) is None  # not finished
    # run.overwrite starts an unfinished run afresh too (the errors above tell users to pass it)
    from fairdiff_ray.dist.trainer import _set_aside_run, check_run_dir

    assert check_run_dir(cfg()) == "resume" and check_run_dir(cfg("run.overwrite=true")) == "overwrite"
    aside = _set_aside_run(cfg("run.overwrite=true"))
    assert not run.exists() and (aside / checkpoint_name(2) / "config.yaml").is_file()
    aside.replace(run)
    (run / "finished.json").write_text(json.dumps({"adaptor": str(run / "adaptor"), "checkpoint": str(ck)}))
    assert finished_adaptor(cfg("eval.images_per_prompt=8")) == run / "adaptor"
    with pytest.raises(UserError, match=r"run 'r' finished with other settings \(target.gender.probs\)"):
        finished_adaptor(cfg("target={gender: {classes: [female, male], probs: [0.3, 0.7]}}"))


def test_overwrite_with_uri_storage_deletes_the_run_in_the_bucket(tmp_path, monkeypatch):
    """URI storage (file:// here, through pyarrow as s3:// or gs:// would be): Ray resumes from the run's
    directory in the bucket, so run.overwrite deletes it there - also when no local mirror exists - and clears the
    mirror; without run.overwrite nothing is touched."""
    from fairdiff_ray.dist.trainer import _set_aside_run, check_run_dir, run_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    def cfg(*extra):
        return load_config(None, [f"run.storage=file://{tmp_path / 'bucket'}", "run.name=r", *extra])

    remote = tmp_path / "bucket" / "r"
    _fake_checkpoint(remote / checkpoint_name(2), 2)
    assert check_run_dir(cfg()) == "new"  # no mirror: Ray itself resumes from the bucket
    assert check_run_dir(cfg("run.overwrite=true")) == "overwrite"
    mirror = run_dir(cfg())
    assert str(mirror).startswith(str(tmp_path / "home"))
    (mirror / "metrics.jsonl").parent.mkdir(parents=True)
    (mirror / "metrics.jsonl").write_text("{}\n")
    assert _set_aside_run(cfg("run.overwrite=true")) is None
    assert not remote.exists() and not mirror.exists() and (tmp_path / "bucket").is_dir()
    assert check_run_dir(cfg("run.overwrite=true")) == "new"
    assert _set_aside_run(cfg("run.overwrite=true")) is None  # nothing there: nothing to do


def test_manifests_find_missing_truncated_and_altered_files(tmp_path):
    assert checkpoint_name(3) == "checkpoint_00000003" and checkpoint_name(3, 2) == "checkpoint_00000003-2"
    assert parse_name("checkpoint_00000003-2") == (3, 2) and parse_name("checkpoint_manager_snapshot.json") is None
    d = _fake_checkpoint(tmp_path / "checkpoint_00000002", 2)
    assert verify_checkpoint(d) is None
    (d / "manifest_rank1.json").rename(tmp_path / "m1")  # rank 1's upload never finished
    assert verify_checkpoint(d) == "manifest_rank1.json is missing (an unfinished save or upload)"
    (tmp_path / "m1").rename(d / "manifest_rank1.json")
    (d / "engine" / "optim_rank1.pt").write_bytes(b"x" * 50)
    assert verify_checkpoint(d) == "engine/optim_rank1.pt has 50 bytes, the manifest says 101"
    (d / "engine" / "optim_rank1.pt").write_bytes(b"y" * 101)  # same size, other bytes
    assert verify_checkpoint(d) == "engine/optim_rank1.pt does not match its sha256 in manifest_rank1.json"
    (d / "engine" / "optim_rank1.pt").unlink()
    assert verify_checkpoint(d) == "engine/optim_rank1.pt is missing"
    assert verify_checkpoint(tmp_path / "nothing").startswith("manifest_rank0.json is missing")


def test_resume_falls_back_past_damaged_checkpoints(tmp_path):
    from ray.train import Checkpoint

    run = tmp_path / "run"
    for step in (1, 2, 3):
        _fake_checkpoint(run / checkpoint_name(step), step)
    _fake_checkpoint(run / checkpoint_name(2, 1), 2)
    (run / checkpoint_name(3) / "adaptor_state.safetensors").write_bytes(b"torn")
    (run / checkpoint_name(2, 1) / "manifest_rank0.json").unlink()
    said: list[str] = []
    with open_intact(Checkpoint(str(run / checkpoint_name(3))), said.append) as r:
        assert r.name == "checkpoint_00000002" and r.dir == run / "checkpoint_00000002"
        assert [n for n, _ in r.damaged] == ["checkpoint_00000003", "checkpoint_00000002-1"]
        assert r.attempt == 2  # above every attempt number already in the run directory
    assert len(said) == 1 and "checkpoint_00000003, checkpoint_00000002-1" in said[0] and "from checkpoint_00000002" in said[0]
    with open_intact(Checkpoint(str(run / checkpoint_name(1))), said.append) as r:
        assert (r.name, r.damaged, r.attempt) == ("checkpoint_00000001", [], 0)
    assert newest_intact(run) == (None, [])  # Ray registered nothing: the run starts at step 0
    snapshot = run / "checkpoint_manager_snapshot.json"
    snapshot.write_text(json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_00000003"}}))
    assert newest_intact(run) == ("checkpoint_00000002", [
        ("checkpoint_00000003", "adaptor_state.safetensors has 4 bytes, the manifest says 70"),
        ("checkpoint_00000002-1", "manifest_rank0.json is missing (an unfinished save or upload)")])
    assert checkpoint_for_step(run, 2) == run / "checkpoint_00000002" and checkpoint_for_step(run, 3) is None
    snapshot.write_text('{"latest_checkpoint_result": {"checkpoint_dir_na')  # torn by a killed controller
    with pytest.raises(ValueError, match="checkpoint_manager_snapshot.json is unreadable"):
        newest_intact(run)
    for step in (1, 2):
        (run / checkpoint_name(step) / "manifest_rank0.json").unlink()
    with pytest.raises(RuntimeError, match="no intact checkpoint left .* run.overwrite=true"):
        with open_intact(Checkpoint(str(run / checkpoint_name(3))), said.append):
            pass


def test_resume_without_an_intact_checkpoint_is_a_one_line_error(tmp_path):
    cfg = config(write_config(tmp_path), "run.name=broken")
    run = run_dir(cfg)
    for step in (1, 2):
        _fake_checkpoint(run / checkpoint_name(step), step)
        (run / checkpoint_name(step) / "adaptor_state.safetensors").write_bytes(b"")
    (run / "checkpoint_manager_snapshot.json").write_text(
        json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_00000002"}}))
    with pytest.raises(UserError, match=r"run 'broken' in .* has no intact checkpoint \(checkpoint_00000002: "
                                        r"adaptor_state.safetensors has 0 bytes.*\): pass run.overwrite=true"):
        run_debias(cfg)  # before Ray starts


# -- training ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clean(tmp_path_factory, ray_cluster):
    """The uninterrupted run every training fault is compared with: (config file, its config)."""
    path = write_config(tmp_path_factory.mktemp("faults"))
    cfg = config(path, "run.name=clean")
    run_debias(cfg)
    return path, cfg


def _finished(cfg) -> dict:
    return json.loads((run_dir(cfg) / "finished.json").read_text())


def _tensors(cfg) -> dict[str, torch.Tensor]:
    """The final checkpoint's adaptor state (trainable weights and their EMA) and the exported EMA adaptor."""
    state = load_file(str(Path(_finished(cfg)["checkpoint"]) / "adaptor_state.safetensors"))
    for f in sorted((run_dir(cfg) / "adaptor").glob("*.safetensors")):
        state.update({f"export/{f.name}/{k}": v for k, v in load_file(str(f)).items()})
    return state


def assert_same_adaptor(ref_cfg, cfg) -> None:
    ref, got = _tensors(ref_cfg), _tensors(cfg)
    assert any(k.startswith("export/") for k in ref) and ref.keys() == got.keys()
    assert max(float(v.abs().max()) for k, v in ref.items() if "lora_B" in k) > 1e-4  # it trained: not vacuous
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


def _steps(cfg) -> list[int]:
    return [m["step"] for m in read_metrics(run_dir(cfg))]


def _registered(d: Path) -> list[str]:
    """Checkpoints Ray Train has registered (its snapshot), oldest first."""
    try:
        snap = json.loads((d / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return []
    return [r["checkpoint_dir_name"] for r in snap["checkpoint_results"]]


@pytest.mark.slow
def test_worker_killed_during_a_checkpoint_save_is_replaced(clean, tmp_path):
    path, ref = clean
    cfg = config(path, "run.name=killed-in-save", "ray.max_failures=1")
    marker = tmp_path / "killed"
    run_debias(cfg, builders=Builders(save_fault=KillInSave(str(marker), steps_done=2)))
    assert marker.exists()  # the worker died inside the save of step 2; its replacement redid step 2
    assert _steps(cfg) == [0, 1, 2]
    assert _registered(run_dir(cfg)) == ["checkpoint_00000001", "checkpoint_00000002", "checkpoint_00000003"]
    for name in _registered(run_dir(cfg)):
        assert verify_checkpoint(run_dir(cfg) / name) is None, name
    assert_same_adaptor(ref, cfg)


def _wait_for_job_actors_to_die(timeout: float = 60.0) -> None:
    """After a driver exits Ray kills its job's actors; wait until no other job's actor is alive."""
    import ray
    import ray._private.state as state

    me = ray.get_runtime_context().get_job_id()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [a for a in state.actors().values() if a.get("State") == "ALIVE" and a.get("JobID") != me]
        if not alive:
            return
        time.sleep(0.5)
    raise AssertionError(f"actors of the interrupted driver still alive after {timeout} s")


@pytest.mark.slow
def test_driver_sigint_then_resume_past_a_truncated_checkpoint(clean, tmp_path, capsys):
    """jobs/debias.py interrupted with SIGINT once two checkpoints are in; the newest is then truncated on disk.
    The resume (same run name + storage) falls back to the one before, says so, and ends bit-equal."""
    import ray

    path, ref = clean
    cfg = config(path, "run.name=sigint")
    log = tmp_path / "driver.log"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "jobs/debias.py", "--config", str(path), "run.name=sigint"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while len(_registered(run_dir(cfg))) < 2:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "fewer than two checkpoints after 300 s"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    said = log.read_text()
    assert proc.returncode == 130 and "interrupted" in said.splitlines(), said[-3000:]  # run_job's one line
    _wait_for_job_actors_to_die()
    assert not (run_dir(cfg) / "finished.json").exists()

    *_, previous, newest = _registered(run_dir(cfg))
    victim = max((p for p in (run_dir(cfg) / newest).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    problem = f"{victim.relative_to(run_dir(cfg) / newest).as_posix()} has {len(data) // 2} bytes, the manifest says {len(data)}"
    assert verify_checkpoint(run_dir(cfg) / newest) == problem

    capsys.readouterr()
    run_debias(cfg)  # what jobs/debias.py with the same config does
    said = capsys.readouterr().out
    assert f"WARNING: checkpoint {newest} of run 'sigint' is damaged ({problem}): resuming from {previous}" in said
    assert f"resuming run 'sigint' from {previous}" in said
    assert _finished(cfg)["recovered"] == [{"damaged": newest, "problem": problem, "resumed_from": previous}]
    # the steps after it were trained again, into new directories (the damaged one stays for Ray's bookkeeping)
    assert parse_name(Path(_finished(cfg)["checkpoint"]).name) == (3, 1)
    assert _steps(cfg) == [0, 1, 2]
    assert_same_adaptor(ref, cfg)


@pytest.mark.slow
def test_nan_loss_step_is_skipped_counted_and_training_goes_on(clean):
    path, ref = clean
    cfg = config(path, "run.name=nan")
    nan = NaNLossAt(step=1)
    run_debias(cfg, builders=Builders(loss=nan.loss, fault=nan))
    rows = read_metrics(run_dir(cfg))
    assert [m["step"] for m in rows] == [0, 1, 2]
    assert [m["applied"] for m in rows] == [1.0, 0.0, 1.0]
    assert [m["skipped"] for m in rows] == [0.0, 1.0, 1.0]
    assert _finished(cfg)["skipped"] == 1

    def state(c, step):
        return load_file(str(run_dir(c) / f"checkpoint_{step:08d}" / "adaptor_state.safetensors"))

    s1, s2, s3 = (state(cfg, i) for i in (1, 2, 3))
    assert all(torch.equal(s1[k], s2[k]) for k in s1)  # the NaN step changed no weight and no EMA
    assert not all(torch.equal(s2[k], s3[k]) for k in s2)  # the next step trained
    assert all(bool(torch.isfinite(v).all()) for v in s3.values())
    r1 = state(ref, 1)
    assert all(torch.equal(r1[k], s1[k]) for k in r1)  # and before it, the clean run's weights


class _InterruptedTrainer:
    """A new run that had begun writing its run directory when Ctrl-C reached the driver."""

    def __init__(self, cfg):
        self.cfg = cfg

    def fit(self):
        (run_dir(self.cfg) / "checkpoint_00000001").mkdir(parents=True)
        raise KeyboardInterrupt


@pytest.mark.slow
def test_failed_overwrite_run_leaves_the_finished_run_intact(clean, monkeypatch, capsys):
    from fairdiff_ray.dist import trainer

    path, ref = clean
    cfg = config(path, "run.name=again")
    shutil.copytree(run_dir(ref), run_dir(cfg))  # a finished run
    files = sorted(p for p in run_dir(cfg).rglob("*") if p.is_file())
    before = {p: p.read_bytes() for p in files}
    with pytest.raises(UserError, match="already finished"):
        run_debias(cfg)
    again = config(path, "run.name=again", "run.overwrite=true")
    monkeypatch.setattr(trainer, "build_trainer", lambda c, **kw: _InterruptedTrainer(c))
    with pytest.raises(KeyboardInterrupt):
        run_debias(again)
    assert "the previous run is back" in capsys.readouterr().out
    assert sorted(p for p in run_dir(cfg).rglob("*") if p.is_file()) == files
    assert all(p.read_bytes() == b for p, b in before.items())
    failed = run_dir(cfg).parent / ".again.failed"
    assert [p.name for p in failed.iterdir()] == ["checkpoint_00000001"]  # the failed attempt, for a look
    assert not (run_dir(cfg).parent / ".again.previous").exists()


# -- evaluation -----------------------------------------------------------------------------------------------


def eval_cfg(tmp: Path, *extra: str):
    prompts = write_prompts(tmp / "prompts.jsonl", n=4)
    (tmp / "model").mkdir(exist_ok=True)
    return load_config(None, [f"model.path={tmp / 'model'}", f"data.prompt_sets=[{{path: {prompts}}}]",
                              "eval.images_per_prompt=3", "eval.batch_size=3", "eval.prompts_per_part=1",
                              "eval.grid_images=2", "eval.steps=2", "eval.num_actors=1", "eval.cpus_per_actor=0.5",
                              "target={gender: {classes: [female, male], probs: [0.5, 0.5]}}", *extra])


def adaptor(tmp: Path) -> dict[str, str]:
    d = tmp / "adaptor"
    if not d.is_dir():  # written once: its files' identity is part of every part's fingerprint
        d.mkdir()
        (d / "weights.safetensors").write_bytes(b"stand-in")
    return {"debiased": str(d)}


def evaluate(cfg, tmp: Path, out: Path, executor: str = "local", gen_loader=standin_gen_loader, **kw) -> dict:
    return run_evaluation(cfg, adaptor(tmp), out, executor=executor, report=False, gen_loader=gen_loader,
                          score_loader=standin_score_loader, log=lambda s: None, **kw)


def prompt(i: int) -> str:
    return f"A photo of the face of a {OCCUPATIONS[i]}, a person"


COLS = ["model", "prompt", "j", "seed", "face_found", "label_gender", "label_race", "thumb", "sem_toy_sim"]


@pytest.mark.slow
def test_interrupted_ray_evaluation_resumes_reusing_parts_and_survives_a_killed_actor(tmp_path, ray_cluster):
    """An evaluation interrupted part of the way through; rerun into the same --out it reuses the finished
    parts, and when a generation actor is killed during the rerun Ray restarts it and reruns its batch: the
    records equal a clean run's."""
    cfg = eval_cfg(tmp_path)
    out, log, marker = tmp_path / "out", tmp_path / "gen.log", tmp_path / "killed"
    with pytest.raises(Exception, match="evaluation interrupted"):
        evaluate(cfg, tmp_path, out, "ray", gen_loader=FaultyGenerator(str(log), fail=prompt(3), delay=3.0))
    done = sorted(out.glob("parts/*/*/*.parquet"))
    assert done and not (out / "summary.json").exists()
    finished = {(m == "base", p) for f in done
                for m, p in pd.read_parquet(f, columns=["model", "prompt"]).drop_duplicates().itertuples(index=False)}
    log.write_text("")
    resumed = evaluate(cfg, tmp_path, out, "ray", gen_loader=FaultyGenerator(str(log), kill=prompt(2),
                                                                              marker=str(marker)))
    assert marker.exists()  # a generation actor died mid-run
    generated = [tuple(json.loads(x)) for x in log.read_text().splitlines()]
    assert not finished & set(generated)  # finished parts were reused, not generated again
    assert len(set(generated)) == 2 * 4 - len(done)  # every other part (1 prompt each) was generated
    clean = evaluate(cfg, tmp_path, tmp_path / "clean")
    assert resumed["models"] == clean["models"]
    pd.testing.assert_frame_equal(pd.read_parquet(out / "records.parquet")[COLS],
                                  pd.read_parquet(tmp_path / "clean" / "records.parquet")[COLS])


def _results(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


def test_evaluation_results_are_not_overwritten_without_overwrite(tmp_path):
    cfg, other = eval_cfg(tmp_path), eval_cfg(tmp_path, "eval.steps=3")
    out = tmp_path / "out"
    first = evaluate(cfg, tmp_path, out, overwrite=False)
    records = (out / "records.parquet").read_bytes()
    assert evaluate(cfg, tmp_path, out, overwrite=False)["models"] == first["models"]  # the same one: rebuilt
    assert (out / "records.parquet").read_bytes() == records
    before = _results(out)
    assert {"summary.json", "parts.json", "records.parquet", "per_prompt.csv"} <= set(before)
    with pytest.raises(UserError, match="holds a finished evaluation of other models, settings or prompts"):
        evaluate(other, tmp_path, out, overwrite=False)
    assert _results(out) == before and len(list(out.glob("parts/base/*"))) == 1  # nothing written
    # --overwrite, but the new run fails part of the way: the previous results stay as they were
    with pytest.raises(RuntimeError, match="evaluation interrupted"):
        evaluate(other, tmp_path, out, gen_loader=FaultyGenerator(str(tmp_path / "log"), fail=prompt(1)), overwrite=True)
    assert _results(out) == before and not list(out.glob(".results.*"))
    new = evaluate(other, tmp_path, out, overwrite=True)
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(new))
    assert _results(out)["parts.json"] != before["parts.json"]
    # a directory that is not an evaluation is not written into
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match="not an evaluation directory"):
        evaluate(cfg, tmp_path, notes, overwrite=False)
    assert [p.name for p in notes.iterdir()] == ["mine.txt"]


def test_atomic_dir_failure_keeps_the_old_directory(tmp_path):
    d = tmp_path / "out"
    with atomic_dir(d) as tmp:
        (tmp / "a.png").write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(d, overwrite=True) as tmp:
        (tmp / "b.png").write_bytes(b"new")
        raise RuntimeError("boom")
    assert [p.name for p in d.iterdir()] == ["a.png"] and (d / "a.png").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary left behind


_SIGTERM_JOB = """
import os, sys, time
from fairdiff_ray.dist.cluster import connect
from fairdiff_ray.jobs_common import run_job

def main(argv):
    connect(None, num_cpus=1, include_dashboard=False, configure_logging=False)
    with open(argv[0], "w") as f:
        f.write(os.environ["RAY_TMPDIR"])
    time.sleep(600)
    return 0

run_job(main)
"""


@pytest.mark.slow
def test_sigterm_shuts_the_private_cluster_down_and_removes_its_temp_root(tmp_path):
    """A job on a private local cluster stopped with SIGTERM (ray job stop, timeout, a scheduler) exits through
    the normal clean-up (ray.init's own SIGTERM handler raises SystemExit): its /tmp/fdray* root is removed."""
    marker = tmp_path / "tmpdir"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
    proc = subprocess.Popen([sys.executable, "-c", _SIGTERM_JOB, str(marker)], cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() or not marker.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.2)
        root = marker.read_text()
        assert root.startswith("/tmp/fdray") and os.path.isdir(root)
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == signal.SIGTERM, out[-3000:]  # ray.init's handler: sys.exit(signum)
    assert not os.path.exists(root)
