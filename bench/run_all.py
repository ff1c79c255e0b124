"""Run every benchmark (``make bench``), each in a fresh interpreter, then rebuild the summary of BENCHMARKS.md.

    python bench/run_all.py                      # all: ot, step (x2), memory, workers, eval (CPU; ~40 min, 2 cores)
    python bench/run_all.py --only step memory   # some of them
    python bench/run_all.py --list

Each script writes its own section of BENCHMARKS.md (see its docstring for the method); a script that fails is
reported and the others still run (exit status 1 if any failed). The GPU measurements are bench/gpu.sh.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import BENCHMARKS, write_summary  # noqa: E402

# name -> (command, environment changes); the step bench runs under both glibc settings (training workers run
# with MALLOC_TRIM_THRESHOLD_=0 when ray.worker_malloc_trim is set; it changes step times on CPU)
SCRIPTS: dict[str, tuple[list[str], dict[str, str | None]]] = {
    "ot": (["bench/bench_ot.py"], {}),
    "step": (["bench/bench_step.py"], {"MALLOC_TRIM_THRESHOLD_": None}),
    "step-trim0": (["bench/bench_step.py", "--section", "step-trim0"], {"MALLOC_TRIM_THRESHOLD_": "0"}),
    "memory": (["bench/bench_sampler_memory.py"], {}),
    "workers": (["bench/bench_workers.py"], {}),
    "eval": (["bench/bench_eval.py"], {}),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=list(SCRIPTS), default=list(SCRIPTS))
    p.add_argument("--list", action="store_true", help="print the scripts and exit")
    args = p.parse_args(argv)
    if args.list:
        for name, (cmd, changes) in SCRIPTS.items():
            print(f"{name:10s} {' '.join(cmd)}  {changes or ''}")
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "RAY_USAGE_STATS_ENABLED": "0"}
    failed = []
    for name in args.only:
        args, changes = SCRIPTS[name]
        cmd = [sys.executable, *args]
        run_env = {k: v for k, v in {**env, **changes}.items() if v is not None}
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=ROOT, env=run_env)
        print(f"== {name}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
        if rc != 0:
            failed.append(name)
    write_summary(BENCHMARKS)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"wrote {BENCHMARKS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
