"""The `fairdiff` console script: one subcommand per job, each a thin call into an importable function.

User mistakes (UserError) print one line and exit 2, with no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from fairdiff_ray.errors import UserError

# name -> (module, function, one-line help). Each function takes argv (list[str]) and returns an exit code.
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "debias": ("jobs_entry", "debias", "finetune an adaptor for fairness with Ray Train (adjusted DFT)"),
    "evaluate": ("jobs_entry", "evaluate", "generate with base and adaptors, measure bias and semantics, write a report"),
    "generate": ("fairdiff_ray.generate", "main", "write PNGs for a prompt and seeds, optionally with an adaptor"),
    "compare": ("fairdiff_ray.eval.compare", "compare_main", "print two evaluations' summary tables side by side"),
    "sweep": ("jobs_entry", "sweep", "run a Ray Tune sweep over config paths"),
    "train-classifier": ("jobs_entry", "train_classifier", "train attribute heads on a labelled face dataset"),
    "build-face-bank": ("jobs_entry", "build_face_bank", "embed a folder of real faces into a face bank"),
    "pretrain-synthetic": ("jobs_entry", "pretrain_synthetic", "pretrain the synthetic world's biased tiny model"),
    "demo": ("jobs_entry", "demo", "debias the synthetic model end to end and write runs/demo (make demo)"),
}

# jobs/*.py hold the entry points (thin, for `ray job submit`); the CLI runs the same functions.
JOB_FILES = {
    "debias": "debias",
    "evaluate": "evaluate",
    "sweep": "sweep",
    "train_classifier": "train_classifier",
    "build_face_bank": "build_face_bank",
    "pretrain_synthetic": "pretrain_synthetic",
    "demo": "demo",
}




def _job_main(job: str) -> Callable[[list[str]], int]:
    """Load jobs/<job>.py's main() from the repository checkout (jobs/ is not an installed package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "jobs" / f"{JOB_FILES[job]}.py"
    if not path.is_file():
        raise UserError(f"job script {path} is missing: run fairdiff from a full checkout of fairdiff-ray")
    spec = importlib.util.spec_from_file_location(f"fairdiff_jobs_{job}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _resolve(name: str) -> Callable[[list[str]], int]:
    module, func, _ = SUBCOMMANDS[name]
    if module == "jobs_entry":
        return _job_main(func)
    return getattr(importlib.import_module(module), func)


def _config_main(argv: list[str]) -> int:
    from fairdiff_ray.config import load_config

    p = argparse.ArgumentParser(prog="fairdiff config", description="Inspect and check run configs.")
    sub = p.add_subparsers(dest="action", required=True)
    v = sub.add_parser("validate", help="check a YAML config (with optional key=value overrides)")
    v.add_argument("file")
    v.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    s = sub.add_parser("show", help="print the resolved config with defaults filled in")
    s.add_argument("file")
    s.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cfg = load_config(args.file, args.overrides)
    if args.action == "validate":
        cfg.target_distribution()
        print(f"{args.file}: ok ({cfg.adaptor.kind}, target over {', '.join(cfg.target_distribution().names)})")
    else:
        print(cfg.to_yaml(), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fairdiff",
        description="Finetune text-to-image diffusion models for fairness (Shen et al., ICLR 2024) on Ray.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("config", help="validate or show a config file", add_help=False)
    for name, (_, _, help_) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    command, rest = argv[0], argv[1:]
    if command != "config" and command not in SUBCOMMANDS:
        parser.print_usage(sys.stderr)
        print(f"fairdiff: error: unknown command {command!r} (choose from config, {', '.join(SUBCOMMANDS)})",
              file=sys.stderr)
        return 2
    try:
        fn = _config_main if command == "config" else _resolve(command)
        return int(fn(rest) or 0)
    except UserError as e:
        print(f"fairdiff {command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"fairdiff {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
