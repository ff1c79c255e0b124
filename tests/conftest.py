"""Suite-wide fixtures: one torch thread, one shared local Ray cluster, and a guard against leaked Ray sessions.

Small tensors on two threads spin-wait badly when the CI machine's two cores are shared with Ray workers, so
every test runs torch on one thread (subprocesses inherit OMP_NUM_THREADS=1). Tests that need Ray ask for the
``ray_cluster`` fixture: one local cluster, started on first use and shared by the whole session; code under test
that calls ``ray.init`` itself finds it running. A test that starts Ray without asking for the fixture gets it shut
down afterwards, so it cannot leak into the next test.
"""

from __future__ import annotations

import os
import sys

import pytest

os.environ["OMP_NUM_THREADS"] = "1"


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
