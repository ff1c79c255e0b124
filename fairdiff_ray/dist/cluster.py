"""Which Ray cluster a job uses: one rule for every entry point.

- ``ray.address`` set (``auto``, ``host:port``, ``ray://...``): that cluster (``auto`` joins one started on this
  machine with ``ray start``).
- unset and ``RAY_ADDRESS`` in the environment (what ``ray job submit`` gives the entry point): the job's cluster.
- otherwise: a new private local cluster, never another process's stale one (plain ``ray.init()`` would join the
  last cluster recorded in /tmp/ray, even one whose head is gone).
"""

from __future__ import annotations

import os
from typing import Any


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
        ray.init(address="local", **{"include_dashboard": False, **local_kwargs})
