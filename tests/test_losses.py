"""Pure loss pieces (core/losses.py): alignment CE, weights, gradient scaling in face boxes, box helpers."""

import math

import pytest
import torch
import torch.nn.functional as F

from fairdiff_ray.core.losses import (
    alignment_loss,
    box_intersection,
    cosine_distance,
    expand_boxes,
    mismatch_weights,
    scale_grad_in_boxes,
)

NAN4 = [math.nan] * 4


def test_alignment_loss_hand_value_and_masking():
    g = torch.Generator().manual_seed(0)
    logits = {
        "gender": torch.randn(4, 2, generator=g, requires_grad=True),
        "race": torch.randn(4, 4, generator=g),
    }
    targets = {"gender": torch.tensor([0, -1, 1, 1]), "race": torch.tensor([-1, -1, 3, -1])}
    loss, metrics = alignment_loss(logits, targets)
    ce_g = F.cross_entropy(logits["gender"][[0, 2, 3]], torch.tensor([0, 1, 1]), reduction="sum")
    ce_r = F.cross_entropy(logits["race"][[2]], torch.tensor([3]), reduction="sum")
    assert loss.item() == pytest.approx(((ce_g + ce_r) / 4).item(), rel=1e-6)
    assert metrics["confident_gender"] == 0.75 and metrics["confident_race"] == 0.25
    assert metrics["ce_race"] == pytest.approx(ce_r.item(), rel=1e-6)
    loss.backward()
    assert torch.equal(logits["gender"].grad[1], torch.zeros(2))  # no target, no gradient
    assert logits["gender"].grad[0].abs().sum() > 0


def test_alignment_loss_data_parallel_sum_is_exact():
    # two workers with their halves and the global N give the same loss as one process with all images
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 2, generator=g)
    y = torch.tensor([0, 1, -1, 1, 0, -1])
    whole, _ = alignment_loss({"gender": z}, {"gender": y})
    halves = [
        alignment_loss({"gender": z[s]}, {"gender": y[s]}, normalizer=6)[0]
        for s in (slice(0, 3), slice(3, 6))
    ]
    assert (halves[0] + halves[1]).item() == pytest.approx(whole.item(), rel=1e-6)


def test_alignment_loss_without_targets_is_zero_but_connected():
    z = torch.randn(3, 2, requires_grad=True)
    loss, metrics = alignment_loss({"gender": z}, {"gender": torch.full((3,), -1)})
    assert loss.item() == 0.0 and metrics["ce_gender"] == 0.0
    loss.backward()
    assert z.grad is not None and torch.equal(z.grad, torch.zeros(3, 2))


def test_alignment_loss_rejects_misuse():
    z = torch.randn(3, 2)
    with pytest.raises(ValueError):
        alignment_loss({"gender": z}, {"race": torch.zeros(3, dtype=torch.long)})
    with pytest.raises(ValueError):
        alignment_loss({"gender": z}, {"gender": torch.tensor([0, 2, 1])})
    with pytest.raises(ValueError):
        alignment_loss({"gender": z}, {"gender": torch.zeros(2, dtype=torch.long)})
    with pytest.raises(ValueError):
        alignment_loss({"gender": z}, {"gender": torch.zeros(3, dtype=torch.long)}, normalizer=0)


def test_cosine_distance():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    b = torch.tensor([[3.0, 0.0], [-1.0, -1.0], [0.0, 5.0]])
    assert cosine_distance(a, b).tolist() == pytest.approx([0.0, 2.0, 1.0])
    with pytest.raises(ValueError):
        cosine_distance(a, b[:2])


def test_mismatch_weights():
    factors = {"gender": 0.2, "race": 0.6}
    targets = {"gender": torch.tensor([0, 1, 0, -1, 1, -1, -1]), "race": torch.tensor([2, 2, 1, 3, -1, 2, -1])}
    ref = {"gender": torch.tensor([0, 0, 0, 1, -1, 0, -1]), "race": torch.tensor([2, 2, 0, 0, 1, 2, -1])}
    # match; gender differs; race differs; no gender target (original: a face) + race differs; gender target but
    # no face before; no gender target (unconfident) + race matches; no face in either image
    assert mismatch_weights(targets, ref, factors).tolist() == pytest.approx([1.0, 0.2, 0.6, 0.2, 0.2, 0.2, 1.0])
    # the previous rule: a -1 target counts as a match
    assert mismatch_weights(targets, ref, factors, unconfident_as_match=True).tolist() == pytest.approx(
        [1.0, 0.2, 0.6, 0.6, 0.2, 1.0, 1.0])
    with pytest.raises(ValueError, match="mismatch_weight.race"):
        mismatch_weights(targets, ref, {"gender": 0.2})


