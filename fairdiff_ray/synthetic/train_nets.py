"""Train, measure and save all of the synthetic world's nets (``python jobs/train_synthetic_nets.py``).

Order matters: the detector first, because the classifiers are trained on crops of its boxes. The eval-time
classifier sees its own renders (a separate pool) and its own seed. Every number measured here is on fresh
renders that no net was trained on, and is saved in the net's JSON (``measured``) and in ``metrics.json``.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fairdiff_ray.core.seeding import stable_seed
from fairdiff_ray.io import atomic_write_text
from fairdiff_ray.models.classifiers import classify_images
from fairdiff_ray.synthetic.nets import (
    FeatureTrainer,
    Pool,
    SyntheticClassifier,
    SyntheticDetector,
    augment,
    build_net,
    classifier_loss,
    clutter,
    detector_loss,
    features_loss,
    fidelity_loss,
    fit,
    render_pool,
)
from fairdiff_ray.synthetic.render import ATTRIBUTES
from fairdiff_ray.synthetic.world import save_net


@dataclass(frozen=True)
class TrainSpec:
    """Sizes of the run (saved in metrics.json). ``scale`` multiplies every pool size and step count."""

    seed: int = 0
    threads: int = 1
    batch: int = 128
    pool_a: int = 10_000  # detector, train-time classifier, features, fidelity (30% without a face)
    pool_b: int = 6_000  # eval-time classifier only
    test: int = 2_000
    detector_steps: int = 600
    classifier_steps: int = 300
    features_steps: int = 400
    fidelity_steps: int = 250
    lr: float = 3e-3
    scale: float = 1.0
    # fraction of the train-time classifier's batches that are gender blends with soft labels (nets.classifier_loss);
    # the eval-time classifier trains on plain renders only
    gender_mix: float = 0.5

    def n(self, field: str) -> int:
        return max(1, int(round(getattr(self, field) * self.scale)))


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, 4) xyxy x (N, 4) xyxy -> (N,) IoU of matching rows."""
    lo, hi = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])
    inter = (hi - lo).clamp(min=0).prod(-1)
    area = lambda x: (x[:, 2:] - x[:, :2]).clamp(min=0).prod(-1)  # noqa: E731
    return inter / (area(a) + area(b) - inter).clamp(min=1e-9)


@torch.no_grad()
def measure_detector(detector: SyntheticDetector, pool: Pool, augmented: bool = False, seed: int = 0) -> dict:
    """Face recall, IoU > 0.7 rate and landmark error on face images; false-positive rate on the rest."""
    x = augment(pool.images, torch.Generator().manual_seed(seed)) if augmented else pool.images
    faces = detector.detect(x)
    f = pool.face
    iou = box_iou(faces.boxes[f], pool.boxes[f])
    lm_err = (faces.landmarks[f] - pool.landmarks[f]).norm(dim=-1).mean(-1)
    return {
        "recall": faces.found[f].float().mean().item(),
        "iou_gt_0.7": ((iou > 0.7) & faces.found[f]).float().mean().item(),
        "mean_iou": iou.mean().item(),
        "landmark_err_px": lm_err.mean().item(),
        "false_positive": faces.found[~f].float().mean().item() if (~f).any() else 0.0,
        "false_positive_clutter": detector.detect(clutter(x, torch.Generator().manual_seed(seed + 1))).found.float().mean().item(),
    }


@torch.no_grad()
def measure_classifier(classifier: SyntheticClassifier, detector: SyntheticDetector, pool: Pool,
                       augmented: bool = False, seed: int = 0) -> dict:  # fmt: skip
    """Accuracy per attribute on face images through the real detect -> crop -> classify path."""
    f = pool.face
    x = pool.images[f]
    x = augment(x, torch.Generator().manual_seed(seed)) if augmented else x
    _, logits = classify_images(x, detector, classifier)
    return {a: (logits[a].argmax(-1) == pool.labels[a][f]).float().mean().item() for a in ATTRIBUTES}


