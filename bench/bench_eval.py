"""Evaluation throughput: the Ray Data pipeline against a plain diffusers loop on the same model.

    python bench/bench_eval.py                       # quick: 8 prompts x 4 images, base model only
    python bench/bench_eval.py --prompts 50 --images 16 --adaptor debiased=runs/x/adaptor   # issue-6 size

Writes its section of BENCHMARKS.md between <!-- bench:eval --> and <!-- /bench:eval --> (other benches
own the rest of the file). Numbers are images per second of wall time; Ray includes actor start-up and
model loading (they are part of the pipeline's cost), the plain loop does not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import write_section  # noqa: E402


def plain_diffusers(model: str, prompts: list[str], m: int, steps: int, batch: int) -> float:
    """Images/s of a stock StableDiffusionPipeline loop (seeded generators, numpy output, no scoring)."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from fairdiff_ray.core.seeding import stable_seed

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    jobs = [(p, j) for p in prompts for j in range(m)]
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(jobs), batch):
            chunk = jobs[i: i + batch]
            gens = [torch.Generator("cpu").manual_seed(stable_seed(p, j)) for p, j in chunk]
            pipe([p for p, _ in chunk], num_inference_steps=steps, guidance_scale=7.5, generator=gens,
                 output_type="np")
    return len(jobs) / (time.perf_counter() - t0)


def pipeline(cfg_args: list[str], adaptors: dict[str, str], executor: str, out: Path) -> tuple[float, int, dict]:
    """Images/s of fairdiff evaluate (generation + face detection + classification + features)."""
    from fairdiff_ray.config import load_config
    from fairdiff_ray.eval.run import run_evaluation

    cfg = load_config(None, cfg_args)
    t0 = time.perf_counter()
    summary = run_evaluation(cfg, adaptors, out, executor=executor, report=False, log=lambda s: None)
    seconds = time.perf_counter() - t0
    n = summary["prompts"]["count"] * cfg.eval.images_per_prompt * (1 + len(adaptors))
    return n / seconds, n, summary


def prepare_model(arg: str | None, tmp: Path) -> str:
    if arg:
        return arg
    if (ROOT / "assets" / "synthetic-sd" / "model_index.json").is_file():
        return str(ROOT / "assets" / "synthetic-sd")
    from fairdiff_ray.models.sd import save_tiny_model

    save_tiny_model(tmp / "tiny", seed=0, words=["senator", "violinist"])
    return str(tmp / "tiny")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="diffusers SD directory (default: assets/synthetic-sd or tiny)")
    p.add_argument("--prompts-file", default=str(ROOT / "data" / "prompts" / "occupations.jsonl"))
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    p.add_argument("--adaptor", action="append", default=[], metavar="NAME=DIR")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from fairdiff_ray.eval.prompts import load_eval_prompts
    from fairdiff_ray.eval.run import parse_adaptors

    adaptors = parse_adaptors(args.adaptor)
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        model = prepare_model(args.model, tmp)
        base = [f"model.path={model}", f"data.prompt_sets=[{{path: {args.prompts_file}}}]",
                f"eval.max_prompts={args.prompts}", f"eval.images_per_prompt={args.images}",
                f"eval.steps={args.steps}", f"eval.batch_size={args.batch}", "eval.scheduler=dpmsolver++"]
        from fairdiff_ray.config import load_config

        prompts = [x.prompt for x in load_eval_prompts(load_config(None, base))]
        rows = [("plain diffusers loop (generation only, 1 process)",
                 plain_diffusers(model, prompts, args.images, args.steps, args.batch), len(prompts) * args.images)]
        ips, n, _ = pipeline(base, adaptors, "local", tmp / "local")
        rows.append(("fairdiff evaluate, in-process stages (generate + score)", ips, n))
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        try:
            for k in args.actors:
                ips, n, summary = pipeline([*base, f"eval.num_actors={k}"], adaptors, "ray", tmp / f"ray{k}")
                rows.append((f"fairdiff evaluate, Ray Data, {k} generation actor(s) (generate + score)", ips, n))
        finally:
            ray.shutdown()
    lines = [
        "## Evaluation throughput (bench/bench_eval.py)", "",
        f"Model `{Path(model).name}`, {len(prompts)} prompts x {args.images} images x {1 + len(adaptors)} model(s), "
        f"{args.steps} DPM-Solver++ steps, guidance 7.5, batch {args.batch}; {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}.",
        "", "| path | images | images/s |", "|---|---|---|",
        *[f"| {name} | {n} | {ips:.2f} |" for name, ips, n in rows], "",
        "Ray and in-process rows include model loading and actor start-up; the plain loop does not. "
        "On a shared 2-core machine these numbers are noisy (other processes compete for the cores).",
    ]
    text = "\n".join(lines)
    print(text)
    write_section(Path(args.out), "eval", text)
    print(json.dumps({name: round(ips, 3) for name, ips, _ in rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
