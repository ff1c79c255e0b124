"""models/sd.py on the tiny SD model saved as a real diffusers directory: loading, freezing, parity of the
project's generation path (encode_prompts + unet_eps_fn + sample_with_grad + decode_latents) with the stock
StableDiffusionPipeline, and one-line ModelFileErrors for incomplete directories."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from fairdiff_ray.core.sampler import sample_with_grad
from fairdiff_ray.core.seeding import noise_from_seeds
from fairdiff_ray.errors import ModelFileError
from fairdiff_ray.models.sd import (
    check_model_dir,
    components_from_dict,
    decode_latents,
    encode_prompts,
    load_components,
    make_scheduler,
    save_tiny_model,
    unet_eps_fn,
)
from fairdiff_ray.models.tiny import tiny_components

PROMPT = "a photo of the face of a person"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("sd") / "model", seed=0)


def test_load_components_frozen_and_equal_to_the_saved_model(model_dir: Path) -> None:
    comp = load_components(str(model_dir))
    ref = components_from_dict(tiny_components(seed=0))
    for name in ("text_encoder", "unet", "vae"):
        mod = getattr(comp, name)
        assert not mod.training and all(not p.requires_grad for p in mod.parameters())
        for (k, a), (_, b) in zip(mod.state_dict().items(), getattr(ref, name).state_dict().items()):
            assert torch.equal(a, b), (name, k)
    assert comp.path == str(model_dir) and comp.scheduler_config["_class_name"] == "DDIMScheduler"
    e = encode_prompts(comp.tokenizer, comp.text_encoder, [PROMPT, ""])
    assert e.shape == (2, comp.tokenizer.model_max_length, comp.text_encoder.config.hidden_size)


@pytest.mark.parametrize("scheduler,guidance", [("dpmsolver++", 7.5), ("ddim", 7.5), ("ddim", 1.0)])
def test_generation_path_matches_stock_pipeline_images(model_dir: Path, scheduler: str, guidance: float) -> None:
    comp = load_components(str(model_dir))
    seeds, steps = [3, 11], 6
    x_T = noise_from_seeds(seeds, comp.latent_shape())
    with torch.no_grad():
        cond = encode_prompts(comp.tokenizer, comp.text_encoder, [PROMPT] * 2)
        uncond = encode_prompts(comp.tokenizer, comp.text_encoder, [""] * 2) if guidance > 1 else None
        x0 = sample_with_grad(unet_eps_fn(comp.unet, cond, uncond), x_T, make_scheduler(scheduler, comp.scheduler_config),
                              checkpoint=False, guidance_scale=guidance, num_inference_steps=steps)
        ours = decode_latents(comp.vae, x0)
    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), local_files_only=True)
    pipe.scheduler = make_scheduler(scheduler, dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe([PROMPT] * 2, latents=x_T.clone(), num_inference_steps=steps, guidance_scale=guidance,
               output_type="pt").images
    assert ours.shape == ref.shape == (2, 3, 32, 32)
    assert (ours - (ref * 2 - 1)).abs().max() <= 1e-5
    assert ours.std() > 0.01


def test_decode_latents_is_differentiable(model_dir: Path) -> None:
    comp = load_components(str(model_dir))
    z = torch.randn(1, *comp.latent_shape(), requires_grad=True)
    decode_latents(comp.vae, z).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is None for p in comp.vae.parameters())


@pytest.mark.parametrize("remove,named", [
    ("unet/diffusion_pytorch_model.safetensors", "unet/ weights"),
    ("model_index.json", "model_index.json"),
    ("text_encoder/config.json", "text_encoder/config.json"),
    ("tokenizer/tokenizer.json", "tokenizer/vocab.json"),
    ("scheduler", "scheduler/scheduler_config.json"),
])
def test_incomplete_model_dir_is_a_one_line_model_file_error(model_dir: Path, tmp_path: Path, remove: str,
                                                            named: str) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    target = broken / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(ModelFileError) as e:
        load_components(str(broken))
    msg = str(e.value)
    assert "\n" not in msg and named in msg and "huggingface-cli download" in msg and str(broken) in msg
    with pytest.raises(ModelFileError, match="does not exist"):
        check_model_dir(str(tmp_path / "nowhere"))


def test_unet_eps_fn_rejects_wrong_batch(model_dir: Path) -> None:
    comp = load_components(str(model_dir))
    cond = torch.zeros(2, 77, 32)
    fn = unet_eps_fn(comp.unet, cond, cond)
    with pytest.raises(ValueError, match="3 latents for 2 prompts"):
        fn(torch.zeros(3, 4, 16, 16), torch.tensor(10))
