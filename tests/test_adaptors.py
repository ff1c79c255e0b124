"""models/adaptors.py on the tiny SD model (float32, CPU): the gradient path through the project's sampler,
disabled() == base model exactly, EMA, and exports that stock diffusers loads with its own loaders and that
reproduce our images (max abs diff <= 1e-4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from fairdiff_ray.config import AdaptorConfig
from fairdiff_ray.core.sampler import sample_with_grad
from fairdiff_ray.core.seeding import noise_from_seeds
from fairdiff_ray.errors import ModelFileError, UserError
from fairdiff_ray.generate import generate_images
from fairdiff_ray.models.adaptors import TOKEN, Adaptor, attach_adaptor, load_adaptor
from fairdiff_ray.models.sd import (
    Components,
    decode_latents,
    load_components,
    make_scheduler,
    save_tiny_model,
    unet_eps_fn,
)

PROMPT = "a photo of the face of a nurse"
SEEDS = [4, 9]
STEPS = 3
LORA_KINDS = ["text_lora", "unet_lora", "both"]
ALL_KINDS = [*LORA_KINDS, "soft_prompt", "soft_prompt_suffix", "soft_prompt_replace", "full_unet", "full_text"]
EXPORTABLE = [*LORA_KINDS, "soft_prompt", "soft_prompt_suffix", "soft_prompt_replace", "full_unet", "full_text"]
REPLACE = "a photo of the face"  # PROMPT's first words: the replace-position soft prompt stands in for them


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("sd") / "model", seed=0, words=["nurse"])


def cfg(kind: str) -> AdaptorConfig:
    """``soft_prompt_suffix``: a soft prompt placed after the prompt's last token instead of after BOS;
    ``soft_prompt_replace``: one standing in for PROMPT's first words (REPLACE, 5 tokens)."""
    if kind == "soft_prompt_replace":
        return AdaptorConfig(kind="soft_prompt", rank=4, alpha=8.0, soft_tokens=5, ema_decay=0.9, soft_position="replace",
                             soft_replace=REPLACE)
    position = "suffix" if kind == "soft_prompt_suffix" else "prefix"
    return AdaptorConfig(kind=kind.removesuffix("_suffix"), rank=4, alpha=8.0, soft_tokens=3, ema_decay=0.9,
                         soft_position=position)


