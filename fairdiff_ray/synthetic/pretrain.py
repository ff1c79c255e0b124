"""Pretrain the synthetic world's biased tiny Stable Diffusion from scratch (issue 4), with Ray Train.

Stage 1 trains the VAE (32 x 32 RGB <-> 4 x 8 x 8 latents) on fresh renders; stage 2 caches the latents of
renders whose attributes are drawn from every subject's skewed pretraining distribution (vocab.py) and trains
the UNet and the text encoder jointly from random init, with ``uncond_prob`` empty prompts for
classifier-free guidance and an EMA of both. The result is a stock ``StableDiffusionPipeline`` directory
(safetensors). One Ray Train worker; checkpoints go to ``storage/name`` so a rerun resumes there.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPTextConfig, CLIPTextModel

from fairdiff_ray.core.seeding import stable_seed
from fairdiff_ray.errors import ConfigError
from fairdiff_ray.synthetic.render import ATTRIBUTES, render
from fairdiff_ray.synthetic.vocab import (
    Subject,
    build_word_tokenizer,
    subjects,
    varied_caption,
    vocabulary_words,
)

if TYPE_CHECKING:  # diffusers is imported where used: a bad override or source fails before its import noise
    from diffusers import AutoencoderKL


@dataclass(frozen=True)
class PretrainSpec:
    """Everything the pretraining run depends on (saved as pretrain_spec.json beside the model)."""

    seed: int = 0
    threads: int = 1  # torch threads; 1 stays fast when other jobs share the cores (OpenMP spin-waits do not)
    # architecture
    vae_channels: tuple[int, ...] = (16, 32, 32)  # 3 levels: 32 px -> 8 x 8 latents
    unet_channels: tuple[int, ...] = (48, 96)
    cross_attn_levels: tuple[bool, ...] = (False, True)
    text_hidden: int = 64
    text_layers: int = 3
    max_length: int = 77  # SD's text length; prompts use <= 19 (one token per word), the rest is padding
    # stage 1: VAE
    vae_steps: int = 1200
    vae_batch: int = 32
    vae_lr: float = 2e-3
    kl_weight: float = 1e-6
    # stage 2: UNet + text encoder on cached latents
    n_latents: int = 30_000
    steps: int = 2400
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 100
    uncond_prob: float = 0.1
    ema_decay: float = 0.998
    report_every: int = 100
    checkpoint_every: int = 400
    init_from: str = ""  # a state.pt of an earlier run's checkpoint to continue from when this run has none
    # share of captions that name some of the render's attributes and/or put other words first
    # (vocab.varied_caption); 0 = every caption is the subject's fixed template prompt
    caption_mix: float = 0.0
    caption_name_prob: float = 0.5  # in a varied caption, the chance that each attribute is named
    vae_from: str = ""  # a pipeline directory whose VAE (same vae_channels) replaces stage 1


def spec_from_overrides(overrides: dict[str, str]) -> PretrainSpec:
    """PretrainSpec with ``key=value`` text overrides converted to the fields' types; unknown keys raise."""
    base = PretrainSpec()
    fields = {f.name: f for f in dataclasses.fields(PretrainSpec)}
    kw: dict[str, Any] = {}
    for key, text in overrides.items():
        if key not in fields:
            raise KeyError(f"unknown pretraining key {key!r}; known: {', '.join(fields)}")
        cur = getattr(base, key)
        if isinstance(cur, tuple):
            elem = type(cur[0])
            kw[key] = tuple((t.lower() == "true") if elem is bool else elem(t) for t in text.strip("()[] ").split(","))
        else:
            kw[key] = type(cur)(text)
    spec = dataclasses.replace(base, **kw)
    check_spec(spec)
    return spec


# fields that must be >= 1, > 0, or in [0, 1]
_AT_LEAST_ONE = ("threads", "max_length", "vae_steps", "vae_batch", "n_latents", "steps", "batch", "report_every",
                 "checkpoint_every", "text_layers", "text_hidden")
_POSITIVE = ("vae_lr", "lr")
_SHARES = ("uncond_prob", "caption_mix", "caption_name_prob", "ema_decay")


