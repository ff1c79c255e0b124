"""Peak memory of one backward pass through the sampling chain vs the number of steps T (issue 8 b).

    python bench/bench_sampler_memory.py                   # tiny model + a full-size SD v1.5 UNet, CPU
    python bench/bench_sampler_memory.py --models tiny --steps 10 20 40 80
    python bench/bench_sampler_memory.py --models sd15 --device cuda --dtype bfloat16 --latent 64   # bench/gpu.sh

What one measurement does: the UNet (tiny SD, or the SD v1.5 UNet architecture from its config with random
weights - nothing is downloaded) is frozen, as in text-encoder-LoRA training; the CFG embeddings (2B, 77, D)
are a leaf that needs a gradient (the text encoder's output); sample B images with the adjusted estimator
(guidance 7.5, DDIM; eps calls checkpointed by torch's non-reentrant checkpoint (the default), by the reentrant
one (sampler.checkpoint_mode=reentrant: no per-op graph kept on the host), or not at all), backpropagate a
loss on x_0 to the embeddings.

CPU: the model is built once; every measurement runs in a forked child (same starting heap for every variant,
no interpreter start-up per measurement). The child resets the kernel's peak-RSS mark (/proc/self/clear_refs)
and reports VmHWM minus its resident size just before sampling. glibc keeps freed memory in its heap, so
every configuration runs with the default allocator and with the trim threshold at 0
(``mallopt`` in the child: trim threshold 0 and the mmap threshold fixed at glibc's initial 128 KiB, which is what
MALLOC_TRIM_THRESHOLD_=0 gives a process from start-up: large blocks are mmapped and go back to the OS when
freed, the heap top is trimmed, so the peak tracks live memory), and a third measure, ``tensors``: the peak bytes
of live tensors (fairdiff_ray.profiling.LiveTensorBytes, a dispatch mode over forward and backward), which is what
torch.cuda.max_memory_allocated reports on a GPU: the memory the chain needs, with no allocator in it.
CUDA: in process, torch.cuda.max_memory_allocated above the allocation before sampling (the caching allocator's
live tensors; no allocator variants).
Rounds: every configuration once per round, in a rotating order; the table holds the median over rounds.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import BENCHMARKS, machine, write_section, write_summary  # noqa: E402

CHECKPOINTS = ("non_reentrant", "reentrant", "off")  # how eps calls are checkpointed (off: not at all)
ALLOCATORS = ("default", "trim0", "trim0_mmap32m")
# "tensors": the peak bytes of live tensors (fairdiff_ray.profiling.LiveTensorBytes), what
# torch.cuda.max_memory_allocated measures on a GPU - the memory the chain needs, whatever the allocator keeps
MEASURES = (*ALLOCATORS, "tensors")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameter numbers
MMAP_32M = 32 * 2**20  # glibc's largest mmap threshold on 64-bit: blocks below it come from the heap
DEFAULT_MMAP_THRESHOLD = 128 * 1024  # glibc's start value, kept fixed when MALLOC_TRIM_THRESHOLD_ is set


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def build(model: str, sd15_size: str, latent: int, device: str, dtype: str):  # noqa: ANN201
    """(unet, latent size, scheduler config) - frozen UNet on device."""
    import torch

    from fairdiff_ray.models.tiny import tiny_components

    if model == "tiny":
        comp = tiny_components(seed=0)
        unet, size, sched = comp["unet"], comp["unet"].config.sample_size, comp["scheduler"].config
    else:
        from bench import sd15

        unet_cfg = sd15.configs(sd15_size)[0]
        if device == "cpu":
            unet = sd15.fast_unet(unet_cfg)
        else:
            torch.manual_seed(0)
            from diffusers import UNet2DConditionModel

            with torch.device(device):
                unet = UNet2DConditionModel(**unet_cfg)
        from diffusers import DDIMScheduler

        size, sched = latent if sd15_size == "full" else unet_cfg["sample_size"], DDIMScheduler(**sd15.SCHEDULER).config
    unet = unet.to(device=device, dtype=getattr(torch, dtype)).eval().requires_grad_(False)
    return unet, size, sched


def measure(unet, size: int, sched_cfg, steps: int, checkpoint: str, batch: int, device: str,  # noqa: ANN001
            alloc: str = "default") -> dict:
    import contextlib

    import torch
    from diffusers import DDIMScheduler

    from fairdiff_ray.core.sampler import sample_with_grad
    from fairdiff_ray.profiling import LiveTensorBytes

    dtype = next(unet.parameters()).dtype
    sched = DDIMScheduler.from_config(sched_cfg)
    g = torch.Generator().manual_seed(0)
    emb = (torch.randn(2 * batch, 77, unet.config.cross_attention_dim, generator=g) * 0.5).to(device, dtype)
    emb.requires_grad_(True)
    x_T = torch.randn(batch, 4, size, size, generator=g).to(device, dtype)
    eps_fn = lambda x, t, e: unet(x, t, encoder_hidden_states=e).sample  # noqa: E731
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS mark (Linux >= 4.0)
            f.write("5")
        before = _status_kb("VmRSS") * 1024
    live = LiveTensorBytes() if alloc == "tensors" else None
    t0 = time.perf_counter()
    with live if live is not None else contextlib.nullcontext():
        x0 = sample_with_grad(eps_fn, x_T, sched, estimator="adjusted", checkpoint=checkpoint != "off",
                              checkpoint_mode="reentrant" if checkpoint == "reentrant" else "non_reentrant",
                              eps_args=(emb,), num_inference_steps=steps)
        x0.float().square().mean().backward()
    if live is not None:
        peak = live.peak
    elif device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = _status_kb("VmHWM") * 1024 - before
    wall = time.perf_counter() - t0
    assert emb.grad is not None and bool(torch.isfinite(emb.grad).all()), "no finite gradient reached the embeddings"
    return {"peak_mb": round(peak / 2**20, 1), "seconds": round(wall, 2)}


def forked(fn, alloc: str) -> dict:  # noqa: ANN001
    """fn() in a forked child (glibc trim threshold per ``alloc``); its JSON result, or {"error": ...}."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        try:
            if alloc.startswith("trim0"):  # as MALLOC_TRIM_THRESHOLD_=0 at start-up: trim at 0 and no dynamic
                libc = ctypes.CDLL("libc.so.6")  # mmap threshold (the parent's may have grown; put it back)
                libc.mallopt(M_TRIM_THRESHOLD, 0)
                libc.mallopt(M_MMAP_THRESHOLD, MMAP_32M if alloc == "trim0_mmap32m" else DEFAULT_MMAP_THRESHOLD)
            out = fn()
        except BaseException as e:  # noqa: BLE001 - reported to the parent, never raised in a fork
            out = {"error": f"{type(e).__name__}: {e}"[:200]}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        return {"error": f"child died (status {status}; out of memory?)"}
    return json.loads(data)


