"""Peak memory of one backward pass through the sampler vs the number of steps T, checkpointing on/off.

    python bench/bench_sampler_memory.py                      # T in 5 10 20 40, tiny UNet, CPU
    python bench/bench_sampler_memory.py --steps 10 25 50 --batch 8 --out runs/bench/sampler_memory.json

Each (T, checkpoint) runs in a fresh interpreter: build the tiny SD UNet, sample with the adjusted estimator
(guidance 7.5, DPM-Solver++ 2M), backpropagate a loss on x_0 into the UNet. Reported: the peak resident set
size above the resident size just before sampling (CPU: ru_maxrss), and wall time. On CUDA the peak of
torch.cuda.max_memory_allocated is reported instead. The children run with MALLOC_MMAP_THRESHOLD_=65536 so
that freed buffers go back to the OS and the peak RSS tracks live memory, not glibc heap fragmentation.
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


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(steps: int, checkpoint: bool, batch: int, device: str) -> dict:
    import torch
    from diffusers import DPMSolverMultistepScheduler

    from fairdiff_ray.core.sampler import sample_with_grad
    from fairdiff_ray.models.tiny import tiny_components

    comp = tiny_components(seed=0)
    unet = comp["unet"].to(device).train()
    sched = DPMSolverMultistepScheduler.from_config(comp["scheduler"].config, algorithm_type="dpmsolver++", solver_order=2)
    emb = torch.randn(2 * batch, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(0)).to(device)
    x_T = torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(1)).to(device)
    eps_fn = lambda x, t: unet(x, t, encoder_hidden_states=emb).sample  # noqa: E731
    before = _rss_mb()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    x0 = sample_with_grad(eps_fn, x_T, sched, estimator="adjusted", checkpoint=checkpoint, num_inference_steps=steps)
    x0.square().mean().backward()
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before  # ru_maxrss is in KiB on Linux
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    return {"steps": steps, "checkpoint": checkpoint, "batch": batch, "device": device, "peak_mb": round(peak, 1), "seconds": round(wall, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 40])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/bench/sampler_memory.json")
    p.add_argument("--child", nargs=2, metavar=("STEPS", "CHECKPOINT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1] == "1", args.batch, args.device)))
        return 0
    rows = []
    for steps in args.steps:
        for ckpt in (True, False):
            cmd = [sys.executable, __file__, "--child", str(steps), str(int(ckpt)), "--batch", str(args.batch), "--device", args.device]
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"T={r['steps']:3d} checkpoint={str(r['checkpoint']):5s} peak +{r['peak_mb']:8.1f} MB  {r['seconds']:6.2f} s", flush=True)
    from fairdiff_ray.io import atomic_write_text

    out_path = ROOT / args.out
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_path, json.dumps(rows, indent=2) + "\n")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