def check_spec(spec: PretrainSpec) -> None:
    """ValueError naming the first field out of its range (before any cluster starts)."""
    for k in _AT_LEAST_ONE:
        if getattr(spec, k) < 1:
            raise ValueError(f"{k}={getattr(spec, k)} must be >= 1")
    for k in _POSITIVE:
        if not getattr(spec, k) > 0:
            raise ValueError(f"{k}={getattr(spec, k)} must be > 0")
    for k in _SHARES:
        if not 0 <= getattr(spec, k) <= 1:
            raise ValueError(f"{k}={getattr(spec, k)} must be in [0, 1]")
    if spec.warmup < 0 or spec.kl_weight < 0:
        raise ValueError("warmup and kl_weight must be >= 0")
    if len(spec.unet_channels) != len(spec.cross_attn_levels):
        raise ValueError(f"unet_channels {spec.unet_channels} and cross_attn_levels {spec.cross_attn_levels} "
                         "need one entry per level each")


SPEC_FILE = "pretrain_spec.json"  # beside the model and in the run's storage directory


def spec_json(spec: PretrainSpec) -> str:
    return json.dumps(dataclasses.asdict(spec), indent=1) + "\n"


def check_run_spec(spec: PretrainSpec, storage: str, name: str) -> None:
    """A rerun of ``storage/name`` resumes it (Ray Train): refuse one whose saved spec differs (a finished run would
    otherwise write its old weights under the new spec's name). UserError naming the changed keys."""
    from fairdiff_ray.errors import UserError

    saved = Path(storage).resolve() / name / SPEC_FILE
    if not saved.is_file():
        return
    then = json.loads(saved.read_text(encoding="utf-8"))
    now = json.loads(spec_json(spec))
    changed = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))
    if changed:
        raise UserError(f"pretraining run {name!r} in {storage} was started with other settings ({', '.join(changed)}): "
                        "give another --name, or delete that run to start it again")


# ----------------------------------------------------------------------------------------------- models
def build_components(spec: PretrainSpec) -> dict[str, Any]:
    """Randomly initialised tokenizer, text encoder, UNet, VAE and DDIM scheduler, seeded by spec.seed."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    tokenizer = build_word_tokenizer(vocabulary_words(captions=spec.caption_mix > 0), model_max_length=spec.max_length)
    vocab = len(tokenizer)
    torch.manual_seed(stable_seed(spec.seed, "text_encoder") % 2**31)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
            hidden_size=spec.text_hidden, intermediate_size=4 * spec.text_hidden, num_attention_heads=4,
            num_hidden_layers=spec.text_layers, max_position_embeddings=spec.max_length, projection_dim=spec.text_hidden,
        )
    )  # fmt: skip
    torch.manual_seed(stable_seed(spec.seed, "unet") % 2**31)
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in spec.cross_attn_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(spec.cross_attn_levels))
    latent = 32 // 2 ** (len(spec.vae_channels) - 1)
    unet = UNet2DConditionModel(
        block_out_channels=spec.unet_channels, layers_per_block=1, sample_size=latent, in_channels=4,
        out_channels=4, down_block_types=down, up_block_types=up, cross_attention_dim=spec.text_hidden,
        attention_head_dim=8, norm_num_groups=8,
    )  # fmt: skip
    torch.manual_seed(stable_seed(spec.seed, "vae") % 2**31)
    vae = AutoencoderKL(
        block_out_channels=list(spec.vae_channels), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * len(spec.vae_channels),
        up_block_types=["UpDecoderBlock2D"] * len(spec.vae_channels), norm_num_groups=8, sample_size=32,
    )  # fmt: skip
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )  # fmt: skip
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "unet": unet, "vae": vae, "scheduler": scheduler}


def save_pipeline(comp: dict[str, Any], out_dir: str | Path) -> None:
    """Stock diffusers layout (safetensors), loadable with StableDiffusionPipeline.from_pretrained(out_dir)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=comp["vae"], text_encoder=comp["text_encoder"], tokenizer=comp["tokenizer"], unet=comp["unet"],
        scheduler=comp["scheduler"], safety_checker=None, feature_extractor=None, image_encoder=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(str(out_dir), safe_serialization=True)


