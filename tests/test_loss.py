"""training/loss.py on real photos with dlib's detector and classifier and tiny CLIP / DINOv2 / IResNet nets."""

from __future__ import annotations

import pytest
import torch
from _helpers_faces import astronaut
from _helpers_features import tiny_clip_dir, tiny_dino_dir, tiny_embedder_dir

from fairdiff_ray.config import FairDiffConfig, FeaturesConfig
from fairdiff_ray.core.losses import alignment_loss, box_mask
from fairdiff_ray.errors import ConfigError
from fairdiff_ray.models.classifiers import DlibAttributeClassifier
from fairdiff_ray.models.faces import DlibDetector, from_uint8
from fairdiff_ray.models.features import build_face_embedder, build_features
from fairdiff_ray.training.loss import FairnessLoss, build_loss, select_reference

FAR = (slice(None), 470, 470)  # a background pixel, far from the astronaut's face (box ~ x 170-280, y 60-170)



@pytest.fixture(scope="module")
def nets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("nets")
    dirs = {"clip": str(tiny_clip_dir(root)), "dino": str(tiny_dino_dir(root)),
            "face_embedder": str(tiny_embedder_dir(root))}
    return {
        "dirs": dirs,
        "detector": DlibDetector(),
        "classifier": DlibAttributeClassifier().requires_grad_(False),
        "features": build_features(FeaturesConfig(clip=dirs["clip"], dino=dirs["dino"])),
        "embedder": build_face_embedder(FeaturesConfig(face_embedder=dirs["face_embedder"])),
    }


@pytest.fixture(scope="module")
def photos() -> tuple[torch.Tensor, torch.Tensor]:
    """(ref, gen): the astronaut and a slightly recoloured copy (both (1, 3, 512, 512), same face)."""
    ref = from_uint8(astronaut())
    gen = (ref * 0.9 + 0.05 * torch.sin(torch.arange(512.0) / 7)).clamp(-1, 1)
    return ref, gen


def _cfg(**loss) -> FairDiffConfig:
    return FairDiffConfig(loss=loss)


def _make(nets, cfg, features=True, embedder=False, bank=None) -> FairnessLoss:
    return FairnessLoss(cfg, nets["detector"], nets["classifier"], nets["features"] if features else {},
                        face_embedder=nets["embedder"] if embedder else None, face_bank=bank)


def _grad(loss_fn, gen, ref, targets, normalizer=1, detach_logits=False):
    images = gen.clone().requires_grad_()
    scored = loss_fn.score(images.detach() if detach_logits else images)
    value, metrics = loss_fn(images, scored, loss_fn.reference(ref), targets, normalizer)
    value.backward()
    return value.detach(), metrics, images.grad[0], scored


def test_alignment_only_is_the_core_ce_and_stays_in_the_face_crop(nets, photos) -> None:
    ref, gen = photos
    fn = _make(nets, _cfg(), features=False)
    targets = {"gender": torch.tensor([1])}  # the astronaut is classified female: ask for male
    value, m, g, scored = _grad(fn, gen, ref, targets, normalizer=3)
    want, _ = alignment_loss({"gender": scored.logits["gender"].detach()}, targets, 3)
    torch.testing.assert_close(value, want)
    assert (m["active_align"], m["active_img"], m["active_face"]) == (1.0, 0.0, 0.0)
    assert m["confident_gender"] == 1.0 and m["face_found"] == 1.0
    assert g[FAR].abs().sum() == 0 and g.abs().sum() > 0


def test_no_targets_keeps_the_loss_connected_with_zero_gradient(nets, photos) -> None:
    ref, gen = photos
    fn = _make(nets, _cfg(), features=False)
    value, m, g, _ = _grad(fn, gen, ref, {"gender": torch.tensor([-1])})
    assert float(value) == 0.0 and g.abs().sum() == 0 and m["confident_gender"] == 0.0


