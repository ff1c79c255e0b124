"""Train attribute heads on a frozen local CLIP vision backbone with Ray Train.

    fairdiff train-classifier --data faces.parquet --backbone models/clip-vit-l14 --out models/heads \
        --attributes gender,race,age
    ray job submit --working-dir . -- python jobs/train_classifier.py --data ... --backbone ... --out ...

Dataset layout and how FairFace / CelebA labels map onto it: fairdiff_ray/training/classifier.py.
Use the result with classifier.kind=clip_heads classifier.path=OUT classifier.backbone=BACKBONE.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fairdiff_ray.jobs_common import run_job  # noqa: E402


def main(argv: list[str]) -> int:
    from fairdiff_ray.training.classifier import train_classifier

    p = argparse.ArgumentParser(prog="fairdiff train-classifier", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="parquet file/dir (image + label columns) or folder with labels.csv")
    p.add_argument("--backbone", required=True, help="local CLIP directory (CLIPVisionModelWithProjection)")
    p.add_argument("--out", required=True, help="output directory (heads.safetensors, heads.json, card.json)")
    p.add_argument("--attributes", default="gender,race,age", help="comma-separated label columns")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--hidden", type=int, default=0, help="MLP hidden width (0 = linear heads)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    card = train_classifier(a.data, a.backbone, a.out, [s for s in a.attributes.split(",") if s], a.epochs,
                            a.val_fraction, a.hidden, a.lr, a.num_workers, a.seed, overwrite=a.overwrite)
    for attr, m in card["accuracy"]["val"].items():
        per = ", ".join(f"{c} {v:.3f}" if v is not None else f"{c} -" for c, v in m["per_class"].items())
        print(f"{attr}: held-out accuracy {m['overall']:.3f} (n={m['n']}, majority {m['chance']:.3f}; {per})")
    print(f"heads: {a.out} (card.json); use {card['use']}")
    return 0


if __name__ == "__main__":
    run_job(main)
