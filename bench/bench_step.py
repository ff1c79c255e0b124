"""Training-step time: the reference schedule vs the fused one, in units of a no-grad generation (issue 8 a, c).

    python bench/bench_step.py                         # synthetic world + tiny model, N=8, T=20, 5 repeats
    python bench/bench_step.py --models tiny --images 8 --steps 20 --repeats 3
    python bench/bench_step.py --models sd15 --device cuda --dtype bfloat16 --images 4   # bench/gpu.sh

One process, as one Ray Train worker runs it (a gloo process group of size 1, dist.worker.Worker). Per model a
Worker for each schedule (train.schedule=reference / fused; same model, N, T, guidance, adaptor, loss) and
each warmed up with one step. Then, per round, interleaved and in a rotating order:
  gen        one no-grad generation of the same N images (same prompt, noise, T, guidance, adaptor on, VAE
             decode; no scoring): the floor a training step is measured against;
  reference  one training step with train.schedule=reference (reference images, current images under
             no_grad, then the images again with gradients, backward);
  fused      one training step with train.schedule=fused (every eps call checkpointed: memory flat in T; the
             default sampler.checkpoint_mode auto = reentrant here, and the frozen model's reference images
             batched into the current images' UNet calls, as the worker does for a text-encoder adaptor);
  selective  the same fused step with selective checkpointing: eps calls keep their activations for
             backward (no recomputation) up to --keep-mb per chunk (sampler.keep_activations_mb), the
             rest are checkpointed;
  non_reentrant  the fused step with torch's non-reentrant checkpoint instead (sampler.checkpoint_mode=
             non_reentrant; the reference images then run as a chain of their own);
  subsampled the selective step with sampler.estimator=adjusted_subsampled: the model-parameter gradient of
             --subsample-k random steps of the T, scaled by T / K (an unbiased estimate of the adjusted
             gradient, not the full chain's gradient; its own Worker, same model and settings otherwise).
Reported: the median over rounds of each time and of each per-round ratio (ratios within a round are side by
side, so load from other processes on the machine affects both sides alike as far as possible).

Models: ``synthetic`` = assets/synthetic-sd with the synthetic world's detector, classifier and feature net
(what ``make demo`` trains); ``tiny`` = models/tiny.py with the test suite's stand-in nets; ``sd15`` = the
SD v1.5 architecture with random weights (bench/sd15.py; ``--sd15-size dry`` for a CPU check of the path).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import BENCHMARKS, machine, write_section, write_summary  # noqa: E402

PROMPT = "A photo of the face of a nurse, a person"
VARIANTS = ("gen", "reference", "fused", "selective", "non_reentrant", "subsampled")


def _overrides(args: argparse.Namespace, model: str) -> list[str]:
    common = [
        "adaptor.kind=text_lora", "adaptor.rank=8", "sampler.scheduler=ddim", f"sampler.steps={args.steps}",
        "sampler.steps_jitter=0", "sampler.guidance_scale=7.5", "sampler.estimator=adjusted",
        "sampler.checkpoint=true", f"train.images_per_prompt={args.images}", f"train.chunk_size={args.images}",
        "train.prompts_per_step=1", "train.lr=0.001", "loss.lambda_face=0",
    ]
    if args.device == "cuda" or args.dtype != "float32":
        common += ["deepspeed.enabled=false", f"model.dtype={args.dtype}"]
    else:
        common += ["deepspeed.enabled=true", "deepspeed.zero_stage=0", "deepspeed.precision=fp32"]
    if model == "synthetic":
        return [f"model.path={ROOT / 'assets' / 'synthetic-sd'}", "faces.detector=synthetic",
                "classifier.kind=synthetic", "features.synthetic=default", "loss.lambda_img=16", *common]
    return ["loss.lambda_img=1", *common]


def _builders(model: str, sd15_size: str):  # noqa: ANN202
    if model == "synthetic":
        return None
    from fairdiff_ray.dist.worker import Builders
    from tests._helpers_train import tiny_components, tiny_loss

    if model == "tiny":
        return Builders(components=tiny_components, loss=tiny_loss)
    from bench.sd15 import dry_components, full_components

    return Builders(components=full_components if sd15_size == "full" else dry_components, loss=tiny_loss)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def measure(args: argparse.Namespace, model: str) -> dict:
    import torch

    from fairdiff_ray.config import load_config
    from fairdiff_ray.dist.worker import Worker

    device = torch.device(args.device)
    builders = _builders(model, args.sd15_size)
    workers = {}
    for name, extra in (("reference", ["train.schedule=reference"]), ("fused", ["train.schedule=fused"]),
                        ("subsampled", ["train.schedule=fused", "sampler.estimator=adjusted_subsampled",
                                        f"sampler.subsample_k={args.subsample_k}"])):
        cfg = load_config(None, [*_overrides(args, model), *extra, *args.set])
        workers[name] = Worker(cfg, device, builders)
    workers["subsampled"].keep_activations_bytes = int(args.keep_mb * 2**20)
    w = workers["fused"]
    cfg = w.cfg
    n, steps = cfg.train.images_per_prompt, cfg.sampler.steps

    def gen(step: int) -> None:
        x_T = w._noise(step, [(0, j) for j in range(n)])  # prompt 0, images 0..n-1 (one rank)
        with torch.no_grad():
            w.generate([PROMPT] * n, x_T, steps, grad=False)

    def selective(step: int) -> None:  # the fused step, eps-call activations kept up to --keep-mb
        w.keep_activations_bytes = int(args.keep_mb * 2**20)
        try:
            w.train_step([PROMPT], step)
        finally:
            w.keep_activations_bytes = 0

    def non_reentrant(step: int) -> None:  # the fused step, torch's default checkpoint, separate reference chain
        mode, batch = w.checkpoint_mode, w.batch_reference
        w.checkpoint_mode, w.batch_reference = "non_reentrant", False
        try:
            w.train_step([PROMPT], step)
        finally:
            w.checkpoint_mode, w.batch_reference = mode, batch

    calls = {"gen": gen, "reference": lambda s: workers["reference"].train_step([PROMPT], s),
             "fused": lambda s: w.train_step([PROMPT], s), "selective": selective, "non_reentrant": non_reentrant,
             "subsampled": lambda s: workers["subsampled"].train_step([PROMPT], s)}
    wall: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for v in VARIANTS:  # warm-up (allocator, kernels, DeepSpeed's first step)
        calls[v](0)
    _sync(args.device)
    for r in range(args.repeats):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[: r % len(VARIANTS)]
        for v in order:
            _sync(args.device)
            t0, c0 = time.perf_counter(), time.process_time()
            calls[v](r + 1)
            _sync(args.device)
            wall[v].append(time.perf_counter() - t0)
            cpu[v].append(time.process_time() - c0)
        print(f"{model} round {r + 1}: " + ", ".join(f"{v} {wall[v][-1]:.3f} s (cpu {cpu[v][-1]:.3f} s)"
                                                     for v in VARIANTS), flush=True)

    def ratios(times: dict[str, list[float]]) -> dict[str, float]:
        def med(a: str, b: str) -> float:
            return statistics.median(x / y for x, y in zip(times[a], times[b]))

        return {"fused/reference": med("fused", "reference"), "selective/reference": med("selective", "reference"),
                "non_reentrant/reference": med("non_reentrant", "reference"), "reference/gen": med("reference", "gen"),
                "fused/gen": med("fused", "gen"), "selective/gen": med("selective", "gen"),
                "non_reentrant/gen": med("non_reentrant", "gen"), "subsampled/reference": med("subsampled", "reference"),
                "subsampled/gen": med("subsampled", "gen"), "subsampled/selective": med("subsampled", "selective")}

    # CPU: process CPU time is the primary clock (one torch thread; other processes on a shared machine
    # stretch wall time, not the work done); CUDA: wall time (synchronised)
    primary = cpu if args.device == "cpu" else wall
    med = {v: statistics.median(t) for v, t in primary.items()}
    ratio, ratio_wall = ratios(primary), ratios(wall)
    peak = None
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    return {"model": model, "images": n, "steps": steps, "subsample_k": args.subsample_k, "dtype": str(compute_dtype_name(cfg)), "median_s": med,
            "ratio": ratio, "ratio_wall": ratio_wall, "clock": "cpu" if args.device == "cpu" else "wall", "repeats": args.repeats, "peak_gib": peak}


def allocator() -> str:
    """The glibc malloc setting this process started with (it changes step times on CPU)."""
    trim = os.environ.get("MALLOC_TRIM_THRESHOLD_")
    return "default" if trim is None else f"MALLOC_TRIM_THRESHOLD_={trim}"


def compute_dtype_name(cfg) -> str:  # noqa: ANN001
    from fairdiff_ray.dist.engine import compute_dtype

    return str(compute_dtype(cfg)).removeprefix("torch.")


def table(rows: list[dict]) -> str:
    lines = ["| model | N | T | dtype | clock | gen s | reference s | fused s | selective s | non_reentrant s | "
             "fused / reference | selective / reference | non_reentrant / reference | reference / gen | fused / gen | "
             "selective / gen | non_reentrant / gen | subsampled K | subsampled s | subsampled / selective | subsampled / gen | "
             "wall clock: fused, selective, non_reentrant / reference |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m, q, w = r["median_s"], r["ratio"], r["ratio_wall"]
        lines.append(f"| {r['model']} | {r['images']} | {r['steps']} | {r['dtype']} | {r['clock']} | {m['gen']:.3f} | "
                     f"{m['reference']:.3f} | {m['fused']:.3f} | {m['selective']:.3f} | {m['non_reentrant']:.3f} | "
                     f"{q['fused/reference']:.2f}x | {q['selective/reference']:.2f}x | {q['non_reentrant/reference']:.2f}x | "
                     f"{q['reference/gen']:.2f}x | {q['fused/gen']:.2f}x | {q['selective/gen']:.2f}x | "
                     f"{q['non_reentrant/gen']:.2f}x | {min(r['subsample_k'], r['steps'])} | {m['subsampled']:.3f} | "
                     f"{q['subsampled/selective']:.2f}x | {q['subsampled/gen']:.2f}x | "
                     f"{w['fused/reference']:.2f}x, {w['selective/reference']:.2f}x, "
                     f"{w['non_reentrant/reference']:.2f}x |")
    return "\n".join(lines)


def section(rows: list[dict], args: argparse.Namespace) -> str:
    import torch

    dev = args.device if args.device != "cuda" else f"cuda ({torch.cuda.get_device_name()})"
    return (
        "## Training step: reference vs fused schedule, in no-grad generations (bench/bench_step.py)\n\n"
        f"{machine()}, device {dev}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, glibc allocator "
        f"{allocator()}. One process, one "
        "dist.worker.Worker per schedule (gloo group of size 1), one prompt, N images in one chunk, T DDIM steps, "
        "guidance 7.5, text-encoder LoRA rank 8, adjusted estimator, checkpointed eps calls and VAE decode; "
        f"selective = the fused step keeping eps-call activations up to {args.keep_mb:g} MB per chunk instead of "
        "recomputing them (calls beyond that are checkpointed); fused and selective use the default "
        "sampler.checkpoint_mode (auto: reentrant) and batch the frozen model's reference images into the current "
        "images' UNet calls; non_reentrant = the fused step with torch's default checkpoint and a separate "
        "reference chain (the fused step before 2026-12-06); subsampled = the selective step with "
        "sampler.estimator=adjusted_subsampled (K of the T steps carry the parameter gradient, scaled by T / K: an "
        "unbiased estimate of the adjusted gradient, not the full chain's; its own Worker). "
        f"Each variant warmed up once, then {args.repeats} rounds interleaved in rotating order; medians over "
        "rounds (ratios: median of the per-round ratios). gen = one no-grad generation of the same N images "
        "(same noise, T, guidance, adaptor on, VAE decode). Clock cpu = the process's CPU time (one torch "
        "thread, so it counts the work done and not the time other processes on a shared machine took; the "
        "wall-clock ratios are beside it), wall = synchronised wall time. synthetic = assets/synthetic-sd with the synthetic "
        "world's nets; tiny = models/tiny.py with the test stand-in nets; sd15 = SD v1.5 architecture, random "
        "weights, stand-in nets.\n\n" + table(rows))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["synthetic", "tiny"], choices=["synthetic", "tiny", "sd15"])
    p.add_argument("--images", type=int, default=8, help="N images per step (one chunk)")
    p.add_argument("--steps", type=int, default=20, help="T sampling steps")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--sd15-size", default="full", choices=["full", "dry"])
    p.add_argument("--keep-mb", type=float, default=1024.0,
                   help="selective variant: eps-call activations kept per chunk (sampler.keep_activations_mb)")
    p.add_argument("--subsample-k", type=int, default=5,
                   help="subsampled variant: steps whose model call carries the gradient (sampler.subsample_k)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides")
    p.add_argument("--out", default=str(BENCHMARKS), help="markdown file to write the section into ('-': none)")
    p.add_argument("--section", default="step", help="section name in --out")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.subsample_k < 1:
        p.error("--subsample-k must be >= 1")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if args.device == "cuda" else "cpu")
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        dist.init_process_group("gloo", rank=0, world_size=1)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):  # DeepSpeed / Ray leave nothing behind
        for model in args.models:
            rows.append(measure(args, model))
    text = section(rows, args)
    print(text)
    data = {"allocator": allocator(),
            "models": {r["model"]: {"images": r["images"], "steps": r["steps"], "dtype": r["dtype"],
                                     "subsample_k": r["subsample_k"],
                                     **{k: round(v, 3) for k, v in r["ratio"].items()}} for r in rows}}
    if args.out != "-":
        write_section(Path(args.out), args.section, text, data)
        write_summary(Path(args.out))
        print(f"wrote {args.out}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