def sample(comp: Components, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    x_T = noise_from_seeds(SEEDS, comp.latent_shape())
    x0 = sample_with_grad(unet_eps_fn(comp.unet, cond, uncond), x_T, make_scheduler("dpmsolver++", comp.scheduler_config),
                          guidance_scale=7.5, num_inference_steps=STEPS)
    return decode_latents(comp.vae, x0)


def base_images(comp: Components) -> torch.Tensor:
    from fairdiff_ray.models.sd import encode_prompts

    with torch.no_grad():
        cond = encode_prompts(comp.tokenizer, comp.text_encoder, [PROMPT] * len(SEEDS))
        return sample(comp, cond, encode_prompts(comp.tokenizer, comp.text_encoder, [""] * len(SEEDS)))


def images(ad: Adaptor) -> torch.Tensor:
    return sample(ad.comp, ad.encode([PROMPT] * len(SEEDS)), ad.uncond(len(SEEDS)))


def loss_of(img: torch.Tensor) -> torch.Tensor:
    # a simple loss that depends on every pixel: pull the images towards a fixed pattern
    target = torch.linspace(-1, 1, img.shape[-1]).expand_as(img)
    return (img - target).square().mean()


def train(ad: Adaptor, n: int = 2, lr: float = 5e-3) -> None:
    opt = torch.optim.Adam(ad.trainable_parameters(), lr=lr)
    for _ in range(n):
        opt.zero_grad(set_to_none=True)
        loss_of(images(ad)).backward()
        opt.step()
        ad.ema_update()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("kind", [*LORA_KINDS, "full_unet", "full_text"])
def test_attaching_changes_no_output(model_dir: Path, kind: str) -> None:
    comp = load_components(str(model_dir))
    before = base_images(comp)
    ad = attach_adaptor(comp, cfg(kind))
    with torch.no_grad():
        assert torch.equal(images(ad), before)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_gradients_reach_every_adaptor_weight_and_no_frozen_one(model_dir: Path, kind: str) -> None:
    comp = load_components(str(model_dir))
    ad = attach_adaptor(comp, cfg(kind))
    train(ad, n=1)  # LoRA A gets no gradient while B is still zero: one step makes B non-zero
    loss_of(images(ad)).backward()
    trainable = {id(p) for p in ad.trainable_parameters()}
    grads = {k: p.grad for k, p in ad.named_parameters().items()}
    missing = [k for k, g in grads.items() if g is None or not bool(g.abs().sum() > 0)]
    if kind == "full_unet":  # a few UNet weights (e.g. unused up-sampler biases) may legitimately get none
        assert len(missing) <= 0.1 * len(grads), missing[:5]
    else:
        assert not missing, missing[:5]
    for name in ("text_encoder", "unet", "vae"):
        for k, p in getattr(comp, name).named_parameters():
            if id(p) not in trainable:
                assert p.grad is None and not p.requires_grad, f"{name}.{k}"
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_disabled_is_the_base_model_exactly(model_dir: Path, kind: str) -> None:
    comp = load_components(str(model_dir))
    base = base_images(comp)
    ad = attach_adaptor(comp, cfg(kind))
    train(ad)
    with torch.no_grad():
        on = images(ad)
        with ad.disabled():
            off = images(ad)
        again = images(ad)
    assert torch.equal(off, base)
    assert (on - base).abs().max() > 1e-3  # training changed the model
    assert torch.equal(again, on)  # leaving disabled() restores the adaptor ...
    assert all(p.requires_grad for p in ad.trainable_parameters())  # ... and its trainability


@pytest.mark.slow  # ~8 s per kind: stock pipeline load + three generations
@pytest.mark.parametrize("kind", EXPORTABLE)
def test_export_loads_in_stock_diffusers_and_reproduces_our_images(model_dir: Path, tmp_path: Path, kind: str) -> None:
    comp = load_components(str(model_dir))
    ad = attach_adaptor(comp, cfg(kind))
    train(ad)
    out = tmp_path / "adaptor"
    ad.export(str(out), {"attributes": ["gender"], "target": {"gender": [0.5, 0.5]}, "step": 2}, use_ema=False)
    meta = json.loads((out / "fairdiff_adaptor.json").read_text())
    assert meta["kind"] == kind.removesuffix("_suffix").removesuffix("_replace") and meta["step"] == 2
    assert meta["alpha"] == 8.0
    assert meta["ema"] is False
    assert meta["base_model"] == str(model_dir)

    ours = generate_images(str(model_dir), PROMPT, SEEDS, adaptor=str(out), steps=STEPS, guidance=7.5,
                           scheduler="dpmsolver++", device="cpu")
    with torch.no_grad():
        assert (ours - images(ad)).abs().max() <= 1e-5  # load_adaptor == the trained adaptor
    base = generate_images(str(model_dir), PROMPT, SEEDS, steps=STEPS, scheduler="dpmsolver++", device="cpu")

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), local_files_only=True)
    pipe.scheduler = make_scheduler("dpmsolver++", dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    prompt = PROMPT
    if kind == "soft_prompt":
        pipe.load_textual_inversion(str(out), token=TOKEN)
        prompt = f"{TOKEN} {PROMPT}"
        assert meta["usage"].endswith(f'prompt = "{TOKEN} " + prompt')
    elif kind == "soft_prompt_suffix":
        pipe.load_textual_inversion(str(out), token=TOKEN)
        prompt = f"{PROMPT} {TOKEN}"
        assert meta["usage"].endswith(f'prompt = prompt + " {TOKEN}"')
    elif kind == "soft_prompt_replace":
        pipe.load_textual_inversion(str(out), token=TOKEN)
        prompt = PROMPT.replace(REPLACE, TOKEN, 1)
        assert meta["usage"].endswith(f'prompt = prompt.replace("{REPLACE}", "{TOKEN}", 1)')
    elif kind == "full_unet":
        from diffusers import UNet2DConditionModel

        pipe.unet = UNet2DConditionModel.from_pretrained(str(out), subfolder="unet")
        assert meta["usage"].endswith('pipe.unet = UNet2DConditionModel.from_pretrained(ADAPTOR_DIR, subfolder="unet")')
    elif kind == "full_text":
        from transformers import CLIPTextModel

        pipe.text_encoder = CLIPTextModel.from_pretrained(str(out), subfolder="text_encoder")
        assert meta["usage"].endswith('CLIPTextModel.from_pretrained(ADAPTOR_DIR, subfolder="text_encoder")')
    else:
        pipe.load_lora_weights(str(out))
    ref = pipe([prompt] * len(SEEDS), latents=noise_from_seeds(SEEDS, comp.latent_shape()), num_inference_steps=STEPS,
               guidance_scale=7.5, output_type="pt").images * 2 - 1
    diff = float((ours - ref).abs().max())
    print(f"{kind}: stock diffusers vs fairdiff max abs diff {diff:.2e}; adaptor vs base {float((ours - base).abs().max()):.3f}")
    assert diff <= 1e-4
    assert (ours - base).abs().max() > 1e-3


def test_ema_math_state_dict_and_ema_export(model_dir: Path, tmp_path: Path) -> None:
    comp = load_components(str(model_dir))
    ad = attach_adaptor(comp, cfg("soft_prompt"))
    d = ad.cfg.ema_decay
    (p,) = ad.trainable_parameters()
    w0 = p.detach().clone()
    w1, w2 = w0 + 1.0, w0 - 3.0
    with torch.no_grad():
        p.copy_(w1)
        ad.ema_update()
        p.copy_(w2)
        ad.ema_update()
    want = d * d * w0 + d * (1 - d) * w1 + (1 - d) * w2
    assert torch.allclose(ad.ema["soft_prompt"], want, atol=1e-6)
    with ad.ema_applied():
        assert torch.allclose(p, want, atol=1e-6)
    assert torch.equal(p.detach(), w2)  # swapped back

    sd = ad.state_dict()
    assert set(sd) == {"soft_prompt", "ema.soft_prompt", "ema_weight"} and float(sd["ema_weight"]) == 1.0
    other = attach_adaptor(load_components(str(model_dir)), cfg("soft_prompt"), seed=1)
    other.load_state_dict(sd)
    assert torch.equal(other.trainable_parameters()[0].detach(), w2) and torch.equal(other.ema["soft_prompt"], sd["ema.soft_prompt"])
    old = {k: v for k, v in sd.items() if k != "ema_weight"}  # a state saved before the weight was
    other.ema_weight = 0.5
    other.load_state_dict(old)
    assert other.ema_weight == 1.0

    ad.export(str(tmp_path / "a"), {"step": 2})  # EMA by default
    assert torch.allclose(load_file(str(tmp_path / "a" / "learned_embeds.safetensors"))[TOKEN], want, atol=1e-6)
    with pytest.raises(UserError, match="already exists"):
        ad.export(str(tmp_path / "a"), {"step": 3})
    ad.export(str(tmp_path / "a"), {"step": 3}, use_ema=False, overwrite=True)
    assert json.loads((tmp_path / "a" / "fairdiff_adaptor.json").read_text())["step"] == 3


def test_ema_bias_correction_averages_the_trained_weights_only(model_dir: Path, capsys) -> None:
    """adaptor.ema_bias_correction: the EMA holds no share of the untrained adaptor - sum_s (1-d) d^(t-s) w_s
    / (1 - d^t); before any update the weights are used as they are; its weight survives a state round trip.
    Without it a short run warns how much of the untrained adaptor the export keeps."""
    from fairdiff_ray.config import load_config
    from fairdiff_ray.preflight import warn_ema_start

    comp = load_components(str(model_dir))
    ad = attach_adaptor(comp, cfg("soft_prompt").model_copy(update={"ema_bias_correction": True}))
    d = ad.cfg.ema_decay
    (p,) = ad.trainable_parameters()
    w0 = p.detach().clone()
    with ad.ema_applied():
        assert torch.equal(p.detach(), w0)  # nothing averaged yet
    w1, w2 = w0 + 1.0, w0 - 3.0
    with torch.no_grad():
        p.copy_(w1)
        ad.ema_update()
        with ad.ema_applied():
            assert torch.allclose(p, w1, atol=1e-6)  # one trained weight: the average is that weight
        p.copy_(w2)
        ad.ema_update()
    want = (d * (1 - d) * w1 + (1 - d) * w2) / (1 - d * d)
    with ad.ema_applied():
        assert torch.allclose(p, want, atol=1e-6)
    sd = ad.state_dict()
    assert abs(float(sd["ema_weight"]) - (1 - d * d)) < 1e-12
    other = attach_adaptor(load_components(str(model_dir)), ad.cfg, seed=1)
    other.load_state_dict(sd)
    with other.ema_applied():
        assert torch.allclose(other.trainable_parameters()[0], want, atol=1e-6)

    run = load_config(None, ["adaptor.ema_decay=0.996", "train.steps=500"])
    assert abs(warn_ema_start(run) - 0.996**500) < 1e-12
    assert "leaves 13% of the untrained adaptor" in capsys.readouterr().err
    on = load_config(None, ["adaptor.ema_decay=0.996", "train.steps=500", "adaptor.ema_bias_correction=true"])
    assert warn_ema_start(on) == 0.0 and warn_ema_start(load_config(None, ["train.steps=5000"])) < 0.05
    assert capsys.readouterr().err == ""


def test_soft_prompt_init_is_seeded_near_the_init_word(model_dir: Path) -> None:
    comp = load_components(str(model_dir))
    a = attach_adaptor(comp, cfg("soft_prompt"), seed=3).soft
    b = attach_adaptor(comp, cfg("soft_prompt"), seed=3).soft
    c = attach_adaptor(comp, cfg("soft_prompt"), seed=4).soft
    assert a is not None and b is not None and c is not None
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (3, comp.text_encoder.config.hidden_size)
    word = comp.text_encoder.get_input_embeddings().weight[comp.tokenizer("person", add_special_tokens=False).input_ids]
    assert (a - word.mean(0)).norm(dim=1).max() < 0.2 * word.norm()


def test_soft_prompt_replace_starts_as_the_base_model_and_checks_its_words(model_dir: Path) -> None:
    from pydantic import ValidationError

    from fairdiff_ray.errors import ConfigError
    from fairdiff_ray.models.sd import encode_prompts
    from fairdiff_ray.preflight import check_soft_replace

    comp = load_components(str(model_dir))
    ad = attach_adaptor(comp, cfg("soft_prompt_replace"))
    with torch.no_grad():  # the soft rows are exactly the replaced words' embeddings, at their positions
        assert torch.equal(ad.encode([PROMPT]), encode_prompts(comp.tokenizer, comp.text_encoder, [PROMPT]))
        assert torch.equal(images(ad), base_images(comp))
    with pytest.raises(ValueError, match="does not start with adaptor.soft_replace"):
        ad.encode(["a nurse, a photo of the face"])
    with pytest.raises(ConfigError, match="set adaptor.soft_tokens=5"):
        attach_adaptor(load_components(str(model_dir)), cfg("soft_prompt_replace").model_copy(update={"soft_tokens": 3}))
    with pytest.raises(ValidationError, match="soft_replace"):
        AdaptorConfig(kind="soft_prompt", soft_position="replace")
    good = cfg("soft_prompt_replace")
    check_soft_replace(good, str(model_dir), [[PROMPT]], "set")  # no error
    with pytest.raises(ConfigError, match="set: prompt 'a nurse' does not start with"):
        check_soft_replace(good, str(model_dir), [[PROMPT, "a nurse"]], "set")
    with pytest.raises(ConfigError, match="set adaptor.soft_tokens=5"):
        check_soft_replace(good.model_copy(update={"soft_tokens": 4}), str(model_dir), [[PROMPT]], "set")


def test_load_adaptor_errors_are_model_file_errors(model_dir: Path, tmp_path: Path) -> None:
    comp = load_components(str(model_dir))
    with pytest.raises(ModelFileError, match="does not exist"):
        load_adaptor(comp, str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match="fairdiff_adaptor.json is missing"):
        load_adaptor(comp, str(tmp_path / "empty"))
    ad = attach_adaptor(load_components(str(model_dir)), cfg("text_lora"))
    ad.export(str(tmp_path / "x"), {})
    (tmp_path / "x" / "pytorch_lora_weights.safetensors").unlink()
    with pytest.raises(ModelFileError, match="pytorch_lora_weights.safetensors is missing"):
        load_adaptor(comp, str(tmp_path / "x"))
    assert not getattr(comp.text_encoder, "peft_config", None)  # nothing was injected on failure


def test_lora_dropout_acts_only_in_train_mode(model_dir: Path) -> None:
    comp = load_components(str(model_dir))
    ad = attach_adaptor(comp, AdaptorConfig(kind="text_lora", rank=4, dropout=0.5))
    with torch.no_grad():
        for k, p in ad.named_parameters().items():
            if "lora_B" in k:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
        assert torch.equal(ad.encode([PROMPT]), ad.encode([PROMPT]))  # eval mode: dropout off
        ad.train()
        assert not torch.equal(ad.encode([PROMPT]), ad.encode([PROMPT]))
        ad.train(False)
        assert torch.equal(ad.encode([PROMPT]), ad.encode([PROMPT]))
    assert not comp.text_encoder.training  # the frozen module itself never leaves eval mode