# ----------------------------------------------------------------------------------------------- data
def draw_attributes(rows: list[Subject], seed: int) -> dict[str, np.ndarray]:
    """Attributes for one render per row, each drawn from that row's subject's pretraining distribution."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in ATTRIBUTES:
        cum = np.cumsum(np.array([s.probs[name] for s in rows]), axis=1)
        u = rng.uniform(size=(len(rows), 1))
        out[name] = np.minimum((u > cum).sum(1), cum.shape[1] - 1)
    out["content"] = np.array([s.content for s in rows])
    return out


def pretraining_batch(all_subjects: list[Subject], n: int, seed: int) -> tuple[list[int], torch.Tensor]:
    """(subject indices, images (n, 3, 32, 32) in [-1, 1]): uniform subjects, skewed attributes, fresh scenes."""
    idx, _, img = _batch(all_subjects, n, seed)
    return idx, img


def _batch(all_subjects: list[Subject], n: int, seed: int) -> tuple[list[int], dict[str, np.ndarray], torch.Tensor]:
    rng = np.random.default_rng(stable_seed("pretrain-batch", seed))
    idx = rng.integers(0, len(all_subjects), n).tolist()
    a = draw_attributes([all_subjects[i] for i in idx], seed=int(rng.integers(2**62)))
    img = render(a["gender"], a["race"], a["age"], a["content"], seed=int(rng.integers(2**62)))["images"]
    return idx, a, img


# ----------------------------------------------------------------------------------------------- stages
def _lr_at(step: int, spec: PretrainSpec, total: int, base: float) -> float:
    warm = min(1.0, (step + 1) / max(1, spec.warmup))
    return base * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, total)))))


def vae_step(vae: AutoencoderKL, x: torch.Tensor, kl_weight: float, generator: torch.Generator) -> torch.Tensor:
    """One VAE loss: reconstruction MSE + L1 of a posterior sample, plus kl_weight * KL (summed per image)."""
    post = vae.encode(x).latent_dist
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=generator)
    rec = vae.decode(z).sample
    return F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + kl_weight * post.kl().mean()


@torch.no_grad()
def encode_cache(vae: AutoencoderKL, all_subjects: list[Subject], n: int,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """(latents (n, 4, h, w) already scaled by vae.config.scaling_factor, subject indices (n,),
    {attribute: (n,) class indices of each render})."""
    lat, ids, attrs = [], [], {a: [] for a in ATTRIBUTES}
    for i in range(0, n, 256):
        idx, a, img = _batch(all_subjects, min(256, n - i), seed=stable_seed("cache", seed, i))
        lat.append(vae.encode(img).latent_dist.mean * vae.config.scaling_factor)
        ids.extend(idx)
        for name in ATTRIBUTES:
            attrs[name].append(torch.as_tensor(a[name]))
    return torch.cat(lat), torch.tensor(ids), {k: torch.cat(v) for k, v in attrs.items()}


def unet_loss(comp: dict[str, Any], latents: torch.Tensor, input_ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Epsilon-prediction MSE at uniformly drawn training timesteps (DDPM objective)."""
    sched = comp["scheduler"]
    noise = torch.randn(latents.shape, generator=generator)
    t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    x_t = sched.add_noise(latents, noise, t)
    cond = comp["text_encoder"](input_ids).last_hidden_state
    return F.mse_loss(comp["unet"](x_t, t, encoder_hidden_states=cond).sample, noise)


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids


class _Ema:
    """EMA copies of the parameters of several modules (UNet and text encoder)."""

    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))  # fast start, then the configured decay
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - d)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)


# ----------------------------------------------------------------------------------------------- worker loop
def _spec_from_dict(d: dict[str, Any]) -> PretrainSpec:
    return PretrainSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _report(metrics: dict[str, Any], state: dict[str, Any] | None = None, model: dict[str, Any] | None = None) -> None:
    """ray.train.report, with a checkpoint holding the training state (state.pt) and/or the pipeline (model/)."""
    import ray.train

    print(json.dumps(metrics), flush=True)
    if state is None and model is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        if state is not None:
            torch.save(state, Path(d) / "state.pt")
        if model is not None:
            save_pipeline(model, Path(d) / "model")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _load_state() -> dict[str, Any] | None:
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return torch.load(Path(d) / "state.pt", weights_only=True)


