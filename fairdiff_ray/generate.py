"""`fairdiff generate`: PNGs for one prompt and a list of seeds, from the base model or base + adaptor.

    fairdiff generate --model assets/synthetic-sd --adaptor runs/demo/adaptor --prompt "a photo of a nurse" \\
        --seeds 0-7 --steps 30 --guidance 7.5 --scheduler dpmsolver++ --out out/nurse

Images are generated exactly as evaluation generates them (eval.stages.load_generator: models.sd +
core.sampler.sample_with_grad under no_grad, x_T from core.seeding.noise_from_seeds(seed)), so the image for
seed s here is the image evaluation makes for that seed. Files: seed_<s>.png plus generate.json (settings).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import torch

from fairdiff_ray.config import DEVICE_RE
from fairdiff_ray.errors import ConfigError
from fairdiff_ray.io import atomic_dir, check_output_dir

_SEED_PART = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse_seeds(text: str) -> list[int]:
    """'0-7' -> [0..7] (inclusive); '1,5,9' and '0-3,10' also work. Seeds are non-negative, unique."""
    seeds: list[int] = []
    for part in text.replace(" ", "").split(","):
        m = _SEED_PART.match(part)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise ConfigError(f"--seeds {text!r}: expected N, N-M (M >= N) or a comma list of them, e.g. 0-7 or 0,3,9")
        lo = int(m.group(1))
        seeds.extend(range(lo, int(m.group(2) or lo) + 1))
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r} names a seed twice; list each seed once")
    if max(seeds) >= 2**63 or len(seeds) > 100_000:
        raise ConfigError(f"--seeds {text!r}: seeds must be below 2**63 and at most 100000 of them")
    return seeds


def generate_images(
    model: str,
    prompt: str,
    seeds: list[int],
    adaptor: str | None = None,
    steps: int = 30,
    guidance: float = 7.5,
    scheduler: str = "dpmsolver++",
    dtype: str = "float32",
    device: str = "auto",
    batch_size: int = 8,
) -> torch.Tensor:
    """Images (len(seeds), 3, H, W) in [-1, 1], float32 on the CPU; row i from seeds[i]'s noise."""
    from fairdiff_ray.eval.stages import load_generator

    spec = {"model_path": model, "dtype": dtype, "device": device, "scheduler": scheduler,
            "guidance_scale": guidance, "steps": steps}
    generate = load_generator(spec, adaptor)
    chunks = [generate([prompt] * len(seeds[i: i + batch_size]), seeds[i: i + batch_size])
              for i in range(0, len(seeds), batch_size)]
    return torch.cat(chunks)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fairdiff generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local diffusers Stable Diffusion directory")
    p.add_argument("--adaptor", default=None, help="exported adaptor directory (fairdiff_adaptor.json inside)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--seeds", default="0-7", help="e.g. 0-7, 1,5,9 or 0-3,10 (default 0-7)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--scheduler", choices=["dpmsolver++", "ddim"], default="dpmsolver++")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def main(argv: list[str]) -> int:
    from fairdiff_ray.eval.records import png_bytes, to_uint8
    from fairdiff_ray.models.adaptors import check_adaptor
    from fairdiff_ray.models.sd import check_model_dir, load_tokenizer, warn_long_prompts

    args = build_parser().parse_args(argv)
    seeds = parse_seeds(args.seeds)
    if args.steps < 1 or args.batch_size < 1:
        raise ConfigError(f"--steps and --batch-size must be >= 1, got {args.steps} and {args.batch_size}")
    if not (math.isfinite(args.guidance) and args.guidance >= 0):
        raise ConfigError(f"--guidance {args.guidance}: give a finite number >= 0 (7.5: the pipeline's default)")
    if not re.fullmatch(DEVICE_RE, args.device):
        raise ConfigError(f"--device {args.device!r}: use auto, cpu, cuda or cuda:N")
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {args.device}: no CUDA device here; use --device cpu (or auto)")
    # Every check before any work, so a mistake costs nothing and writes nothing.
    check_output_dir(args.out, args.overwrite, what="--out")
    check_model_dir(args.model)
    meta = check_adaptor(args.adaptor, args.model) if args.adaptor is not None else {}
    reserved = int(meta.get("soft_tokens") or 0) if meta.get("kind") == "soft_prompt" else 0
    warn_long_prompts(load_tokenizer(args.model), [args.prompt], "--prompt", reserved)
    images = generate_images(args.model, args.prompt, seeds, args.adaptor, args.steps, args.guidance,
                             args.scheduler, args.dtype, args.device, args.batch_size)
    pixels = to_uint8(images.numpy())
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "overwrite")}
    with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
        for seed, px in zip(seeds, pixels):
            (tmp / f"seed_{seed}.png").write_bytes(png_bytes(px, max_side=1 << 30))
        (tmp / "generate.json").write_text(json.dumps({**settings, "seeds": seeds}, indent=2) + "\n")
    print(f"wrote {len(seeds)} images to {Path(args.out)}/")
    return 0
