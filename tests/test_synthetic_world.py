"""The synthetic world's shipped nets (assets/synthetic-nets) behind the model protocols, on fresh renders."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fairdiff_ray.config import ClassifierConfig, FacesConfig, FeaturesConfig
from fairdiff_ray.errors import ModelFileError
from fairdiff_ray.models.classifiers import build_classifier, classify_images
from fairdiff_ray.models.faces import build_detector
from fairdiff_ray.models.features import build_features
from fairdiff_ray.models.protocols import AttributeClassifier, FaceDetector, ImageFeatures
from fairdiff_ray.synthetic import world
from fairdiff_ray.synthetic.nets import augment
from fairdiff_ray.synthetic.render import ATTRIBUTES, N_CONTENT, render, sample_batch
from fairdiff_ray.synthetic.train_nets import TrainSpec, box_iou, train_all
from fairdiff_ray.synthetic.vocab import subjects

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("detector", "classifier-train", "classifier-eval", "features", "features-eval", "fidelity")


def _renders(n: int, seed: int, size: int = 32, face_prob: float = 1.0) -> tuple[dict, dict]:
    a = sample_batch(n, seed, face_prob=face_prob)
    return a, render(a["gender"], a["race"], a["age"], a["content"], seed=seed + 1000, size=size, face=a["face"])


@pytest.fixture(scope="module")
def fresh() -> tuple[dict, dict]:
    return _renders(240, seed=987_654)  # a seed the training pools (stable_seed-derived) do not use


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return world.load_detector()


def test_shipped_files_load_small_and_frozen() -> None:
    for name in NAMES:
        weights = world.DEFAULT_DIR / f"{name}.safetensors"
        assert weights.stat().st_size < 2_000_000, name
        assert json.loads(weights.with_suffix(".json").read_text())["arch"]["name"] == name
    nets = {
        "detector": world.load_detector(),
        "classifier-train": world.load_classifier(),
        "classifier-eval": world.load_classifier(variant="eval"),
        "features": world.load_features(),
        "features-eval": world.load_features(name="features-eval"),
        "fidelity": world.load_fidelity(),
    }
    assert isinstance(nets["detector"], FaceDetector)
    for v in ("classifier-train", "classifier-eval"):
        c = nets[v]
        assert isinstance(c, AttributeClassifier)
        assert c.attributes == ATTRIBUTES and c.input_size == 32 and c.crop_expand == 0.5
    for v in ("features", "features-eval"):
        assert isinstance(nets[v], ImageFeatures) and nets[v].name == "synthetic"
    for net in nets.values():
        assert not net.training and not any(p.requires_grad for p in net.parameters())
    # METHOD.md 6: the eval-time classifier and feature net are different nets, not copies.
    assert nets["classifier-train"].arch["widths"] != nets["classifier-eval"].arch["widths"]
    assert nets["features"].arch["widths"] != nets["features-eval"].arch["widths"]


def test_detector_boxes_landmarks_and_no_faces(detector: FaceDetector, fresh) -> None:
    _, r = fresh
    images = r["images"].clone().requires_grad_(True)
    faces = detector.detect(images)
    assert not faces.boxes.requires_grad and faces.found.dtype == torch.bool
    assert faces.found.all()
    iou = box_iou(faces.boxes, r["boxes"])
    assert (iou > 0.7).float().mean() > 0.95
    assert (faces.landmarks - r["landmarks"]).norm(dim=-1).mean() < 1.0
    # the same scenes without a face: nothing found, rows are zeros
    a, _ = fresh
    empty = render(a["gender"], a["race"], a["age"], a["content"], seed=987_654 + 1000, face=np.zeros(240, bool))
    none = detector.detect(empty["images"])
    assert none.found.float().mean() <= 0.01
    assert (none.boxes[~none.found] == 0).all()


def test_detector_ignores_noise_and_scrambled_portraits(detector: FaceDetector, fresh) -> None:
    g = torch.Generator().manual_seed(123)
    noise = (torch.randn(100, 3, 32, 32, generator=g) * torch.linspace(0.1, 1.5, 100).view(-1, 1, 1, 1)).clamp(-1, 1)
    assert detector.detect(noise).found.float().mean() <= 0.02
    _, r = fresh
    scrambled = r["images"].flatten(2)[:, :, torch.randperm(1024, generator=g)].view_as(r["images"])
    assert detector.detect(scrambled).found.float().mean() <= 0.02


def test_detector_other_sizes_and_corruption(detector: FaceDetector) -> None:
    _, r = _renders(64, seed=4242, size=64)  # the same geometry at twice the resolution
    faces = detector.detect(r["images"])
    assert faces.found.all() and (box_iou(faces.boxes, r["boxes"]) > 0.7).float().mean() > 0.95
    _, r = _renders(128, seed=77)
    faces = detector.detect(augment(r["images"], torch.Generator().manual_seed(0)))
    assert (faces.found & (box_iou(faces.boxes, r["boxes"]) > 0.7)).float().mean() > 0.9


@pytest.mark.parametrize("variant", ["train", "eval"])
def test_classifier_accuracy_through_detect_crop_classify(detector, fresh, variant: str) -> None:
    a, r = fresh
    clf = world.load_classifier(variant=variant)
    faces, logits = classify_images(r["images"], detector, clf)
    assert faces.found.all()
    for attr, names in ATTRIBUTES.items():
        assert logits[attr].shape == (240, len(names))
        acc = (logits[attr].argmax(-1).numpy() == a[attr]).mean()
        assert acc > 0.95, (variant, attr, acc)


def test_classifier_logits_carry_gradients_to_pixels(detector, fresh) -> None:
    _, r = fresh
    images = r["images"][:8].clone().requires_grad_(True)
    faces, logits = classify_images(images, detector, world.load_classifier())
    logits["gender"][:, 0].sum().backward()
    g = images.grad.abs().sum(1)  # (B, H, W)
    assert torch.isfinite(g).all() and (g.flatten(1).sum(1) > 0).all()
    # the gradient lives in the face crop: pixels far outside the expanded box get none
    b = faces.boxes[0]
    side = float(torch.maximum(b[2] - b[0], b[3] - b[1])) * 1.5
    cx, cy = float(b[0] + b[2]) / 2, float(b[1] + b[3]) / 2
    yy, xx = torch.meshgrid(torch.arange(32) + 0.5, torch.arange(32) + 0.5, indexing="ij")
    outside = ((xx - cx).abs() > side / 2 + 1) | ((yy - cy).abs() > side / 2 + 1)
    if outside.any():
        assert g[0][outside].max() == 0


@pytest.mark.parametrize("name", ["features", "features-eval"])
def test_features_normalised_differentiable_and_semantic(name: str) -> None:
    net = world.load_features(name=name)
    n = 96
    a = sample_batch(n, 31)
    content = np.repeat(np.arange(4), n // 4)
    r = render(a["gender"], a["race"], a["age"], content, seed=32)
    x = r["images"].clone().requires_grad_(True)
    e = net(x)
    assert e.shape[0] == n and e.ndim == 2
    assert torch.allclose(e.norm(dim=-1), torch.ones(n), atol=1e-5)
    e[:, 0].sum().backward()
    assert x.grad.abs().sum() > 0
    sim = (e @ e.T).detach()
    same = torch.from_numpy(content[:, None] == content[None, :]) & ~torch.eye(n, dtype=torch.bool)
    assert sim[same].mean() > sim[~same.logical_or(torch.eye(n, dtype=torch.bool))].mean() + 0.1


def test_fidelity_and_content_class() -> None:
    net = world.load_fidelity()
    a, r = _renders(200, seed=555)
    logits = net(r["images"])
    assert logits.shape == (200, N_CONTENT)
    assert (logits.argmax(-1).numpy() == a["content"]).mean() > 0.95
    s = subjects("occupations")[0]
    assert world.content_class(s.prompt) == s.content


def test_built_from_config() -> None:
    det = build_detector(FacesConfig(detector="synthetic"))
    clf = build_classifier(ClassifierConfig(kind="synthetic", variant="eval"))
    assert isinstance(det, FaceDetector) and clf.arch["name"] == "classifier-eval"
    assert build_classifier(ClassifierConfig(kind="synthetic")).arch["name"] == "classifier-train"
    assert set(build_features(FeaturesConfig(synthetic="default"))) == {"synthetic"}
    # "default" = the training's feature net, "eval" = the evaluation-time one, a path = that directory's or file's
    assert build_features(FeaturesConfig(synthetic="default"))["synthetic"].arch["name"] == "features"
    assert build_features(FeaturesConfig(synthetic="eval"))["synthetic"].arch["name"] == "features-eval"
    eval_file = str(world.DEFAULT_DIR / "features-eval.safetensors")
    assert build_features(FeaturesConfig(synthetic=eval_file))["synthetic"].arch["name"] == "features-eval"
    # a path may name the directory or the weights file itself
    assert world.load_classifier(str(world.DEFAULT_DIR / "classifier-eval.safetensors")).arch["name"] == "classifier-eval"


def test_missing_or_broken_weights_are_one_line_errors(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(ModelFileError, match=r"detector\.safetensors.*python jobs/train_synthetic_nets\.py"):
        world.load_detector(str(tmp_path))
    (tmp_path / "fidelity.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "fidelity.json").write_text(json.dumps({"arch": {"name": "fidelity"}}))
    with pytest.raises(ModelFileError, match="does not load") as e:
        world.load_fidelity(str(tmp_path))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="variant"):
        world.load_classifier(variant="test")
    with pytest.raises(ValueError, match="features-eval"):
        world.load_features(name="classifier-train")
    # a nets directory from before the eval-time feature net: the preflight names the command that adds it
    from fairdiff_ray.preflight import _check_features

    monkeypatch.setattr(world, "DEFAULT_DIR", tmp_path)
    with pytest.raises(ModelFileError, match=r"eval\.features\.synthetic: .*features-eval\.safetensors is missing; "
                                             r"train it .* --only features-eval") as e:
        _check_features(FeaturesConfig(synthetic="eval"), "eval.features")
    assert "\n" not in str(e.value)


def _weights(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.safetensors"))}


def test_training_is_seeded_and_the_job_writes_everything(tmp_path: Path) -> None:
    spec = TrainSpec(scale=0.004, test=5000)  # a few renders and steps: this checks plumbing, not accuracy
    train_all(tmp_path / "a", spec, log=lambda _: None)
    train_all(tmp_path / "b", spec, log=lambda _: None)
    assert _weights(tmp_path / "a") == _weights(tmp_path / "b") and len(_weights(tmp_path / "a")) == 6
    job = importlib.util.spec_from_file_location("job", ROOT / "jobs" / "train_synthetic_nets.py")
    mod = importlib.util.module_from_spec(job)
    job.loader.exec_module(mod)
    out = tmp_path / "job"
    assert mod.main(["--out", str(out), "--scale", "0.004"]) == 0
    assert {p.name for p in out.iterdir()} >= {f"{n}.safetensors" for n in NAMES} | {"metrics.json", "CARD.md"}
    world.load_classifier(str(out), variant="eval")  # what the job wrote loads
    with pytest.raises(Exception, match="already exists"):
        mod.main(["--out", str(out), "--scale", "0.004"])


def test_measured_on_the_synthetic_sd(tmp_path: Path) -> None:
    sd = ROOT / "assets" / "synthetic-sd"
    if not (sd / "model_index.json").is_file():
        pytest.skip("assets/synthetic-sd is not built")
    from fairdiff_ray.synthetic.train_nets import measure_on_model, write_card

    m = measure_on_model(sd, prompts=2, per_prompt=3, steps=8)
    assert m["images"] == 6 and 0 <= m["face_rate"] <= 1
    assert set(ATTRIBUTES) <= set(m) and all(0 <= m[a]["agreement"] <= 1 for a in ATTRIBUTES)
    for f in world.DEFAULT_DIR.glob("*.safetensors"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    metrics = json.loads((world.DEFAULT_DIR / "metrics.json").read_text())
    card = write_card(tmp_path, metrics, m).read_text()
    assert "## On images generated by" in card and "face rate" in card


def test_gender_blends_get_soft_labels_and_only_retrains_one_classifier(tmp_path: Path) -> None:
    from fairdiff_ray.synthetic.nets import blend_labels, build_net, classifier_loss, render_pool

    pool = render_pool(64, "blend-test")
    flipped = render_pool(64, "blend-test", flip_gender=True)
    assert torch.equal(flipped.labels["gender"], 1 - pool.labels["gender"])
    assert torch.equal(flipped.labels["race"], pool.labels["race"]) and torch.equal(flipped.boxes, pool.boxes)
    assert not torch.equal(flipped.images, pool.images)  # the hair differs, the scene does not
    det = world.load_detector()
    clf = build_net("classifier-train", 0)
    loss = classifier_loss(clf.net, pool, det, clf.crop_expand, batch=8, flipped=flipped, gender_mix=1.0)
    value, parts = loss(torch.Generator().manual_seed(0))
    assert torch.isfinite(value) and set(parts) == set(ATTRIBUTES)
    soft = blend_labels(torch.tensor([0, 1, 0]), torch.tensor([1.0, 0.25, 0.6]))
    torch.testing.assert_close(soft, torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.6, 0.4]]))  # a on the render's own class
    hard, _ = classifier_loss(clf.net, pool, det, clf.crop_expand, batch=8)(torch.Generator().manual_seed(0))
    assert float(value) != pytest.approx(float(hard))  # the blends are other images with other labels
    with pytest.raises(ValueError, match="gender_mix needs"):
        classifier_loss(clf.net, pool, det, clf.crop_expand, gender_mix=0.5)
    # --only retrains one classifier in an existing directory, the others stay byte for byte
    job = importlib.util.spec_from_file_location("job", ROOT / "jobs" / "train_synthetic_nets.py")
    mod = importlib.util.module_from_spec(job)
    job.loader.exec_module(mod)
    out = tmp_path / "nets"
    assert mod.main(["--out", str(out), "--scale", "0.004"]) == 0
    before = _weights(out)
    assert mod.main(["--out", str(out), "--scale", "0.004", "--only", "classifier-train"]) == 0
    after = _weights(out)
    assert {k for k in before if before[k] != after[k]} <= {"classifier-train.safetensors"}
    assert json.loads((out / "classifier-train.json").read_text())["gender_mix"] == 0.5
    assert json.loads((out / "classifier-eval.json").read_text())["gender_mix"] == 0.0
    assert "classifier-train" in json.loads((out / "metrics.json").read_text())
    # and one feature net: the eval-time one, into a directory trained before it existed
    for f in out.glob("features-eval.*"):
        f.unlink()
    metrics = json.loads((out / "metrics.json").read_text())
    metrics.pop("features-eval")
    (out / "metrics.json").write_text(json.dumps(metrics))
    assert mod.main(["--out", str(out), "--scale", "0.004", "--only", "features-eval"]) == 0
    again = _weights(out)
    assert {k for k in again if again.get(k) != after.get(k)} == set()  # same seed: the same net, others untouched
    assert "features-eval" in json.loads((out / "metrics.json").read_text())
    assert world.load_features(str(out), "features-eval").arch["name"] == "features-eval"
