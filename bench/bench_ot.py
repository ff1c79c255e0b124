"""Cost and accuracy of the expected-OT target paths (core/ot.py) at training sizes.

    python bench/bench_ot.py                  # N in {24, 40, 64}, 200 draws, writes BENCHMARKS.md section

Writes its section of BENCHMARKS.md between <!-- bench:ot --> and <!-- /bench:ot --> (other benches own
the rest of the file). Times are the median of a few calls of ``expected_targets`` on one CPU thread;
"max |q - q_ref|" compares each path with the exact path at coverage 0.9999 (one attribute) or
Monte-Carlo with 20000 draws (several attributes).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import write_section  # noqa: E402

RACE = ["white", "black", "indian", "asian"]



def targets() -> dict:
    from fairdiff_ray.core.targets import TargetDistribution

    g = {"classes": ["female", "male"], "probs": [0.5, 0.5]}
    r = {"classes": RACE, "probs": [0.25] * 4}
    a = {"classes": ["young", "old"], "probs": [0.75, 0.25]}
    return {
        "gender (K=2)": TargetDistribution.from_spec({"gender": g}),
        "race (K=4)": TargetDistribution.from_spec({"race": r}),
        "gender x race (J=8)": TargetDistribution.from_spec({"gender": g, "race": r}),
        "gender x race x age (J=16)": TargetDistribution.from_spec({"gender": g, "race": r, "age": a}),
    }


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    import torch

    from fairdiff_ray.core.ot import expected_targets

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="24,40,64")
    p.add_argument("--draws", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = ["| target | N | method | ms per call | max abs q - q_ref |", "|---|---|---|---|---|"]
    for name, target in targets().items():
        for n in (int(s) for s in args.sizes.split(",")):
            g = torch.Generator().manual_seed(n)
            probs = {
                a: torch.softmax(torch.randn(n, k, generator=g) * 2, 1) for a, k in target.num_classes.items()
            }
            single = len(target.names) == 1
            ref_kw = {"method": "exact", "coverage": 0.9999} if single else {"num_draws": 20000}
            ref = expected_targets(probs, target, generator=torch.Generator().manual_seed(1), **ref_kw)
            methods = ["auto", "monte_carlo"] + (["exact"] if single else [])
            for method in methods:

                def call(method=method, probs=probs, target=target):
                    gen = torch.Generator().manual_seed(0)
                    return expected_targets(probs, target, method=method, num_draws=args.draws, generator=gen)

                ms = 1000 * timed(call, args.repeats)
                q = call()
                err = max(float((q[a] - ref[a]).abs().max()) for a in q)
                rows.append(f"| {name} | {n} | {method} | {ms:.1f} | {err:.3f} |")
                print(rows[-1], flush=True)
    body = (
        "## Expected-OT targets (bench/bench_ot.py)\n\n"
        f"{platform.processor() or platform.machine()}, 1 thread, {args.draws} Monte-Carlo draws; "
        "reference = exact (coverage 0.9999) for one attribute, 20000 draws otherwise.\n\n" + "\n".join(rows)
    )
    write_section(Path(args.out), "ot", body)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
