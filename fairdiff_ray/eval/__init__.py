"""Evaluation at scale (issue 6): Ray Data generation and scoring, the paper's metrics, the report.

Entry points: run.run_evaluation(cfg, adaptors, out_dir) (``fairdiff evaluate``), report.write_report(eval_dir),
compare.compare_main(argv) (``fairdiff compare``), aggregate.summarize(records, attributes, target, split).
"""
