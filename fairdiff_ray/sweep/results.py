"""Sweep results: one table row per trial (config values + final metrics), plots, and the best trial.

Columns: `trial`, `status`, one column per swept config path (`cfg:<path>`), and the trial's last reported
metrics (`objective`, `bias/<attr>`, `freq/<attr>/<class>`, `drift`, ...).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from fairdiff_ray.io import atomic_write_text


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def write_table(rows: list[dict[str, Any]], out_dir: Path) -> pd.DataFrame:
    """trials.parquet + trials.md in out_dir; returns the frame sorted by objective (best first)."""
    df = pd.DataFrame(rows)
    if "objective" in df:
        df = df.sort_values("objective", na_position="last").reset_index(drop=True)
    tmp = out_dir / ".trials.parquet.tmp"
    df.assign(**{c: df[c].map(json.dumps) for c in df.columns if df[c].map(lambda v: isinstance(v, (list, dict))).any()}).to_parquet(tmp)
    tmp.replace(out_dir / "trials.parquet")
    keep = [c for c in df.columns if c in ("trial", "status", "objective", "drift") or c.startswith(("cfg:", "bias/", "freq/"))]
    atomic_write_text(out_dir / "trials.md", to_markdown(df[keep]))
    return df


def to_markdown(df: pd.DataFrame) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    head = "| " + " | ".join(df.columns) + " |\n| " + " | ".join("---" for _ in df.columns) + " |\n"
    return head + "".join("| " + " | ".join(fmt(v) for v in row) + " |\n" for row in df.itertuples(index=False))


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated when minimising both coordinates (bias, drift)."""
    front = []
    for i, (a, b) in enumerate(points):
        if not any((c <= a and d <= b) and (c < a or d < b) for j, (c, d) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def write_plots(df: pd.DataFrame, out_dir: Path, requested: dict[int, dict[str, float]] | None = None) -> list[Path]:
    """bias_vs_rank.png, pareto.png and (for non-uniform targets) shares.png; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    bias_cols = [c for c in df.columns if c.startswith("bias/")]
    if "cfg:adaptor.rank" in df and bias_cols:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        kinds = df["cfg:adaptor.kind"] if "cfg:adaptor.kind" in df else pd.Series(["adaptor"] * len(df))
        for kind in sorted(set(kinds)):
            sub = df[kinds == kind].sort_values("cfg:adaptor.rank")
            for c in bias_cols:
                ax.plot(sub["cfg:adaptor.rank"], sub[c], marker="o", label=f"{kind} {c.removeprefix('bias/')}")
        ax.set_xlabel("LoRA rank")
        ax.set_ylabel("bias (lower is fairer)")
        ax.legend(fontsize=7)
        written.append(_save(fig, out_dir / "bias_vs_rank.png"))
    if "drift" in df and bias_cols:
        pts = [(float(df[bias_cols].iloc[i].mean()), float(df["drift"].iloc[i])) for i in range(len(df))]
        ok = [i for i, p in enumerate(pts) if all(map(math.isfinite, p))]
        if ok:
            fig, ax = plt.subplots(figsize=(5, 3.5))
            ax.scatter([pts[i][0] for i in ok], [pts[i][1] for i in ok], c="#999", label="trials")
            front = [ok[k] for k in pareto_front([pts[i] for i in ok])]
            ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "o-", c="#c33", label="Pareto front")
            for i in ok:
                ax.annotate(str(df["trial"].iloc[i])[-5:], pts[i], fontsize=6)
            ax.set_xlabel("mean bias")
            ax.set_ylabel("semantic drift")
            ax.legend(fontsize=7)
            written.append(_save(fig, out_dir / "pareto.png"))
    if requested:
        rows = [(i, k, want, df.loc[i, f"freq/{k}"]) for i, req in requested.items() for k, want in req.items()
                if f"freq/{k}" in df and _is_num(df.loc[i, f"freq/{k}"])]
        if rows:
            fig, ax = plt.subplots(figsize=(4, 4))
            ax.scatter([r[2] for r in rows], [r[3] for r in rows])
            ax.plot([0, 1], [0, 1], "--", c="#888")
            for r in rows:
                ax.annotate(r[1], (r[2], r[3]), fontsize=6)
            ax.set_xlabel("requested share")
            ax.set_ylabel("achieved share")
            written.append(_save(fig, out_dir / "shares.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    tmp = path.with_suffix(".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