def _cell(values: list, median: float | None) -> str:
    if not values:
        return "not run"
    return "failed" if median is None else f"{median:.1f}"


def table(rows: list[dict], steps: list[int]) -> str:
    lines = ["| model | allocator | checkpoint | " + " | ".join(f"T={t} MB" for t in steps)
             + f" | T={steps[-1]} / T={steps[0]} | s at T={steps[-1]} |",
             "|---|---|---|" + "---|" * len(steps) + "---|---|"]
    keys = dict.fromkeys((r["model"], r["allocator"], r["checkpoint"]) for r in rows)
    for key in keys:
        sel = [r for r in rows if (r["model"], r["allocator"], r["checkpoint"]) == key]
        by = {t: [r["peak_mb"] for r in sel if r["steps"] == t] for t in steps}
        med = {t: statistics.median(v) if v and None not in v else None for t, v in by.items()}
        secs = [r["seconds"] for r in sel if r["steps"] == steps[-1] and r["seconds"] is not None]

        lo, hi = med[steps[0]], med[steps[-1]]
        ratio = f"{hi / lo:.2f}x" if lo and hi is not None and lo > 0 else "-"
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(_cell(by[t], med[t]) for t in steps)
                     + f" | {ratio} | {f'{statistics.median(secs):.2f}' if secs else '-'} |")
    return "\n".join(lines)


def _median_peak(rows: list[dict], key: tuple) -> float | None:
    v = [r["peak_mb"] for r in rows if (r["model"], r["allocator"], r["checkpoint"], r["steps"]) == key]
    return statistics.median(v) if v and None not in v else None


