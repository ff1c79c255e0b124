"""The model side of the fairness loss (METHOD.md sections 2-3); the math lives in core/losses.py.

Notation (METHOD.md):
- x_i: generated image, o_i: the frozen original model's image from the same prompt and noise (the reference);
- y_i^a: OT target of attribute a (-1: none), r_i^a: the original image's predicted class (-1: no face);
- w_i: L_img weight (1, or ``loss.mismatch_weight[a]`` when y_i^a != r_i^a; min over attributes);
- s_i: gradient scale inside the face region (same rule with ``loss.face_region_scale``);
- N: the step's global image count (``normalizer``), so summing the workers' losses gives the paper's mean.

Per image:  CE-sum over attributes  +  lambda_img * w_i * sum_nets (1 - cos(F(x_i), F(o_i)))
            +  lambda_face * (1 - cos(e(x_i), t_i))  [+ lambda_presence * -log P(face in x_i), an option:
            on images whose original has a face (or every image: loss.presence_on), from a detector with a
            differentiable score]
            [+ lambda_preserve * sum over a in loss.preserve of CE(h_a(face(x_i)), r_i^a), an option: attributes
            not aligned keep the original's class, on images where both have a face]
            [+ lambda_detail * |log E(x_i) - log E(o_i)|, an option: E the fine-detail energy, keeps x_i as sharp
            as its original].
Every part is optional: L_img is active when feature nets are configured (and lambda_img > 0), L_face when a
face embedder is (and lambda_face > 0). Gradients reach the images only through the active parts.

L_face targets t_i: the original face's embedding when the image is not asked to change (y_i^a is -1 or equals
r_i^a for every attribute) and the original prediction is confident (joint probability of the predicted
classes >= ``loss.face_confidence``); otherwise the nearest face of the bank (when one is configured).
Images whose generated face was not found get no L_face (and no targets).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from fairdiff_ray.config import FairDiffConfig
from fairdiff_ray.core.crop import align_faces, arcface_template
from fairdiff_ray.core.losses import (
    alignment_loss,
    box_intersection,
    cosine_distance,
    detail_energy,
    detail_loss,
    expand_boxes,
    mismatch_weights,
    scale_grad_in_boxes,
)
from fairdiff_ray.errors import ConfigError
from fairdiff_ray.models.faces import face_crops
from fairdiff_ray.models.protocols import (
    AttributeClassifier,
    FaceDetector,
    FaceEmbedder,
    Faces,
    ImageFeatures,
)


@dataclass
class Scored:
    """Generated images after detection and classification.

    faces: largest face per image (detached); logits: attribute -> (B, K_a) with gradients to the pixels;
    probs: attribute -> (B, K_a) detached softmax (the OT input).
    """

    faces: Faces
    logits: dict[str, Tensor]
    probs: dict[str, Tensor]
    kept: dict[str, Tensor] = dataclasses.field(default_factory=dict)  # loss.preserve attribute -> (B, K) logits

    def select(self, rows: slice | Tensor) -> Scored:
        """The rows ``rows`` (a slice or index tensor) of every field (logits keep their gradients)."""
        return Scored(select_faces(self.faces, rows), {a: z[rows] for a, z in self.logits.items()},
                      {a: p[rows] for a, p in self.probs.items()}, {a: z[rows] for a, z in self.kept.items()})


def check_presence_detector(cfg: FairDiffConfig, detector: Any) -> None:
    """loss.lambda_presence needs a detector with a differentiable face score (``presence_logit``; ConfigError).
    ``detector``: the detector, or its class (the preflight's, before any weights load)."""
    if cfg.loss.lambda_presence > 0 and not callable(getattr(detector, "presence_logit", None)):
        raise ConfigError(
            f"loss.lambda_presence={cfg.loss.lambda_presence} needs a detector with a differentiable face "
            f"score, which faces.detector={cfg.faces.detector} has not: use faces.detector=synthetic or set "
            "loss.lambda_presence=0"
        )


def check_preserve(preserve: list[str], aligned: list[str], predicted: list[str]) -> None:
    """loss.preserve lists attributes the classifier predicts and the target does not align (ConfigError)."""
    for a in preserve:
        if a in aligned or a not in predicted:
            why = "is aligned by the target" if a in aligned else "is not predicted by the classifier"
            raise ConfigError(f"loss.preserve: {a!r} {why}; list attributes of "
                              f"{sorted(set(predicted) - set(aligned))}")


def select_faces(faces: Faces, rows: slice | Tensor) -> Faces:
    return Faces(boxes=faces.boxes[rows], scores=faces.scores[rows], landmarks=faces.landmarks[rows],
                 found=faces.found[rows])


def select_reference(ref: dict[str, Any], rows: slice | Tensor) -> dict[str, Any]:
    """The rows ``rows`` of a ``FairnessLoss.reference`` result (compute it once per step, slice per chunk)."""
    return {
        "faces": select_faces(ref["faces"], rows),
        "labels": {a: v[rows] for a, v in ref["labels"].items()},
        "confidence": ref["confidence"][rows],
        "features": {k: v[rows] for k, v in ref["features"].items()},
        "face_emb": None if ref["face_emb"] is None else ref["face_emb"][rows],
        "detail": None if ref.get("detail") is None else ref["detail"][rows],
    }


def _call(fn: Any, x: Tensor, use_checkpoint: bool) -> Any:
    """fn(x), recomputed in backward instead of stored when ``use_checkpoint`` and x needs a gradient."""
    if use_checkpoint and x.requires_grad:
        return checkpoint(fn, x, use_reentrant=False)
    return fn(x)


def face_landmarks(faces: Faces, height: int, width: int) -> Tensor:
    """(B, 5, 2) landmarks; rows without a face get the ArcFace template over the image centre (their
    aligned crops are computed but masked out, so every worker runs the same graph)."""
    side = float(min(height, width))
    template = arcface_template(int(side)) + torch.tensor([(width - side) / 2, (height - side) / 2])
    lm = faces.landmarks.float().cpu()
    return torch.where(faces.found.cpu()[:, None, None], lm, template[None].to(lm.dtype))


class FairnessLoss:
    """L = L_align + lambda_img * L_img + lambda_face * L_face (METHOD.md section 3), per worker chunk.

    detector / classifier / features / face_embedder follow models/protocols.py; they are frozen and must sit
    on the images' device. face_bank: (M, D) L2-normalised real-face embeddings or None.
    ``checkpoint``: recompute the classifier and feature nets in backward (activation checkpointing).
    """

    def __init__(
        self,
        cfg: FairDiffConfig,
        detector: FaceDetector,
        classifier: AttributeClassifier,
        features: dict[str, ImageFeatures],
        face_embedder: FaceEmbedder | None = None,
        face_bank: Tensor | None = None,
        checkpoint: bool = False,
    ) -> None:
        self.cfg = cfg
        self.detector, self.classifier = detector, classifier
        self.features = dict(features)
        self.face_embedder, self.face_bank = face_embedder, face_bank
        self.checkpoint = checkpoint
        self.attributes = list(cfg.target_distribution().attributes)
        for a, classes in cfg.target_distribution().attributes.items():
            have = classifier.attributes.get(a)
            if have is None or list(have) != list(classes):
                raise ConfigError(
                    f"target.{a}: classes {classes} but the classifier ({cfg.classifier.kind}) gives "
                    f"{a}: {have}; use the classifier's class names, in its order"
                )
            for key in ("mismatch_weight", "face_region_scale"):
                if a not in getattr(cfg.loss, key):
                    raise ConfigError(f"loss.{key}.{a} is missing: give a factor in [0, 1] for attribute {a!r}")
        self.preserve = list(cfg.loss.preserve)
        check_preserve(self.preserve, self.attributes, list(classifier.attributes))
        if face_bank is not None and (face_bank.dim() != 2 or face_bank.shape[0] == 0):
            raise ValueError(f"face_bank must be (M >= 1, D), got {tuple(face_bank.shape)}")
        self.use_img = bool(self.features) and cfg.loss.lambda_img > 0
        self.use_face = face_embedder is not None and cfg.loss.lambda_face > 0
        self.use_presence = cfg.loss.lambda_presence > 0
        check_presence_detector(cfg, detector)

    @property
    def needs_reference(self) -> bool:
        """Whether any active term reads the original images o_i (else a step need not sample them)."""
        return (self.use_img or self.use_face or bool(self.preserve) or self.cfg.loss.lambda_detail > 0
                or (self.use_presence and self.cfg.loss.presence_on == "reference"))

    def to(self, device: str | torch.device) -> FairnessLoss:
        """Move the torch modules (a torch detector too; dlib / InsightFace run on CPU copies) and the bank."""
        for net in [self.detector, self.classifier, self.face_embedder, *self.features.values()]:
            if isinstance(net, torch.nn.Module):
                net.to(device)
        if self.face_bank is not None:
            self.face_bank = self.face_bank.to(device)
        return self

    # ----------------------------------------------------------------------------------------------------------

    def score(self, images: Tensor) -> Scored:
        """images: (B, 3, H, W) in [-1, 1] -> Scored: detect (no grad), crop + classify (grad)."""
        faces, crops = face_crops(
            images, self.detector, expand=self.classifier.crop_expand, size=self.classifier.input_size
        )
        out = _call(self.classifier, crops, self.checkpoint)
        logits = {a: out[a] for a in self.attributes}
        probs = {a: torch.softmax(z.detach().float(), dim=-1) for a, z in logits.items()}
        return Scored(faces=faces, logits=logits, probs=probs, kept={a: out[a] for a in self.preserve})

    @torch.no_grad()
    def reference(self, ref_images: Tensor) -> dict[str, Any]:
        """The original images o_i (no grad). Returns {"faces": Faces, "labels": {a: (B,) long, -1 no face},
        "confidence": (B,) joint probability of the predicted classes (0 without a face),
        "features": {net: (B, D)}, "face_emb": (B, D) or None}."""
        scored = self.score(ref_images)
        found = scored.faces.found.to(ref_images.device)
        labels, conf = {}, torch.where(found, 1.0, 0.0)
        for a, p in scored.probs.items():
            pmax, arg = p.max(dim=-1)
            labels[a] = torch.where(found, arg, torch.full_like(arg, -1))
            conf = conf * pmax
        for a, z in scored.kept.items():  # loss.preserve: the original's class, not part of the confidence
            arg = z.argmax(dim=-1)
            labels[a] = torch.where(found, arg, torch.full_like(arg, -1))
        feats = {name: net(ref_images).float() for name, net in self.features.items()} if self.use_img else {}
        emb = self._embed(ref_images, scored.faces) if self.use_face else None
        detail = detail_energy(ref_images) if self.cfg.loss.lambda_detail > 0 else None
        return {"faces": scored.faces, "labels": labels, "confidence": conf, "features": feats, "face_emb": emb,
                "detail": detail}

    def _embed(self, images: Tensor, faces: Faces) -> Tensor:
        h, w = images.shape[-2:]
        aligned = align_faces(images, face_landmarks(faces, h, w).to(images.device))
        return _call(self.face_embedder, aligned, self.checkpoint).float()

    def face_regions(self, gen: Faces, ref: Faces, height: int, width: int) -> Tensor:
        """(B, 4) intersection of the expanded gen and ref face boxes; NaN rows where either has no face."""
        e, sq = self.cfg.faces.expand, self.cfg.loss.face_region == "square"
        both = (gen.found & ref.found).cpu()
        box = box_intersection(
            expand_boxes(gen.boxes.float().cpu(), e, height, width, sq),
            expand_boxes(ref.boxes.float().cpu(), e, height, width, sq),
        )
        return torch.where(both[:, None], box, torch.full_like(box, float("nan")))

    # ----------------------------------------------------------------------------------------------------------

    def __call__(
        self, images: Tensor, scored: Scored, ref: dict[str, Any] | None, targets: dict[str, Tensor],
        normalizer: int,
    ) -> tuple[Tensor, dict[str, float]]:
        """images: (B, 3, H, W) generated, with gradients; scored = self.score(images); ref =
        self.reference(ref_images), or None when not ``needs_reference``; targets: attribute -> (B,) long (-1:
        none); normalizer: global N. Returns (this worker's share of the loss, metrics)."""
        if normalizer <= 0:
            raise ValueError(f"normalizer must be the positive global image count, got {normalizer}")
        if ref is None and self.needs_reference:
            raise ValueError("ref is None, but an active loss term compares with the original images: pass "
                             "self.reference(original images)")
        missing = [a for a in self.attributes if a not in targets]
        if missing:
            raise ValueError(f"targets lack attribute(s) {missing}; expected {self.attributes}")
        dev = images.device
        found = scored.faces.found.to(dev)
        tg = {a: torch.where(found, targets[a].to(dev).long(), -1) for a in self.attributes}
        ref_labels = {a: ref["labels"][a].to(dev) for a in self.attributes} if ref is not None else {}

        # (1) L_align: CE on the confident targets (METHOD.md section 2, step 4)
        total, metrics = alignment_loss(scored.logits, tg, normalizer)
        metrics["loss_align"] = float(total.detach())
        metrics.update(active_align=1.0, active_img=float(self.use_img), active_face=float(self.use_face))
        metrics["face_found"] = float(found.float().mean()) if len(found) else 0.0

        # (2) L_img: weighted feature distance to the original, face region damped when asked to change
        if self.use_img:
            l_img, m = self._image_term(images, scored, ref, tg, ref_labels, normalizer)
            total = total + self.cfg.loss.lambda_img * l_img
            metrics.update(m)
        # (3) L_face: identity / realism of the generated face
        if self.use_face:
            l_face, m = self._face_term(images, scored, ref, tg, ref_labels, normalizer)
            total = total + self.cfg.loss.lambda_face * l_face
            metrics.update(m)
        # (4) option: keep the face detectable where the original has one
        if self.use_presence:
            logit = _call(self.detector.presence_logit, images, self.checkpoint).float()
            l_pres = torch.nn.functional.softplus(-logit)
            if self.cfg.loss.presence_on == "reference":
                l_pres = ref["faces"].found.to(dev).to(l_pres.dtype) * l_pres
            l_pres = l_pres.sum() / normalizer
            total = total + self.cfg.loss.lambda_presence * l_pres
            metrics["loss_presence"] = float(l_pres.detach())
        # (5) option: keep the original's amount of fine detail (no blurring into a class)
        if self.cfg.loss.lambda_detail > 0:
            l_det = detail_loss(images, ref["detail"].to(dev)).sum() / normalizer
            total = total + self.cfg.loss.lambda_detail * l_det
            metrics["loss_detail"] = float(l_det.detach())
        # (6) option: attributes not aligned keep the original image's class
        if self.preserve:
            keep = {a: torch.where(found, ref["labels"][a].to(dev), -1) for a in self.preserve}
            l_keep, m = alignment_loss(scored.kept, keep, normalizer)
            total = total + self.cfg.loss.lambda_preserve * l_keep
            metrics["loss_preserve"] = float(l_keep.detach())
            metrics.update({f"preserve_{k}": v for k, v in m.items()})
        metrics["loss"] = float(total.detach())
        return total, metrics

    def _image_term(self, images, scored, ref, tg, ref_labels, normalizer) -> tuple[Tensor, dict[str, float]]:
        as_match = self.cfg.loss.unconfident_as_match
        w = mismatch_weights(tg, ref_labels, self.cfg.loss.mismatch_weight, as_match)
        lost = ref["faces"].found.to(images.device) & ~scored.faces.found.to(images.device)
        w = torch.where(lost, w * self.cfg.loss.lost_face_weight, w)
        s = mismatch_weights(tg, ref_labels, self.cfg.loss.face_region_scale, as_match)
        h, wd = images.shape[-2:]
        x = scale_grad_in_boxes(images, self.face_regions(scored.faces, ref["faces"], h, wd), s)
        dist = None
        for name, net in self.features.items():
            d = cosine_distance(_call(net, x, self.checkpoint).float(), ref["features"][name].to(images.device))
            dist = d if dist is None else dist + d
        loss = (w * dist).sum() / normalizer
        return loss, {
            "loss_img": float(loss.detach()),
            "img_distance": float(dist.detach().mean()),
            "img_weight": float(w.mean()),
            "lost_faces": float(lost.float().mean()),
        }

    def _face_term(self, images, scored, ref, tg, ref_labels, normalizer) -> tuple[Tensor, dict[str, float]]:
        dev = images.device
        emb = self._embed(images, scored.faces)
        gen_found = scored.faces.found.to(dev)
        unchanged = torch.ones_like(gen_found)
        for a in self.attributes:
            # METHOD.md: the original's face only where the target equals its class (no target: the bank)
            same = tg[a] == ref_labels[a]
            unchanged &= (same | (tg[a] == -1)) if self.cfg.loss.unconfident_as_match else same
        ref_ok = ref["faces"].found.to(dev) & (ref["confidence"].to(dev) >= self.cfg.loss.face_confidence)
        use_ref = gen_found & unchanged & ref_ok & (ref["face_emb"] is not None)
        target = ref["face_emb"].to(dev) if ref["face_emb"] is not None else torch.zeros_like(emb)
        use_bank = torch.zeros_like(use_ref)
        if self.face_bank is not None:
            bank = self.face_bank.to(dev)
            if bank.shape[1] != emb.shape[1]:
                raise ConfigError(
                    f"features.face_bank holds {bank.shape[1]}-d embeddings but the face embedder gives "
                    f"{emb.shape[1]}-d: rebuild the bank with this embedder (fairdiff build-face-bank)"
                )
            nearest = bank[(emb.detach() @ bank.T).argmax(dim=1)]
            use_bank = gen_found & ~use_ref
            target = torch.where(use_ref[:, None], target, nearest)
        mask = (use_ref | use_bank).to(emb.dtype)
        loss = (mask * cosine_distance(emb, target)).sum() / normalizer
        n = max(len(mask), 1)
        return loss, {
            "loss_face": float(loss.detach()),
            "face_ref": float(use_ref.sum()) / n,
            "face_bank": float(use_bank.sum()) / n,
        }


def build_loss(cfg: FairDiffConfig, device: str | torch.device = "cpu") -> FairnessLoss:
    """Detector, classifier, feature nets, face embedder and bank from ``cfg`` (faces, classifier, features)."""
    from fairdiff_ray.models.classifiers import build_classifier
    from fairdiff_ray.models.faces import build_detector
    from fairdiff_ray.models.features import build_face_embedder, build_features, load_face_bank

    classifier = build_classifier(cfg.classifier)
    if isinstance(classifier, torch.nn.Module):
        classifier.eval().requires_grad_(False)
    loss = FairnessLoss(
        cfg,
        build_detector(cfg.faces),
        classifier,
        build_features(cfg.features),
        face_embedder=build_face_embedder(cfg.features),
        face_bank=load_face_bank(cfg.features.face_bank),
        checkpoint=cfg.sampler.checkpoint,
    )
    return loss.to(device)
