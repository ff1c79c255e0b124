"""From per-image records to the paper's numbers (METHOD.md section 6), per prompt first, then averaged.

Notation: for one model and one prompt P with images i = 1..M,
- F(P) = the images where a face was found (largest face), label_a(i) the eval classifier's argmax;
- freq_a(P)[k] = |{i in F(P): label_a(i) = k}| / |F(P)|;
- bias_a(P) = (1 / C(K_a, 2)) * sum_{k<l} |freq_a(P)[k] - freq_a(P)[l]|  (core.metrics.bias);
- a joint attribute (gender_x_race) is the same on the flattened joint label (row-major, core.metrics);
- a prompt with no face at all has no frequencies: it is left out of the means (and counted).
Reported: mean and std (population, ddof=0) of bias_a(P) over prompts, the mean of freq_a(P) over prompts,
the face-detection rate (mean over prompts of |F(P)| / M) and each semantic metric (mean over prompts of the
per-prompt mean). Beside them, where the records hold the classifier's probabilities, ``uncertain_a``: the mean over
prompts of the share of F(P) whose top class probability is below UNCERTAIN_P - in-between images (a blend of
two classes) that an argmax counts as one or the other, so a low bias with many of them is not a clean result.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import torch

from fairdiff_ray.core.metrics import bias, bias_over_prompts, frequencies, joint_bias
from fairdiff_ray.core.targets import TargetDistribution
from fairdiff_ray.eval.records import joint_name, label_col, prob_col

BASE = "base"
UNCERTAIN_P = 0.9  # an image whose top eval-classifier probability is below this counts as uncertain


def joint_attribute_sets(attributes: dict[str, list[str]], target: TargetDistribution | None) -> list[list[str]]:
    """Which joint attributes to report: gender x race when both exist, plus a joint target's attributes."""
    sets: list[list[str]] = []
    if "gender" in attributes and "race" in attributes:
        sets.append(["gender", "race"])
    if target is not None and not target.independent and len(target.names) > 1:
        if all(a in attributes for a in target.names) and target.names not in sets:
            sets.append(list(target.names))
    return sets


def _prompt_row(g: pd.DataFrame, attributes: dict[str, list[str]], joints: list[list[str]]) -> dict[str, Any]:
    found = g["face_found"].to_numpy(dtype=bool)
    row: dict[str, Any] = {"images": len(g), "faces": int(found.sum()), "face_rate": float(found.mean())}
    # label -1 = no face: core.metrics leaves those images out (NaN when a prompt has no face at all)
    labels = {a: torch.as_tensor(np.where(found, g[label_col(a)].to_numpy(), -1), dtype=torch.long)
              for a in attributes}
    for a, classes in attributes.items():
        freq = frequencies(labels[a], len(classes))
        for k, c in enumerate(classes):
            row[f"freq.{a}.{c}"] = float(freq[k])
        row[f"bias.{a}"] = bias(labels[a], len(classes))
        if prob_col(a) in g.columns:
            top = [float(np.max(p)) for p, f in zip(g[prob_col(a)], found) if f]
            row[f"uncertain.{a}"] = float(np.mean(np.asarray(top) < UNCERTAIN_P)) if top else math.nan
    for names in joints:
        row[f"bias.{joint_name(names)}"] = joint_bias({a: labels[a] for a in names},
                                                      {a: len(attributes[a]) for a in names})
    for col in g.columns:
        if col.startswith("sem_"):
            vals = g[col].to_numpy(dtype=np.float64)
            row[col] = float(np.nanmean(vals)) if np.isfinite(vals).any() else math.nan
    return row


def per_prompt(
    records: pd.DataFrame, attributes: dict[str, list[str]], joints: list[list[str]]
) -> pd.DataFrame:
    """One row per (model, concept, prompt): images, faces, face_rate, freq.<a>.<class>, bias.<a>,
    uncertain.<a> (where the records hold prob_<a>), bias.<joint>, sem_<metric>. ``records`` holds the merged per-image table (see records.py)."""
    rows = []
    for (model, concept, prompt), g in records.groupby(["model", "concept", "prompt"], sort=False):
        rows.append({"model": model, "concept": concept, "prompt": prompt, **_prompt_row(g, attributes, joints)})
    return pd.DataFrame(rows)


