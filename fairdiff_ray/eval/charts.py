"""The report's charts, rendered with matplotlib (Agg) to PNG bytes.

Every function takes the per-prompt table (aggregate.per_prompt) or the summary dict and returns PNG bytes;
nothing here reads or writes files.
"""

from __future__ import annotations

import io
import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

# Models: base in neutral grey, adaptors in saturated colours. Classes: a colour-blind-friendly cycle.
MODEL_COLOURS = ["#8c8c8c", "#0f8b8d", "#d1495b", "#edae49", "#3c6e71", "#7b2cbf"]
CLASS_COLOURS = ["#e07a5f", "#3d405b", "#81b29a", "#f2cc8f", "#6d597a", "#5fa8d3", "#b56576", "#264653"]
DPI = 110

plt.rcParams.update({
    "font.size": 9, "axes.spines.top": False, "axes.spines.right": False, "axes.titleweight": "bold",
    "axes.titlesize": 10, "figure.facecolor": "white", "savefig.facecolor": "white",
})


def model_colour(i: int) -> str:
    return MODEL_COLOURS[i % len(MODEL_COLOURS)]


def class_colour(k: int) -> str:
    return CLASS_COLOURS[k % len(CLASS_COLOURS)]


def _png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def short_labels(prompts: list[str]) -> list[str]:
    """Strip the prefix and suffix all prompts share ("A photo of the face of a {x}, a person" -> x)."""
    if len(prompts) < 2:
        return list(prompts)
    pre = os.path.commonprefix(prompts)
    suf = os.path.commonprefix([p[::-1] for p in prompts])[::-1]
    pre = pre[: pre.rfind(" ") + 1] if " " in pre else ""  # cut at a word boundary
    out = []
    for p in prompts:
        core = p[len(pre): len(p) - len(suf)] if len(p) > len(pre) + len(suf) else p
        core = core.strip(" ,.")
        out.append(core if core else p)
    return out


def headline_png(summary: dict[str, Any]) -> bytes:
    """Mean bias (+- std over prompts) per attribute, one bar per model."""
    models = list(summary["models"])
    names = list(summary["models"][models[0]]["bias"])
    fig, ax = plt.subplots(figsize=(1.2 + 1.3 * len(names) * max(1, len(models)) / 2, 2.8))
    width = 0.8 / len(models)
    x = np.arange(len(names))
    for i, m in enumerate(models):
        b = summary["models"][m]["bias"]
        mean = [b[n]["mean"] if b[n]["mean"] is not None else np.nan for n in names]
        std = [b[n]["std"] if b[n]["std"] is not None else 0.0 for n in names]
        bars = ax.bar(x + (i - (len(models) - 1) / 2) * width, mean, width * 0.92, yerr=std, capsize=2,
                      color=model_colour(i), label=m, error_kw={"elinewidth": 0.8, "alpha": 0.6})
        ax.bar_label(bars, labels=[f"{v:.2f}" if np.isfinite(v) else "" for v in mean], fontsize=7, padding=2)
    ax.set_xticks(x, [n.replace("_x_", " × ") for n in names])
    ax.set_ylabel("bias (mean over prompts)")
    ax.set_ylim(0, 1.05)
    ax.legend(frameon=False, ncols=len(models), loc="upper right", fontsize=8)
    return _png(fig)


def bias_distribution_png(pp: pd.DataFrame, models: list[str], names: list[str]) -> bytes:
    """Per attribute, the distribution over prompts of the per-prompt bias: box plot plus every prompt."""
    fig, axes = plt.subplots(1, len(names), figsize=(0.6 + 2.1 * len(names) * max(1, len(models)) / 2, 3.0),
                             squeeze=False)
    rng = np.random.default_rng(0)  # jitter only; fixed so the report is reproducible
    for ax, name in zip(axes[0], names):
        data = [pp.loc[pp["model"] == m, f"bias.{name}"].dropna().to_numpy() for m in models]
        box = ax.boxplot(data, widths=0.55, patch_artist=True, showfliers=False,
                         medianprops={"color": "black", "linewidth": 1.2})
        for i, patch in enumerate(box["boxes"]):
            patch.set_facecolor(model_colour(i))
            patch.set_alpha(0.35)
        for i, d in enumerate(data):
            ax.scatter(i + 1 + rng.uniform(-0.18, 0.18, len(d)), d, s=9, color=model_colour(i), alpha=0.85,
                       edgecolors="none", zorder=3)
        ax.set_xticks(range(1, len(models) + 1), models)
        ax.set_title(name.replace("_x_", " × "))
        ax.set_ylim(-0.03, 1.03)
    axes[0][0].set_ylabel("bias of one prompt")
    fig.tight_layout()
    return _png(fig)


def freq_bars_png(
    pp: pd.DataFrame,
    models: list[str],
    attribute: str,
    classes: list[str],
    target: dict[str, float] | None,
    prompts: list[str],
) -> bytes:
    """Per prompt, one stacked horizontal bar per model of the class frequencies of ``attribute``.

    Dashed vertical lines mark the target's cumulative class boundaries, so a debiased bar should split there.
    """
    n, nm = len(prompts), len(models)
    fig, ax = plt.subplots(figsize=(7.2, 0.6 + 0.2 * n * nm + 0.12 * n))
    labels = short_labels(prompts)
    row_h = 0.8 / nm
    for p_i, prompt in enumerate(prompts):
        for m_i, m in enumerate(models):
            sel = pp[(pp["model"] == m) & (pp["prompt"] == prompt)]
            if sel.empty:
                continue
            y = p_i + (m_i - (nm - 1) / 2) * row_h
            left = 0.0
            for k, c in enumerate(classes):
                f = float(sel[f"freq.{attribute}.{c}"].iloc[0])
                if not np.isfinite(f):
                    continue
                ax.barh(y, f, left=left, height=row_h * 0.9, color=class_colour(k),
                        alpha=1.0 if m_i else 0.55, edgecolor="white", linewidth=0.4)
                left += f
    if target:
        cum = np.cumsum([target[c] for c in classes])[:-1]
        for c in cum:
            ax.axvline(c, color="black", linestyle="--", linewidth=0.8, alpha=0.6)
    ax.set_yticks(range(n), labels, fontsize=7.5)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"frequency of each {attribute} class (faces found)")
    order = " / ".join(models)
    ax.set_title(f"{attribute}: per-prompt frequencies (bars per prompt, top to bottom: {order})", fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=class_colour(k)) for k in range(len(classes))]
    ax.legend(handles, classes, ncols=len(classes), frameon=False, loc="lower center",
              bbox_to_anchor=(0.5, 1.0 + 0.35 / max(n, 1)), fontsize=8)
    return _png(fig)
