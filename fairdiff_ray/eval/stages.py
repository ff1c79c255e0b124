"""Ray Data stages of the evaluation: callable classes that load their models once in ``__init__``.

Batches are ``dict[str, np.ndarray]``. Rows enter as (model, concept, prompt, j, seed, part); GenerateImages
adds ``image`` (B, H, W, 3) uint8; ScoreImages replaces it by the record columns of records.py.
Workers read only the ``spec`` dict they are given (plain JSON-able data), never driver globals.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fairdiff_ray.eval.records import emb_col, from_uint8, label_col, png_bytes, prob_col, sem_col, to_uint8

# A generator maps (prompts, seeds) -> images (B, 3, H, W) in [-1, 1], all from the seeds' own noise.
Generator = Callable[[list[str], list[int]], torch.Tensor]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_generator(spec: dict[str, Any], adaptor_dir: str | None) -> Generator:
    """The base model (``adaptor_dir`` None) or base + adaptor, sampling with the project's own sampler.

    The sampler is the training sampler (core.sampler.sample_with_grad) run under no_grad, so evaluation
    measures exactly the model that was trained. x_T comes from noise_from_seeds: the j-th image of every
    model of one prompt starts from the same noise.
    """
    from fairdiff_ray.core.sampler import sample_with_grad
    from fairdiff_ray.core.seeding import noise_from_seeds
    from fairdiff_ray.models.sd import (
        decode_latents,
        encode_prompts,
        load_components,
        make_scheduler,
        unet_eps_fn,
    )

    dtype = getattr(torch, spec["dtype"])
    device = _device(spec["device"])
    comp = load_components(spec["model_path"], dtype, device)
    adaptor = None
    if adaptor_dir is not None:
        from fairdiff_ray.models.adaptors import load_adaptor

        adaptor = load_adaptor(comp, adaptor_dir)
    unet_cfg = comp.unet.config
    latent_shape = (unet_cfg.in_channels, unet_cfg.sample_size, unet_cfg.sample_size)

    def generate(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        with torch.no_grad():
            if adaptor is not None:
                cond, uncond = adaptor.encode(prompts), adaptor.uncond(len(prompts))
            else:
                cond = encode_prompts(comp.tokenizer, comp.text_encoder, prompts)
                uncond = encode_prompts(comp.tokenizer, comp.text_encoder, [""] * len(prompts))
            scheduler = make_scheduler(spec["scheduler"], comp.scheduler_config)
            x_T = noise_from_seeds(seeds, latent_shape, dtype=dtype, device=device)
            x_0 = sample_with_grad(
                unet_eps_fn(comp.unet, cond, uncond), x_T, scheduler, checkpoint=False,
                guidance_scale=spec["guidance_scale"], num_inference_steps=spec["steps"],
            )
            return decode_latents(comp.vae, x_0).float().cpu()

    return generate


class GenerateImages:
    """Stage 1: images for rows of (model, prompt, seed). Models load lazily, one at a time, in row order.

    The driver orders rows model-major, so an actor switches model at most a few times; keeping only the
    current model bounds memory to one model copy per actor (several SD copies would not fit a small GPU).
    """

    def __init__(self, spec: dict[str, Any], loader: Callable[[dict[str, Any], str | None], Generator] | None = None):
        self.spec = spec
        self.loader = loader or load_generator
        self.current: tuple[str, Generator] | None = None

    def _model(self, name: str) -> Generator:
        if self.current is None or self.current[0] != name:
            self.current = None  # release the previous model before loading the next
            self.current = (name, self.loader(self.spec, self.spec["models"][name]))
        return self.current[1]

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        models = batch["model"]
        images: list[np.ndarray | None] = [None] * len(models)
        for name in dict.fromkeys(models.tolist()):
            idx = np.flatnonzero(models == name)
            out = self._model(str(name))([str(batch["prompt"][i]) for i in idx], [int(batch["seed"][i]) for i in idx])
            for k, i in enumerate(idx):
                images[i] = to_uint8(out[k: k + 1].numpy())[0]
        return {**batch, "image": np.stack(images)}  # type: ignore[arg-type]


def load_scorers(spec: dict[str, Any]) -> dict[str, Any]:
    """The eval-time face detector, attribute classifier, feature nets and (synthetic world) fidelity net."""
    from fairdiff_ray.config import ClassifierConfig, FacesConfig, FeaturesConfig
    from fairdiff_ray.models.classifiers import build_classifier, classify_images
    from fairdiff_ray.models.faces import build_detector
    from fairdiff_ray.models.features import build_features, load_clip_text

    clip = spec["features"].get("clip")
    out: dict[str, Any] = {
        "detector": build_detector(FacesConfig(**spec["faces"])),
        "classifier": build_classifier(ClassifierConfig(**spec["classifier"])),
        "classify": classify_images,
        "features": build_features(FeaturesConfig(**spec["features"])),
        "fidelity": None,
        "clip_text": load_clip_text(clip) if clip else None,  # CLIP-T where the CLIP directory has a text side
    }
    if spec.get("fidelity"):
        from fairdiff_ray.synthetic.world import content_class, load_fidelity

        out["fidelity"] = (load_fidelity(), content_class)
    return out


class ScoreImages:
    """Stage 2: detect the largest face, classify it, embed the image and score prompt fidelity.

    Output columns follow records.py; the image itself is dropped, except a PNG thumbnail for the first
    ``grid_images`` images of every prompt (the report's grids).
    """

    def __init__(self, spec: dict[str, Any], loader: Callable[[dict[str, Any]], dict[str, Any]] | None = None):
        self.spec = spec
        s = (loader or load_scorers)(spec)
        self.detector, self.classifier, self.classify = s["detector"], s["classifier"], s["classify"]
        feats = s["features"]
        self.features = list(feats.values()) if isinstance(feats, dict) else list(feats or [])
        self.fidelity, self.clip_text = s["fidelity"], s.get("clip_text")
        self.attributes = {a: list(c) for a, c in self.classifier.attributes.items()}
        self.attributes_json = json.dumps(self.attributes)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = torch.from_numpy(from_uint8(batch["image"]))
        n = images.shape[0]
        faces, logits = self.classify(images, self.detector, self.classifier)
        found = faces.found.cpu().numpy().astype(bool)
        out = {k: v for k, v in batch.items() if k != "image"}
        out["face_found"] = found
        out["face_box"] = faces.boxes.float().cpu().numpy().astype(np.float32)
        out["face_score"] = faces.scores.float().cpu().numpy().astype(np.float32)
        for a in self.attributes:
            probs = torch.softmax(logits[a].float(), dim=-1).cpu().numpy().astype(np.float32)
            out[prob_col(a)] = probs
            out[label_col(a)] = np.where(found, probs.argmax(axis=1), -1).astype(np.int64)
        for net in self.features:
            emb = net(images).float().cpu()
            out[emb_col(net.name)] = emb.numpy().astype(np.float32)
            if net.name == "clip" and self.clip_text is not None:  # CLIP-T: image-prompt cosine (normalised)
                text = self.clip_text([str(p) for p in batch["prompt"]]).cpu()
                out[sem_col("clip_t")] = (emb * text).sum(dim=-1).numpy().astype(np.float32)
        if self.fidelity is not None:
            net, content_class = self.fidelity
            probs = torch.softmax(net(images).float(), dim=-1).cpu().numpy()
            want = np.array([content_class(str(p)) for p in batch["prompt"]])
            out[sem_col("fidelity")] = probs[np.arange(n), want].astype(np.float32)
        keep = batch["j"] < self.spec["grid_images"]
        thumbs = np.empty(n, dtype=object)
        for i in range(n):
            thumbs[i] = png_bytes(batch["image"][i]) if keep[i] else None
        out["thumb"] = thumbs
        out["attributes"] = np.array([self.attributes_json] * n, dtype=object)
        return out
