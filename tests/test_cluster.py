"""dist.cluster.connect's private local cluster: its own Ray temp root that names it, the Ray Train settings for
one machine, and the temp root gone when the process exits. Run in a fresh interpreter without RAY_TMPDIR (the
suite's conftest sets one for the tests' own clusters)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

SCRIPT = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
import ray
from fairdiff_ray.dist.cluster import connect
connect(None, num_cpus=1)
tmp = os.environ["RAY_TMPDIR"]
path = os.path.join(tmp, "ray", "ray_current_cluster")
recorded = open(path).read() if os.path.exists(path) else None
print(json.dumps({"tmp": tmp, "recorded": recorded, "gcs": ray.get_runtime_context().gcs_address,
                  "health": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"),
                  "watcher": os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")}))
"""


def _run(env: dict[str, str]) -> dict[str, str]:
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT)], env=env, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _clean_env() -> dict[str, str]:
    drop = ("RAY_TMPDIR", "RAY_ADDRESS", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")
    return {k: v for k, v in os.environ.items() if k not in drop}


def test_local_cluster_gets_a_private_temp_root_naming_it_removed_at_exit() -> None:
    out = _run(_clean_env())
    assert Path(out["tmp"]).name.startswith("fdray")
    assert out["recorded"] == out["gcs"] and out["gcs"]  # the state API finds this cluster, not a stale one
    assert out["health"] == "0.25" and out["watcher"] == "0"
    assert not Path(out["tmp"]).exists()  # removed when the process exited


def test_users_ray_settings_are_kept() -> None:
    import shutil
    import tempfile

    mine = tempfile.mkdtemp(prefix="fdt", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        out = _run({**_clean_env(), "RAY_TMPDIR": mine, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "3"})
        assert out["tmp"] == mine and out["health"] == "3"
        assert Path(mine).is_dir()  # the user's temp root is theirs: not removed
        assert out["recorded"] is None  # nor is anything of ours written into it
    finally:
        shutil.rmtree(mine, ignore_errors=True)


def test_reap_stops_only_the_finished_clusters_own_leftover_processes(tmp_path: Path) -> None:
    import signal

    from fairdiff_ray.dist.cluster import reap_ray_processes

    root, other = str(tmp_path / "mine"), str(tmp_path / "other")
    sleep = "import signal, sys, time; {} print('ready', flush=True); time.sleep(120)"

    def start(env_root: str, *argv: str, ignore_term: bool = False) -> subprocess.Popen:
        code = sleep.format("signal.signal(signal.SIGTERM, signal.SIG_IGN);" if ignore_term else "")
        p = subprocess.Popen([sys.executable, "-c", code, *argv], env={**os.environ, "RAY_TMPDIR": env_root},
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        return p

    leftover = start(root, "/site-packages/ray/dashboard/agent.py")  # a Ray daemon of this cluster
    stubborn = start(root, "/site-packages/ray/_private/workers/default_worker.py", ignore_term=True)
    not_ray = start(root, "user-script.py")  # inherited the environment, but is no Ray process
    elsewhere = start(other, "/site-packages/ray/dashboard/agent.py")  # another cluster's
    procs = [leftover, stubborn, not_ray, elsewhere]
    try:
        reaped = reap_ray_processes(root, grace_s=1.0)
        assert sorted(reaped) == sorted([leftover.pid, stubborn.pid])
        assert leftover.wait(timeout=10) == -signal.SIGTERM
        assert stubborn.wait(timeout=10) == -signal.SIGKILL  # ignored SIGTERM: killed after the grace time
        assert not_ray.poll() is None and elsewhere.poll() is None
        assert reap_ray_processes(root) == []  # nothing of this cluster is left
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)
