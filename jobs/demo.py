"""`make demo`: debias the embedded synthetic Stable Diffusion and evaluate it against ground truth (issue 4).

    python jobs/demo.py [--config configs/synthetic_gender.yaml] [key=value ...]
    fairdiff demo

Writes runs/demo/: adaptor/, eval/summary.json, report.html. A second run reuses what is finished.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fairdiff_ray.jobs_common import run_job  # noqa: E402


def main(argv: list[str]) -> int:
    from fairdiff_ray.config import load_config
    from fairdiff_ray.demo import run_demo

    p = argparse.ArgumentParser(prog="fairdiff demo", description="Debias the synthetic model end to end.")
    p.add_argument("--config", default="configs/synthetic_gender.yaml", help="YAML config (default: the demo)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=50")
    args = p.parse_args(argv)
    cfg = load_config(args.config, ["run.name=demo", "run.storage=runs", *args.overrides])
    run_demo(cfg)
    return 0


if __name__ == "__main__":
    run_job(main)