def _train_vae(comp: dict[str, Any], spec: PretrainSpec, state: dict[str, Any] | None) -> None:
    vae = comp["vae"]
    opt = torch.optim.AdamW(vae.parameters(), lr=spec.vae_lr, weight_decay=0.0)
    start = 0
    if state is not None and state["stage"] == "vae":
        opt.load_state_dict(state["opt"])
        start = state["step"]
    all_subjects, t0, run = subjects(), time.time(), 0.0
    vae.train()
    for step in range(start, spec.vae_steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, spec, spec.vae_steps, spec.vae_lr)
        _, x = pretraining_batch(all_subjects, spec.vae_batch, seed=stable_seed(spec.seed, "vae", step))
        loss = vae_step(vae, x, spec.kl_weight, torch.Generator().manual_seed(stable_seed(spec.seed, "vae-noise", step)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run = loss.item() if step == start else 0.98 * run + 0.02 * loss.item()
        done = step + 1 == spec.vae_steps
        if (step + 1) % spec.report_every == 0 or done:
            m = {"stage": "vae", "step": step + 1, "loss": run, "minutes": (time.time() - t0) / 60}
            ckpt = (step + 1) % spec.checkpoint_every == 0 or done
            st = {"stage": "vae", "step": step + 1, "vae": vae.state_dict(), "opt": opt.state_dict()} if ckpt else None
            _report(m, st)
    vae.eval()


@torch.no_grad()
def _set_scaling_factor(vae: AutoencoderKL, spec: PretrainSpec) -> None:
    """scaling_factor = 1 / std of the latents (the SD convention), measured on pretraining renders."""
    _, x = pretraining_batch(subjects(), 512, seed=stable_seed(spec.seed, "scale"))
    std = vae.encode(x).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=float(1.0 / std))


def _train_unet(comp: dict[str, Any], spec: PretrainSpec, state: dict[str, Any] | None) -> _Ema:
    unet, text = comp["unet"], comp["text_encoder"]
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.01)
    ema = _Ema([unet, text], spec.ema_decay)
    start = 0
    if state is not None and state["stage"] == "unet":
        opt.load_state_dict(state["opt"])
        for s, v in zip(ema.shadow, state["ema"]):
            s.copy_(v)
        start = state["step"]
    all_subjects = subjects()
    latents, ids, attrs = encode_cache(comp["vae"], all_subjects, spec.n_latents, spec.seed)
    prompt_ids = tokenize(comp["tokenizer"], [s.prompt for s in all_subjects] + [""])
    t0, run = time.time(), 0.0
    unet.train()
    text.train()
    for step in range(start, spec.steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, spec, spec.steps, spec.lr)
        gen = torch.Generator().manual_seed(stable_seed(spec.seed, "unet", step))
        rows = torch.randint(0, latents.shape[0], (spec.batch,), generator=gen)
        drop = torch.rand(spec.batch, generator=gen) < spec.uncond_prob
        pid = torch.where(drop, torch.full_like(rows, len(all_subjects)), ids[rows])
        input_ids = prompt_ids[pid]
        if spec.caption_mix > 0:
            input_ids = _vary_captions(comp["tokenizer"], input_ids, rows, drop, ids, attrs, all_subjects,
                                       spec, np.random.default_rng(stable_seed(spec.seed, "caption", step)))  # fmt: skip
        loss = unet_loss(comp, latents[rows], input_ids, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(step)
        run = loss.item() if step == start else 0.99 * run + 0.01 * loss.item()
        done = step + 1 == spec.steps
        if (step + 1) % spec.report_every == 0 or done:
            m = {"stage": "unet", "step": step + 1, "loss": run, "minutes": (time.time() - t0) / 60}
            st = None
            if (step + 1) % spec.checkpoint_every == 0 and not done:
                st = {"stage": "unet", "step": step + 1, "vae": comp["vae"].state_dict(), "unet": unet.state_dict(),
                      "text": text.state_dict(), "opt": opt.state_dict(), "ema": [s.clone() for s in ema.shadow]}  # fmt: skip
            _report(m, st)
    unet.eval()
    text.eval()
    return ema


def _vary_captions(tokenizer, input_ids: torch.Tensor, rows: torch.Tensor, drop: torch.Tensor, ids: torch.Tensor,
                   attrs: dict[str, torch.Tensor], all_subjects: list[Subject], spec: PretrainSpec,
                   rng: np.random.Generator) -> torch.Tensor:  # fmt: skip
    """input_ids with a ``spec.caption_mix`` share of the non-empty rows re-captioned by vocab.varied_caption."""
    pick = [k for k in range(len(rows)) if not bool(drop[k]) and rng.random() < spec.caption_mix]
    if not pick:
        return input_ids
    caps = [varied_caption(all_subjects[int(ids[rows[k]])].prompt, {a: int(attrs[a][rows[k]]) for a in attrs}, rng,
                           spec.caption_name_prob) for k in pick]  # fmt: skip
    out = input_ids.clone()
    out[pick] = tokenize(tokenizer, caps)
    return out


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: VAE stage, scaling factor, UNet + text-encoder stage, final EMA pipeline."""
    spec = _spec_from_dict(config)
    torch.set_num_threads(spec.threads)
    comp = build_components(spec)
    state = _load_state()
    finetune = False  # init_from a finished run: its weights start a new UNet + text-encoder stage
    if state is None and spec.init_from:
        state = torch.load(spec.init_from, weights_only=True)
        finetune = state["stage"] == "done"
    if state is not None:
        comp["vae"].load_state_dict(state["vae"])
        if state["stage"] in ("unet", "done"):
            comp["unet"].load_state_dict(state["unet"])
            comp["text_encoder"].load_state_dict(state["text"])
    if state is None and spec.vae_from:
        from diffusers import AutoencoderKL

        comp["vae"].load_state_dict(AutoencoderKL.from_pretrained(spec.vae_from, subfolder="vae").state_dict())
    elif state is None or state["stage"] == "vae":
        _train_vae(comp, spec, state)
    comp["vae"].eval()
    _set_scaling_factor(comp["vae"], spec)
    if state is None or state["stage"] != "done" or finetune:
        _train_unet(comp, spec, state if state is not None and state["stage"] == "unet" else None).copy_to_model()
    final = {"stage": "done", "step": spec.steps, "vae": comp["vae"].state_dict(), "unet": comp["unet"].state_dict(),
             "text": comp["text_encoder"].state_dict()}  # fmt: skip
    _report({"stage": "done", "step": spec.steps, "scaling_factor": comp["vae"].config.scaling_factor}, final, comp)


# ----------------------------------------------------------------------------------------------- driver
def check_sources(spec: PretrainSpec) -> None:
    """ConfigError (one line, exit 2 in a job), before any Ray work, for an init_from / vae_from the run could not
    use."""
    if spec.vae_from and not (Path(spec.vae_from) / "vae" / "config.json").is_file():
        raise ConfigError(f"vae_from={spec.vae_from}: no vae/config.json there; give a diffusers pipeline directory "
                          "(e.g. assets/synthetic-sd)")  # fmt: skip
    if not spec.init_from:
        return
    if not Path(spec.init_from).is_file():
        raise ConfigError(f"init_from={spec.init_from}: no such file; give a state.pt of a pretraining checkpoint")
    state = torch.load(spec.init_from, weights_only=True)
    key = "text_model.embeddings.token_embedding.weight"
    have = state.get("text", {}).get(key)
    want = len(build_word_tokenizer(vocabulary_words(captions=spec.caption_mix > 0)))
    if have is not None and have.shape[0] != want:
        raise ConfigError(f"init_from={spec.init_from}: its text encoder has {have.shape[0]} tokens, this spec's "
                          f"vocabulary {want} (caption words come with caption_mix > 0): use the same caption_mix "
                          "setting (zero / non-zero) as the run it comes from")  # fmt: skip


def run_pretraining(spec: PretrainSpec, out_dir: str | Path, storage: str = "/tmp/fairdiff-pretrain",
                    name: str = "synthetic-sd") -> Path:  # fmt: skip
    """Fit on one Ray Train worker (resumes ``storage/name`` if it exists) and write the pipeline to out_dir."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from fairdiff_ray.dist.cluster import connect

    check_sources(spec)
    check_run_spec(spec, storage, name)
    connect(None, num_cpus=spec.threads, configure_logging=False)
    run_root = Path(storage).resolve() / name
    run_root.mkdir(parents=True, exist_ok=True)
    (run_root / SPEC_FILE).write_text(spec_json(spec), encoding="utf-8")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=dataclasses.asdict(spec),
        scaling_config=ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": spec.threads}),
        run_config=RunConfig(name=name, storage_path=str(Path(storage).resolve()),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )  # fmt: skip
    result = trainer.fit()
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with result.checkpoint.as_directory() as d:
        shutil.copytree(Path(d) / "model", tmp)
    (tmp / SPEC_FILE).write_text(spec_json(spec), encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