def test_scale_grad_in_boxes_identity_forward_scaled_backward():
    images = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    boxes = torch.tensor([[1.0, 2.0, 4.0, 5.0], NAN4], dtype=torch.float64)
    out = scale_grad_in_boxes(images, boxes, torch.tensor([0.25, 0.5]))
    assert torch.equal(out, images)
    out.sum().backward()
    expected = torch.ones(2, 3, 8, 8, dtype=torch.float64)
    expected[0, :, 2:5, 1:4] = 0.25  # image[y0:y1, x0:x1]; the NaN box of image 1 scales nothing
    assert torch.equal(images.grad, expected)


def test_scale_grad_in_boxes_partial_pixels_and_none_rows():
    images = torch.zeros(2, 3, 6, 6, requires_grad=True)
    out = scale_grad_in_boxes(images, [torch.tensor([0.5, 0.5, 2.2, 1.0]), None], torch.tensor([0.0, 0.0]))
    out.sum().backward()
    touched = images.grad[0, 0] == 0
    assert touched[0, :3].all() and touched.sum() == 3  # pixels (x 0..2, y 0) touched by the fractional box
    assert (images.grad[1] == 1).all()
    with pytest.raises(ValueError):
        scale_grad_in_boxes(images, torch.zeros(3, 4), torch.ones(2))


def test_box_intersection_and_expand():
    a = torch.tensor([[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 1.0, 1.0], NAN4])
    b = torch.tensor([[2.0, 1.0, 6.0, 3.0], [2.0, 2.0, 3.0, 3.0], [0.0, 0.0, 1.0, 1.0]])
    inter = box_intersection(a, b)
    assert inter[0].tolist() == [2.0, 1.0, 4.0, 3.0]
    assert (inter[1, 2:] - inter[1, :2]).tolist() == [0.0, 0.0]  # disjoint: empty box
    assert torch.isnan(inter[2]).all()
    grown = expand_boxes(torch.tensor([[2.0, 2.0, 6.0, 4.0], [0.0, 0.0, 2.0, 2.0]]), 0.5, height=8, width=7)
    assert grown[0].tolist() == [1.0, 0.0, 7.0, 6.0]  # a square of side 4 x 1.5 about the centre (4, 3)
    per_side = expand_boxes(torch.tensor([[2.0, 2.0, 6.0, 4.0]]), 0.5, height=8, width=7, square=False)
    assert per_side[0].tolist() == [1.0, 1.5, 7.0, 4.5]  # loss.face_region: box
    assert grown[1].tolist() == [0.0, 0.0, 2.5, 2.5]  # clipped at the image edge
    with pytest.raises(ValueError):
        expand_boxes(grown, -1.0, 8, 8)


def test_detail_energy_falls_with_blur_and_detail_loss_is_zero_at_the_original() -> None:
    from fairdiff_ray.core.losses import detail_energy, detail_loss

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    blur = torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    e, eb = detail_energy(x), detail_energy(blur)
    assert e.shape == (3,) and (eb < 0.5 * e).all()
    assert torch.allclose(detail_energy(torch.full((2, 1, 8, 8), 0.3)), torch.zeros(2))  # flat: no detail
    torch.testing.assert_close(detail_loss(x, e), torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(detail_loss(blur, e), (torch.log(eb + 1e-6) - torch.log(e + 1e-6)).abs())
    b = blur.clone().requires_grad_()
    detail_loss(b, e).sum().backward()
    with torch.no_grad():  # a step along -grad sharpens
        assert (detail_energy(b - 0.05 * b.grad / b.grad.abs().max()) > eb).all()
    with pytest.raises(ValueError, match="detail_energy needs"):
        detail_energy(torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match="does not match"):
        detail_loss(x, e[:2])
