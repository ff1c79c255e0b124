"""What every thin job script shares: `--config FILE key=value ...` parsing and one-line user errors."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from fairdiff_ray.config import FairDiffConfig, load_config
from fairdiff_ray.errors import UserError


def config_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=200")
    return p


def parse_config(argv: list[str], parser: argparse.ArgumentParser) -> tuple[FairDiffConfig, argparse.Namespace]:
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides), args


def run_job(main: Callable[[list[str]], int], argv: list[str] | None = None) -> None:
    """Run a job's main(); a UserError prints one line and exits 2 (no traceback)."""
    try:
        code = main(list(sys.argv[1:] if argv is None else argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(int(code or 0))