@torch.no_grad()
def measure_content(net: torch.nn.Module, pool: Pool, augmented: bool = False, seed: int = 0) -> float:
    x = augment(pool.images, torch.Generator().manual_seed(seed)) if augmented else pool.images
    return (net(x).argmax(-1) == pool.labels["content"]).float().mean().item()


@contextlib.contextmanager
def timer(log: Callable[[str], None], what: str) -> Iterator[None]:
    t = time.perf_counter()
    log(f"{what} ...")
    yield
    log(f"{what}: {time.perf_counter() - t:.0f} s")


def _seed(spec: TrainSpec) -> Callable[..., int]:
    return lambda *parts: stable_seed("synthetic-nets", spec.seed, *parts) % (1 << 31)


FEATURE_NETS = {"train": "features", "eval": "features-eval"}


def train_features(out_dir: str | Path, spec: TrainSpec, variant: str, test: Pool,
                   log: Callable[[str], None] = print, pool_a: Pool | None = None) -> dict:  # fmt: skip
    """Train and save the feature net of ``variant``: "train" (``features``, pool A, used by the training's
    preservation losses) or "eval" (``features-eval``: its own architecture, seed and renders (pool B), for the
    evaluation's semantic similarities); its measurements on ``test``."""
    s = _seed(spec)
    name = FEATURE_NETS[variant]
    with timer(log, f"{name} pool"):
        if variant == "train":
            pool = pool_a if pool_a is not None else render_pool(spec.n("pool_a"), s("pool-a"), face_prob=0.7)
        else:
            pool = render_pool(spec.n("pool_b"), s("pool-b", "features"), face_prob=0.7)
    feats = build_net(name, s("init", name))
    with torch.random.fork_rng(devices=[]):  # the auxiliary heads' init is seeded too
        torch.manual_seed(s("init", f"{name}-aux"))
        trainer = FeatureTrainer(feats.net, feats.arch["heads"]["embed"])
    with timer(log, name):
        fit(trainer, features_loss(trainer, pool, spec.batch), spec.n("features_steps"), spec.lr, s("fit", name), log)
    feats.eval()
    measured = {"content_probe_clean": measure_content(lambda x: trainer(x)["content"], test)}
    save_net(feats, out_dir, name, {"measured": measured})
    log(f"{name}: {measured}")
    return measured


def train_classifier(out_dir: str | Path, spec: TrainSpec, variant: str, det: SyntheticDetector, test: Pool,
                     log: Callable[[str], None] = print, pool_a: Pool | None = None) -> dict:  # fmt: skip
    """Train and save ``classifier-<variant>`` on crops of ``det``'s boxes; its measurements on ``test``.

    train: pool A's faces (``pool_a`` when the caller rendered it already), ``spec.gender_mix`` of each batch
    gender blends (soft labels); eval: pool B, plain."""
    s = _seed(spec)
    name = f"classifier-{variant}"
    flipped = None
    with timer(log, f"{name} pool"):
        if variant == "train":
            if pool_a is None:
                pool_a = render_pool(spec.n("pool_a"), s("pool-a"), face_prob=0.7)
            keep = torch.nonzero(pool_a.face)[:, 0]
            pool = pool_a.take(keep)
            if spec.gender_mix > 0:
                flipped = render_pool(spec.n("pool_a"), s("pool-a"), face_prob=0.7, flip_gender=True).take(keep)
        else:
            pool = render_pool(spec.n("pool_b"), s("pool-b"))
    clf = build_net(name, s("init", name))
    mix = spec.gender_mix if variant == "train" else 0.0
    with timer(log, name):
        loss = classifier_loss(clf.net, pool, det, clf.crop_expand, spec.batch, flipped=flipped, gender_mix=mix)
        fit(clf.net, loss, spec.n("classifier_steps"), spec.lr, s("fit", name), log)
    clf.eval()
    measured = {"clean": measure_classifier(clf, det, test), "augmented": measure_classifier(clf, det, test, True)}
    save_net(clf, out_dir, name, {"measured": measured, "gender_mix": mix})
    log(f"{name}: {measured}")
    return measured