def test_image_term_reaches_the_background(nets, photos) -> None:
    ref, gen = photos
    fn = _make(nets, _cfg())
    value, m, g, _ = _grad(fn, gen, ref, {"gender": torch.tensor([-1])})
    # no target where the original has a face: a mismatch (METHOD.md), the gender factor 0.2
    assert m["active_img"] == 1.0 and m["loss_img"] > 0 and m["img_weight"] == pytest.approx(0.2)
    torch.testing.assert_close(value, torch.tensor(8.0 * m["loss_img"]))  # lambda_img = 8, no CE
    assert g[FAR].abs().sum() > 0
    # lambda_img = 0 switches it off
    _, m0, g0, _ = _grad(_make(nets, _cfg(lambda_img=0.0)), gen, ref, {"gender": torch.tensor([-1])})
    assert m0["active_img"] == 0.0 and g0.abs().sum() == 0


def test_mismatch_weight_scales_the_image_term(nets, photos) -> None:
    ref, gen = photos
    kw = dict(detach_logits=True)
    _, m1, g1, _ = _grad(_make(nets, _cfg(mismatch_weight={"gender": 1.0})), gen, ref, {"gender": torch.tensor([1])}, **kw)
    _, m2, g2, _ = _grad(_make(nets, _cfg(mismatch_weight={"gender": 0.2})), gen, ref, {"gender": torch.tensor([1])}, **kw)
    assert m2["img_weight"] == pytest.approx(0.2) and m2["loss_img"] == pytest.approx(0.2 * m1["loss_img"], rel=1e-5)
    torch.testing.assert_close(g2, 0.2 * g1, atol=1e-9, rtol=1e-4)


def test_face_region_damping_scales_pixel_gradients_inside_the_box(nets, photos) -> None:
    ref, gen = photos
    male = {"gender": torch.tensor([1])}  # mismatch with the reference (female): damping applies
    base = dict(mismatch_weight={"gender": 1.0}, face_region_scale={"gender": 1.0})
    damp = dict(mismatch_weight={"gender": 1.0}, face_region_scale={"gender": 0.25})
    _, _, g1, scored = _grad(_make(nets, _cfg(**base)), gen, ref, male, detach_logits=True)
    _, _, g2, _ = _grad(_make(nets, _cfg(**damp)), gen, ref, male, detach_logits=True)
    fn = _make(nets, _cfg(**damp))
    region = fn.face_regions(scored.faces, fn.reference(ref)["faces"], 512, 512)
    inside = box_mask(region, 512, 512)[0, 0].expand(3, -1, -1)
    assert 5000 < inside[0].sum() < 100_000  # a face-sized region
    torch.testing.assert_close(g2[inside], 0.25 * g1[inside], atol=1e-9, rtol=1e-4)
    torch.testing.assert_close(g2[~inside], g1[~inside], atol=1e-9, rtol=1e-4)
    assert g1[inside].abs().sum() > 0
    # target equal to the original prediction: no damping
    _, _, g3, _ = _grad(fn, gen, ref, {"gender": torch.tensor([0])}, detach_logits=True)
    torch.testing.assert_close(g3, g1, atol=1e-9, rtol=1e-4)
    # loss.face_region: the square of the classifier's crop (default) or the box grown per side
    from fairdiff_ray.models.protocols import Faces

    wide = Faces(boxes=torch.tensor([[100.0, 100.0, 200.0, 150.0]]), scores=torch.ones(1),
                 landmarks=torch.zeros(1, 5, 2), found=torch.tensor([True]))
    sq = fn.face_regions(wide, wide, 512, 512)[0].tolist()
    bx = _make(nets, _cfg(**damp, face_region="box")).face_regions(wide, wide, 512, 512)[0].tolist()
    assert sq == [75.0, 50.0, 225.0, 200.0] and bx == [75.0, 87.5, 225.0, 162.5]


