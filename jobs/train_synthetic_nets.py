"""Train the synthetic world's detector, classifiers, feature and fidelity nets (issue 4); ~10 min on 2 CPUs.

    python jobs/train_synthetic_nets.py [--out assets/synthetic-nets] [--overwrite] [--seed 0] [--scale 1.0]
                                        [--sd assets/synthetic-sd] [--card-only]
                                        [--only classifier-train|classifier-eval|features|features-eval]

Writes <name>.safetensors + <name>.json for detector, classifier-train, classifier-eval, features, features-eval,
fidelity, metrics.json and CARD.md. With --sd, CARD.md also reports the nets on ~100 images that model generates;
--card-only skips training and re-measures the nets already in --out; --only retrains one classifier or feature
net in the existing --out (its detector kept) and updates metrics.json and CARD.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fairdiff_ray.jobs_common import run_job  # noqa: E402


def main(argv: list[str]) -> int:
    from fairdiff_ray.errors import ModelFileError
    from fairdiff_ray.io import atomic_dir
    from fairdiff_ray.synthetic.train_nets import (
        TrainSpec,
        measure_on_model,
        retrain,
        train_all,
        write_card,
    )

    p = argparse.ArgumentParser(prog="train_synthetic_nets", description="Train the synthetic world's nets.")
    p.add_argument("--out", default="assets/synthetic-nets", help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="multiplies every pool size and step count")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on shared cores)")
    p.add_argument("--sd", default=None, help="a synthetic SD directory to measure the nets on (CARD.md)")
    p.add_argument("--card-only", action="store_true", help="no training: re-measure the nets in --out")
    p.add_argument("--only", choices=["classifier-train", "classifier-eval", "features", "features-eval"],
                   default=None, help="retrain this net in the existing --out only")
    args = p.parse_args(argv)
    if args.sd is not None and not (Path(args.sd) / "model_index.json").is_file():
        raise ModelFileError(f"--sd {args.sd}: no model_index.json there; run `python jobs/pretrain_synthetic.py`")
    spec = TrainSpec(seed=args.seed, scale=args.scale, threads=args.threads)
    if args.only:
        if not (Path(args.out) / "metrics.json").is_file():
            raise ModelFileError(f"{Path(args.out) / 'metrics.json'} is missing; train all nets first (no --only)")
        metrics = retrain(args.out, spec, args.only)
        print(f"wrote {write_card(args.out, metrics, measure_on_model(args.sd, args.out) if args.sd else None)}")
        return 0
    if args.card_only:
        metrics_file = Path(args.out) / "metrics.json"
        if not metrics_file.is_file():
            raise ModelFileError(f"{metrics_file} is missing; train first with `python jobs/train_synthetic_nets.py`")
        on_model = measure_on_model(args.sd, args.out) if args.sd else None
        print(f"wrote {write_card(args.out, json.loads(metrics_file.read_text()), on_model)}")
        return 0
    with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
        metrics = train_all(tmp, spec)
        write_card(tmp, metrics, measure_on_model(args.sd, tmp) if args.sd else None)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    run_job(main)
