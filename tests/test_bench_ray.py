"""The Ray benchmarks of issue 8 (bench/bench_workers.py: images/s with 1 vs 2 Ray Train workers;
bench/bench_eval.py: the evaluation pipeline vs a stock diffusers loop) run end to end at toy sizes and write
their BENCHMARKS.md sections, so the scripts cannot rot unnoticed between benchmark runs. No timing is asserted:
only that each variant ran, measured a positive rate and reported it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import section_text  # noqa: E402

pytestmark = pytest.mark.slow


def _run(script: str, args: list[str], out: Path) -> tuple[Path, dict]:
    # a fresh interpreter with its own private local cluster (the suite's RAY_TMPDIR belongs to its clusters)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_TMPDIR", "RAY_ADDRESS")}
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args, "--out", str(out)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return out, json.loads(r.stdout.strip().splitlines()[-1])


def _section(out: Path, name: str) -> str:
    body = section_text(out, name)
    assert body is not None, out.read_text()[:2000]
    return body


def test_bench_workers_runs_one_and_two_workers_and_writes_its_section(tmp_path: Path) -> None:
    out, speedup = _run("bench_workers.py", ["--workers", "1", "2", "--images", "4", "--chunk-size", "2",
                                              "--sampling-steps", "2", "--steps", "2", "--rounds", "1"],
                         tmp_path / "BENCHMARKS.md")
    body = _section(out, "workers")
    rows = [line.split("|")[1:-1] for line in body.splitlines() if line.startswith("| 4 |")]
    assert [r[1].strip() for r in rows] == ["1", "2"], body
    assert all(float(r[2]) > 0 for r in rows), body  # images/s measured for both worker counts
    # cores used by the training workers / by the rest of the cluster: figures, or nan when no second had every
    # worker above 0.5 core (the suite's other tests share the cores); the sampler itself: the test below
    for r in rows:
        workers, other = (float(v) for v in r[7].split("/"))
        assert (workers > 0.5 and other >= 0) or (workers != workers and other != other), body
    assert speedup["4"]["1"] == 1.0 and speedup["4"]["2"] > 0


def test_bench_eval_runs_every_variant_and_writes_its_section(tmp_path: Path) -> None:
    out, per_worker = _run("bench_eval.py", ["--prompts", "3", "--images", "2", "--steps", "2", "--actors", "2",
                                              "--rounds", "1"], tmp_path / "BENCHMARKS.md")
    body = _section(out, "eval")
    rows = {line.split("|")[1].strip(): line for line in body.splitlines() if line.startswith("| ")}
    for v in ("plain", "local", "ray 2"):
        assert v in rows, body
        assert float(rows[v].split("|")[3]) > 0, rows[v]  # images/s measured
    assert per_worker["plain"] == 1.0 and per_worker["local"] > 0 and per_worker["ray 2"] > 0


def test_core_sampler_tells_training_workers_from_the_rest_of_the_cluster(tmp_path: Path) -> None:
    """bench_workers.CoreSampler on stand-in processes: two busy loops titled like Ray Train workers and an idle
    Ray-looking daemon under the sampled Ray temp root, a busy loop under another root (not counted)."""
    from bench.bench_workers import CoreSampler

    root, other_root = str(tmp_path / "mine"), str(tmp_path / "other")
    busy = "import time\nt = time.time()\nwhile time.time() - t < 60: pass"

    def start(env_root: str, argv0: str, code: str) -> subprocess.Popen:  # argv0 is what /proc/PID/cmdline starts with
        return subprocess.Popen(["bash", "-c", f'exec -a "{argv0}" "{sys.executable}" -c "$0"', code],
                                env={**os.environ, "RAY_TMPDIR": env_root})

    procs = [start(root, "ray::RayTrainWorker", busy), start(root, "ray::RayTrainWorker", busy),
             start(root, "/x/ray/dashboard/agent.py", "import time; time.sleep(60)"),
             start(other_root, "ray::RayTrainWorker", busy)]
    try:
        sampler = CoreSampler(root, interval_s=0.5, busy_core=0.05)
        sampler.start()
        import time

        time.sleep(7)  # the first scan of the root's processes happens within the first interval
        cores = sampler.stop(workers=2)
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)
    assert cores["seconds"] >= 3, sampler.samples
    # three busy loops share the machine's cores; the two under this root count as its training workers
    assert 0.1 < cores["worker_cores"] <= 2.2, sampler.samples
    assert cores["other_cores"] < 0.1, sampler.samples  # the idle daemon (and this test's driver) use ~nothing
