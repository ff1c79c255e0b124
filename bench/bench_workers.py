"""Training throughput with 1 vs 2 Ray Train workers (issue 8 d).

    python bench/bench_workers.py                       # synthetic world, N=32 and 64, T=10, 4 steps per run, 3 rounds
    python bench/bench_workers.py --workers 1 2 4 --images 16 --steps 6 --rounds 3

Each run is a real ``dist.trainer.build_trainer(cfg).fit()`` on the synthetic world (assets/synthetic-sd, the
synthetic detector / classifier / feature net, text-encoder LoRA, DeepSpeed ZeRO-0 on gloo), one CPU and one
torch thread per worker, on a private local Ray cluster. The runs alternate (1, 2, 1, 2, ...) for ``--rounds``
rounds. Throughput is the per-step ``images_per_s`` metric rank 0 writes to metrics.jsonl (N images of the
step / the step's wall time on rank 0, all-gather and gradient all-reduce included), so worker start-up, model
loading and checkpointing are excluded; the first step of every run (warm-up) is dropped. Reported: median
images/s per worker count, and the median over rounds of the per-round ratio W workers / 1 worker, for each N.
Why several N and a fixed chunk size: a worker's images are sampled in chunks of ``--chunk-size`` (one batched
chain each). The default, 32, is ``make demo``'s ``train.chunk_size`` (its 2 workers each run their 32 images
of the 64 per step as one chunk): at N=64 one worker runs two chunks of 32 and each of 2 workers one, the same
work unit; at N=32 one worker runs one chunk of 32 and each of 2 workers one of 16 (smaller batches cost more
per image on CPU: the synthetic UNet, one thread, 1.8 ms per row at 8 rows, 1.2 ms at 64), which is what a user
changing only ``ray.num_workers`` gets. Before 2026-12-06 the demo trained in chunks of 4 (one prompt's images)
and this bench measured N=8 and 16 in chunks of 4 (``--images 8 16 --chunk-size 4`` reproduces it); steps of
one second or less are where a step's fixed cost (the gradient all-reduce, the report barrier, the Ray
processes' share of the cores) counts most. The workers run with the training default, glibc's default
allocator (ray.worker_malloc_trim off), unless the caller exports MALLOC_TRIM_THRESHOLD_.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import BENCHMARKS, write_section, write_summary  # noqa: E402


def config(args: argparse.Namespace, storage: Path, name: str, workers: int, images: int):  # noqa: ANN201
    from fairdiff_ray.config import load_config

    return load_config(None, [
        f"run.storage={storage}", f"run.name={name}", f"model.path={ROOT / 'assets' / 'synthetic-sd'}",
        f"data.prompt_sets=[{{path: {ROOT / 'data' / 'prompts' / 'occupations.jsonl'}}}]", "data.split=train",
        "faces.detector=synthetic", "classifier.kind=synthetic", "features.synthetic=default",
        "adaptor.kind=text_lora", "adaptor.rank=8", "sampler.scheduler=ddim", f"sampler.steps={args.sampling_steps}",
        "sampler.steps_jitter=0", "sampler.guidance_scale=7.5", "loss.lambda_img=16", "loss.lambda_face=0",
        f"train.steps={args.steps}", f"train.checkpoint_every={args.steps}", "train.validate_every=0",
        f"train.images_per_prompt={images}", f"train.chunk_size={args.chunk_size}", "train.prompts_per_step=1",
        "train.lr=0.001", f"ray.num_workers={workers}", "ray.cpus_per_worker=1",
        "deepspeed.enabled=true", "deepspeed.zero_stage=0", "deepspeed.precision=fp32",
    ])


class CoreSampler(threading.Thread):
    """Cores used, second by second, by the training workers (``ray::RayTrainWorker``) and by everything else of
    this benchmark's private Ray cluster (raylet, GCS, dashboard, Train controller and helper actors, Ray Data's
    actors, this driver). /proc, Linux; the cluster's processes and their titles are re-read every few seconds
    (a worker's title is set after its process starts), the per-second reads are only their /proc/PID/stat."""

    RESCAN_S = 5.0

    def __init__(self, root: str, interval_s: float = 1.0, busy_core: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root, self.interval_s, self.busy_core, self.samples = root, interval_s, busy_core, []
        self._stop_event = threading.Event()
        self._tick = os.sysconf("SC_CLK_TCK")

    def run(self) -> None:
        from fairdiff_ray.dist.cluster import proc_stat, ray_processes

        kinds: dict[int, str] = {}
        last: dict[int, float] = {}
        t_last, rescan = time.monotonic(), 0.0
        while not self._stop_event.wait(self.interval_s):
            now = time.monotonic()
            if now - rescan > self.RESCAN_S:
                kinds = {pid: "worker" if cmd.startswith(b"ray::RayTrainWorker") else "other"
                         for pid, cmd in ray_processes(self.root).items()}
                kinds[os.getpid()] = "other"
                rescan = now
            used: dict[str, float] = {"worker": 0.0, "other": 0.0}
            busy = 0
            for pid, kind in list(kinds.items()):
                fields = proc_stat(pid)
                if not fields:
                    kinds.pop(pid)
                    continue
                cpu = (int(fields[11]) + int(fields[12])) / self._tick
                d = (cpu - last[pid]) / (now - t_last) if pid in last else 0.0
                last[pid] = cpu
                used[kind] += d
                busy += kind == "worker" and d > self.busy_core
            self.samples.append((busy, used["worker"], used["other"]))
            t_last = now

    def stop(self, workers: int) -> dict:
        """Median cores over the seconds in which all ``workers`` training workers were busy (> ``busy_core``
        each); NaN when there was no such second (cores shared with other work)."""
        self._stop_event.set()
        self.join()
        steady = [(w, o) for busy, w, o in self.samples if busy >= workers]
        if not steady:
            return {"worker_cores": float("nan"), "other_cores": float("nan"), "seconds": 0}
        return {"worker_cores": statistics.median(w for w, _ in steady),
                "other_cores": statistics.median(o for _, o in steady), "seconds": len(steady)}


def _median_finite(values) -> float:  # noqa: ANN001
    vals = [float(v) for v in values if v is not None and not math.isnan(v)]
    return statistics.median(vals) if vals else float("nan")


def one_run(args: argparse.Namespace, storage: Path, name: str, workers: int, images: int) -> dict:
    from fairdiff_ray.dist.trainer import build_trainer, run_dir

    cfg = config(args, storage, name, workers, images)
    sampler = CoreSampler(os.environ["RAY_TMPDIR"]) if os.path.isdir("/proc") and os.environ.get("RAY_TMPDIR") \
        else None
    if sampler is not None:
        sampler.start()
    t0 = time.perf_counter()
    result = build_trainer(cfg).fit()
    wall = time.perf_counter() - t0
    cores = sampler.stop(workers) if sampler is not None else {}
    if result.error is not None:
        raise RuntimeError(f"run {name} failed: {result.error}")
    rows = [json.loads(line) for line in (run_dir(cfg) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = sorted(rows, key=lambda r: r["step"])[1:]  # drop the warm-up step
    ips = [float(r["images_per_s"]) for r in rows]
    cpu = [float(r["cpu_s"]) for r in rows]
    return {"workers": workers, "images": images, "images_per_s": statistics.median(ips), "steps": ips,
            "wall_s": wall, "cpu_s": statistics.median(cpu), **cores}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--images", type=int, nargs="+", default=[32, 64],
                   help="N images per step (divides over the workers); one table row per N and worker count")
    p.add_argument("--chunk-size", type=int, default=32,
                   help="images per sampling chunk on every worker (make demo's train.chunk_size, 32): a worker "
                        "runs its share of N in chunks of at most this many")
    p.add_argument("--sampling-steps", type=int, default=10, help="T DDIM steps")
    p.add_argument("--steps", type=int, default=4, help="training steps per run (the first is dropped)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(BENCHMARKS), help="markdown file to write the section into ('-': none)")
    args = p.parse_args(argv)
    if args.steps < 2 or args.rounds < 1 or 1 not in args.workers:
        p.error("need --steps >= 2, --rounds >= 1 and 1 among --workers")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray

    from fairdiff_ray.dist.cluster import connect

    runs: list[dict] = []
    load_before = os.getloadavg()[0]
    connect(None, num_cpus=max(args.workers) + 1, include_dashboard=True, log_to_driver=False,
            configure_logging=False)
    try:
        with tempfile.TemporaryDirectory(prefix="fairdiff-bench-workers-") as tmp:
            for r in range(args.rounds):
                order = args.workers if r % 2 == 0 else args.workers[::-1]
                for n in args.images:
                    for w in order:
                        res = one_run(args, Path(tmp), f"n{n}-w{w}-r{r}", w, n)
                        runs.append({**res, "round": r})
                        print(f"round {r + 1} N={n} workers {w}: {res['images_per_s']:.2f} images/s "
                              f"(steps {[round(x, 2) for x in res['steps']]}, fit {res['wall_s']:.0f} s; cores: "
                              f"workers {res.get('worker_cores', float('nan')):.2f}, other Ray processes "
                              f"{res.get('other_cores', float('nan')):.2f})", flush=True)
    finally:
        ray.shutdown()
    lines = ["| N | workers | images/s (median) | per round | x 1 worker (median of per-round ratios) | "
             "rank-0 CPU s per step (median) | CPU-time scaling vs 1 worker | cores used by the training workers / "
             "by the other Ray processes and the driver (median) |", "|---|---|---|---|---|---|---|---|"]
    by_images: dict[str, dict] = {}
    for n in args.images:
        sel = [x for x in runs if x["images"] == n]
        speedup, cpu_scaling, cores_by = {}, {}, {}
        for w in args.workers:
            pairs = [(x, y) for x in sel for y in sel
                     if x["workers"] == w and y["workers"] == 1 and x["round"] == y["round"]]
            speedup[w] = statistics.median(x["images_per_s"] / y["images_per_s"] for x, y in pairs)
            cpu_scaling[w] = statistics.median(y["cpu_s"] / x["cpu_s"] for x, y in pairs)
            ips = [x["images_per_s"] for x in sel if x["workers"] == w]
            cpu_w = statistics.median(x["cpu_s"] for x in sel if x["workers"] == w)
            cores = {k: _median_finite(x.get(k) for x in sel if x["workers"] == w)
                     for k in ("worker_cores", "other_cores")}
            lines.append(f"| {n} | {w} | {statistics.median(ips):.2f} | {', '.join(f'{v:.2f}' for v in ips)} | "
                         f"{speedup[w]:.2f}x | {cpu_w:.2f} | {cpu_scaling[w]:.2f}x | "
                         f"{cores['worker_cores']:.2f} / {cores['other_cores']:.2f} |")
            cores_by[str(w)] = {k: round(v, 3) for k, v in cores.items() if not math.isnan(v)}
        by_images[str(n)] = {"speedup": {str(w): round(v, 3) for w, v in speedup.items()},
                             "cpu_scaling": {str(w): round(v, 3) for w, v in cpu_scaling.items()},
                             "cores": cores_by,
                             "where": f"synthetic world, N={n}, T={args.sampling_steps}, {os.cpu_count()} CPUs"}
    # Weak scaling (data-parallel throughput as usually quoted): W workers at N = W x n images per step against
    # 1 worker at n, i.e. the same batch per worker, paired within a round
    weak_lines, weak = [], {}
    for w in args.workers:
        for n in args.images:
            if w == 1 or n % w or n // w not in args.images:
                continue
            pairs = [(x, y) for x in runs for y in runs if x["workers"] == w and x["images"] == n
                     and y["workers"] == 1 and y["images"] == n // w and x["round"] == y["round"]]  # fmt: skip
            if pairs:
                r = statistics.median(x["images_per_s"] / y["images_per_s"] for x, y in pairs)
                weak[f"{w}x{n // w}"] = round(r, 3)
                weak_lines.append(f"| {n // w} | {w} (N={n}) | {r:.2f}x |")
    if weak_lines:
        lines += ["", "Same batch per worker (W workers at N = W x n vs 1 worker at n, paired within a round):", "",
                  "| images per worker n | workers | images/s x 1 worker (median of per-round ratios) |",
                  "|---|---|---|", *weak_lines]  # fmt: skip
    import platform

    text = (
        "## Ray Train workers: images/s, 1 vs 2 (bench/bench_workers.py)\n\n"
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. build_trainer(...).fit() on the synthetic world, "
        f"N={' and '.join(map(str, args.images))} images per step (one prompt) in chunks of {args.chunk_size} per "
        f"worker, T={args.sampling_steps} DDIM steps, guidance 7.5, text-encoder LoRA rank 8, DeepSpeed ZeRO-0 "
        f"(gloo), 1 CPU and 1 torch thread per worker; {args.steps} steps per run, the first "
        f"dropped; {args.rounds} rounds alternating the worker counts. images/s = the per-step metric of rank 0 "
        "(start-up, loading and checkpoints excluded).\n\n" + "\n".join(lines)
        + f"\n\nLoad average (1 min) on the {os.cpu_count()} cores: {load_before:.1f} before the first run, "
        f"{os.getloadavg()[0]:.1f} at the end (the benchmark's own workers count in both); with W workers on W "
        "free cores the ideal is W x. CPU-time scaling = "
        "rank 0's CPU seconds per step with 1 worker / with W workers (the step's compute per worker; what the "
        "images/s ratio would approach on free cores, collectives aside). Cores used: sampled from /proc once a "
        "second during each fit, median over the seconds in which every training worker was busy (> 0.5 core); "
        "'other' is every other process of the benchmark's private Ray cluster (raylet, GCS, dashboard and agent, "
        "the Train controller and its helper actors, Ray Data's actors) plus this driver: on a machine with as many "
        "cores as workers it is taken from the workers.")
    print(text)
    if args.out != "-":
        write_section(Path(args.out), "workers", text, {"by_images": by_images, "same_per_worker": weak})
        write_summary(Path(args.out))
        print(f"wrote {args.out}")
    print(json.dumps({n: d["speedup"] for n, d in by_images.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