def _nan_to_none(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _model_summary(pp: pd.DataFrame, attributes: dict[str, list[str]], joints: list[list[str]]) -> dict[str, Any]:
    out: dict[str, Any] = {"bias": {}, "freq": {}, "face_rate": _nan_to_none(float(pp["face_rate"].mean()))}
    for name in [*attributes, *(joint_name(j) for j in joints)]:
        mean, std = bias_over_prompts(pp[f"bias.{name}"].tolist())
        out["bias"][name] = {"mean": _nan_to_none(mean), "std": _nan_to_none(std)}
    for a, classes in attributes.items():
        out["freq"][a] = {c: _nan_to_none(float(pp[f"freq.{a}.{c}"].mean())) for c in classes}
    unc = {a: pp[f"uncertain.{a}"].mean() for a in attributes if f"uncertain.{a}" in pp.columns}
    if unc:
        out["uncertain"] = {a: _nan_to_none(float(v)) for a, v in unc.items()}
    sems = sorted(c for c in pp.columns if c.startswith("sem_"))
    out["semantics"] = {c.removeprefix("sem_"): _nan_to_none(float(pp[c].mean())) for c in sems}
    out["prompts_without_faces"] = int((pp["faces"] == 0).sum())
    return out


def uncertain_attributes(summary: dict[str, Any]) -> list[str]:
    """The aligned attributes every model of ``summary`` reports an uncertain share for (the tables' columns)."""
    models = summary["models"].values()
    return [a for a in summary.get("target", {}) if all(a in m.get("uncertain", {}) for m in models)]


def target_gap(freq: dict[str, float | None], target: dict[str, float]) -> float | None:
    """Total-variation distance 0.5 * sum_k |freq[k] - target[k]| between mean frequencies and the target."""
    if any(freq.get(c) is None for c in target):
        return None
    return 0.5 * sum(abs(float(freq[c]) - p) for c, p in target.items())  # type: ignore[arg-type]


def check_target(attributes: dict[str, list[str]], target: TargetDistribution) -> None:
    """The target's attributes and class names must be the eval classifier's (same names, same order)."""
    for a, classes in target.attributes.items():
        if a not in attributes:
            raise ValueError(f"target attribute {a!r} is not predicted by the eval classifier ({list(attributes)})")
        if list(classes) != list(attributes[a]):
            raise ValueError(
                f"target.{a} classes {classes} differ from the eval classifier's {attributes[a]}: "
                "use the classifier's class names in that order"
            )


def summarize(
    records: pd.DataFrame,
    attributes: dict[str, list[str]],
    target: TargetDistribution | None,
    split: str,
    extra: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """The summary.json dict (keys of issue 4) and the per-prompt table it was computed from.

    Layout: ``models.<name>.bias.<attr>.mean|std``, ``models.<name>.freq.<attr>.<class>``,
    ``models.<name>.face_rate``, ``models.<name>.semantics.<metric>``, ``prompts.split|count``; beside them
    ``models.<name>.uncertain.<attr>`` (share of in-between images, where the records hold probabilities),
    ``target`` (marginal probabilities), ``target_gap.<name>.<attr>`` (total variation of the mean
    frequencies from the target), ``concepts.<concept>.models...`` and ``concepts.<concept>.prompts``.
    """
    if target is not None:
        check_target(attributes, target)
    joints = joint_attribute_sets(attributes, target)
    pp = per_prompt(records, attributes, joints)
    models = list(dict.fromkeys(records["model"]))  # first-seen order: base first
    prompts = pp[pp["model"] == models[0]]
    summary: dict[str, Any] = {
        "prompts": {"split": split, "count": int(len(prompts))},
        "images_per_prompt": int(records.groupby(["model", "concept", "prompt"]).size().max()),
        "attributes": {a: list(c) for a, c in attributes.items()},
        "joint_attributes": [joint_name(j) for j in joints],
        "models": {m: _model_summary(pp[pp["model"] == m], attributes, joints) for m in models},
    }
    if target is not None:
        tgt = {a: dict(zip(c, target.marginal(a).tolist())) for a, c in target.attributes.items()}
        summary["target"] = tgt
        summary["target_gap"] = {
            m: {a: target_gap(summary["models"][m]["freq"][a], tgt[a]) for a in tgt} for m in models
        }
    summary["concepts"] = {}
    for concept, cpp in pp.groupby("concept", sort=False):
        summary["concepts"][concept] = {
            "prompts": int((cpp["model"] == models[0]).sum()),
            "models": {m: _model_summary(cpp[cpp["model"] == m], attributes, joints) for m in models},
        }
    if extra:
        summary.update(extra)
    return summary, pp
