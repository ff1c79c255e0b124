"""Evaluation throughput: the evaluation pipeline against a plain diffusers loop on the same model (issue 8 e).

    python bench/bench_eval.py                       # synthetic SD: 8 prompts x 8 images, 20 DPM++ steps, 3 rounds
    python bench/bench_eval.py --prompts 16 --images 16 --actors 1 2 --rounds 3

Variants, interleaved for ``--rounds`` rounds (order rotated per round), same prompts, seeds, steps, guidance 7.5
and batch size:
  plain  a stock StableDiffusionPipeline loop in this process (DPM-Solver++ scheduler, numpy output, no
         scoring), one batch per prompt;
  local  ``run_evaluation(executor="local")``: generation + scoring (face detection, attribute classifier,
         feature net, fidelity) in this process;
  ray k  ``run_evaluation(executor="ray")`` with k generation actors (+ the scoring actor) on a private local
         Ray cluster.
Throughput is steady state: images completed between the first and the last completed batch (plain) or
evaluation part (the pipeline's progress lines, one part per prompt) over the time between them, so model
loading and actor start-up are left out (they are reported separately as the first result's latency). Per
worker = images/s divided by the number of generation processes (1 for plain / local, k for ray k). Ratios are
the median over rounds of the per-round ratio to the plain loop.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import BENCHMARKS, write_section, write_summary  # noqa: E402

_IMAGES = re.compile(r"\((\d+) images")


def steady_rate(events: list[tuple[float, int]]) -> float:
    """Images/s between the first and the last (time, cumulative images) event."""
    (t0, n0), (t1, n1) = events[0], events[-1]
    if len(events) < 2 or t1 <= t0:
        raise RuntimeError("fewer than two completions: use more prompts")
    return (n1 - n0) / (t1 - t0)


def plain_diffusers(model: str, prompts: list[str], m: int, steps: int) -> tuple[float, float]:
    """(steady images/s, first-batch latency s) of a stock StableDiffusionPipeline loop, one batch per prompt."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from fairdiff_ray.core.seeding import stable_seed

    t_start = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    events, done = [], 0
    with torch.no_grad():
        for p in prompts:
            gens = [torch.Generator("cpu").manual_seed(stable_seed(p, j)) for j in range(m)]
            pipe([p] * m, num_inference_steps=steps, guidance_scale=7.5, generator=gens, output_type="np")
            done += m
            events.append((time.perf_counter(), done))
    return steady_rate(events), events[0][0] - t_start


def pipeline(cfg_args: list[str], executor: str, out: Path) -> tuple[float, float]:
    """(steady images/s, first-part latency s) of fairdiff's evaluation (generation + scoring), base model."""
    from fairdiff_ray.config import load_config
    from fairdiff_ray.eval.run import run_evaluation

    cfg = load_config(None, cfg_args)
    events: list[tuple[float, int]] = []

    def log(line: str) -> None:
        m = _IMAGES.search(line)
        if m and " done: " in line:
            events.append((time.perf_counter(), int(m.group(1))))

    t_start = time.perf_counter()
    run_evaluation(cfg, {}, out, executor=executor, report=False, log=log)
    return steady_rate(events), events[0][0] - t_start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "assets" / "synthetic-sd"), help="diffusers SD directory")
    p.add_argument("--prompts-file", default=str(ROOT / "data" / "prompts" / "occupations.jsonl"))
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--images", type=int, default=8, help="images per prompt (= the batch size)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(BENCHMARKS), help="markdown file to write the section into ('-': none)")
    args = p.parse_args(argv)
    if args.prompts < 3 or args.rounds < 1:
        p.error("need --prompts >= 3 (steady state is measured between completions) and --rounds >= 1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from fairdiff_ray.config import load_config
    from fairdiff_ray.dist.cluster import connect
    from fairdiff_ray.eval.prompts import load_eval_prompts

    base = [f"model.path={args.model}", f"data.prompt_sets=[{{path: {args.prompts_file}}}]",
            f"eval.max_prompts={args.prompts}", f"eval.images_per_prompt={args.images}",
            f"eval.steps={args.steps}", f"eval.batch_size={args.images}", "eval.scheduler=dpmsolver++",
            "eval.prompts_per_part=1", "eval.cpus_per_actor=1"]
    prompts = [x.prompt for x in load_eval_prompts(load_config(None, base))]
    variants = ["plain", "local", *[f"ray {k}" for k in args.actors]]
    workers = {"plain": 1, "local": 1, **{f"ray {k}": k for k in args.actors}}
    rate: dict[str, list[float]] = {v: [] for v in variants}
    first: dict[str, list[float]] = {v: [] for v in variants}
    load_before = os.getloadavg()[0]
    connect(None, num_cpus=max(args.actors) + 1, include_dashboard=False, log_to_driver=False,
            configure_logging=False)
    try:
        with tempfile.TemporaryDirectory(prefix="fairdiff-bench-eval-") as td:
            for r in range(args.rounds):
                order = variants[r % len(variants):] + variants[: r % len(variants)]
                for v in order:
                    out = Path(td) / f"r{r}-{v.replace(' ', '')}"
                    if v == "plain":
                        ips, lat = plain_diffusers(args.model, prompts, args.images, args.steps)
                    elif v == "local":
                        ips, lat = pipeline(base, "local", out)
                    else:
                        ips, lat = pipeline([*base, f"eval.num_actors={workers[v]}"], "ray", out)
                    rate[v].append(ips)
                    first[v].append(lat)
                    print(f"round {r + 1} {v}: {ips:.2f} images/s steady, first result after {lat:.1f} s", flush=True)
    finally:
        ray.shutdown()
    per_worker = {v: statistics.median(rate[v][i] / workers[v] / rate["plain"][i] for i in range(args.rounds))
                  for v in variants}
    lines = [
        "## Evaluation throughput (bench/bench_eval.py)", "",
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
        f"{os.environ.get('OMP_NUM_THREADS', 'default')}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        f"Model `{Path(args.model).name}`, {len(prompts)} prompts x {args.images} images (batch {args.images}), "
        f"{args.steps} DPM-Solver++ steps, guidance 7.5, base model; {args.rounds} rounds, variants interleaved. "
        "plain = stock StableDiffusionPipeline loop (generation only); local / ray k = fairdiff evaluate "
        "(generation + face detection + classifier + features + fidelity) in process / with k Ray Data "
        "generation actors (1 CPU each) + 1 scoring actor. images/s = steady state between the first and last "
        "completed batch / part (loading and actor start-up excluded; their cost is the first-result latency).",
        "", "| path | generation processes | images/s (median) | per round | per worker / plain (median) | "
        "first result after s (median) |", "|---|---|---|---|---|---|",
        *[f"| {v} | {workers[v]} | {statistics.median(rate[v]):.2f} | {', '.join(f'{x:.2f}' for x in rate[v])} | "
          f"{per_worker[v]:.2f}x | {statistics.median(first[v]):.1f} |" for v in variants], "",
        f"Load average (1 min) on the machine's {os.cpu_count()} cores: {load_before:.1f} before the first round, "
        f"{os.getloadavg()[0]:.1f} after the last (the benchmark's own processes count in both).",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out != "-":
        data = {"per_worker": {f"{v} ({workers[v]} generation process(es)) vs plain": round(per_worker[v], 3)
                               for v in variants if v != "plain"}}
        write_section(Path(args.out), "eval", text, data)
        write_summary(Path(args.out))
        print(f"wrote {args.out}")
    print(json.dumps({v: round(per_worker[v], 3) for v in variants}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
