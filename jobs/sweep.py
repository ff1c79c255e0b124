"""Run a Ray Tune sweep over config paths (issue 7).

    fairdiff sweep --config configs/sweep_synthetic.yaml [key=value ...]   # keys of the sweep: section (sweep.key works too)
    ray job submit --working-dir . -- python jobs/sweep.py --config configs/sweep_synthetic.yaml

Running it again with the same sweep name resumes: finished trials are not re-run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fairdiff_ray.jobs_common import run_job  # noqa: E402


def main(argv: list[str]) -> int:
    from fairdiff_ray.dist.tune import run_sweep
    from fairdiff_ray.sweep.spec import load_sweep

    p = argparse.ArgumentParser(prog="fairdiff sweep", description="Ray Tune sweep over a base run config.")
    p.add_argument("--config", required=True, help="sweep YAML (see configs/sweep_*.yaml)")
    p.add_argument("overrides", nargs="*", help="overrides of the sweep file, e.g. name=my-sweep num_samples=4")
    args = p.parse_args(argv)
    spec = load_sweep(args.config, args.overrides)
    try:
        out = run_sweep(spec)
    except RuntimeError as e:  # no trial finished; the table of what happened is written
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"sweep results: {out}/trials.md, plots: {out}/*.png, best adaptor: {out}/best_adaptor")
    return 0


if __name__ == "__main__":
    run_job(main)
