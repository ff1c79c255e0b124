"""Stable Diffusion 1.x / 2.x components from a local diffusers directory, and the small functions that
connect them to the project's own sampler (core.sampler.sample_with_grad).

Nothing here downloads: every ``from_pretrained`` is ``local_files_only=True`` and the path must be a local
directory laid out as ``StableDiffusionPipeline.save_pretrained`` writes it (model_index.json, tokenizer/,
text_encoder/, unet/, vae/, scheduler/). All weights come back frozen (``requires_grad=False``) and in eval
mode; adaptors (models/adaptors.py) add the trainable parts.

Shapes: prompt embeddings (B, L, D) with L = tokenizer.model_max_length (77 for SD); latents (B, 4, h, w);
images (B, 3, H, W) in [-1, 1].
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from fairdiff_ray.errors import ModelFileError

HF_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
COMPONENTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")
# Weight files a component folder may hold (plain, sharded-index or variant forms of either format).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


@dataclass
class Components:
    """The parts of one SD model. ``scheduler_config`` is a plain dict (make_scheduler builds fresh ones)."""

    tokenizer: Any
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler_config: dict
    path: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def latent_shape(self) -> tuple[int, int, int]:
        cfg = self.unet.config
        return (cfg.in_channels, cfg.sample_size, cfg.sample_size)


def _download_hint(path: str) -> str:
    return (f"download the model on a machine with internet: `huggingface-cli download {HF_REPO} "
            f"--local-dir {path}` and copy the directory here")


def _missing(path: str, what: str) -> ModelFileError:
    return ModelFileError(f"model directory {path!r} is incomplete: {what} is missing; {_download_hint(path)}")


def _has_weights(folder: Path) -> bool:
    return folder.is_dir() and any(f.name.endswith(_WEIGHT_SUFFIXES) for f in folder.iterdir())


_MAX_HEADER = 100 << 20  # safetensors itself refuses headers over 100 MB


def read_safetensors_header(path: str | Path, hint: str) -> dict[str, Any]:
    """The JSON header ``{name: {dtype, shape, data_offsets}}`` of a safetensors file that is complete.

    Reads the header only (a few KB even for a 3 GB UNet). Layout: an 8-byte little-endian length N, N bytes
    of JSON, then the tensor data, which must end exactly where the largest ``data_offsets`` end says - a
    truncated copy or download is shorter. Anything else is a ModelFileError: "<path> is not a valid
    safetensors file (<why>): <hint>".
    """
    path = Path(path)

    def bad(why: str) -> ModelFileError:
        return ModelFileError(f"{path} is not a valid safetensors file ({why}): {hint}")

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes, shorter than a header")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_HEADER):
            raise bad(f"header length {n} does not fit in the {size}-byte file: truncated or not safetensors")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise bad("header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            lo, hi = (int(x) for x in info["data_offsets"])
            shape = [int(x) for x in info["shape"]]
            str(info["dtype"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"header entry {name!r} lacks dtype / shape / data_offsets") from None
        if not 0 <= lo <= hi or min(shape, default=0) < 0:
            raise bad(f"header entry {name!r} has offsets {[lo, hi]} and shape {shape}")
        end = max(end, hi)
    if size - 8 - n != end:
        raise bad(f"the file has {size - 8 - n} data bytes, its header describes {end}: truncated or corrupt")
    return header


def component_header(path: str | Path, sub: str) -> dict[str, Any] | None:
    """{tensor name: header entry} over the plain (non-variant) safetensors files of ``path/sub``; None when
    that component's weights are not safetensors (``.bin``) or are only present as a variant."""
    folder = Path(path) / sub
    files = sorted(f for f in folder.glob("*.safetensors") if f.name.count(".") == 1)
    if not files:
        return None
    out: dict[str, Any] = {}
    for f in files:
        out.update({k: v for k, v in read_safetensors_header(f, _download_hint(str(path))).items()
                    if k != "__metadata__"})
    return out


