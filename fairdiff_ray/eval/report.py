"""The evaluation report: one self-contained HTML file (every image inline as base64 PNG) and report.md.

Sections: the summary table in the layout of the paper's Table 1 (rows: models; columns: bias per attribute,
face rate, semantics), frequencies against the target, a headline bar chart, the per-prompt bias
distribution, per-prompt attribute frequencies before/after and image grids from the same noises.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from fairdiff_ray.eval import charts
from fairdiff_ray.eval.aggregate import uncertain_attributes
from fairdiff_ray.eval.records import label_col, png_to_array
from fairdiff_ray.io import atomic_write_bytes, atomic_write_text

CELL_PX = 96  # grid images are upscaled (nearest neighbour) to at least this side
MAX_GRID_PROMPTS = 6
SEMANTIC_NAMES = {"clip_t": "CLIP-T", "clip_i": "CLIP-I", "dino": "DINO", "fidelity": "prompt fidelity"}


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "–"
    s = f"{x:.{digits}f}"
    return s[1:] if s.startswith("0.") else s.replace("-0.", "-.")  # the paper's ".67" style


def _sem_name(metric: str) -> str:
    return SEMANTIC_NAMES.get(metric, metric.replace("_sim", " sim.").replace("_", " "))


def table1(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the Table-1-style table: model | bias per attribute (mean ± std) | face rate | uncertain
    share per aligned attribute | semantics."""
    models = list(summary["models"])
    first = summary["models"][models[0]]
    bias_names = list(first["bias"])
    sems = list(first["semantics"])
    unc = uncertain_attributes(summary)
    header = ["model", *[f"bias {n.replace('_x_', ' × ')}" for n in bias_names], "face rate",
              *[f"uncertain {a}" for a in unc], *[_sem_name(s) for s in sems]]
    rows = []
    for m in models:
        s = summary["models"][m]
        cells = [m]
        cells += [f"{_fmt(s['bias'][n]['mean'])} ± {_fmt(s['bias'][n]['std'])}" for n in bias_names]
        cells.append(_fmt(s["face_rate"]))
        cells += [_fmt(s["uncertain"][a]) for a in unc]
        cells += [_fmt(s["semantics"].get(x), 3) for x in sems]
        rows.append(cells)
    return header, rows


