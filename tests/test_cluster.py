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
