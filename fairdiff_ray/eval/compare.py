"""`fairdiff compare RUN_A RUN_B`: two evaluations' summary tables side by side."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fairdiff_ray.errors import UserError


def find_summary(path: str | Path) -> Path:
    """A summary.json itself, or a directory holding one (directly or in ``eval/``)."""
    p = Path(path)
    for cand in (p, p / "summary.json", p / "eval" / "summary.json"):
        if cand.is_file():
            return cand
    raise UserError(f"no summary.json at {str(p)!r} (looked in it, and in eval/): give an evaluation directory")


def load_summary(path: str | Path) -> dict[str, Any]:
    f = find_summary(path)
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{f} is not valid JSON: re-run `fairdiff evaluate` to rewrite it") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise UserError(f"{f} has no 'models' section: it is not a fairdiff evaluation summary")
    return data


def flatten_model(s: dict[str, Any]) -> dict[str, float | None]:
    """One model's summary as ``metric -> value`` rows, in the order of the paper's table."""
    rows: dict[str, float | None] = {}
    for name, v in s.get("bias", {}).items():
        rows[f"bias {name}"] = v.get("mean")
        rows[f"  ± std {name}"] = v.get("std")
    for a, freq in s.get("freq", {}).items():
        for c, v in freq.items():
            rows[f"freq {a}={c}"] = v
    rows["face rate"] = s.get("face_rate")
    for m, v in s.get("semantics", {}).items():
        rows[f"sem {m}"] = v
    return rows


def _cell(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def compare_table(a: dict[str, Any], b: dict[str, Any], label_a: str = "A", label_b: str = "B") -> str:
    """Plain-text table: one block per model present in either run; columns A, B and B - A."""
    lines = [f"A = {label_a}  ({a['prompts']['split']}, {a['prompts']['count']} prompts)",
             f"B = {label_b}  ({b['prompts']['split']}, {b['prompts']['count']} prompts)", ""]
    models = list(dict.fromkeys([*a["models"], *b["models"]]))
    for m in models:
        ra = flatten_model(a["models"].get(m, {}))
        rb = flatten_model(b["models"].get(m, {}))
        keys = list(dict.fromkeys([*ra, *rb]))
        width = max([len(k) for k in keys] + [10])
        lines.append(f"[{m}]")
        lines.append(f"  {'metric':<{width}}  {'A':>8}  {'B':>8}  {'B - A':>8}")
        for k in keys:
            va, vb = ra.get(k), rb.get(k)
            d = "-" if va is None or vb is None else f"{vb - va:+.3f}"
            lines.append(f"  {k:<{width}}  {_cell(va):>8}  {_cell(vb):>8}  {d:>8}")
        lines.append("")
    return "\n".join(lines)


def compare_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fairdiff compare", description="Print two evaluations side by side.")
    p.add_argument("run_a", help="evaluation directory (or its summary.json)")
    p.add_argument("run_b", help="evaluation directory (or its summary.json)")
    args = p.parse_args(argv)
    a, b = load_summary(args.run_a), load_summary(args.run_b)
    print(compare_table(a, b, args.run_a, args.run_b))
    return 0
