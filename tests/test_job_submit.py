"""`ray job submit` against a real local Ray head started with token authentication (RAY_AUTH_MODE=token,
token from `ray get-auth-token --generate`): jobs/debias.py debiases the shipped synthetic-world model
(configs/synthetic_gender.yaml) for 2 steps, the job succeeds and the exported adaptor loads. A submission
with a wrong token is refused.

The head runs under a private HOME (its token file lives there) and is stopped through its own
`ray start --block` process, never with `ray stop` (which would stop every Ray cluster of the user)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_jobs_api(url: str, env: dict, timeout: float = 180) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        r = subprocess.run([RAY, "job", "list", "--address", url], env=env, capture_output=True, text=True)
        if r.returncode == 0:
            return
        time.sleep(3)
    raise TimeoutError(f"the Jobs API at {url} did not come up: {r.stderr[-2000:]}")


@pytest.fixture
def head(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    # The private HOME holds only the token: caches stay the user's (XDG_CACHE_HOME), or every run would
    # rebuild DeepSpeed's CPU comm op under HOME/.cache/torch_extensions (~35 s of compiling). Without a drain
    # timeout the head stops at once on SIGTERM instead of draining for up to 30 s (RAY_GRACEFUL_SHUTDOWN_...).
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0",
           "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")),
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    env.pop("RAY_ADDRESS", None)
    token = subprocess.run([RAY, "get-auth-token", "--generate"], env=env, capture_output=True, text=True,
                           check=True).stdout.strip()
    assert token and (home / ".ray" / "auth_token").read_text().strip() == token
    port, dash = _free_port(), _free_port()
    # every listening port picked free, so other Ray clusters on this machine do not collide with this one
    ports = [f"--{name}={_free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "ray-client-server-port", "node-manager-port", "object-manager-port")]
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: socket paths; removed with the head
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}", "--num-cpus=4",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--disable-usage-stats",
         f"--temp-dir={temp}", *ports],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_jobs_api(url, env)
        yield url, env, token
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # only the processes this head started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


# Start-up answers that mean the submission never reached the head (nothing was submitted, so it is retried):
# the job agent still starting, or the dashboard's HTTP server not accepting yet (seen once on a loaded 2-core
# box during a full `make test`, after `ray job list` had already answered).
_NOT_UP = ("No available agent", "Connection refused", "Failed to connect to Ray")
# The head dropped the connection without an answer (seen once under a full `make test`): the job may or may not
# exist. Retried with the same submission id, so a job the head did create is followed, never submitted twice.
_DROPPED = "Remote end closed connection"


def _follow(url: str, sid: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """What `ray job submit` prints for a job already submitted: its logs to the end, then its final status."""
    logs = subprocess.run([RAY, "job", "logs", "--follow", "--address", url, sid], env=env, capture_output=True,
                          text=True, timeout=timeout)
    status = subprocess.run([RAY, "job", "status", "--address", url, sid], env=env, capture_output=True, text=True,
                            timeout=60)
    ok = "succeeded" in status.stdout + status.stderr
    return subprocess.CompletedProcess(status.args, 0 if ok else 1, logs.stdout + status.stdout,
                                       logs.stderr + status.stderr)


def _submit(url: str, entry: list[str], env: dict, timeout: float, sid: str) -> subprocess.CompletedProcess:
    """ray job submit (blocking) as job `sid`, retried while the head's job agent or HTTP server is still starting
    or when the head dropped the submission's connection (then a job it did create is followed to its end)."""
    t0, dropped = time.time(), False
    while True:
        r = subprocess.run([RAY, "job", "submit", "--address", url, "--submission-id", sid, "--", *entry], env=env,
                           capture_output=True, text=True, timeout=timeout)
        out = r.stdout + r.stderr
        if "submitted successfully" in out:  # dropped while its logs were streamed: follow the job to its end
            return _follow(url, sid, env, timeout) if r.returncode != 0 and _DROPPED in out else r
        if dropped and "already exists" in out:
            return _follow(url, sid, env, timeout)
        dropped = dropped or _DROPPED in out
        if not (_DROPPED in out or any(m in out for m in _NOT_UP)) or time.time() - t0 > 180:
            return r
        time.sleep(5)


def _job_args(tmp_path: Path) -> list[str]:
    """The shipped synthetic-world demo config, shortened to 2 steps; paths absolute (no --working-dir upload)."""
    return ["--config", str(REPO / "configs" / "synthetic_gender.yaml"), "run.name=job",
            f"run.storage={tmp_path / 'runs'}", f"model.path={REPO / 'assets' / 'synthetic-sd'}",
            f"data.prompt_sets=[{{path: '{REPO / 'data' / 'prompts' / 'occupations.jsonl'}'}}]",
            "train.steps=2", "train.prompts_per_step=1", "train.images_per_prompt=2", "train.chunk_size=2",
            "train.checkpoint_every=1", "sampler.steps=2", "sampler.steps_jitter=0", "ray.cpus_per_worker=1",
            "ray.num_workers=1"]


def test_cluster_yaml_matches_the_autoscaler_schema():
    """cluster.yaml validates against the JSON schema the installed ray ships (ray/autoscaler/ray-schema.json)."""
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    jsonschema.validate(cluster, schema)
    image = cluster["docker"]["image"]
    assert image.startswith(f"rayproject/ray:{ray.__version__}-py311-"), image
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    starts = cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    bad = {**cluster, "provider": {**cluster["provider"], "type": 42}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


@pytest.mark.slow
def test_debias_job_submitted_with_token_auth(head, tmp_path):
    url, env, token = head
    entry = [sys.executable, str(REPO / "jobs" / "debias.py"), *_job_args(tmp_path)]
    bad = {**env, "RAY_AUTH_TOKEN": "not-the-token"}
    refused = _submit(url, entry, bad, timeout=300, sid="refused")
    assert refused.returncode != 0
    assert any(w in (refused.stdout + refused.stderr).lower() for w in ("401", "unauthori", "auth")), refused.stderr
    r = _submit(url, entry, env, timeout=900, sid="debias")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in (r.stdout + r.stderr)
    adaptor = tmp_path / "runs" / "job" / "adaptor"
    assert f"adaptor: {adaptor}" in r.stdout
    # the path taken when the head drops a submission it did create: following the job gives the same answer
    followed = _follow(url, "debias", env, timeout=120)
    assert followed.returncode == 0 and f"adaptor: {adaptor}" in followed.stdout, followed.stderr[-2000:]
    finished = json.loads((tmp_path / "runs" / "job" / "finished.json").read_text())
    assert finished["steps"] == 2

    from fairdiff_ray.models.adaptors import load_adaptor
    from fairdiff_ray.models.sd import load_components

    loaded = load_adaptor(load_components(str(REPO / "assets" / "synthetic-sd")), str(adaptor))
    shipped = yaml.safe_load((REPO / "configs" / "synthetic_gender.yaml").read_text())["adaptor"]["kind"]
    assert loaded.kind == shipped and loaded.trainable_parameters()  # the shipped config's adaptor kind
    # the finished run is not clobbered: one line, exit 2, nothing written
    again = subprocess.run([sys.executable, str(REPO / "jobs" / "debias.py"), *_job_args(tmp_path)],
                           env={**env, "RAY_ADDRESS": url}, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already finished" in again.stderr and len(again.stderr.splitlines()) == 1