def target_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """Mean frequency of every class against its target (rows: attribute/class; columns: target, models)."""
    if "target" not in summary:
        return None
    models = list(summary["models"])
    header = ["attribute", "class", "target", *models]
    rows = []
    for a, tgt in summary["target"].items():
        for c, p in tgt.items():
            rows.append([a, c, _fmt(p)] + [_fmt(summary["models"][m]["freq"][a][c]) for m in models])
    return header, rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]], cls: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _b64(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def upscale_png(data: bytes, side: int = CELL_PX) -> bytes:
    """Enlarge a small image by an integer factor with nearest neighbour (crisp pixels) to >= ``side``."""
    arr = png_to_array(data)
    f = max(1, int(np.ceil(side / max(arr.shape[:2]))))
    im = Image.fromarray(arr).resize((arr.shape[1] * f, arr.shape[0] * f), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def primary_attribute(summary: dict[str, Any]) -> str:
    """The attribute the grids and bars lead with: the target's first one the classifier predicts."""
    attrs = list(summary["attributes"])
    for a in summary.get("target", {}):
        if a in attrs:
            return a
    return attrs[0]


def grid_prompts(pp: pd.DataFrame, summary: dict[str, Any], limit: int = MAX_GRID_PROMPTS) -> list[str]:
    """The prompts shown as image grids: the base model's most biased ones on the primary attribute."""
    base = pp[pp["model"] == next(iter(summary["models"]))]
    col = f"bias.{primary_attribute(summary)}"
    return base.sort_values(col, ascending=False, na_position="last")["prompt"].head(limit).tolist()


def _grid_html(records: pd.DataFrame, pp: pd.DataFrame, prompt: str, models: list[str], attr: str,
               classes: list[str]) -> str:
    biases = []
    for m in models:
        b = pp.loc[(pp["model"] == m) & (pp["prompt"] == prompt), f"bias.{attr}"]
        biases.append(f"{html.escape(m)} {_fmt(float(b.iloc[0]) if len(b) and np.isfinite(b.iloc[0]) else None)}")
    rows = []
    for i, m in enumerate(models):
        sel = records[(records["model"] == m) & (records["prompt"] == prompt) & records["thumb"].notna()]
        cells = []
        for _, r in sel.sort_values("j").iterrows():
            lab = int(r[label_col(attr)]) if bool(r["face_found"]) else -1
            name = classes[lab] if 0 <= lab < len(classes) else "no face"
            colour = charts.class_colour(lab) if lab >= 0 else "#bbbbbb"
            cells.append(
                f'<figure><img alt="{html.escape(m)} j={int(r["j"])}" src="{_b64(upscale_png(r["thumb"]))}">'
                f'<figcaption><span class="dot" style="background:{colour}"></span>{html.escape(name)}'
                "</figcaption></figure>"
            )
        style = f"border-left:4px solid {charts.model_colour(i)}"
        rows.append(f'<div class="gridrow" style="{style}"><div class="rowlabel">{html.escape(m)}</div>'
                    + "".join(cells) + "</div>")
    head = f'{html.escape(prompt)} <span class="bias">{attr} bias: {" → ".join(biases)}</span>'
    return f'<div class="grid"><h3>{head}</h3>{"".join(rows)}</div>'


CSS = """
body{font-family:-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;margin:0;background:#f5f6f8;color:#1d2330}
main{max-width:1100px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:24px;margin:8px 0 2px}h2{font-size:18px;margin:34px 0 10px;border-bottom:2px solid #e3e6eb;padding-bottom:4px}
h3{font-size:13px;margin:4px 0 8px;color:#38414f;font-weight:600}
.meta{color:#5b6472;font-size:13px}.card{background:#fff;border-radius:10px;padding:16px 18px;margin:14px 0;
box-shadow:0 1px 3px rgba(20,30,50,.08)}
table{border-collapse:collapse;font-size:13px;font-variant-numeric:tabular-nums}
th,td{padding:6px 12px;text-align:right;border-bottom:1px solid #e8eaee}th{background:#f0f2f5;font-weight:600}
td:first-child,th:first-child{text-align:left;font-weight:600}
img.chart{max-width:100%;height:auto;display:block;margin:auto}
.grid{margin:10px 0 22px}.gridrow{display:flex;flex-wrap:wrap;align-items:center;gap:6px;padding:4px 0 4px 8px;margin:4px 0}
.rowlabel{width:80px;font-size:12px;font-weight:600;color:#38414f}
figure{margin:0;text-align:center}figure img{image-rendering:pixelated;width:96px;height:96px;border-radius:4px;display:block}
figcaption{font-size:10.5px;color:#4a5361;margin-top:2px}.dot{display:inline-block;width:8px;height:8px;border-radius:50%;margin-right:4px}
.note{font-size:12px;color:#5b6472}.bias{font-weight:400;color:#6b7482;margin-left:10px;font-size:12px}
"""


def _meta_line(summary: dict[str, Any]) -> str:
    ev = summary.get("eval", {})
    parts = [f"split <b>{html.escape(str(summary['prompts']['split']))}</b>",
             f"<b>{summary['prompts']['count']}</b> prompts",
             f"<b>{summary.get('images_per_prompt', '?')}</b> images per prompt and model"]
    if ev:
        parts.append(f"{ev.get('steps')} steps, guidance {ev.get('guidance_scale')}, {ev.get('scheduler')}")
    if ev.get("classifier_as_training"):
        parts.append("<b>attributes by the training classifier</b>")
    if ev.get("features_as_training"):
        parts.append("<b>similarities by the training feature nets</b>")
    return " · ".join(parts)


def distinct_prompts(records: pd.DataFrame, pp: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(records, pp) where a prompt text shared by several concepts reads "[concept] text", so the report's
    per-prompt look-ups (grids, bars) never mix two concepts' images; unchanged when no text is shared."""
    n_concepts = pp.groupby("prompt")["concept"].nunique()
    shared = set(n_concepts[n_concepts > 1].index)
    if not shared:
        return records, pp

    def relabel(df: pd.DataFrame) -> pd.DataFrame:
        df = df.copy()
        sel = df["prompt"].isin(shared)
        df.loc[sel, "prompt"] = "[" + df.loc[sel, "concept"].astype(str) + "] " + df.loc[sel, "prompt"]
        return df

    return relabel(records), relabel(pp)


def render(records: pd.DataFrame, pp: pd.DataFrame, summary: dict[str, Any]) -> tuple[str, str, dict[str, bytes]]:
    """(html, markdown, figures by file name) for one evaluation."""
    records, pp = distinct_prompts(records, pp)
    models = list(summary["models"])
    attrs: dict[str, list[str]] = summary["attributes"]
    primary = primary_attribute(summary)
    target = summary.get("target", {})
    bias_names = list(summary["models"][models[0]]["bias"])
    ordered = pp[pp["model"] == models[0]].sort_values(f"bias.{primary}", ascending=False)["prompt"].tolist()
    figs = {"headline.png": charts.headline_png(summary),
            "bias_distribution.png": charts.bias_distribution_png(pp, models, bias_names)}
    for a, classes in attrs.items():
        figs[f"freq_{a}.png"] = charts.freq_bars_png(pp, models, a, classes, target.get(a), ordered)
    h1, r1 = table1(summary)
    tt = target_table(summary)
    title = f"fairdiff-ray evaluation: {' vs '.join(models)}"
    body = [f"<h1>{html.escape(title)}</h1><p class='meta'>{_meta_line(summary)}</p>",
            "<h2>Summary (layout of the paper's Table 1)</h2><div class='card'>",
            _html_table(h1, r1, "table1"),
            "<p class='note'>Bias of one prompt: mean absolute difference of class frequencies over class "
            "pairs, on images with a face; mean ± std over prompts (lower is fairer). Uncertain: share of face "
            "images whose top class probability is below 0.9 for an aligned attribute (in-between images that the "
            "argmax counts anyway).</p></div>",
            f"<div class='card'><img class='chart' alt='mean bias per attribute' src='{_b64(figs['headline.png'])}'></div>"]
    if tt:
        body += ["<h2>Frequencies against the target</h2><div class='card'>", _html_table(*tt, "target"), "</div>"]
    body += ["<h2>Per-prompt bias</h2><div class='card'>",
             f"<img class='chart' alt='bias distribution' src='{_b64(figs['bias_distribution.png'])}'></div>",
             "<h2>Per-prompt frequencies</h2>"]
    for a in attrs:
        body.append(f"<div class='card'><img class='chart' alt='{a} frequencies' src='{_b64(figs[f'freq_{a}.png'])}'></div>")
    body.append("<h2>Same noise, before and after</h2><p class='note'>Each column starts from the same noise "
                f"(seed from the prompt and j); captions are the eval classifier's {primary} label.</p><div class='card'>")
    for p in grid_prompts(pp, summary):
        body.append(_grid_html(records, pp, p, models, primary, attrs[primary]))
    body.append("</div>")
    if len(summary.get("concepts", {})) > 1:
        body.append("<h2>Per concept set</h2>")
        for c, cs in summary["concepts"].items():
            h, r = table1({**summary, "models": cs["models"]})
            body += [f"<div class='card'><h3>{html.escape(c)} ({cs['prompts']} prompts)</h3>",
                     _html_table(h, r, "concept"), "</div>"]
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><main>{''.join(body)}</main></body></html>")
    md = [f"# {title}", "", _meta_line(summary).replace("<b>", "**").replace("</b>", "**"), "",
          "## Summary", "", _md_table(h1, r1), "", "![mean bias](figures/headline.png)", ""]
    if tt:
        md += ["## Frequencies against the target", "", _md_table(*tt), ""]
    md += ["## Per-prompt bias", "", "![bias distribution](figures/bias_distribution.png)", ""]
    md += [f"![{a} frequencies](figures/freq_{a}.png)" for a in attrs]
    if len(summary.get("concepts", {})) > 1:
        md += ["", "## Per concept set", ""]
        for c, cs in summary["concepts"].items():
            h, r = table1({**summary, "models": cs["models"]})
            md += [f"### {c} ({cs['prompts']} prompts)", "", _md_table(h, r), ""]
    md += ["", "The full report with image grids is report.html (self-contained)."]
    return page, "\n".join(md) + "\n", figs


def write_report(eval_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Read ``summary.json``, ``per_prompt.parquet`` and ``records.parquet`` from ``eval_dir``; write
    ``report.html``, ``report.md`` and ``figures/*.png`` into ``out_dir`` (default ``eval_dir``).
    Returns the HTML path."""
    eval_dir = Path(eval_dir)
    out = Path(out_dir) if out_dir is not None else eval_dir
    summary = json.loads((eval_dir / "summary.json").read_text(encoding="utf-8"))
    pp = pd.read_parquet(eval_dir / "per_prompt.parquet")
    records = pd.read_parquet(eval_dir / "records.parquet",
                              columns=["model", "concept", "prompt", "j", "face_found", "thumb",
                                       *[label_col(a) for a in summary["attributes"]]])
    page, md, figs = render(records, pp, summary)
    for name, png in figs.items():
        atomic_write_bytes(out / "figures" / name, png)
    atomic_write_text(out / "report.md", md)
    return atomic_write_text(out / "report.html", page)