def retrain(out_dir: str | Path, spec: TrainSpec, name: str, log: Callable[[str], None] = print) -> dict:
    """Retrain one net (``classifier-train``, ``classifier-eval``, ``features`` or ``features-eval``) in an
    existing nets directory (its detector kept); metrics.json updated."""
    from fairdiff_ray.synthetic.world import load_detector

    torch.set_num_threads(spec.threads)
    metrics_file = Path(out_dir) / "metrics.json"
    metrics = json.loads(metrics_file.read_text())
    test = render_pool(spec.n("test"), _seed(spec)("test"), face_prob=0.8)
    if name.startswith("classifier-"):
        det = load_detector(str(out_dir))
        metrics[name] = train_classifier(out_dir, spec, name.removeprefix("classifier-"), det, test, log)
    else:
        variant = {v: k for k, v in FEATURE_NETS.items()}[name]
        metrics[name] = train_features(out_dir, spec, variant, test, log)
    metrics["spec"] = asdict(spec)
    atomic_write_text(metrics_file, json.dumps(metrics, indent=2) + "\n")
    return metrics


def train_all(out_dir: str | Path, spec: TrainSpec = TrainSpec(), log: Callable[[str], None] = print) -> dict:
    """Train the five nets, save ``<name>.safetensors`` / ``.json`` and ``metrics.json`` in ``out_dir``."""
    torch.set_num_threads(spec.threads)
    s = _seed(spec)
    with timer(log, "render pools"):
        pool_a = render_pool(spec.n("pool_a"), s("pool-a"), face_prob=0.7)
        test = render_pool(spec.n("test"), s("test"), face_prob=0.8)
    lr, b = spec.lr, spec.batch
    metrics: dict = {"spec": asdict(spec)}

    det = build_net("detector", s("init", "detector"))
    with timer(log, "detector"):
        fit(det.net, detector_loss(det.net, pool_a, b), spec.n("detector_steps"), lr, s("fit", "detector"), log)
    det.eval()
    metrics["detector"] = {"clean": measure_detector(det, test), "augmented": measure_detector(det, test, True)}
    save_net(det, out_dir, "detector", {"measured": metrics["detector"]})
    log(f"detector: {metrics['detector']}")

    for variant in ("train", "eval"):
        metrics[f"classifier-{variant}"] = train_classifier(out_dir, spec, variant, det, test, log, pool_a)

    for variant in ("train", "eval"):
        metrics[FEATURE_NETS[variant]] = train_features(out_dir, spec, variant, test, log, pool_a)

    fid = build_net("fidelity", s("init", "fidelity"))
    with timer(log, "fidelity"):
        fit(fid.net, fidelity_loss(fid.net, pool_a, b), spec.n("fidelity_steps"), lr, s("fit", "fidelity"), log)
    fid.eval()
    metrics["fidelity"] = {"clean": measure_content(fid, test), "augmented": measure_content(fid, test, True)}
    save_net(fid, out_dir, "fidelity", {"measured": metrics["fidelity"]})
    log(f"fidelity: {metrics['fidelity']}")
    atomic_write_text(Path(out_dir) / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics



@torch.no_grad()
def measure_on_model(model_dir: str | Path, nets_dir: str | Path | None = None, prompts: int = 25, per_prompt: int = 4,
                     steps: int = 20, guidance: float = 7.5) -> dict:  # fmt: skip
    """The nets on images the synthetic SD generates (test prompts of every concept, DPM-Solver++ 2M).

    Face rate of the detector; per attribute, agreement of the train- and eval-time classifiers on the faces
    found and their mean confidence; the fidelity net's rate of showing the prompt's own content.
    """
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from fairdiff_ray.core.seeding import noise_from_seeds
    from fairdiff_ray.synthetic.vocab import subjects
    from fairdiff_ray.synthetic.world import (
        content_class,
        load_classifier,
        load_detector,
        load_features,
        load_fidelity,
        net_files,
    )

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    pipe.set_progress_bar_config(disable=True)
    test = [s for s in subjects() if s.split == "test"]
    chosen = [test[round(i * (len(test) - 1) / max(prompts - 1, 1))] for i in range(min(prompts, len(test)))]
    shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    images, want = [], []
    for s in chosen:
        latents = noise_from_seeds([stable_seed(s.prompt, j) for j in range(per_prompt)], shape)
        out = pipe(prompt=[s.prompt] * per_prompt, latents=latents, num_inference_steps=steps,
                   guidance_scale=guidance, output_type="pt")  # fmt: skip
        images.append(out.images * 2 - 1)
        want += [content_class(s.prompt)] * per_prompt
    x = torch.cat(images).float()
    det = load_detector(nets_dir)
    faces, train_logits = classify_images(x, det, load_classifier(nets_dir, "train"))
    _, eval_logits = classify_images(x, det, load_classifier(nets_dir, "eval"))
    f = faces.found
    res: dict = {"images": int(x.shape[0]), "prompts": len(chosen), "face_rate": f.float().mean().item(),
                 "mean_face_score": faces.scores[f].mean().item() if f.any() else 0.0}  # fmt: skip
    for a in ATTRIBUTES:
        pt, pe = train_logits[a][f].softmax(-1), eval_logits[a][f].softmax(-1)
        res[a] = {
            "agreement": (pt.argmax(-1) == pe.argmax(-1)).float().mean().item(),
            "confidence_train": pt.max(-1).values.mean().item(),
            "confidence_eval": pe.max(-1).values.mean().item(),
        }
    res["fidelity"] = (load_fidelity(nets_dir)(x).argmax(-1) == torch.tensor(want)).float().mean().item()
    if net_files(nets_dir, "features-eval")[0].is_file():
        res["features_agreement"] = feature_agreement(load_features(nets_dir, "features"),
                                                      load_features(nets_dir, "features-eval"), x)
    res["setup"] = {"model": str(model_dir), "steps": steps, "guidance": guidance, "scheduler": "dpmsolver++",
                    "per_prompt": per_prompt}  # fmt: skip
    return res


def feature_agreement(a: torch.nn.Module, b: torch.nn.Module, images: torch.Tensor) -> float:
    """Pearson correlation, over all pairs of ``images``, of the cosine similarities two feature nets give them:
    how far an evaluation with ``b`` ranks image pairs as the training's ``a`` does (1 = the same)."""
    sims = []
    for net in (a, b):
        e = net(images)
        sims.append((e @ e.T)[torch.triu_indices(len(e), len(e), 1).unbind()])
    return torch.corrcoef(torch.stack(sims))[0, 1].item()


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def write_card(out_dir: str | Path, metrics: dict, on_model: dict | None = None) -> Path:
    """CARD.md: what each net is, its size, and what was measured (renders, and the synthetic SD's images)."""
    out_dir = Path(out_dir)
    sizes = {p.stem: p.stat().st_size for p in sorted(out_dir.glob("*.safetensors"))}
    d, sp = metrics["detector"], metrics["spec"]
    lines = [
        "# Synthetic-world nets (issue 4)",
        "",
        "Small CNNs on 32 x 32 images, trained on procedural renders (fairdiff_ray/synthetic/render.py) with blur,",
        "noise and colour-shift augmentation; loaded by fairdiff_ray/synthetic/world.py. Rebuild (CPU, seeded):",
        "",
        "    python jobs/train_synthetic_nets.py --overwrite [--sd assets/synthetic-sd]",
        "",
        f"Run: seed {sp['seed']}, scale {sp['scale']}, batch {sp['batch']}, test renders {sp['test']} "
        "(20% without a face), never seen in training.",
        "",
        "| net | file size | what |",
        "|---|---|---|",
        f"| detector | {sizes.get('detector', 0) / 1e6:.2f} MB | face presence, box, 5 landmarks (FaceDetector) |",
        f"| classifier-train | {sizes.get('classifier-train', 0) / 1e6:.2f} MB | gender / race / age on crops, training-time |",
        f"| classifier-eval | {sizes.get('classifier-eval', 0) / 1e6:.2f} MB | other architecture, seed and renders, eval-time |",
        f"| features | {sizes.get('features', 0) / 1e6:.2f} MB | 64-d L2-normalised embedding (CLIP / DINO stand-in) |",
        f"| features-eval | {sizes.get('features-eval', 0) / 1e6:.2f} MB | other architecture, seed and renders, eval-time |",
        f"| fidelity | {sizes.get('fidelity', 0) / 1e6:.2f} MB | content (shirt) class: prompt fidelity |",
        "",
        "## On held-out renders (clean / augmented)",
        "",
        f"- detector: recall {_pct(d['clean']['recall'])} / {_pct(d['augmented']['recall'])}, IoU > 0.7 "
        f"{_pct(d['clean']['iou_gt_0.7'])} / {_pct(d['augmented']['iou_gt_0.7'])}, mean IoU "
        f"{d['clean']['mean_iou']:.3f}, landmark error {d['clean']['landmark_err_px']:.2f} px, false positives "
        f"on no-face renders {_pct(d['clean']['false_positive'])} / {_pct(d['augmented']['false_positive'])}, "
        f"on noise / pixel-shuffled images {_pct(d['clean']['false_positive_clutter'])}",
    ]
    for name in ("classifier-train", "classifier-eval"):
        m = metrics[name]
        accs = ", ".join(f"{a} {_pct(m['clean'][a])} / {_pct(m['augmented'][a])}" for a in ATTRIBUTES)
        lines.append(f"- {name} (through detect -> crop -> classify): {accs}")
    if sp.get("gender_mix", 0) > 0:
        lines.append(f"- classifier-train also learned gender blends: {_pct(sp['gender_mix'])} of every batch is "
                     "a * render + (1 - a) * the same scene with the other gender, labelled (a, 1 - a), so an "
                     "in-between image reads as in-between (the eval-time classifier saw plain renders only)")
    for name in FEATURE_NETS.values():
        if name in metrics:
            lines.append(f"- {name}: content linear head {_pct(metrics[name]['content_probe_clean'])}")
    fid = metrics["fidelity"]
    lines.append(f"- fidelity: content accuracy {_pct(fid['clean'])} / {_pct(fid['augmented'])}")
    if on_model:
        m = on_model
        lines += ["", f"## On images generated by {m['setup']['model']}", "",
                  f"{m['images']} images ({m['prompts']} test prompts x {m['setup']['per_prompt']}, "
                  f"{m['setup']['scheduler']} {m['setup']['steps']} steps, guidance {m['setup']['guidance']}).", "",
                  f"- face rate {_pct(m['face_rate'])} (mean score of found faces {m['mean_face_score']:.3f})",
                  f"- prompt fidelity (fidelity net shows the prompt's content) {_pct(m['fidelity'])}"]  # fmt: skip
        for a in ATTRIBUTES:
            lines.append(f"- {a}: train/eval classifier agreement {_pct(m[a]['agreement'])}, mean confidence "
                         f"{m[a]['confidence_train']:.3f} / {m[a]['confidence_eval']:.3f}")  # fmt: skip
        if "features_agreement" in m:
            lines.append(f"- features / features-eval: correlation of their cosine similarities over all image "
                         f"pairs {m['features_agreement']:.3f}")
    return atomic_write_text(out_dir / "CARD.md", "\n".join(lines) + "\n")
