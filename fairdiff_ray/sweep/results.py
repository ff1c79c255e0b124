"""Sweep results: one table row per trial (config values + final metrics), plots, and the best trial.

Columns: `trial`, `status` (OK: trained and exported; STOPPED: stopped early by ASHA; ERROR), one column per swept
config path (`cfg:<path>`), the trial's adaptor `kind` and `rank`, the requested shares of its targets
(`want/<attr>/<class>`), the shares at its first validation, before the first step (`first/<attr>/<class>`), and
its last reported metrics
(`objective`, `distance`, `drift`, `bias/<attr>`, `freq/<attr>/<class>`, `loss/...`).
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
    keep = [c for c in df.columns if c in ("trial", "status", "kind", "rank", "objective", "distance",
                                           "distance_start", "drift")
            or c.startswith(("cfg:", "bias/", "want/", "first/", "freq/"))]
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


def write_plots(df: pd.DataFrame, out_dir: Path) -> list[Path]:
    """bias_vs_rank.png, pareto.png and shares.png (requested vs achieved); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    done = df[df["status"] != "ERROR"] if "status" in df else df
    bias_cols = [c for c in done.columns if c.startswith("bias/")]
    if "rank" in done and bias_cols and len(done):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for kind in sorted(set(done["kind"])):
            sub = done[done["kind"] == kind].groupby("rank")[bias_cols].mean().sort_index()
            for c in bias_cols:
                ax.plot(sub.index, sub[c], marker="o", label=f"{kind} {c.removeprefix('bias/')}")
        ax.set_xlabel("LoRA rank")
        ax.set_ylabel("bias (lower is fairer; mean over trials)")
        ax.legend(fontsize=7)
        written.append(_save(fig, out_dir / "bias_vs_rank.png"))
    if "drift" in done and bias_cols:
        pts = [(float(done[bias_cols].iloc[i].mean()), float(done["drift"].iloc[i])) for i in range(len(done))]
        ok = [i for i, p in enumerate(pts) if all(map(math.isfinite, p))]
        if ok:
            fig, ax = plt.subplots(figsize=(5, 3.5))
            ax.scatter([pts[i][0] for i in ok], [pts[i][1] for i in ok], c="#999", label="trials")
            front = [ok[k] for k in pareto_front([pts[i] for i in ok])]
            ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "o-", c="#c33", label="Pareto front")
            for i in ok:
                ax.annotate(str(done["trial"].iloc[i])[-5:], pts[i], fontsize=6)
            ax.set_xlabel("mean bias")
            ax.set_ylabel("semantic drift")
            ax.legend(fontsize=7)
            written.append(_save(fig, out_dir / "pareto.png"))
    rows = [(str(r["trial"]), c.removeprefix("want/"), float(r[c]), r.get(f"freq/{c.removeprefix('want/')}"),
             r.get(f"first/{c.removeprefix('want/')}"))
            for _, r in done.iterrows() for c in done.columns if c.startswith("want/") and _is_num(r[c])]
    rows = [x for x in rows if _is_num(x[3])]
    if rows:
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        for trial, key, want, got, first in rows:
            if _is_num(first):  # from the shares before training to where the trial ended
                ax.annotate("", (want, got), (want, first), arrowprops={"arrowstyle": "->", "color": "#bbb"})
            ax.scatter([want], [got], c="#c33", s=14)
            ax.annotate(f"{key} {trial[-5:]}", (want, got), fontsize=5)
        ax.plot([0, 1], [0, 1], "--", c="#888")
        ax.set_xlabel("requested share")
        ax.set_ylabel("achieved share (arrow: from before training)")
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