def check_model_dir(path: str) -> None:
    """Raise ModelFileError (one line: the missing file and the download command) unless ``path`` is a
    complete local diffusers SD directory."""
    root = Path(path)
    if not root.is_dir():
        raise ModelFileError(f"model directory {path!r} does not exist (or is not a directory); {_download_hint(path)}")
    if not (root / "model_index.json").is_file():
        raise _missing(path, "model_index.json")
    try:
        json.loads((root / "model_index.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{root / 'model_index.json'} is not valid JSON ({e}); {_download_hint(path)}") from None
    tok = root / "tokenizer"
    if not ((tok / "tokenizer.json").is_file() or ((tok / "vocab.json").is_file() and (tok / "merges.txt").is_file())):
        raise _missing(path, "tokenizer/vocab.json + tokenizer/merges.txt (or tokenizer/tokenizer.json)")
    if not (root / "scheduler" / "scheduler_config.json").is_file():
        raise _missing(path, "scheduler/scheduler_config.json")
    for sub in ("text_encoder", "unet", "vae"):
        if not (root / sub / "config.json").is_file():
            raise _missing(path, f"{sub}/config.json")
        if not _has_weights(root / sub):
            raise _missing(path, f"{sub}/ weights (*.safetensors or *.bin)")
        for f in sorted((root / sub).glob("*.safetensors")):
            read_safetensors_header(f, _download_hint(path))


def _variant(folder: Path, stem: str) -> str | None:
    """None when the plain weight file is there, else a variant (e.g. 'fp16') that is."""
    names = [f.name for f in folder.iterdir()]
    if any(n.startswith(stem + ".") and n.count(".") == 1 for n in names) or any(n == stem + ".safetensors.index.json"
                                                                                  for n in names):
        return None
    for n in names:  # stem.<variant>.safetensors
        parts = n.split(".")
        if n.startswith(stem + ".") and len(parts) == 3 and parts[2] in ("safetensors", "bin"):
            return parts[1]
    return None


def freeze(*modules: torch.nn.Module) -> None:
    for m in modules:
        m.requires_grad_(False)
        m.eval()


def load_components(path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Components:
    """Tokenizer, text encoder, UNet, VAE and scheduler config from a local diffusers SD directory.

    Frozen, eval mode, on ``device`` in ``dtype``. Never downloads (local_files_only=True).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors import SafetensorError
    from transformers import CLIPTextModel, CLIPTokenizer

    check_model_dir(path)
    root = Path(path)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(
            path, subfolder="text_encoder", dtype=dtype, local_files_only=True,
            variant=_variant(root / "text_encoder", "model"),
        )
        unet = UNet2DConditionModel.from_pretrained(
            path, subfolder="unet", torch_dtype=dtype, local_files_only=True,
            variant=_variant(root / "unet", "diffusion_pytorch_model"),
        )
        vae = AutoencoderKL.from_pretrained(
            path, subfolder="vae", torch_dtype=dtype, local_files_only=True,
            variant=_variant(root / "vae", "diffusion_pytorch_model"),
        )
        scheduler_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFileError(f"could not load the model in {path!r}: {first}; {_download_hint(path)}") from None
    for m in (text_encoder, unet, vae):
        m.to(device)
    freeze(text_encoder, unet, vae)
    return Components(tokenizer, text_encoder, unet, vae, scheduler_config, str(path))


def components_from_dict(d: dict) -> Components:
    """Wrap ``models.tiny.tiny_components(...)`` (or any StableDiffusionPipeline kwargs dict); frozen."""
    freeze(d["text_encoder"], d["unet"], d["vae"])
    return Components(d["tokenizer"], d["text_encoder"], d["unet"], d["vae"], dict(d["scheduler"].config), None)


def save_tiny_model(path: str | Path, seed: int = 0, words: list[str] | tuple[str, ...] = ()) -> Path:
    """Write the tiny SD model (models/tiny.py) as a stock diffusers directory (tests, demos)."""
    from diffusers import StableDiffusionPipeline

    from fairdiff_ray.models.tiny import tiny_components

    pipe = StableDiffusionPipeline(**tiny_components(seed=seed, words=words), requires_safety_checker=False)
    pipe.save_pretrained(str(path))
    return Path(path)


def load_tokenizer(path: str) -> Any:
    """The model's CLIP tokenizer alone (cheap: for checking prompts before any model is loaded)."""
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFileError(f"could not load the tokenizer in {path!r}: {first}; {_download_hint(path)}") from None


def long_prompts(tokenizer: Any, prompts: list[str], reserved: int = 0) -> list[tuple[str, int]]:
    """[(prompt, token count incl. BOS / EOS)] of the prompts that ``tokenize`` would truncate; ``reserved``
    positions are taken by something else (soft prompt tokens)."""
    limit = tokenizer.model_max_length - reserved
    # truncation at a huge length counts every token without transformers' own "sequence too long" log line
    ids = tokenizer(list(prompts), truncation=True, max_length=1 << 30).input_ids if prompts else []
    return [(p, len(i)) for p, i in zip(prompts, ids) if len(i) > limit]


def warn_long_prompts(tokenizer: Any, prompts: list[str], where: str, reserved: int = 0) -> int:
    """One stderr warning line when prompts exceed the tokenizer's limit (they are truncated, as the stock
    pipeline truncates them; the end of such a prompt is lost). Returns how many are too long."""
    long = long_prompts(tokenizer, prompts, reserved)
    if long:
        limit = tokenizer.model_max_length - reserved
        p, n = max(long, key=lambda x: x[1])
        shown = p if len(p) <= 60 else p[:57] + "..."
        print(f"fairdiff: warning: {where}: {len(long)} prompt(s) longer than the tokenizer's {limit} tokens are "
              f"truncated (longest: {shown!r}, {n} tokens); shorten them to keep their ends", file=sys.stderr, flush=True)
    return len(long)


def tokenize(tokenizer: Any, prompts: list[str], max_length: int | None = None) -> Tensor:
    """(B, max_length) input ids padded / truncated exactly as StableDiffusionPipeline.encode_prompt does."""
    return tokenizer(
        list(prompts), padding="max_length", max_length=max_length or tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    ).input_ids


def _attention_mask(text_encoder: torch.nn.Module, ids: Tensor) -> Tensor | None:
    # The pipeline passes a mask only for text encoders configured to want one (not CLIP in SD 1.x / 2.x).
    if getattr(text_encoder.config, "use_attention_mask", False):
        return torch.ones_like(ids)
    return None


def encode_ids(text_encoder: torch.nn.Module, ids: Tensor) -> Tensor:
    """Last hidden state (B, L, D) for input ids (B, L)."""
    device = next(text_encoder.parameters()).device
    ids = ids.to(device)
    mask = _attention_mask(text_encoder, ids)
    return text_encoder(ids, attention_mask=mask)[0]


def encode_prompts(tokenizer: Any, text_encoder: torch.nn.Module, prompts: list[str]) -> Tensor:
    """Prompt embeddings (B, L, D): the text encoder's last hidden state over max_length-padded ids."""
    return encode_ids(text_encoder, tokenize(tokenizer, prompts))


def make_scheduler(name: Literal["ddim", "dpmsolver++"], scheduler_config: dict) -> Any:
    """A fresh scheduler of the model's noise schedule: DDIM (eta 0) or DPM-Solver++ (2M)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if name == "ddim":
        return DDIMScheduler.from_config(scheduler_config)
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(scheduler_config, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"scheduler must be 'ddim' or 'dpmsolver++', got {name!r}")


def unet_eps_fn(unet: torch.nn.Module, cond: Tensor, uncond: Tensor | None) -> Callable[..., Tensor]:
    """eps_fn(x, t) for core.sampler: the UNet on cond (B, L, D), with rows cat([uncond, cond]) for a doubled
    (classifier-free guidance) batch of 2B latents. ``uncond`` None -> guidance must be off (B rows).
    eps_fn(x, t, cond, uncond) uses the embeddings passed instead (core.sampler's ``eps_args``, which the
    reentrant checkpoint needs to pass their gradients on): see ``unet_eps_args``."""
    both = torch.cat([uncond, cond]) if uncond is not None else None
    if uncond is not None and uncond.shape != cond.shape:
        raise ValueError(f"uncond shape {tuple(uncond.shape)} differs from cond shape {tuple(cond.shape)}")

    def eps_fn(x: Tensor, t: Tensor, *emb_args: Tensor) -> Tensor:
        c, pair, b = cond, both, cond.shape[0]
        if emb_args:  # any number of rows (the sampler's grad_rows splits them)
            c = emb_args[0]
            pair = torch.cat([emb_args[1], c]) if len(emb_args) > 1 else None
            b = c.shape[0]
        if x.shape[0] == b:
            emb = c
        elif pair is not None and x.shape[0] == 2 * b:
            emb = pair
        else:
            raise ValueError(f"eps_fn got {x.shape[0]} latents for {b} prompts (expected {b}, or {2 * b} with uncond)")
        return unet(x, t, encoder_hidden_states=emb).sample

    return eps_fn


def unet_eps_args(cond: Tensor, uncond: Tensor | None) -> tuple[Tensor, ...]:
    """The ``eps_args`` of core.sampler.sample_with_grad for unet_eps_fn(unet, cond, uncond)."""
    return (cond,) if uncond is None else (cond, uncond)


def decode_latents(vae: torch.nn.Module, latents: Tensor) -> Tensor:
    """Images (B, 3, H, W) in [-1, 1] from latents (B, 4, h, w); differentiable (clamped like the pipeline)."""
    cfg = vae.config
    z = latents / cfg.scaling_factor
    shift = getattr(cfg, "shift_factor", None)
    if shift is not None:
        z = z + shift
    image = vae.decode(z.to(next(vae.parameters()).dtype)).sample
    return image.clamp(-1.0, 1.0)
