"""Pretrain the synthetic world's biased tiny Stable Diffusion (issue 4) with Ray Train; about 30 min on 2 CPUs.

    python jobs/pretrain_synthetic.py [--out assets/synthetic-sd --overwrite] [--storage /tmp/fairdiff-pretrain] [key=value ...]
    fairdiff pretrain-synthetic --overwrite steps=6000 vae_steps=1500   # replaces the shipped model
    fairdiff pretrain-synthetic --out /tmp/sd-captions caption_mix=0.3 vae_from=assets/synthetic-sd   # captions that
        # sometimes name attributes / start with other words, the VAE taken from an existing pipeline (no stage 1)
    fairdiff pretrain-synthetic --name more init_from=RUN/checkpoint_.../state.pt steps=1200   # finetune a finished run

Keys are PretrainSpec fields (fairdiff_ray/synthetic/pretrain.py). A rerun with the same --storage/--name
resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fairdiff_ray.jobs_common import run_job  # noqa: E402


def main(argv: list[str]) -> int:
    from fairdiff_ray.errors import ConfigError, UserError
    from fairdiff_ray.synthetic.pretrain import run_pretraining, spec_from_overrides

    p = argparse.ArgumentParser(prog="fairdiff pretrain-synthetic", description="Pretrain the synthetic SD.")
    p.add_argument("--out", default="assets/synthetic-sd", help="output diffusers directory")
    p.add_argument("--storage", default="/tmp/fairdiff-pretrain", help="Ray Train storage (checkpoints)")
    p.add_argument("--name", default="synthetic-sd", help="run name under --storage (reuse it to resume)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.add_argument("overrides", nargs="*", help="PretrainSpec overrides, e.g. steps=6000")
    args = p.parse_args(argv)
    pairs = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not key=value: write e.g. steps=6000")
        pairs[key] = value
    try:
        spec = spec_from_overrides(pairs)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"bad pretraining override: {e.args[0]}") from None
    out_dir = Path(args.out)
    if out_dir.exists() and any(out_dir.iterdir()) and not args.overwrite:
        raise UserError(f"--out {args.out!r} exists: pass --overwrite to replace it (the shipped model lives in "
                        "assets/synthetic-sd), or give another --out")
    out = run_pretraining(spec, args.out, storage=args.storage, name=args.name)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_job(main)