def growth(rows: list[dict], steps: list[int]) -> dict:
    """{"<model> <allocator>": {t_lo, t_hi, checkpointed (non-reentrant), checkpointed_reentrant,
    uncheckpointed: peak ratio T_hi / T_lo}} (medians)."""
    out: dict[str, dict] = {}
    for model, alloc in dict.fromkeys((r["model"], r["allocator"]) for r in rows):
        entry: dict = {"t_lo": steps[0], "t_hi": steps[-1]}
        for ckpt, name in (("non_reentrant", "checkpointed"), ("reentrant", "checkpointed_reentrant"),
                           ("off", "uncheckpointed")):
            lo = _median_peak(rows, (model, alloc, ckpt, steps[0]))
            hi = _median_peak(rows, (model, alloc, ckpt, steps[-1]))
            entry[name] = round(hi / lo, 3) if lo and hi is not None and lo > 0 else None
        out[f"{model} {alloc}"] = entry
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["tiny", "sd15"], choices=["tiny", "sd15"])
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40])
    p.add_argument("--batch", type=int, default=4, help="images (tiny); SD v1.5 uses --sd15-batch")
    p.add_argument("--sd15-batch", type=int, default=1)
    p.add_argument("--latent", type=int, default=8, help="SD v1.5 latent side (64 = 512 px; 8 keeps CPU runs short)")
    p.add_argument("--sd15-size", default="full", choices=["full", "dry"])
    p.add_argument("--sd15-max-uncheckpointed", type=int, default=10,
                   help="largest T run without checkpointing on SD v1.5 (memory grows with T)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sd15-rounds", type=int, default=1,
                   help="rounds for SD v1.5 (one T=40 checkpointed chain is ~5 CPU-minutes at 8x8 latents)")
    p.add_argument("--sd15-allocators", nargs="+", default=["trim0", "tensors"], choices=list(MEASURES),
                   help="allocators (or 'tensors': live tensor bytes) for SD v1.5 on CPU (trim0 = workers with ray.worker_malloc_trim)")
    p.add_argument("--checkpoints", nargs="+", default=list(CHECKPOINTS), choices=list(CHECKPOINTS),
                   help="how eps calls are checkpointed: non_reentrant (default mode), reentrant, off")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default=str(BENCHMARKS), help="markdown file to write the section into ('-': none)")
    p.add_argument("--section", default="memory")
    args = p.parse_args(argv)
    if args.device == "cpu" and "MALLOC_TRIM_THRESHOLD_" in os.environ:
        # the children emulate both settings; a parent started with the variable would give them its heap
        env = {k: v for k, v in os.environ.items() if k != "MALLOC_TRIM_THRESHOLD_"}
        os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *(argv or sys.argv[1:])], env)
    steps = sorted(set(args.steps))
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    allocators = MEASURES if args.device == "cpu" else ("caching",)
    rows: list[dict] = []
    for model in args.models:
        unet, size, sched = build(model, args.sd15_size, args.latent, args.device, args.dtype)
        batch = args.batch if model == "tiny" else args.sd15_batch
        allocs = allocators if model == "tiny" or args.device != "cpu" else tuple(args.sd15_allocators)
        rounds = args.rounds if model == "tiny" else args.sd15_rounds
        plan = [(a, c, t) for a in allocs for c in args.checkpoints for t in steps
                if c != "off" or model == "tiny" or t <= args.sd15_max_uncheckpointed]
        for r in range(rounds):
            k = (r * len(plan)) // max(rounds, 1)
            for alloc, ckpt, t in plan[k:] + plan[:k]:
                fn = functools.partial(measure, unet, size, sched, t, ckpt, batch, args.device, alloc)
                if args.device == "cpu":
                    res = forked(fn, alloc)
                else:
                    try:
                        res = fn()
                    except torch.OutOfMemoryError:
                        res = {"error": "out of memory"}
                    torch.cuda.empty_cache()
                row = {"model": model, "allocator": alloc, "steps": t, "checkpoint": ckpt, "batch": batch,
                       "peak_mb": res.get("peak_mb"), "seconds": res.get("seconds")}
                rows.append(row)
                print(f"round {r + 1} {model:5s} {alloc:7s} T={t:3d} checkpoint={ckpt:13s} "
                      + (f"peak +{row['peak_mb']:8.1f} MB {row['seconds']:7.2f} s" if "error" not in res
                         else res["error"]), flush=True)
        unet = None  # free it before the next model is built
    sd_desc = (f"the SD v1.5 UNet architecture with random weights, batch {args.sd15_batch}, {args.latent}x{args.latent} "
               "latents" if args.sd15_size == "full" else "the SD v1.5 UNet structure at toy widths (dry run)")
    how = ("peak RSS above the RSS just before sampling, per forked child" if args.device == "cpu"
           else "torch.cuda.max_memory_allocated above the allocation before sampling")
    body = (f"## Peak memory vs sampling steps (bench/bench_sampler_memory.py)\n\n{machine()}, device {args.device}, "
            f"{args.dtype}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. One adjusted-estimator backward "
            "through the whole DDIM chain (guidance 7.5, loss on x_0) into the CFG text embeddings, UNet frozen "
            "(text-encoder-LoRA training); checkpoint: non_reentrant = every eps call under torch's default "
            "(non-reentrant) checkpoint, which keeps the autograd graph of every op of the call on the host; "
            "reentrant = sampler.checkpoint_mode=reentrant (one graph node per call); off = no checkpointing. "
            f"tiny = the tiny SD UNet, batch {args.batch}; sd15 = {sd_desc}. "
            f"{how}; median of {args.rounds} rounds for tiny and {args.sd15_rounds} for sd15 (configurations "
            "rotated per round; on CPU sd15 runs with the allocator(s) "
            f"{', '.join(args.sd15_allocators) if args.device == 'cpu' else 'caching'} and uncheckpointed up to "
            f"T={args.sd15_max_uncheckpointed} only, to fit the CPU time). "
            "default = glibc's default allocator; trim0 = trim threshold 0 (MALLOC_TRIM_THRESHOLD_=0); tensors = "
            "the peak bytes of live tensors (fairdiff_ray.profiling.LiveTensorBytes; the CPU counterpart of "
            "torch.cuda.max_memory_allocated: no allocator caching or fragmentation in it).\n\n"
            + table(rows, steps))
    print(body)
    if args.out != "-":
        write_section(Path(args.out), args.section, body, {"growth": growth(rows, steps)})
        write_summary(Path(args.out))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
