"""Peak bytes of live tensors on any device, the CPU counterpart of ``torch.cuda.max_memory_allocated``.

On CPU the process's resident size is what the allocator holds, not what the tensors need: glibc keeps freed
blocks in its heap, so peak RSS grows with fragmentation even when the live tensors do not. ``LiveTensorBytes``
counts the tensors themselves: a dispatch mode sees every tensor an operator returns (forward and backward; the
autograd engine runs backward under the caller's modes), counts its storage once while that storage is alive
(storages keep one Python object while alive, so a weakref finalizer marks the free), and keeps the peak. An
output that shares its storage with one of the operator's inputs (a view such as ``linear``'s transposed
weight, an in-place result) is not an allocation and is not counted.

    with LiveTensorBytes() as mem:
        loss = f(x); loss.backward()
    mem.peak   # bytes, above what was alive before the block (tensors created before it are not counted)

Slower than running without it (one Python call per operator); for benchmarks and tests, not for training.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    """Live and peak bytes of the storages created by operators inside the block (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def _freed(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {(a.device, a.untyped_storage().data_ptr()) for a in tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor) and a.device.type != "meta"}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = id(storage)
            # counted already, or a view / in-place result of an input (not an allocation)
            if key in self._sizes or (t.device, storage.data_ptr()) in inputs:
                continue
            self._sizes[key] = storage.nbytes()
            self.live += self._sizes[key]
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key)
        return out
