"""Peak memory of one backward pass through the sampling chain vs the number of steps T (issue 8 b).

    python bench/bench_sampler_memory.py                   # tiny model + a full-size SD v1.5 UNet, CPU
    python bench/bench_sampler_memory.py --models tiny --steps 10 20 40 80

Each (model, allocator, T, checkpoint) runs in a fresh interpreter: build the UNet (tiny SD, or the SD v1.5 UNet
architecture from its config with random weights - nothing is downloaded), sample with the adjusted estimator
(guidance 7.5, DDIM), backpropagate a loss on x_0 into the UNet. Reported: peak resident set size above the
resident size just before sampling (CPU, ru_maxrss) or torch.cuda.max_memory_allocated (CUDA), and wall time.
glibc keeps freed memory in its heap, so every configuration is measured twice: with the default allocator and
with MALLOC_TRIM_THRESHOLD_=0 (freed memory goes back to the OS, so the peak tracks live tensors), which is
what the training workers set (dist/ sets it for Ray workers).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import BENCHMARKS, machine, write_section  # noqa: E402

# Stable Diffusion v1.5 UNet architecture (its published unet/config.json), random weights.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
ALLOCATORS = {"default": {}, "trim0": {"MALLOC_TRIM_THRESHOLD_": "0"}}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _unet(model: str):  # noqa: ANN202
    import torch
    from diffusers import UNet2DConditionModel

    from fairdiff_ray.models.tiny import tiny_components

    torch.manual_seed(0)
    if model == "tiny":
        return tiny_components(seed=0)["unet"], 16, tiny_components(seed=0)["scheduler"].config
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    return UNet2DConditionModel(**SD15_UNET), 32, sched.config  # 32x32 latents (256 px) keep CPU runs short


def child(model: str, steps: int, checkpoint: bool, batch: int, device: str) -> dict:
    import torch
    from diffusers import DDIMScheduler

    from fairdiff_ray.core.sampler import sample_with_grad

    unet, size, sched_cfg = _unet(model)
    unet = unet.to(device).train().requires_grad_(True)
    sched = DDIMScheduler.from_config(sched_cfg)
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(2 * batch, 77, unet.config.cross_attention_dim, generator=g).to(device)
    x_T = torch.randn(batch, 4, size, size, generator=g).to(device)
    eps_fn = lambda x, t: unet(x, t, encoder_hidden_states=emb).sample  # noqa: E731
    before = _rss_mb()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    x0 = sample_with_grad(eps_fn, x_T, sched, estimator="adjusted", checkpoint=checkpoint, num_inference_steps=steps)
    x0.square().mean().backward()
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before  # KiB on Linux
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    return {"peak_mb": round(peak, 1), "seconds": round(wall, 2)}


def run(model: str, alloc: str, steps: int, ckpt: bool, batch: int, device: str) -> dict:
    cmd = [sys.executable, __file__, "--child", model, str(steps), str(int(ckpt)), "--batch", str(batch),
           "--device", device]
    env = {**os.environ, **ALLOCATORS[alloc], "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    r = {"model": model, "allocator": alloc, "steps": steps, "checkpoint": ckpt, "batch": batch,
         **json.loads(out.strip().splitlines()[-1])}
    print(f"{model:5s} {alloc:7s} T={steps:3d} checkpoint={ckpt!s:5s} peak +{r['peak_mb']:8.1f} MB "
          f"{r['seconds']:7.2f} s", flush=True)
    return r


def table(rows: list[dict]) -> str:
    lines = ["| model | allocator | checkpoint | " + " | ".join(f"T={t} MB" for t in sorted({r['steps'] for r in rows}))
             + " | peak T=max / T=min |", ""]
    steps = sorted({r["steps"] for r in rows})
    lines[1] = "|---|---|---|" + "---|" * len(steps) + "---|"
    for key in dict.fromkeys((r["model"], r["allocator"], r["checkpoint"]) for r in rows):
        by = {r["steps"]: r["peak_mb"] for r in rows if (r["model"], r["allocator"], r["checkpoint"]) == key}
        ks = sorted(by)
        ratio = f"{by[ks[-1]] / by[ks[0]]:.2f}x (T={ks[-1]} vs {ks[0]})" if len(ks) > 1 and by[ks[0]] > 0 else "-"
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(str(by.get(t, "-")) for t in steps)
                     + f" | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["tiny", "sd15"], choices=["tiny", "sd15"])
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40])
    p.add_argument("--batch", type=int, default=4, help="images (tiny); SD v1.5 always uses 1")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(BENCHMARKS))
    p.add_argument("--child", nargs=3, metavar=("MODEL", "STEPS", "CHECKPOINT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        m, s, c = args.child
        print(json.dumps(child(m, int(s), c == "1", args.batch, args.device)))
        return 0
    rows = []
    for model in args.models:
        batch = args.batch if model == "tiny" else 1
        for alloc in ALLOCATORS:
            for ckpt in (True, False):
                # the uncheckpointed full-size chain does not fit a small machine beyond the shortest T
                steps = args.steps if (ckpt or model == "tiny" or args.device == "cuda") else args.steps[:1]
                rows += [run(model, alloc, t, ckpt, batch, args.device) for t in steps]
    body = (f"## Peak memory vs sampling steps (bench/bench_sampler_memory.py)\n\n{machine()}, device {args.device}; "
            "one adjusted-DFT backward through the whole DDIM chain (guidance 7.5, loss on x_0). tiny = the tiny SD "
            "UNet, batch " f"{args.batch}, 16x16 latents; sd15 = the SD v1.5 UNet architecture with random weights, "
            "batch 1, 32x32 latents. Peak RSS above the pre-sampling RSS.\n\n" + table(rows))
    write_section(Path(args.out), "memory", body)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
