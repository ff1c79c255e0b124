"""What every bench shares: its own marked section of BENCHMARKS.md, replaced in place, and the summary table
of the issue-8 targets at the top of the file, rebuilt from the figures the sections carry."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BENCHMARKS = ROOT / "BENCHMARKS.md"
HEADER = ("# Benchmarks\n\nWritten by the scripts in `bench/` (each owns one marked section). Every figure is a "
          "ratio or a value measured side by side in one run on the machine named in its section.\n")
_DATA = re.compile(r"<!-- data (\{.*?\}) -->")


def write_section(path: Path, name: str, body: str, data: dict | None = None, top: bool = False,
                  after: str | None = None) -> None:
    """Replace the ``<!-- bench:NAME -->`` section of ``path`` (or add it: after the section ``after`` when
    there is one, else after the header when ``top``, else at the end), leaving the rest untouched.
    ``data``: figures for the summary, kept as a JSON comment."""
    from fairdiff_ray.io import atomic_write_text

    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = path.read_text(encoding="utf-8") if path.exists() else HEADER
    if data is not None:
        body = body.rstrip() + "\n\n<!-- data " + json.dumps(data, sort_keys=True) + " -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    anchor = f"<!-- /bench:{after} -->" if after else None
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    elif anchor and anchor in text:
        head, rest = text.split(anchor, 1)
        text = head + anchor + "\n\n" + block + "\n" + rest
    elif top and text.startswith(HEADER):
        text = HEADER + "\n" + block + "\n\n" + text[len(HEADER):].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    atomic_write_text(path, text)


def section_text(path: Path, name: str) -> str | None:
    """The body of the ``<!-- bench:NAME -->`` section of ``path`` (None: no such file or section)."""
    if not path.exists():
        return None
    text = path.read_text(encoding="utf-8")
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    if begin not in text or end not in text:
        return None
    return text.split(begin, 1)[1].split(end, 1)[0]


def section_data(path: Path, name: str) -> dict | None:
    """The ``data`` a section was written with (None: no such section, or no data)."""
    body = section_text(path, name)
    m = _DATA.search(body) if body is not None else None
    return json.loads(m.group(1)) if m else None


def _verdict(value: float | None, target: float | None, at_most: bool) -> str:
    if target is None:  # a figure beside the targets, not one of them
        return "-"
    if value is None:
        return "not measured"
    ok = value <= target if at_most else value >= target
    return "met" if ok else "**not met**"


def write_summary(path: Path = BENCHMARKS) -> None:
    """The 'summary' section at the top: each issue-8 target, the measured ratio, met / not met."""
    rows = []
    for sec, label in (("step", "CPU"), ("step-trim0", "CPU"), ("step-gpu", "GPU")):
        d = section_data(path, sec) or {}
        alloc = f", allocator {d['allocator']}" if label == "CPU" and "allocator" in d else ""
        for model, r in d.get("models", {}).items():
            where = f"{model}, N={r['images']}, T={r['steps']}, {r['dtype']} ({label}{alloc})"
            for v, how in (("fused", "all eps calls checkpointed"), ("selective", "selective checkpointing"),
                           ("non_reentrant", "all eps calls checkpointed, non-reentrant, separate reference chain")):
                if f"{v}/reference" not in r:
                    continue
                rows.append((f"{v} step / reference-schedule step ({how})", "<= 0.75x", r[f"{v}/reference"], 0.75,
                             True, where))
                rows.append((f"{v} step / no-grad generation of the same images ({how})", "<= 3.5x", r[f"{v}/gen"],
                             3.5, True, where + f"; reference schedule: {r['reference/gen']:.2f}x"))
            if "subsampled/gen" in r:  # not a full-chain step, so beside the targets, not meeting them
                rows.append(("subsampled step / no-grad generation (adjusted_subsampled: the parameter gradient of "
                             f"K={min(r['subsample_k'], r['steps'])} of the T steps, not the full chain)", "-",
                             r["subsampled/gen"], None, True, where + f"; / selective step: {r['subsampled/selective']:.2f}x"))
    for sec, label in (("memory", "CPU"), ("memory-gpu", "GPU")):
        d = section_data(path, sec) or {}
        for key, r in d.get("growth", {}).items():
            unck = r.get("uncheckpointed")
            note = f"uncheckpointed: {unck:.2f}x" if unck is not None else "uncheckpointed: not run / failed"
            what = "peak live-tensor bytes" if key.endswith(" tensors") else "peak memory"
            for k, how in (("checkpointed", "checkpointed, non-reentrant"), ("checkpointed_reentrant", "checkpointed, reentrant")):
                if r.get(k) is not None:
                    rows.append((f"{what} T={r['t_hi']} / T={r['t_lo']}, {how}", "<= 1.15x", r[k], 1.15, True,
                                 f"{key} ({label}); {note}"))
    d = section_data(path, "workers") or {}
    for r in d.get("by_images", {}).values():  # one entry per N
        for w, s in r.get("speedup", {}).items():
            if w != "1":
                cpu = r.get("cpu_scaling", {}).get(w)
                note = f"; CPU-time scaling {cpu:.2f}x" if cpu is not None else ""
                rows.append((f"images/s, {w} Ray Train workers / 1", ">= 1.7x" if w == "2" else "-", s,
                             1.7 if w == "2" else 0.0, False, r.get("where", "") + note))
    for key, s in d.get("same_per_worker", {}).items():  # "WxN": W workers at W*N images vs 1 worker at N
        w, n = key.split("x")
        rows.append((f"images/s, {w} Ray Train workers / 1, same batch per worker", ">= 1.7x" if w == "2" else "-", s,
                     1.7 if w == "2" else 0.0, False, f"{n} images per worker per step (N={int(w) * int(n)} vs {n})"))
    d = section_data(path, "eval") or {}
    for name, r in d.get("per_worker", {}).items():
        rows.append(("evaluation pipeline images/s per worker / plain diffusers loop", ">= 0.9x", r, 0.9, False,
                     name))
    lines = ["## Summary: issue 8 targets", "",
             "Written by bench/common.py from the figures of the sections below (each measured side by side in "
             "one run; see the section for method, machine and date).", "",
             "| target | goal | measured | verdict | where |", "|---|---|---|---|---|"]
    for what, goal, value, target, at_most, where in rows:
        val = "-" if value is None else f"{value:.2f}x"
        lines.append(f"| {what} | {goal} | {val} | {_verdict(value, target, at_most)} | {where} |")
    write_section(path, "summary", "\n".join(lines), top=True)


def machine() -> str:
    """One line naming the machine the numbers come from."""
    import os
    import platform

    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")
