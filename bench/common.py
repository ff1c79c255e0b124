"""What every bench shares: its own marked section of BENCHMARKS.md, replaced in place."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BENCHMARKS = ROOT / "BENCHMARKS.md"
HEADER = ("# Benchmarks\n\nWritten by the scripts in `bench/` (each owns one marked section). Every figure is a "
          "ratio or a value measured side by side in one run on the machine named in its section.\n")


def write_section(path: Path, name: str, body: str) -> None:
    """Replace the ``<!-- bench:NAME -->`` section of ``path`` (or append it), leaving the rest untouched."""
    from fairdiff_ray.io import atomic_write_text

    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = path.read_text(encoding="utf-8") if path.exists() else HEADER
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    atomic_write_text(path, text)


def machine() -> str:
    """One line naming the machine the numbers come from."""
    import os
    import platform

    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")
