"""Evaluate the base model and adaptors on a prompt split: bias, frequencies, semantics, report (issue 6).

    fairdiff evaluate --config configs/synthetic_gender.yaml --adaptor debiased=runs/synthetic-gender/adaptor
    ray job submit --working-dir . -- python jobs/evaluate.py --config ... --adaptor debiased=DIR --out DIR

Running it again with the same --out resumes: finished parts are reused.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fairdiff_ray.jobs_common import config_parser, parse_config, run_job  # noqa: E402


def main(argv: list[str]) -> int:
    from fairdiff_ray.eval.run import add_eval_args, default_out, parse_adaptors, run_evaluation

    parser = add_eval_args(config_parser("fairdiff evaluate", "Generate, score and report base vs adaptors."))
    cfg, args = parse_config(argv, parser)
    adaptors = parse_adaptors(args.adaptor)
    out = Path(args.out) if args.out else default_out(cfg)
    summary = run_evaluation(cfg, adaptors, out, executor=args.executor, report=not args.no_report,
                             overwrite=args.overwrite or cfg.run.overwrite)
    for name, s in summary["models"].items():
        bias = ", ".join(f"{a} {v['mean']:.3f}" for a, v in s["bias"].items() if v["mean"] is not None)
        face = "-" if s["face_rate"] is None else f"{s['face_rate']:.3f}"
        print(f"{name:>12}: bias {bias}; face rate {face}")
    print(f"evaluation: {out}/summary.json" + ("" if args.no_report else f", report: {out}/report.html"))
    return 0


if __name__ == "__main__":
    run_job(main)
