"""Suite-wide fixtures: one torch thread, one shared local Ray cluster, and a guard against leaked Ray sessions.

Small tensors on two threads spin-wait badly when the CI machine's two cores are shared with Ray workers, so
every test runs torch on one thread (subprocesses inherit OMP_NUM_THREADS=1). Tests that need Ray ask for the
``ray_cluster`` fixture: one local cluster, started on first use and shared by the whole session; code under test
that calls ``ray.init`` itself finds it running. A test that starts Ray without asking for the fixture gets it shut
down afterwards, so it cannot leak into the next test. Under pytest-xdist (``make test``) each worker process
has its own such cluster, and the long test files are handed out first (``pytest_collection_modifyitems``).

Ray settings for the whole session (environment, so subprocess jobs and every Ray process the tests start get
them too):

- ``RAY_TMPDIR``: a fresh Ray temp root for the session. Ray Train's PlacementGroupCleaner asks the state API
  about the controller; with no address given that API trusts ``<ray temp>/ray_current_cluster``, which a
  ``ray start`` anywhere on the machine leaves behind pointing at a head that is gone, and then every Train run
  ended in a 12 s stop timeout. A private temp root has no such file.
- ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (Ray Train V2, default 2 s): how often the controller polls the workers.
  A worker's ``ray.train.report`` waits for the previous report to be polled and the end of a run is noticed at
  the next poll, so the default cost a tiny test run several seconds per run.
- ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0`` (Ray Train V2): no node-preemption watcher actor per run (a local
  test cluster is never drained); one process less to start per run.
"""

from __future__ import annotations

import os
import sys

import pytest

from fairdiff_ray.dist.cluster import LOCAL_ENV, new_ray_temp_root, reap_ray_processes, remove_ray_temp_root

os.environ["OMP_NUM_THREADS"] = "1"
for _k, _v in LOCAL_ENV.items():  # the settings the product gives its own local clusters (dist/cluster.py)
    os.environ.setdefault(_k, _v)
_RAY_TMP: str | None = None


def pytest_configure(config):
    """The session's Ray temp root: short (Ray's socket paths live under it), made before any test starts Ray."""
    global _RAY_TMP
    if "RAY_TMPDIR" not in os.environ:
        _RAY_TMP = new_ray_temp_root()
        os.environ["RAY_TMPDIR"] = _RAY_TMP


def pytest_unconfigure(config):
    """Removed after the session (Ray's processes may still be writing their last logs for a moment), and any
    process of the session's clusters still running stopped."""
    if _RAY_TMP is None:
        return
    os.environ.pop("RAY_TMPDIR", None)
    reap_ray_processes(_RAY_TMP)  # a Ray actor process that outlived its cluster (dist/cluster.py)
    remove_ray_temp_root(_RAY_TMP)


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``make test``: ``-n 2 --dist loadfile --no-loadscope-reorder``) the test files go to
    the workers in collection order; the long ones (a ``slow`` mark, or the Ray cluster) are put first, so the
    many short files fill the gaps at the end instead of one worker finishing a long file alone."""
    if getattr(config, "workerinput", None) is None:  # not an xdist worker: the usual order
        return

    def file_of(item) -> str:
        return item.nodeid.split("::", 1)[0]

    heavy = {file_of(i) for i in items if i.get_closest_marker("slow") or "ray_cluster" in i.fixturenames}
    items.sort(key=lambda i: file_of(i) not in heavy)  # stable: the order inside each group is kept


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster (4 logical CPUs) that never joins another cluster running on the machine."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    # with the dashboard (bound to 127.0.0.1): without it every Ray Train run ends in a 10 s cleanup timeout
    ray.init(address="local", num_cpus=4, include_dashboard=True, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def _no_leaked_ray(request):
    before = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    yield
    ray = sys.modules.get("ray")
    if ray is not None and not before and "ray_cluster" not in request.fixturenames and ray.is_initialized():
        ray.shutdown()
