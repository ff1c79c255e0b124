"""Which Ray cluster a job uses: one rule for every entry point.

- ``ray.address`` set (``auto``, ``host:port``, ``ray://...``): that cluster (``auto`` joins one started on this
  machine with ``ray start``).
- unset and ``RAY_ADDRESS`` in the environment (what ``ray job submit`` gives the entry point): the job's cluster.
- otherwise: a new private local cluster, never another process's stale one (plain ``ray.init()`` would join the
  last cluster recorded in /tmp/ray, even one whose head is gone).

A new local cluster gets, unless the environment already sets them (the Ray processes it starts inherit them):
- ``RAY_TMPDIR``: a private temp root, removed when the process exits (set RAY_TMPDIR to keep Ray's logs),
  whose ``ray/ray_current_cluster`` names the new cluster. Ray Train's PlacementGroupCleaner asks the state
  API about the run's controller, and with no address that API trusts ``<ray temp>/ray_current_cluster``: a
  stale one left by an earlier ``ray start`` cost every training run a 10-12 s stop timeout. The state API also
  needs the dashboard, so a local cluster starts one (on 127.0.0.1); without it the cleaner warned every second.
- ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.25`` (Ray Train V2, default 2 s): a worker's ``ray.train.report`` waits
  for the controller's next poll, and the end of a run is noticed at a poll; with steps of a few seconds on one
  machine the default poll is a visible share of the run.
- ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0``: a one-machine cluster is never drained; the watcher actor only
  cost a process and logged an error line at every start.

When the process exits, after ``ray.shutdown()``, any of the private cluster's own processes still alive are
stopped (``reap_ray_processes``): now and then a Ray actor process (seen: ``ray::TrainController`` after a
``fit()``, ~0.4 GB) missed its raylet's exit and lived on, orphaned, holding its memory.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
import time
from typing import Any

LOCAL_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def new_ray_temp_root() -> str:
    """A fresh Ray temp root, short (Ray's socket paths live under it, at most 107 bytes)."""
    return tempfile.mkdtemp(prefix="fdray", dir="/tmp")


def remove_ray_temp_root(path: str) -> None:
    """Remove it, retrying briefly: Ray's processes may still be writing their last logs after shutdown."""
    for _ in range(10):
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            return
        time.sleep(0.5)


def ray_processes(root: str) -> dict[int, bytes]:
    """Live processes started for the Ray temp root ``root``, pid -> command line: ``RAY_TMPDIR=root`` in their
    environment (inherited from the process that started the cluster) and a Ray process by their command line
    (``ray::...`` workers and actors, Ray's binaries and Python daemons under ``.../ray/``). Linux /proc; {}
    elsewhere."""
    want, me, out = f"RAY_TMPDIR={root}".encode(), os.getpid(), {}
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return {}
    for pid in pids:
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if want not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ")
        except OSError:  # gone, or not ours to read
            continue
        if cmd.startswith(b"ray::") or b"/ray/" in cmd:
            out[pid] = cmd
    return out


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first, utime and stime at 11 and 12); None
    when the process is gone or /proc is not there."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def reap_ray_processes(root: str, grace_s: float = 3.0) -> list[int]:
    """Stop what is left of a finished local cluster (see the module docstring): SIGTERM, then SIGKILL after
    ``grace_s``. Call it only after ``ray.shutdown()``. Returns the pids that were still running."""
    import signal

    pids = list(ray_processes(root))
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    return pids


def _alive(pid: int) -> bool:
    """Running (a zombie awaiting its parent's wait() counts as gone)."""
    fields = proc_stat(pid)
    return bool(fields) and fields[0] != "Z"


def _private_local_env() -> str | None:
    """The environment of a new local cluster (module docstring); a private RAY_TMPDIR (returned) only if none
    is set."""
    for k, v in LOCAL_ENV.items():
        os.environ.setdefault(k, v)
    if "RAY_TMPDIR" in os.environ:
        return None
    tmp = new_ray_temp_root()
    os.environ["RAY_TMPDIR"] = tmp

    def _remove() -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        reap_ray_processes(tmp)
        remove_ray_temp_root(tmp)

    atexit.register(_remove)
    return tmp


def _record_address(tmp: str) -> None:
    """``<tmp>/ray/ray_current_cluster`` = this cluster's GCS address (as ``ray start`` records its own)."""
    import ray

    d = os.path.join(tmp, "ray")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "ray_current_cluster"), "w") as f:
        f.write(ray.get_runtime_context().gcs_address)


def connect(address: str | None, **local_kwargs: Any) -> None:
    """Initialise Ray once per process by the rule above; ``local_kwargs`` only apply to a new local cluster."""
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=local_kwargs.get("log_to_driver", True))
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=local_kwargs.get("log_to_driver", True))
    else:
        tmp = _private_local_env()
        ray.init(address="local", **{"include_dashboard": True, "dashboard_host": "127.0.0.1", **local_kwargs})
        if tmp is not None:
            _record_address(tmp)
