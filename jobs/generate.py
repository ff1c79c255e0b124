"""Write PNGs for a prompt and seeds, optionally with an adaptor (same images as evaluation for those seeds).

    fairdiff generate --model assets/synthetic-sd --adaptor runs/demo/adaptor --prompt "..." --seeds 0-7 --out DIR
    ray job submit --working-dir . -- python jobs/generate.py --model ... --prompt "..." --out DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fairdiff_ray.generate import main  # noqa: E402
from fairdiff_ray.jobs_common import run_job  # noqa: E402

if __name__ == "__main__":
    run_job(main)
