"""Deterministic seeds and noise that are identical across processes and machines.

Python's ``hash()`` is salted per process, so every seed here comes from SHA-256 of the parts' text.
Noise is always drawn on the CPU from a per-image ``torch.Generator`` and then moved, so the j-th image of
every model and every worker layout starts from the same x_T.
"""

from __future__ import annotations

import hashlib

import torch


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from the parts' text, e.g. ``stable_seed("a photo of a nurse", 3)``."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") & ((1 << 63) - 1)


def noise_from_seeds(
    seeds: list[int],
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(len(seeds), *shape) standard-normal noise, row i drawn from a CPU generator seeded with seeds[i]."""
    rows = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s)), dtype=torch.float32) for s in seeds]
    return torch.stack(rows).to(device=device, dtype=dtype)
