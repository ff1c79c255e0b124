"""Every fairdiff_ray.core module imports in a fresh interpreter without Ray or a process group (STYLE.md)."""

import pkgutil
import subprocess
import sys

import pytest

import fairdiff_ray.core

MODULES = sorted(m.name for m in pkgutil.iter_modules(fairdiff_ray.core.__path__, "fairdiff_ray.core."))
CHECK = """
import importlib, sys
importlib.import_module({name!r})
import torch.distributed as dist
assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))
assert not (dist.is_available() and dist.is_initialized()), 'a process group was initialised'
assert not any(m.startswith(('diffusers', 'transformers', 'deepspeed')) for m in sys.modules), 'model libraries imported'
"""


def test_core_modules_found():
    assert {"fairdiff_ray.core.ot", "fairdiff_ray.core.metrics", "fairdiff_ray.core.losses"} <= set(MODULES)


@pytest.mark.parametrize("name", ["fairdiff_ray.core", *MODULES])
def test_core_module_is_pure(name):
    done = subprocess.run(
        [sys.executable, "-c", CHECK.format(name=name)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
