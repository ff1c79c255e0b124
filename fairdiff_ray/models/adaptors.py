"""What the fairness finetuning trains (METHOD.md section 5), injected in place into a frozen SD model.

Kinds (AdaptorConfig.kind):
- ``text_lora``   LoRA on q_proj, k_proj, v_proj, out_proj, fc1, fc2 of every CLIP layer (``text_targets``);
                  the "" prompt of classifier-free guidance goes through it too.
- ``unet_lora``   LoRA on the UNet attention projections to_q, to_k, to_v, to_out.0 (``unet_targets``).
- ``both``        the two together.
- ``soft_prompt`` ``soft_tokens`` embeddings placed right after BOS of every conditional prompt
                  (``soft_position`` prefix, METHOD.md) or right after its last token (suffix); only they
                  train. Initialised from the embedding of a word ("person") plus small seeded noise.
                  ``replace``: they stand in for the words ``soft_replace`` that every prompt starts with,
                  initialised to exactly those words' embeddings (no position moves; untrained = base model).
- ``full_unet`` / ``full_text``  the whole module trains (meant for DeepSpeed ZeRO stage <= 2: disabled()
                  swaps a CPU copy of the base weights in, which needs whole parameters on every rank).
LoRA layers are peft's (``add_adapter``, adapter name "default"); B starts at zero, so attaching an adaptor
does not change any output. Rank, alpha (None -> rank), dropout and targets come from AdaptorConfig.

Export (``Adaptor.export``) writes files stock diffusers loads with no fairdiff code:

    pipe = StableDiffusionPipeline.from_pretrained(BASE_MODEL_DIR)
    pipe.load_lora_weights(ADAPTOR_DIR)                         # text_lora, unet_lora, both
    pipe.load_textual_inversion(ADAPTOR_DIR, token="<fairdiff>")  # soft_prompt ...
    image = pipe("<fairdiff> " + prompt).images[0]              # ... FIRST in the prompt (prefix) or
    image = pipe(prompt + " <fairdiff>").images[0]              # ... LAST (soft_position: suffix)
    image = pipe(prompt.replace(SOFT_REPLACE, "<fairdiff>", 1)).images[0]  # ... instead of words (replace)
    pipe.unet = UNet2DConditionModel.from_pretrained(ADAPTOR_DIR, subfolder="unet")  # full_unet
    pipe.text_encoder = CLIPTextModel.from_pretrained(ADAPTOR_DIR, subfolder="text_encoder")  # full_text

- LoRA: ``pytorch_lora_weights.safetensors`` as ``save_lora_weights`` writes it (peft key names prefixed
  ``unet.`` / ``text_encoder.text_model.``, the peft LoraConfig of each module in the safetensors metadata so
  alpha is honoured).
- Soft prompt: ``learned_embeds.safetensors`` = {"<fairdiff>": (soft_tokens, D)}, a multi-vector textual
  inversion: diffusers expands "<fairdiff>" to soft_tokens tokens, so "<fairdiff> " + prompt puts them right
  after BOS (prompt + " <fairdiff>" right before EOS), exactly where fairdiff puts its soft tokens. Uncond ("")
  prompts carry no token.
- ``fairdiff_adaptor.json``: kind, rank / alpha / targets, base model, the caller's metadata (attributes,
  target, config, step), ema flag and the usage lines above; ``load_adaptor`` reads it back.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fairdiff_ray.config import AdaptorConfig
from fairdiff_ray.errors import ConfigError, ModelFileError
from fairdiff_ray.io import atomic_dir
from fairdiff_ray.models.sd import Components, encode_ids, encode_prompts, tokenize

ADAPTER = "default"
TOKEN = "<fairdiff>"
INIT_WORD = "person"
EMA_WEIGHT = "ema_weight"  # in state_dict: the share of trained weights the EMA copies hold
META_FILE = "fairdiff_adaptor.json"
LORA_FILE = "pytorch_lora_weights.safetensors"
SOFT_FILE = "learned_embeds.safetensors"
KINDS = ("text_lora", "unet_lora", "both", "soft_prompt", "full_unet", "full_text")
_USAGE = {
    "lora": "pipe.load_lora_weights(ADAPTOR_DIR)",
    "soft_prompt": f'pipe.load_textual_inversion(ADAPTOR_DIR, token="{TOKEN}"); prompt = "{TOKEN} " + prompt',
    "soft_prompt_suffix": f'pipe.load_textual_inversion(ADAPTOR_DIR, token="{TOKEN}"); prompt = prompt + " {TOKEN}"',
    "soft_prompt_replace": (f'pipe.load_textual_inversion(ADAPTOR_DIR, token="{TOKEN}"); '
                            f'prompt = prompt.replace(SOFT_REPLACE, "{TOKEN}", 1)'),
    "full_unet": 'pipe.unet = UNet2DConditionModel.from_pretrained(ADAPTOR_DIR, subfolder="unet")',
    "full_text": 'pipe.text_encoder = CLIPTextModel.from_pretrained(ADAPTOR_DIR, subfolder="text_encoder")',
}


def _lora_modules(kind: str) -> tuple[str, ...]:
    return {"text_lora": ("text_encoder",), "unet_lora": ("unet",), "both": ("text_encoder", "unet")}.get(kind, ())


def _tuner_layers(module: torch.nn.Module) -> list[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


class Adaptor:
    """Trainable additions to ``comp`` (injected in place). See the module docstring for the kinds."""

    def __init__(self, comp: Components, cfg: AdaptorConfig, seed: int = 0, init_word: str = INIT_WORD):
        if cfg.kind not in KINDS:
            raise ValueError(f"adaptor kind must be one of {KINDS}, got {cfg.kind!r}")
        self.kind, self.cfg, self.comp, self.seed = cfg.kind, cfg, comp, seed
        self.alpha = float(cfg.alpha if cfg.alpha is not None else cfg.rank)
        self.soft: torch.nn.Parameter | None = None
        self._base: dict[str, Tensor] = {}  # full kinds: CPU copy of the base weights for disabled()
        self._off = False
        gen = torch.Generator("cpu").manual_seed(int(seed))
        for name in _lora_modules(self.kind):
            self._add_lora(name, gen)
        # replace position: the token ids the soft rows stand in for (checked against every encoded prompt)
        self._replace = soft_replace_ids(comp.tokenizer, cfg)
        if self.kind == "soft_prompt":
            self.soft = torch.nn.Parameter(self._soft_init(init_word, gen))
        for name in {"full_unet": ("unet",), "full_text": ("text_encoder",)}.get(self.kind, ()):
            module = getattr(comp, name)
            self._base = {f"{name}.{k}": v.detach().to("cpu", copy=True) for k, v in module.named_parameters()}
            module.requires_grad_(True)
        self._params = self._collect()
        # EMA copies (float32) and the total weight they hold of the trained weights: 1 when they start from the
        # untrained adaptor (its share decays as decay**t), 0 with adaptor.ema_bias_correction (they start at zero
        # and are divided by the weight, 1 - decay**t: an average of trained weights only)
        correct = cfg.ema_bias_correction
        self.ema = {k: (torch.zeros_like if correct else torch.clone)(p.detach().float()) for k, p in self._params.items()}
        self.ema_weight = 0.0 if correct else 1.0

    # -- construction --------------------------------------------------------------------------------
    def _add_lora(self, name: str, gen: torch.Generator) -> None:
        from peft import LoraConfig

        module = getattr(self.comp, name)
        if getattr(module, "peft_config", None) and ADAPTER in module.peft_config:
            raise ValueError(f"comp.{name} already carries a LoRA adapter: attach one adaptor per loaded model")
        targets = self.cfg.text_targets if name == "text_encoder" else self.cfg.unet_targets
        module.add_adapter(LoraConfig(r=self.cfg.rank, lora_alpha=self.alpha, lora_dropout=self.cfg.dropout,
                                      target_modules=list(targets), init_lora_weights=True), adapter_name=ADAPTER)
        # Re-draw A (peft draws it from the global RNG) from our seeded generator, with peft's own law:
        # kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)). B stays zero.
        with torch.no_grad():
            for layer in _tuner_layers(module):
                a = layer.lora_A[ADAPTER].weight
                bound = 1.0 / math.sqrt(a.shape[1])
                a.copy_((torch.rand(a.shape, generator=gen) * 2 - 1) * bound)
        module.eval()

    def _soft_init(self, word: str, gen: torch.Generator) -> Tensor:
        emb = self.comp.text_encoder.get_input_embeddings().weight.detach().float().cpu()
        if self._replace is not None:
            return emb[self._replace].clone().to(self.comp.text_encoder.device)
        ids = self.comp.tokenizer(word, add_special_tokens=False).input_ids
        base = emb[ids].mean(0) if ids else emb.mean(0)
        noise = torch.randn((self.cfg.soft_tokens, emb.shape[1]), generator=gen) * 0.01 * float(emb.std())
        return (base.expand_as(noise) + noise).to(self.comp.text_encoder.device)

    def _collect(self) -> dict[str, torch.nn.Parameter]:
        out: dict[str, torch.nn.Parameter] = {}
        for name in ("text_encoder", "unet"):
            full = self.kind == f"full_{'text' if name == 'text_encoder' else 'unet'}"
            for k, p in getattr(self.comp, name).named_parameters():
                if full or (name in _lora_modules(self.kind) and ".lora_" in k):
                    out[f"{name}.{k}"] = p
        if self.soft is not None:
            out["soft_prompt"] = self.soft
        return out

    # -- the training-facing API ---------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self._params.values())

    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        return dict(self._params)

    def train(self, mode: bool = True) -> None:
        """LoRA dropout acts only in training mode; the frozen modules themselves stay in eval mode."""
        for name in _lora_modules(self.kind):
            for layer in _tuner_layers(getattr(self.comp, name)):
                layer.lora_dropout.train(mode)

    def encode(self, prompts: list[str]) -> Tensor:
        """Conditional embeddings (B, L, D) with the adaptor active (soft tokens right after BOS)."""
        if self.soft is None or self._off:
            return encode_prompts(self.comp.tokenizer, self.comp.text_encoder, prompts)
        n, tok = self.soft.shape[0], self.comp.tokenizer
        soft = self.soft
        if self._replace is not None:
            ids = tokenize(tok, prompts, tok.model_max_length)
            bad = (ids[:, 1 : 1 + n] != torch.tensor(self._replace, dtype=ids.dtype)).any(dim=1)
            if bool(bad.any()):
                p = prompts[int(bad.nonzero()[0])]
                raise ValueError(f"prompt {p!r} does not start with adaptor.soft_replace "
                                 f"{self.cfg.soft_replace!r}: use prompts that do, or another soft_position")
            at = [1] * ids.shape[0]
        else:
            ids, at = self._insert_filler(prompts)
        # (B, n) positions of the soft rows in every prompt's token embeddings
        pos = torch.as_tensor(at)[:, None] + torch.arange(n)

        def splice(_module: torch.nn.Module, _inputs: Any, out: Tensor) -> Tensor:
            index = pos.to(out.device)[..., None].expand(-1, -1, out.shape[-1])
            return out.scatter(1, index, soft.to(out.dtype).expand(out.shape[0], -1, -1))  # differentiable in soft

        handle = self.comp.text_encoder.get_input_embeddings().register_forward_hook(splice)
        try:
            return encode_ids(self.comp.text_encoder, ids)
        finally:
            handle.remove()

    def _insert_filler(self, prompts: list[str]) -> tuple[Tensor, list[int]]:
        """Token ids with ``soft_tokens`` filler ids inserted (prefix: after BOS; suffix: before EOS), and where."""
        assert self.soft is not None
        n, tok = self.soft.shape[0], self.comp.tokenizer
        ids = tokenize(tok, prompts, tok.model_max_length - n)  # as the stock pipeline truncates "<fairdiff> " + p
        if self.cfg.soft_position == "prefix":
            at = [1] * ids.shape[0]
        else:  # before the first EOS (CLIP pads with EOS; a truncated prompt ends with one too)
            at = [int((row == tok.eos_token_id).nonzero()[0]) for row in ids]
        filler = torch.full((n,), tok.bos_token_id, dtype=ids.dtype)  # replaced by the soft rows in splice
        return torch.stack([torch.cat([row[:a], filler, row[a:]]) for row, a in zip(ids, at)]), at

    def uncond(self, n: int) -> Tensor:
        """"" embeddings (n, L, D); text-encoder LoRA applies, soft tokens do not."""
        return encode_prompts(self.comp.tokenizer, self.comp.text_encoder, [""] * n)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The base model exactly: LoRA layers bypassed, no soft tokens, base weights of full kinds."""
        flags = {k: p.requires_grad for k, p in self._params.items()}
        layers = [m for name in _lora_modules(self.kind) for m in _tuner_layers(getattr(self.comp, name))]
        stash: dict[str, Tensor] = {}
        for m in layers:
            m.enable_adapters(False)
        for k, v in self._base.items():
            stash[k] = self._params[k].data
            self._params[k].data = v.to(stash[k].device, stash[k].dtype)
        self._off = True
        try:
            yield
        finally:
            self._off = False
            for m in layers:
                m.enable_adapters(True)
            for k, v in stash.items():
                self._params[k].data = v
            for k, p in self._params.items():  # peft's enable_adapters toggles requires_grad: put ours back
                p.requires_grad_(flags[k])

    def ema_update(self, decay: float | None = None) -> None:
        """ema <- decay * ema + (1 - decay) * w for every trainable weight (float32 EMA copies)."""
        d = self.cfg.ema_decay if decay is None else float(decay)
        with torch.no_grad():
            for k, p in self._params.items():
                self.ema[k].mul_(d).add_(p.detach().float(), alpha=1.0 - d)
        self.ema_weight = d * self.ema_weight + (1.0 - d)

    @contextlib.contextmanager
    def ema_applied(self) -> Iterator[None]:
        """Temporarily put the EMA weights into the trainable parameters (evaluation, export)."""
        stash = {k: p.data for k, p in self._params.items()}
        if self.ema_weight > 0:  # 0: bias-corrected and never updated - nothing averaged, the weights as they are
            for k, p in self._params.items():
                p.data = (self.ema[k] / self.ema_weight).to(p.device, p.dtype)
        try:
            yield
        finally:
            for k, p in self._params.items():
                p.data = stash[k]

    def state_dict(self) -> dict[str, Tensor]:
        out = {k: p.detach().clone() for k, p in self._params.items()}
        out.update({f"ema.{k}": v.clone() for k, v in self.ema.items()})
        out[EMA_WEIGHT] = torch.tensor([self.ema_weight], dtype=torch.float64)
        return out

    def load_state_dict(self, sd: dict[str, Tensor]) -> None:
        want = set(self._params) | {f"ema.{k}" for k in self._params}
        if set(sd) - {EMA_WEIGHT} != want:
            missing, extra = sorted(want - set(sd))[:3], sorted(set(sd) - want)[:3]
            raise ValueError(f"adaptor state dict does not match this {self.kind} adaptor: missing {missing}, "
                             f"unexpected {extra}")
        with torch.no_grad():
            for k, p in self._params.items():
                p.copy_(sd[k])
                self.ema[k].copy_(sd[f"ema.{k}"])
        # states written before the weight was saved held EMAs that started from the untrained adaptor: weight 1
        self.ema_weight = float(sd[EMA_WEIGHT].reshape(-1)[0]) if EMA_WEIGHT in sd else 1.0

    # -- export --------------------------------------------------------------------------------------
    def _lora_layers(self, name: str) -> dict[str, Tensor]:
        from peft.utils import get_peft_model_state_dict

        sd = get_peft_model_state_dict(getattr(self.comp, name), adapter_name=ADAPTER, save_embedding_layers=False)
        sd = {k: v.detach().contiguous() for k, v in sd.items()}
        if name == "text_encoder":  # older transformers nest CLIP under text_model; new diffusers strip it
            sd = {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in sd.items()}
        return sd

    def _lora_metadata(self, name: str) -> dict:
        return dict(getattr(self.comp, name).peft_config[ADAPTER].to_dict())

    def _write(self, out: Path) -> dict[str, str]:
        if self.kind in ("text_lora", "unet_lora", "both"):
            from diffusers.loaders import StableDiffusionLoraLoaderMixin

            mods = _lora_modules(self.kind)
            kw = {f"{n}_lora_layers": self._lora_layers(n) for n in mods}
            kw.update({f"{n}_lora_adapter_metadata": self._lora_metadata(n) for n in mods})
            StableDiffusionLoraLoaderMixin.save_lora_weights(str(out), weight_name=LORA_FILE, **kw)
            return {"lora": LORA_FILE}
        if self.kind == "soft_prompt":
            from safetensors.torch import save_file

            assert self.soft is not None
            save_file({TOKEN: self.soft.detach().float().cpu().contiguous()}, str(out / SOFT_FILE))
            return {"soft_prompt": SOFT_FILE}
        name = "unet" if self.kind == "full_unet" else "text_encoder"
        getattr(self.comp, name).save_pretrained(str(out / name))
        return {name: name}

    def export(self, out_dir: str, metadata: dict, use_ema: bool = True, overwrite: bool = False) -> None:
        """Write the adaptor (EMA weights by default) for stock diffusers plus fairdiff_adaptor.json.

        Atomic: the directory appears complete or not at all. An existing non-empty ``out_dir`` is refused
        (UserError) unless ``overwrite``.
        """
        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            with self.ema_applied() if use_ema else contextlib.nullcontext():
                files = self._write(tmp)
            pos = self.cfg.soft_position if self.kind == "soft_prompt" else "prefix"
            usage = _USAGE["lora" if "lora" in files else f"soft_prompt_{pos}" if pos != "prefix" else self.kind]
            if pos == "replace":
                usage = usage.replace("SOFT_REPLACE", json.dumps(self.cfg.soft_replace))
            meta = {
                "base_model": self.comp.path, **metadata,
                "format": "fairdiff-adaptor/1", "kind": self.kind, "rank": self.cfg.rank, "alpha": self.alpha,
                "dropout": self.cfg.dropout, "text_targets": list(self.cfg.text_targets),
                "unet_targets": list(self.cfg.unet_targets), "soft_tokens": self.cfg.soft_tokens,
                "token": TOKEN if self.kind == "soft_prompt" else None, "adaptor": self.cfg.model_dump(),
                "seed": self.seed, "ema": bool(use_ema), "files": files, "usage": usage,
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")


def soft_replace_ids(tokenizer: Any, cfg: AdaptorConfig) -> list[int] | None:
    """Token ids of ``cfg.soft_replace`` for a soft prompt at the replace position (else None); ConfigError when
    their count is not ``cfg.soft_tokens``."""
    if cfg.kind != "soft_prompt" or cfg.soft_position != "replace":
        return None
    text = str(cfg.soft_replace)
    ids = list(tokenizer(text, add_special_tokens=False).input_ids)
    if len(ids) != cfg.soft_tokens:
        raise ConfigError(f"adaptor.soft_replace {text!r} is {len(ids)} tokens but adaptor.soft_tokens is "
                          f"{cfg.soft_tokens}: set adaptor.soft_tokens={len(ids)}")
    return ids


def attach_adaptor(comp: Components, cfg: AdaptorConfig, seed: int = 0, init_word: str = INIT_WORD) -> Adaptor:
    """Inject a fresh adaptor of ``cfg.kind`` into ``comp`` (in place); outputs are unchanged until it trains."""
    return Adaptor(comp, cfg, seed=seed, init_word=init_word)


def read_adaptor_meta(adaptor_dir: str) -> dict:
    root = Path(adaptor_dir)
    if not root.is_dir():
        raise ModelFileError(f"adaptor directory {adaptor_dir!r} does not exist; pass the adaptor/ folder of a "
                             "`fairdiff debias` run")
    try:
        return json.loads((root / META_FILE).read_text())
    except FileNotFoundError:
        raise ModelFileError(f"{root / META_FILE} is missing: {adaptor_dir!r} is not a fairdiff adaptor export "
                             "(pass the adaptor/ folder of a `fairdiff debias` run)") from None
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{root / META_FILE} is unreadable ({e}); re-export the adaptor") from None


def _weight_files(root: Path, files: dict[str, str]) -> list[Path]:
    """The safetensors files an export lists (full kinds list a folder: every safetensors file in it)."""
    out = []
    for rel in files.values():
        p = root / rel
        out.extend(sorted(p.glob("*.safetensors")) if p.is_dir() else [p])
    return out


def check_adaptor(adaptor_dir: str, model_path: str | None = None) -> dict:
    """fairdiff_adaptor.json of a complete, uncorrupted export (every weight file's safetensors header is checked);
    with ``model_path``, also that every weight fits that base model (names and shapes, read from headers only).

    Cheap (no tensor is read), so every entry point calls it before any work. ModelFileError (one line) otherwise.
    """
    meta = read_adaptor_meta(adaptor_dir)
    root = Path(adaptor_dir)
    redo = "re-export the adaptor (fairdiff debias writes it)"
    if not isinstance(meta, dict):
        raise ModelFileError(f"{root / META_FILE} is not a JSON object; {redo}")
    try:
        AdaptorConfig(**meta["adaptor"])
    except Exception as e:  # noqa: BLE001 - any malformed section is the same user problem
        raise ModelFileError(f"{root / META_FILE}: bad 'adaptor' section ({str(e).splitlines()[0]}); {redo}") from None
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        raise ModelFileError(f"{root / META_FILE} lists no weight files; {redo}")
    for rel in files.values():
        if not (root / str(rel)).exists():
            raise ModelFileError(f"adaptor file {root / str(rel)} is missing; {redo}")
    from fairdiff_ray.models.sd import read_safetensors_header

    headers = {f: read_safetensors_header(f, redo) for f in _weight_files(root, files)}
    if model_path is not None:
        _check_fit(meta, files, root, headers, model_path)
    return meta


def _misfit(root: Path, model_path: str, meta: dict, what: str) -> ModelFileError:
    made = f"base model {meta['base_model']!r}" if meta.get("base_model") else "another base model"
    return ModelFileError(f"adaptor {str(root)!r} does not fit model {model_path!r}: {what}; it was made for {made}: "
                          "use that model, or train an adaptor for this one")


def _base_entry(base: dict[str, Any], name: str) -> tuple[str, list[int]] | None:
    """(name, shape) of a base tensor, with or without transformers' 'text_model.' nesting."""
    for cand in (name, name.removeprefix("text_model."), f"text_model.{name}"):
        if cand in base:
            return cand, list(base[cand]["shape"])
    return None


def _check_fit(meta: dict, files: dict, root: Path, headers: dict[Path, dict], model_path: str) -> None:
    """Names and shapes of the exported weights against the base model's safetensors headers."""
    from fairdiff_ray.models.sd import component_header

    base = {m: component_header(model_path, m) for m in ("text_encoder", "unet")}

    def entries(rel: str) -> dict[str, Any]:
        return {k: v for f, h in headers.items() if f == root / rel or f.parent == root / rel
                for k, v in h.items() if k != "__metadata__"}

    if "lora" in files:
        for key, info in entries(files["lora"]).items():
            module, _, rest = key.partition(".")
            if base.get(module) is None or not (".lora_A." in rest or ".lora_B." in rest):
                continue  # .bin weights or another kind of tensor: load_adaptor checks them at load time
            side = "A" if ".lora_A." in rest else "B"
            found = _base_entry(base[module], rest.replace(f".lora_{side}.", "."))
            shape = list(info["shape"])
            if found is None:
                raise _misfit(root, model_path, meta, f"{key} has no counterpart in the model's {module}")
            name, want = found
            # lora_A: (r, in, ...), lora_B: (out, r, ...); the base weight is (out, in, ...)
            if len(shape) != len(want) or (shape[1] != want[1] if side == "A" else shape[0] != want[0]):
                raise _misfit(root, model_path, meta, f"{key} has shape {shape}, the model's {module}.{name} {want}")
    elif "soft_prompt" in files:
        emb = _base_entry(base["text_encoder"] or {}, "embeddings.token_embedding.weight")
        for key, info in entries(files["soft_prompt"]).items():
            if emb is not None and list(info["shape"])[-1:] != emb[1][-1:]:
                raise _misfit(root, model_path, meta, f"soft prompt {key} has shape {list(info['shape'])}, the "
                              f"model's token embeddings {emb[1]}")
    else:
        def plain(d: dict[str, Any]) -> dict[str, Any]:
            return {k.removeprefix("text_model."): v for k, v in d.items()}

        for module, rel in files.items():
            have, want = plain(entries(rel)), base.get(module)
            if want is None:
                continue
            want = plain(want)
            for key in sorted(set(have) | set(want)):
                a = list(have[key]["shape"]) if key in have else None
                b = list(want[key]["shape"]) if key in want else None
                if a != b:
                    raise _misfit(root, model_path, meta, f"{module} weight {key}: adaptor {a}, model {b}")


def _load_lora(adaptor: Adaptor, path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    out = {}
    for key, v in load_file(str(path)).items():
        module, rest = key.split(".", 1)
        if module == "text_encoder" and not hasattr(adaptor.comp.text_encoder, "text_model"):
            rest = rest.removeprefix("text_model.")
        out[f"{module}.{rest.replace('.weight', f'.{ADAPTER}.weight')}"] = v
    return out


def load_adaptor(comp: Components, adaptor_dir: str) -> Adaptor:
    """An exported adaptor (its exported weights, EMA = those weights) attached to ``comp`` in place."""
    meta = check_adaptor(adaptor_dir, comp.path)
    root = Path(adaptor_dir)
    cfg = AdaptorConfig(**meta["adaptor"])
    files = meta["files"]
    adaptor = attach_adaptor(comp, cfg, seed=int(meta.get("seed", 0)))
    if "lora" in files:
        sd = _load_lora(adaptor, root / files["lora"])
    elif "soft_prompt" in files:
        from safetensors.torch import load_file

        sd = {"soft_prompt": next(iter(load_file(str(root / files["soft_prompt"])).values()))}
    else:
        sd = _load_full(adaptor, root, next(iter(files)))
    params = adaptor.named_parameters()
    if set(sd) != set(params):
        bad = sorted(set(sd) ^ set(params))[:2]
        raise ModelFileError(f"adaptor in {adaptor_dir!r} does not fit model {comp.path!r} (e.g. {bad}); use the "
                             f"base model it was trained on ({meta.get('base_model')})")
    with torch.no_grad():
        for k, p in params.items():
            if sd[k].shape != p.shape:
                raise ModelFileError(f"adaptor weight {k} has shape {tuple(sd[k].shape)}, model expects "
                                     f"{tuple(p.shape)}: use the base model {meta.get('base_model')}")
            p.copy_(sd[k])
            adaptor.ema[k].copy_(sd[k])
    return adaptor


def _load_full(adaptor: Adaptor, root: Path, name: str) -> dict[str, Tensor]:
    if name == "unet":
        from diffusers import UNet2DConditionModel

        module = UNet2DConditionModel.from_pretrained(str(root / name), local_files_only=True)
    else:
        from transformers import CLIPTextModel

        module = CLIPTextModel.from_pretrained(str(root / name), local_files_only=True)
    return {f"{name}.{k}": v for k, v in module.named_parameters()}