def test_face_term_targets_the_reference_or_the_bank(nets, photos) -> None:
    ref, gen = photos
    cfg = _cfg(lambda_face=1.0, face_confidence=0.5)
    fn = _make(nets, cfg, features=False, embedder=True)
    # unchanged + confident original: target = the original face's embedding -> zero for the same image
    value, m, _, _ = _grad(fn, ref, ref, {"gender": torch.tensor([0])}, detach_logits=True)
    assert m["active_face"] == 1.0 and m["face_ref"] == 1.0 and m["face_bank"] == 0.0
    assert m["loss_face"] == pytest.approx(0.0, abs=1e-5)
    # no confident target (-1): not held to the original face (METHOD.md), unless unconfident_as_match
    value, m, _, _ = _grad(fn, ref, ref, {"gender": torch.tensor([-1])}, detach_logits=True)
    assert m["face_ref"] == 0.0
    fm = _make(nets, _cfg(lambda_face=1.0, face_confidence=0.5, unconfident_as_match=True), features=False,
               embedder=True)
    value, m, _, _ = _grad(fm, ref, ref, {"gender": torch.tensor([-1])}, detach_logits=True)
    assert m["face_ref"] == 1.0
    # asked to change, no bank: no face target at all
    value, m, g, _ = _grad(fn, gen, ref, {"gender": torch.tensor([1])}, detach_logits=True)
    assert m["face_ref"] == 0.0 and m["face_bank"] == 0.0 and g.abs().sum() == 0
    # asked to change, with a bank: the nearest bank face
    bank = torch.nn.functional.normalize(torch.randn(4, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    fb = _make(nets, cfg, features=False, embedder=True, bank=bank)
    value, m, g, scored = _grad(fb, gen, ref, {"gender": torch.tensor([1])}, detach_logits=True)
    with torch.no_grad():
        e = fb._embed(gen, scored.faces)
    assert m["face_bank"] == 1.0
    assert m["loss_face"] == pytest.approx(float(1 - (e @ bank.T).max()), abs=1e-5)
    assert float(value) == pytest.approx(m["loss_align"] + m["loss_face"], rel=1e-5)
    assert g.abs().sum() > 0 and g[FAR].abs().sum() == 0  # only the aligned face region


def test_normalizer_semantics_workers_sum_to_the_global_mean(nets, photos) -> None:
    ref, gen = photos
    refs, gens = torch.cat([ref, ref.flip(-1)]), torch.cat([gen, gen.flip(-1)])
    targets = {"gender": torch.tensor([1, 0])}
    fn = _make(nets, _cfg(), embedder=True, bank=torch.eye(32)[:3])

    def run(g, r, t, n):
        v, _ = fn(g, fn.score(g), fn.reference(r), t, n)
        return float(v)

    whole = run(gens, refs, targets, 2)
    halves = sum(run(gens[i : i + 1], refs[i : i + 1], {"gender": targets["gender"][i : i + 1]}, 2) for i in range(2))
    assert whole == pytest.approx(halves, rel=1e-4)
    assert run(gens, refs, targets, 4) == pytest.approx(whole / 2, rel=1e-5)
    # one reference per step, sliced per chunk, gives the same chunk losses
    ref_all, scored_all = fn.reference(refs), fn.score(gens)
    chunks = sum(float(fn(gens[i : i + 1], scored_all.select(slice(i, i + 1)), select_reference(ref_all, slice(i, i + 1)),
                          {"gender": targets["gender"][i : i + 1]}, 2)[0]) for i in range(2))
    assert chunks == pytest.approx(halves, rel=1e-4)
    with pytest.raises(ValueError, match="normalizer"):
        run(gens, refs, targets, 0)


def test_images_without_a_face_get_no_targets(nets, photos) -> None:
    ref, gen = photos
    blank = torch.zeros_like(gen)
    fn = _make(nets, _cfg(), features=False)
    value, m, g, _ = _grad(fn, blank, ref, {"gender": torch.tensor([1])})
    assert m["face_found"] == 0.0 and m["confident_gender"] == 0.0 and float(value) == 0.0


def test_lost_face_weight_scales_the_image_term_of_a_lost_face_only(nets, photos) -> None:
    """An image whose face the detector no longer finds (the original has one) gets lost_face_weight x its
    weight w_i (no target where the original has a face: the gender factor 0.2)."""
    ref, gen = photos
    blank = torch.zeros_like(gen)
    no = {"gender": torch.tensor([-1])}
    _, m1, g1, _ = _grad(_make(nets, _cfg()), blank, ref, no)
    _, m4, g4, _ = _grad(_make(nets, _cfg(lost_face_weight=4.0)), blank, ref, no)
    assert m1["lost_faces"] == m4["lost_faces"] == 1.0
    assert m1["img_weight"] == pytest.approx(0.2) and m4["img_weight"] == pytest.approx(0.8)
    assert m4["loss_img"] == pytest.approx(4 * m1["loss_img"], rel=1e-5)
    torch.testing.assert_close(g4, 4 * g1, atol=1e-9, rtol=1e-4)
    # a face still found: the weight does not apply
    _, m_kept, _, _ = _grad(_make(nets, _cfg(lost_face_weight=4.0)), gen, ref, no)
    assert m_kept["lost_faces"] == 0.0 and m_kept["img_weight"] == pytest.approx(0.2)


def test_build_loss_from_config(nets, tmp_path) -> None:
    d = nets["dirs"]
    cfg = FairDiffConfig(faces={"detector": "dlib"}, classifier={"kind": "dlib"},
                         features={"clip": d["clip"], "face_embedder": d["face_embedder"]})
    fn = build_loss(cfg)
    assert fn.attributes == ["gender"] and list(fn.features) == ["clip"]
    assert fn.use_img and fn.use_face and fn.face_bank is None
    bad = FairDiffConfig(classifier={"kind": "dlib"}, faces={"detector": "dlib"},
                         target={"gender": {"classes": ["male", "female"], "probs": [0.5, 0.5]}})
    with pytest.raises(ConfigError, match="target.gender"):
        build_loss(bad)
    no_factor = FairDiffConfig(classifier={"kind": "dlib"}, faces={"detector": "dlib"},
                               loss={"mismatch_weight": {"race": 0.6}})
    with pytest.raises(ConfigError, match="loss.mismatch_weight.gender"):
        build_loss(no_factor)



def test_activation_checkpointing_gives_the_same_gradients(nets, photos) -> None:
    ref, gen = photos
    t = {"gender": torch.tensor([1])}
    plain = _make(nets, _cfg(), embedder=True, bank=torch.eye(32)[:3])
    ckpt = _make(nets, _cfg(), embedder=True, bank=torch.eye(32)[:3])
    ckpt.checkpoint = True
    v1, _, g1, _ = _grad(plain, gen, ref, t)
    v2, _, g2, _ = _grad(ckpt, gen, ref, t)
    torch.testing.assert_close(v2, v1)
    torch.testing.assert_close(g2, g1)


def test_full_loss_on_the_synthetic_world() -> None:
    _need_synthetic_nets()
    from fairdiff_ray.synthetic.render import render

    n = 8
    zeros, faces = torch.zeros(n, dtype=torch.long).numpy(), torch.arange(n).numpy() < 6
    ref = render(zeros, zeros, zeros, zeros, seed=3, face=faces)["images"]  # female; two rows without a face
    gen = render(zeros + 1, zeros, zeros, zeros, seed=3, face=faces)["images"]  # the same scenes, male
    fn = build_loss(FairDiffConfig(features={"synthetic": "default"}))
    assert list(fn.features) == ["synthetic"] and fn.use_img and not fn.use_face
    r = fn.reference(ref)
    assert (r["labels"]["gender"][:6] == 0).float().mean() >= 0.75 and (r["labels"]["gender"][6:] == -1).all()
    images = gen.clone().requires_grad_()
    scored = fn.score(images)
    assert (scored.probs["gender"][:6].argmax(-1) == 1).float().mean() >= 0.75
    targets = {"gender": torch.tensor([0, 1] * 4)}
    loss, m = fn(images, scored, r, targets, normalizer=2 * n)
    loss.backward()
    assert m["active_img"] == 1.0 and m["loss_img"] > 0 and 0.6 <= m["face_found"] <= 0.75
    assert m["confident_gender"] == pytest.approx(m["face_found"])  # rows without a face lose their target
    assert torch.isfinite(images.grad).all() and images.grad[6:].abs().sum() > 0  # L_img reaches faceless rows


def _need_synthetic_nets() -> None:
    world = pytest.importorskip("fairdiff_ray.synthetic.world")
    if not (world.DEFAULT_DIR / "detector.safetensors").is_file():
        pytest.skip("the synthetic world's shipped nets are not built yet")


def test_presence_term_pulls_a_lost_face_back_and_needs_a_differentiable_detector(nets) -> None:
    """lambda_presence: -log P(face) from the synthetic detector on images whose original has a face."""
    _need_synthetic_nets()
    from fairdiff_ray.synthetic.render import render

    n = 4
    zeros = torch.zeros(n, dtype=torch.long).numpy()
    ref = render(zeros, zeros, zeros, zeros, seed=5, face=torch.arange(n).numpy() < 2)["images"]  # faces in rows 0-1
    gen = render(zeros, zeros, zeros, zeros, seed=5, face=torch.zeros(n, dtype=torch.bool).numpy())["images"]
    no = {"gender": torch.full((n,), -1)}

    def run(lam: float):
        fn = build_loss(FairDiffConfig(loss={"lambda_presence": lam, "lambda_img": 0.0}))
        images = gen.clone().requires_grad_()
        value, m = fn(images, fn.score(images), fn.reference(ref), no, normalizer=n)
        value.backward()
        return value.detach(), m, images.grad

    v0, m0, g0 = run(0.0)
    assert float(v0) == 0.0 and "loss_presence" not in m0 and g0.abs().sum() == 0
    v2, m2, g2 = run(2.0)
    assert m2["face_found"] == 0.0 and m2["loss_presence"] > 0.69 / 2  # two lost faces, P(face) < 0.5 each
    torch.testing.assert_close(v2, torch.tensor(2.0 * m2["loss_presence"]))
    assert g2[:2].abs().sum() > 0 and g2[2:].abs().sum() == 0  # only where the original had a face
    # a step along -grad makes the detector more sure there is a face
    det = build_loss(FairDiffConfig()).detector
    with torch.no_grad():
        before = det.presence_logit(gen[:2])
        after = det.presence_logit((gen[:2] - 0.05 * g2[:2] / g2[:2].abs().max()).clamp(-1, 1))
    assert (after > before).all()
    with pytest.raises(ConfigError, match="lambda_presence"):
        FairnessLoss(FairDiffConfig(loss={"lambda_presence": 1.0}), nets["detector"], nets["classifier"], {})

    # presence_on=all: every image, no original needed (a step then samples no reference chain)
    fn = build_loss(FairDiffConfig(loss={"lambda_presence": 2.0, "lambda_img": 0.0, "presence_on": "all"}))
    assert not fn.needs_reference
    images = gen.clone().requires_grad_()
    v_all, m_all = fn(images, fn.score(images), None, no, normalizer=n)
    v_all.backward()
    assert (images.grad.flatten(1).abs().sum(1) > 0).all()  # all four rows, with or without an original face
    assert m_all["loss_presence"] > m2["loss_presence"]  # twice the images
    # the same images, reference mode, every original with a face: the same value
    ref_all = render(zeros, zeros, zeros, zeros, seed=5, face=torch.ones(n, dtype=torch.bool).numpy())["images"]
    fn_ref = build_loss(FairDiffConfig(loss={"lambda_presence": 2.0, "lambda_img": 0.0}))
    assert fn_ref.needs_reference
    v_ref, _ = fn_ref(gen, fn_ref.score(gen), fn_ref.reference(ref_all), no, normalizer=n)
    torch.testing.assert_close(v_ref, v_all.detach())
    with pytest.raises(ValueError, match="ref is None"):
        fn_ref(gen, fn_ref.score(gen), None, no, normalizer=n)


def test_preserve_term_holds_unaligned_attributes_at_the_original_class() -> None:
    """loss.preserve: CE of the generated face's race / age towards the original image's predicted class."""
    _need_synthetic_nets()
    from fairdiff_ray.synthetic.render import render

    n = 4
    zeros = torch.zeros(n, dtype=torch.long).numpy()
    ref = render(zeros, zeros + 1, zeros, zeros, seed=7)["images"]  # black skin
    gen = render(zeros, zeros, zeros, zeros, seed=7)["images"]  # white skin, same everything else
    no = {"gender": torch.full((n,), -1)}

    def run(**loss):
        fn = build_loss(FairDiffConfig(loss={"lambda_img": 0.0, **loss}))
        images = gen.clone().requires_grad_()
        value, m = fn(images, fn.score(images), fn.reference(ref), no, normalizer=n)
        value.backward()
        return fn, value.detach(), m, images.grad

    _, v0, m0, g0 = run()
    assert float(v0) == 0.0 and "loss_preserve" not in m0 and g0.abs().sum() == 0
    fn, v1, m1, g1 = run(preserve=["race"])
    assert fn.reference(ref)["labels"]["race"].tolist() == [1] * n  # the original's class is the target
    assert m1["preserve_confident_race"] == 1.0 and m1["loss_preserve"] > 0.69  # gen is confidently white
    torch.testing.assert_close(v1, torch.tensor(m1["loss_preserve"]))
    _, v2, m2, _ = run(preserve=["race"], lambda_preserve=2.0)
    torch.testing.assert_close(v2, 2 * v1)
    with torch.no_grad():  # a step along -grad makes the generated faces more "black" to the classifier
        before = torch.softmax(fn.score(gen).kept["race"], -1)[:, 1]
        after = torch.softmax(fn.score((gen - 0.05 * g1 / g1.abs().max()).clamp(-1, 1)).kept["race"], -1)[:, 1]
    assert (after > before).all()
    for bad, why in ((["gender"], "is aligned by the target"), (["mood"], "is not predicted by the classifier")):
        with pytest.raises(ConfigError, match=f"loss.preserve: '{bad[0]}' {why}"):
            build_loss(FairDiffConfig(loss={"preserve": bad}))


def test_detail_term_penalises_a_blurred_image_against_its_sharp_original() -> None:
    """loss.lambda_detail: |log E(x_i) - log E(o_i)| of the fine-detail energy, on every image."""
    _need_synthetic_nets()
    from fairdiff_ray.core.losses import detail_energy
    from fairdiff_ray.synthetic.render import render

    n = 4
    zeros = torch.zeros(n, dtype=torch.long).numpy()
    ref = render(zeros, zeros, zeros, zeros, seed=3)["images"]
    gen = torch.nn.functional.avg_pool2d(ref, 3, 1, 1, count_include_pad=False)  # the original, blurred
    no = {"gender": torch.full((n,), -1)}
    fn = build_loss(FairDiffConfig(loss={"lambda_img": 0.0, "lambda_detail": 3.0}))
    r = fn.reference(ref)
    torch.testing.assert_close(select_reference(r, slice(1, 3))["detail"], detail_energy(ref)[1:3])
    images = gen.clone().requires_grad_()
    value, m = fn(images, fn.score(images), r, no, normalizer=n)
    value.backward()
    want = (torch.log(detail_energy(gen) + 1e-6) - torch.log(detail_energy(ref) + 1e-6)).abs().mean()
    torch.testing.assert_close(torch.tensor(m["loss_detail"]), want)
    torch.testing.assert_close(value, 3.0 * want)
    assert images.grad.abs().sum() > 0
    same, _ = fn(ref.clone(), fn.score(ref), r, no, normalizer=n)  # the original itself costs nothing
    assert float(same) < 1e-5
    assert fn.reference(ref)["detail"] is not None and build_loss(FairDiffConfig()).reference(ref)["detail"] is None
