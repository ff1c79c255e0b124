"""Finetune an adaptor for fairness with Ray Train (issue 5): adjusted DFT on the configured prompt sets.

    python jobs/debias.py --config configs/synthetic_gender.yaml [train.steps=200 ray.num_workers=2 ...]
    fairdiff debias --config configs/synthetic_gender.yaml
    ray job submit --working-dir . -- python jobs/debias.py --config configs/synthetic_gender.yaml

Connects to ray.address / RAY_ADDRESS or starts a local cluster. The run lives in <run.storage>/<run.name>/;
running the same name again resumes an unfinished run and refuses a finished one (run.overwrite=true).
Prints the exported adaptor's path.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fairdiff_ray.jobs_common import config_parser, parse_config, run_job  # noqa: E402


def main(argv: list[str]) -> int:
    from fairdiff_ray.dist.trainer import run_debias
    from fairdiff_ray.preflight import check_debias_inputs

    parser = config_parser("fairdiff debias", "Finetune an adaptor towards a target attribute distribution.")
    cfg, _ = parse_config(argv, parser)
    check_debias_inputs(cfg)  # model, classifier classes, detector, prompt sets: before Ray starts
    run_debias(cfg)
    return 0


if __name__ == "__main__":
    run_job(main)
