"""Differentiable square crops and five-point alignment (core/crop.py)."""

from __future__ import annotations

import math

import pytest
import torch

from fairdiff_ray.core.crop import (
    ARCFACE_TEMPLATE,
    align_faces,
    arcface_template,
    crop_square,
    largest_face_index,
    similarity_fit,
)


def _images(b: int = 2, h: int = 40, w: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


def test_integer_box_crop_equals_slicing() -> None:
    images = _images()
    boxes = torch.tensor([[5.0, 7.0, 25.0, 27.0], [20.0, 3.0, 36.0, 19.0]])
    crops = [
        crop_square(images[i : i + 1], boxes[i : i + 1], expand=0.0, size=int(boxes[i, 2] - boxes[i, 0]))
        for i in range(2)
    ]
    torch.testing.assert_close(crops[0][0], images[0, :, 7:27, 5:25], atol=1e-5, rtol=0)
    torch.testing.assert_close(crops[1][0], images[1, :, 3:19, 20:36], atol=1e-5, rtol=0)


def test_padding_is_minus_one_and_expand_centres_the_box() -> None:
    images = torch.zeros(1, 3, 20, 20)
    # A 10 px box at the top-left corner, expanded by 1.0 -> a 20 px crop centred on (5, 5): the top-left
    # quarter of the crop lies outside the image.
    crop = crop_square(images, torch.tensor([[0.0, 0.0, 10.0, 10.0]]), expand=1.0, size=20)
    assert (crop[..., :5, :] + 1).abs().max() < 1e-6 and (crop[..., :, :5] + 1).abs().max() < 1e-6
    assert crop[..., 5:, 5:].abs().max() < 1e-6


def test_non_square_box_uses_the_longer_side() -> None:
    images = _images(1, 30, 30)
    crop = crop_square(images, torch.tensor([[10.0, 5.0, 14.0, 25.0]]), expand=0.0, size=20)
    torch.testing.assert_close(crop[0], images[0, :, 5:25, 2:22], atol=1e-5, rtol=0)


def test_gradients_flow_only_to_pixels_inside_the_crop() -> None:
    images = _images(1, 32, 32).requires_grad_()
    crop = crop_square(images, torch.tensor([[8.0, 8.0, 16.0, 16.0]]), expand=0.5, size=24)
    crop.square().sum().backward()
    grad = images.grad[0].abs().sum(0)
    # side 12 around (12, 12) covers pixels 6..17; bilinear taps reach one pixel further, nothing beyond.
    assert torch.all(grad[6:18, 6:18] > 0)
    grad[5:19, 5:19] = 0
    assert torch.all(grad == 0)


def test_downscaled_crop_is_a_box_filter_not_aliased() -> None:
    # A checkerboard of period 2 px cropped 4x smaller must come out at its mean, not at one phase.
    y, x = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    board = ((x + y) % 2).float().mul(2).sub(1).expand(1, 3, 64, 64)
    crop = crop_square(board, torch.tensor([[0.0, 0.0, 64.0, 64.0]]), expand=0.0, size=16)
    assert crop.abs().max() < 1e-5


def test_largest_face_index() -> None:
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 30, 5], [5, 5, 20, 20.0]])
    assert largest_face_index(boxes) == 2
    with pytest.raises(ValueError):
        largest_face_index(torch.zeros(0, 4))


def test_similarity_fit_recovers_a_known_transform() -> None:
    src = torch.tensor(ARCFACE_TEMPLATE, dtype=torch.float64)[None]
    angle, scale, shift = 0.3, 1.7, torch.tensor([4.0, -2.0], dtype=torch.float64)
    rot = scale * torch.tensor(
        [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]], dtype=torch.float64
    )
    w, t = similarity_fit(src, src[0] @ rot.T + shift)
    torch.testing.assert_close(
        w[0], scale * torch.tensor([math.cos(angle), math.sin(angle)], dtype=torch.float64)
    )
    torch.testing.assert_close(t[0], shift)


def test_align_template_landmarks_is_the_identity() -> None:
    images = _images(2, 112, 112)
    lm = arcface_template().expand(2, 5, 2)
    torch.testing.assert_close(align_faces(images, lm), images, atol=5e-5, rtol=0)


def _pattern(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A smooth RGB pattern in template coordinates (bilinear sampling error stays small)."""
    return torch.stack([torch.sin(x / 9.0), torch.cos(y / 11.0), torch.sin((x + y) / 15.0)]) * 0.9


@pytest.mark.parametrize("angle,scale", [(0.4, 2.0), (-0.25, 0.8)])
def test_align_maps_a_rotated_scaled_face_back(angle: float, scale: float) -> None:
    # Source image where source pixel p shows the pattern at template point M(p), M = source -> template.
    # M^-1 is z -> scale * R(angle) z + offset; its landmarks are M^-1(template).
    offset = torch.tensor([100.0, 60.0], dtype=torch.float64)
    rot = scale * torch.tensor(
        [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]], dtype=torch.float64
    )
    size = 380
    y, x = torch.meshgrid(
        torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64), indexing="ij"
    )
    pts = torch.stack([x, y], -1) - offset
    tmpl = pts @ torch.linalg.inv(rot).T
    source = _pattern(tmpl[..., 0], tmpl[..., 1]).float()[None]
    landmarks = (torch.tensor(ARCFACE_TEMPLATE, dtype=torch.float64) @ rot.T + offset).float()[None]
    aligned = align_faces(source, landmarks)
    ty, tx = torch.meshgrid(torch.arange(112.0), torch.arange(112.0), indexing="ij")
    expected = _pattern(tx, ty)[None]
    assert (aligned - expected).abs().max() < 0.02


def test_align_padding_and_gradient() -> None:
    images = _images(1, 60, 60).requires_grad_()
    # A small face hanging over the top-left corner: part of the aligned face lies outside the image.
    lm = (arcface_template() * 0.3 - 15)[None]
    out = align_faces(images, lm)
    assert ((out + 1).abs() < 1e-6).float().mean() > 0.3
    out.sum().backward()
    assert images.grad.abs().sum() > 0


def test_missing_faces_give_finite_crops() -> None:
    images = _images(2, 32, 32)
    assert torch.isfinite(crop_square(images, torch.zeros(2, 4))).all()
    assert torch.isfinite(align_faces(images, torch.zeros(2, 5, 2))).all()
