"""The synthetic world's renderer: determinism, attribute independence, geometry, visual separability."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fairdiff_ray.core.crop import crop_square
from fairdiff_ray.synthetic.render import ATTRIBUTES, N_CONTENT, render, sample_batch

B = 24


def _attrs(seed: int = 0) -> dict[str, np.ndarray]:
    a = sample_batch(B, seed)
    return {k: a[k] for k in ("gender", "race", "age", "content")}


def _region(boxes: torch.Tensor, size: int, expand: float) -> torch.Tensor:
    """(B, size, size) bool mask of the boxes expanded by ``expand`` px on every side."""
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    b = boxes[:, :, None, None]
    return (xx >= b[:, 0] - expand) & (xx <= b[:, 2] + expand) & (yy >= b[:, 1] - expand) & (yy <= b[:, 3] + expand)


def test_api_and_shapes() -> None:
    assert ATTRIBUTES == {"gender": ["female", "male"], "race": ["white", "black", "indian", "asian"], "age": ["young", "old"]}
    assert 12 <= N_CONTENT <= 16
    face = np.ones(B, bool)
    face[:3] = False
    out = render(**_attrs(), seed=3, face=face)
    img = out["images"]
    assert img.shape == (B, 3, 32, 32) and img.dtype == torch.float32
    assert img.min() >= -1 and img.max() <= 1 and img.std() > 0.2
    assert out["boxes"].shape == (B, 4) and out["landmarks"].shape == (B, 5, 2)
    assert out["face"].tolist() == face.tolist()
    assert torch.isnan(out["boxes"][:3]).all() and torch.isfinite(out["boxes"][3:]).all()
    width = out["boxes"][3:, 2] - out["boxes"][3:, 0]
    assert width.min() >= 10 and width.max() <= 18
    big = render(**_attrs(), seed=3, size=64)
    assert big["images"].shape == (B, 3, 64, 64)
    assert torch.allclose(big["boxes"], 2 * render(**_attrs(), seed=3)["boxes"])


def test_deterministic_by_seed() -> None:
    a, b, c = (render(**_attrs(), seed=s)["images"] for s in (7, 7, 8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_landmarks_inside_boxes_in_arcface_order() -> None:
    out = render(**_attrs(), seed=5)
    lm, bx = out["landmarks"], out["boxes"]
    assert ((lm[..., 0] > bx[:, None, 0]) & (lm[..., 0] < bx[:, None, 2])).all()
    assert ((lm[..., 1] > bx[:, None, 1]) & (lm[..., 1] < bx[:, None, 3])).all()
    # left eye left of right eye, eyes above nose above mouth, mouth corners ordered left-right
    assert (lm[:, 0, 0] < lm[:, 1, 0]).all() and (lm[:, 3, 0] < lm[:, 4, 0]).all()
    assert (lm[:, 0, 1] < lm[:, 2, 1]).all() and (lm[:, 2, 1] < lm[:, 3, 1]).all()


@pytest.mark.parametrize("name", ["gender", "race", "age", "content"])
def test_each_attribute_changes_only_its_region(name: str) -> None:
    base = _attrs()
    other = dict(base)
    n_classes = N_CONTENT if name == "content" else len(ATTRIBUTES[name])
    other[name] = (base[name] + 1) % n_classes
    a, b = render(**base, seed=11, noise_std=0.0), render(**other, seed=11, noise_std=0.0)
    assert torch.equal(a["boxes"], b["boxes"])  # geometry is nuisance, never attribute-driven
    diff = (a["images"] - b["images"]).abs().amax(1) > 1e-4  # (B, H, W)
    assert diff.flatten(1).any(1).all(), f"{name} must change every image"
    head = _region(a["boxes"], 32, expand=3.0)
    below = torch.arange(32)[None, :, None] + 0.5 > a["boxes"][:, 3, None, None] + 1.0
    if name == "race":  # skin: face and neck only
        assert not (diff & ~(head | below)).any()
    elif name == "age":  # hair colour: around the head, plus long hair reaching the shoulders
        assert not (diff & ~(head | below)).any()
    elif name == "gender":  # long hair around the face, never far outside it horizontally
        wide = _region(a["boxes"], 32, expand=4.0)
        assert not (diff & ~(wide | below)).any()
    else:  # content: the shirt, below the face
        face_core = _region(a["boxes"], 32, expand=-1.0)
        assert not (diff & face_core).any()


def _crops(n: int, seed: int) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    a = sample_batch(n, seed)
    out = render(a["gender"], a["race"], a["age"], a["content"], seed=seed)
    return crop_square(out["images"], out["boxes"], expand=0.5, size=16).flatten(1), a


def test_linear_probe_on_face_crops_separates_every_attribute() -> None:
    xtr, atr = _crops(1200, 1)
    xte, ate = _crops(400, 2)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-3
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    for name, classes in ATTRIBUTES.items():
        ytr, yte = torch.as_tensor(atr[name]), torch.as_tensor(ate[name])
        w = torch.zeros(xtr.shape[1], len(classes), requires_grad=True)
        bias = torch.zeros(len(classes), requires_grad=True)
        opt = torch.optim.LBFGS([w, bias], max_iter=150)

        def closure(w=w, bias=bias, ytr=ytr, opt=opt) -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(xtr @ w + bias, ytr) + 1e-3 * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        acc = ((xte @ w + bias).argmax(1) == yte).float().mean().item()
        assert acc > 0.95, f"{name}: linear probe accuracy {acc:.3f}"


def test_bad_input_is_rejected() -> None:
    a = _attrs()
    with pytest.raises(ValueError, match="race"):
        render(a["gender"], a["race"] + 4, a["age"], a["content"], seed=0)
    with pytest.raises(ValueError, match="gender"):
        render(a["gender"].astype(float), a["race"], a["age"], a["content"], seed=0)
