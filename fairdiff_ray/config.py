"""Typed, frozen run configuration loaded from YAML with ``a.b=value`` overrides.

Every section is a frozen pydantic model that forbids unknown keys. Errors are ConfigError with one line that
names the key, the problem and (for a misspelt key) the closest valid key.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fairdiff_ray.core.targets import TargetDistribution
from fairdiff_ray.errors import ConfigError
from fairdiff_ray.io import is_uri


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=False, validate_default=True)


class RunConfig(_Section):
    # a directory name under storage: letters, digits, '.', '_', '-' (not '.' or '..'); numbers are taken as text
    name: str = "fairdiff"
    storage: str = Field("runs", min_length=1)  # local directory or any pyarrow filesystem URI (s3://, gs://, ...)
    seed: int = 0
    overwrite: bool = False

    @field_validator("name", mode="before")
    @classmethod
    def _name_text(cls, v: Any) -> Any:
        v = str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v
        if isinstance(v, str) and (v in (".", "..") or not re.fullmatch(r"[A-Za-z0-9_.-]+", v)):
            raise ValueError("must be a directory name under run.storage: letters, digits, '.', '_' or '-'")
        return v


DEVICE_RE = r"auto|cpu|cuda(:[0-9]+)?"  # model.device and generate --device


class ModelConfig(_Section):
    path: str = "assets/synthetic-sd"  # a local diffusers Stable Diffusion directory
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(DEVICE_RE, v):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return v


class FacesConfig(_Section):
    detector: Literal["synthetic", "dlib", "insightface"] = "synthetic"
    insightface_pack: str | None = None  # directory of an InsightFace model pack (e.g. buffalo_l)
    path: str | None = None  # synthetic-world detector weights; None = the shipped default
    dlib_upsample: int = Field(0, ge=0, le=4)  # dlib HOG: image doublings before detection (faces < 80 px)
    det_size: int = Field(640, gt=0)
    expand: float = Field(0.5, ge=0)
    min_score: float = Field(0.5, ge=0, le=1)


class ClassifierConfig(_Section):
    kind: Literal["synthetic", "dlib", "clip_heads"] = "synthetic"
    path: str | None = None  # weights directory (synthetic / clip_heads); None = the shipped default
    variant: Literal["train", "eval"] = "train"  # synthetic world: the train-time or the separate eval-time net
    backbone: str | None = None  # local CLIP vision directory for clip_heads
    age_threshold: float = 35.0  # dlib age network: years at and above which a face counts as 'old'


class AdaptorConfig(_Section):
    kind: Literal["text_lora", "unet_lora", "both", "soft_prompt", "full_unet", "full_text"] = "text_lora"
    rank: int = Field(50, gt=0)
    alpha: float | None = None  # None -> alpha = rank
    dropout: float = Field(0.0, ge=0, lt=1)
    text_targets: list[str] = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    unet_targets: list[str] = ["to_q", "to_k", "to_v", "to_out.0"]
    soft_tokens: int = Field(5, gt=0)
    # where the soft tokens go: right after BOS (METHOD.md, the paper) or right after the prompt's last token.
    # A small text encoder trained on fixed templates can break when every real token moves soft_tokens places
    soft_position: Literal["prefix", "suffix", "replace"] = "prefix"
    # replace: the soft tokens stand in for these words at the start of every prompt (one token per word piece;
    # soft_tokens must equal their token count), initialised to exactly their embeddings, so no position moves and
    # the untrained adaptor is the base model. Export usage: prompt.replace(soft_replace, "<fairdiff>", 1)
    soft_replace: str | None = None
    ema_decay: float = Field(0.996, ge=0, lt=1)
    # the EMA starts from the untrained adaptor, which keeps a share ema_decay**steps in it (0.996 over 500 steps:
    # 13%); true = Adam-style bias correction: the EMA averages the trained weights only (divided by 1 - decay**t)
    ema_bias_correction: bool = False

    @model_validator(mode="after")
    def _replace(self) -> AdaptorConfig:
        if self.soft_position == "replace" and not (self.soft_replace or "").strip():
            raise ValueError("adaptor.soft_replace must name the words the soft tokens replace when "
                             "adaptor.soft_position is 'replace' (e.g. 'A photo of the face')")
        return self


UNET_KINDS = ("unet_lora", "both", "full_unet")  # adaptor kinds that train UNet weights


class SamplerConfig(_Section):
    scheduler: Literal["dpmsolver++", "ddim"] = "dpmsolver++"
    steps: int = Field(21, gt=0)  # METHOD.md: 19-23 steps per training step
    steps_jitter: int = Field(2, ge=0)  # training draws steps uniformly in [steps - jitter, steps + jitter]
    guidance_scale: float = Field(7.5, ge=0)
    estimator: Literal["adjusted", "exact", "truncated", "random_truncation", "adjusted_subsampled"] = "adjusted"
    truncate_k: int | None = Field(None, gt=0)
    # adjusted_subsampled: the model-parameter gradient of K random steps of each chain, scaled by T / K (an
    # unbiased estimate of the adjusted gradient at ~K / T of its backward; core.sampler.sample_with_grad)
    subsample_k: int | None = Field(None, gt=0)
    checkpoint: bool = True
    # selective checkpointing (with ``checkpoint``): per chunk, eps calls keep their activations for backward
    # (no recomputation) until this many MB are kept, later calls are checkpointed; 0 = every call checkpointed
    # (memory flat in the number of steps). Same images and gradients either way.
    keep_activations_mb: float = Field(0.0, ge=0)
    # how checkpointed eps calls are wrapped (core.sampler.CHECKPOINT_MODES): non_reentrant keeps autograd's
    # per-op graph of every call (host memory grows with the steps); reentrant keeps one node per call (flat in
    # the steps; not with deepspeed.zero_stage >= 2 when the UNet is trained); auto = reentrant where allowed.
    # Same images and gradients (up to float summation order).
    checkpoint_mode: Literal["auto", "non_reentrant", "reentrant"] = "auto"
    # dtype of the frozen model's reference chain (no grad; the original images o_i) when it should differ from
    # the training dtype: the worker loads a second, frozen copy of the base model in it (memory: one more base
    # model). null = the training dtype. On CPUs with AVX512-BF16 a bfloat16 chain runs ~1.6x faster; the
    # reference images differ from float32 ones by rounding only.
    reference_dtype: Literal["float32", "bfloat16", "float16"] | None = None

    @model_validator(mode="after")
    def _k(self) -> SamplerConfig:
        if self.estimator in ("truncated", "random_truncation") and self.truncate_k is None:
            raise ValueError(f"sampler.truncate_k must be set for estimator {self.estimator!r}")
        if self.estimator == "adjusted_subsampled" and self.subsample_k is None:
            raise ValueError("sampler.subsample_k must be set for estimator 'adjusted_subsampled'")
        if self.steps_jitter >= self.steps:
            raise ValueError("sampler.steps_jitter must be smaller than sampler.steps")
        return self


class LossConfig(_Section):
    threshold: float = Field(0.8, gt=0, le=1)  # C: confidence needed for a target
    # per-attribute C overriding ``threshold`` (e.g. {age: 0.5}): with a non-uniform target and a small N the
    # images that should change class sit near the OT boundary, where a high C drops them
    thresholds: dict[str, float] = {}
    ot_method: Literal["auto", "closed_form", "exact", "monte_carlo"] = "auto"
    # attributes of an independent target whose OT targets are computed on their own marginal, the others
    # jointly (METHOD.md: all jointly); core/ot.expected_targets_separated says when that matters (age with G x R)
    ot_separate: list[str] = []
    num_draws: int = Field(200, gt=0)
    age_asymmetric_cost: bool = False
    lambda_img: float = Field(8.0, ge=0)
    lambda_face: float = Field(1.0, ge=0)
    mismatch_weight: dict[str, float] = {"gender": 0.2, "race": 0.6, "age": 0.6}
    # an image with a face but no confident target (-1) counts as a match: L_img weight 1, no face-region damping,
    # L_face towards its original (false = METHOD.md and the reference code: it counts as a mismatch)
    unconfident_as_match: bool = False
    face_region_scale: dict[str, float] = {"gender": 0.2, "race": 0.3, "age": 0.3}
    # the face region of that damping: "square" = the square the classifier's crop covers (METHOD.md, reference code),
    # "box" = the face box grown by (1 + faces.expand) per side (this code until 2026-12-07)
    face_region: Literal["square", "box"] = "square"
    face_confidence: float = Field(0.9, gt=0, le=1)
    # multiplies the L_img weight w_i of an image whose face the detector no longer finds although the original
    # image has one (1 = METHOD.md). Such images get no alignment target, so drifting into a blurred, undetected face escapes
    # the CE; a larger weight pulls them back to the original.
    lost_face_weight: float = Field(1.0, ge=0)
    # lambda_presence * -log P(face) from the detector's differentiable face score, on images whose original has a
    # face (0 = METHOD.md). A stand-in for L_face's realism pull where there is no face-recognition net (the
    # synthetic world): blurring a face until it is no longer detected escapes the CE. Needs a detector with
    # ``presence_logit`` (faces.detector: synthetic).
    lambda_presence: float = Field(0.0, ge=0)
    # which images the presence term applies to: "reference" = those whose original has a face (as above; needs
    # the frozen model's images), "all" = every image. With "all" and no other term reading the original (L_img,
    # L_face, preserve, detail off) a step samples no reference chain at all (a quarter of a step's cost on CPU).
    presence_on: Literal["reference", "all"] = "reference"
    # Attributes NOT aligned that every image keeps from its original: lambda_preserve * CE(h_a(face(x_i)), r_i^a),
    # r_i^a the original image's predicted class, on images where both have a face (empty = METHOD.md). Debiasing
    # gender alone otherwise lets race and age drift (synthetic demo: old 0.18 -> 0.56) and the drift gives the
    # train-time classifier easy, off-manifold routes to its targets.
    preserve: list[str] = []
    lambda_preserve: float = Field(1.0, ge=0)
    # lambda_detail * |log E(x_i) - log E(o_i)|, E = the mean squared Laplacian of the luminance (core.losses.
    # detail_energy), on every image (0 = METHOD.md): keeps the original's amount of fine detail. Finetuning
    # through the chain can reach a target class by blurring (a vague halo of "hair" passes for long hair)
    lambda_detail: float = Field(0.0, ge=0)


class FeaturesConfig(_Section):
    """Optional feature nets for the preservation losses; each is a local directory or null (off)."""

    clip: str | None = None
    dino: str | None = None
    face_embedder: str | None = None
    face_bank: str | None = None
    # the synthetic world's stand-in feature net: "default" = the shipped training-time net, "eval" = the shipped
    # evaluation-time net (other architecture, seed and renders: for eval.features), else a .safetensors file or a
    # directory holding features.safetensors
    synthetic: str | None = None


class TrainConfig(_Section):
    steps: int = Field(1000, gt=0)
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    images_per_prompt: int = Field(24, gt=0)  # N, summed over all workers
    prompts_per_step: int = Field(1, gt=0)
    chunk_size: int = Field(8, gt=0)  # images per chunk on one worker (one batched chain + backward; may span prompts)
    schedule: Literal["fused", "reference"] = "fused"
    checkpoint_every: int = Field(100, gt=0)
    num_to_keep: int = Field(2, gt=0)
    validate_every: int = Field(0, ge=0)  # 0 = no periodic validation; else also one before the first step
    val_prompts: int = Field(4, gt=0)  # periodic validation: the first this-many 'val' prompts of the mix
    val_steps: int | None = Field(None, gt=0)  # sampling steps of a validation; null = sampler.steps (METHOD.md: 25)
    log_every: int = Field(1, gt=0)
    max_grad_norm: float | None = None
    # learning-rate schedule over train.steps (training/lr.py): constant (METHOD.md, the paper), or a linear
    # warm-up over warmup_steps followed by a cosine / linear decay to min_lr_ratio * lr at the last step
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _warmup(self) -> TrainConfig:
        if self.warmup_steps >= self.steps:
            raise ValueError(f"train.warmup_steps={self.warmup_steps} must be smaller than train.steps={self.steps}")
        return self


class PromptSetConfig(_Section):
    path: str
    concept: str | None = None  # overrides the file's concept column when set
    weight: float = Field(1.0, gt=0)


class DataConfig(_Section):
    prompt_sets: list[PromptSetConfig] = [PromptSetConfig(path="data/prompts/occupations.jsonl")]
    split: Literal["train", "val", "test"] = "train"


class RayConfig(_Section):
    address: str | None = None  # None: RAY_ADDRESS (ray job submit) or a new local cluster; 'auto': join `ray start`
    num_workers: int = Field(1, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(0, ge=0)
    worker_start_timeout_s: float = Field(300.0, gt=0)
    # training workers with glibc's trim threshold at 0 (MALLOC_TRIM_THRESHOLD_=0): freed memory goes back to the
    # OS at once, so a CPU step's peak RSS tracks its live tensors - but every large tensor is then mmapped
    # afresh and CPU training steps ran ~1.7x slower (README, BENCHMARKS "memory"); off: glibc's default
    worker_malloc_trim: bool = False


class DeepSpeedConfig(_Section):
    enabled: bool = True
    zero_stage: int = Field(0, ge=0, le=3)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    offload_optimizer: bool = False


class EvalConfig(_Section):
    split: Literal["train", "val", "test"] = "test"
    images_per_prompt: int = Field(16, gt=0)
    steps: int = Field(30, gt=0)
    guidance_scale: float = Field(7.5, ge=0)
    scheduler: Literal["dpmsolver++", "ddim"] = "dpmsolver++"
    batch_size: int = Field(16, gt=0)
    num_actors: int = Field(1, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    max_prompts: int | None = Field(None, gt=0)
    # METHOD.md: evaluation uses classifiers and feature nets different from the training's; where they are the
    # same, summary.json (eval.classifier_as_training / features_as_training) and the report say so
    classifier: ClassifierConfig = ClassifierConfig(variant="eval")
    features: FeaturesConfig | None = None  # feature nets of the semantic similarities; null = the training's
    grid_images: int = Field(8, gt=0)
    cpus_per_actor: float = Field(1.0, gt=0)  # CPUs reserved by each generation actor (and the scoring actor)
    prompts_per_part: int = Field(4, gt=0)  # prompts per resumable parquet part (per model)
    # dtype of the evaluation's generation (base and adaptors alike); null = model.dtype. bfloat16 on a CPU with
    # AVX512-BF16: the demo's evaluation 1.22x faster, base bias unchanged to 3 decimals (README)
    dtype: Literal["float32", "bfloat16", "float16"] | None = None


class FairDiffConfig(_Section):
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    target: dict[str, Any] = {"gender": {"classes": ["female", "male"], "probs": [0.5, 0.5]}}
    faces: FacesConfig = FacesConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    adaptor: AdaptorConfig = AdaptorConfig()
    sampler: SamplerConfig = SamplerConfig()
    loss: LossConfig = LossConfig()
    features: FeaturesConfig = FeaturesConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    ray: RayConfig = RayConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    eval: EvalConfig = EvalConfig()

    @field_validator("target")
    @classmethod
    def _target(cls, v: dict[str, Any]) -> dict[str, Any]:
        TargetDistribution.from_spec(v)  # raises ValueError naming the key
        return v

    @model_validator(mode="after")
    def _invariants(self) -> FairDiffConfig:
        for a in self.loss.ot_separate:
            if "joint" in self.target:
                raise ValueError("loss.ot_separate needs independent target attributes, not target.joint: "
                                 "leave it empty")
            if a not in self.target:
                raise ValueError(f"loss.ot_separate names {a!r}, which is not a target attribute "
                                 f"({', '.join(self.target)})")
        for a, c in self.loss.thresholds.items():
            if a not in self.target:
                raise ValueError(f"loss.thresholds names {a!r}, which is not a target attribute ({', '.join(self.target)})")
            if not 0 < c <= 1:
                raise ValueError(f"loss.thresholds.{a}={c} must be in (0, 1]")
        if self.sampler.checkpoint_mode == "reentrant" and not self.reentrant_allowed():
            raise ValueError("sampler.checkpoint_mode 'reentrant' accumulates the UNet LoRA gradients once per "
                             "sampling step, which deepspeed.zero_stage >= 2 refuses: use zero_stage 0 or 1, or "
                             "checkpoint_mode 'non_reentrant'")
        n, w = self.train.images_per_prompt, self.ray.num_workers
        if n % w:
            raise ValueError(
                f"train.images_per_prompt={n} does not divide over ray.num_workers={w}: "
                f"use a multiple of {w}"
            )
        return self

    def reentrant_allowed(self) -> bool:
        """The reentrant checkpoint accumulates a trained UNet's gradients once per eps call: not with ZeRO >= 2."""
        zero2 = self.deepspeed.enabled and self.deepspeed.zero_stage >= 2
        return not (zero2 and self.adaptor.kind in UNET_KINDS)

    def checkpoint_mode(self) -> str:
        """sampler.checkpoint_mode with 'auto' resolved: reentrant where allowed, else non_reentrant."""
        mode = self.sampler.checkpoint_mode
        if mode == "auto":
            return "reentrant" if self.reentrant_allowed() else "non_reentrant"
        return mode

    def target_distribution(self) -> TargetDistribution:
        return TargetDistribution.from_spec(self.target)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------------------------
# Loading, overrides and one-line errors


def _suggest(key: str, model: type[BaseModel] | None) -> str:
    if model is None:
        return ""
    close = difflib.get_close_matches(key, list(model.model_fields), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (valid keys: {', '.join(model.model_fields)})"


def _model_at(path: tuple[Any, ...], root: type[BaseModel] = FairDiffConfig) -> type[BaseModel] | None:
    model: Any = root
    for part in path:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        ann = model.model_fields[part].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return model


def _format_error(
    err: ValidationError, source: str, root: type[BaseModel] = FairDiffConfig, prefix: str = ""
) -> str:
    e = err.errors()[0]
    loc = tuple(p for p in e["loc"] if not isinstance(p, str) or not p.startswith("function-"))
    key = prefix + (".".join(str(p) for p in loc) or "<root>")
    if e["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'{_suggest(str(loc[-1]), _model_at(loc[:-1], root))}"
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] in ("value_error", "assertion_error") and not loc:
        return f"{source}: {prefix.rstrip('.') + ': ' if prefix else ''}{msg}"
    got = e.get("input")
    got_s = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{source}: {key}: {msg}{got_s}"


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item or item.startswith("="):
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(
    data: dict[str, Any], overrides: list[str], defaults: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Return a copy of ``data`` with ``a.b=value`` overrides applied (values parsed as YAML).

    A section missing from ``data`` is first filled from ``defaults`` (so ``target.gender.probs=...`` edits the
    default target instead of replacing it with a half-specified one).
    """
    import copy

    out = copy.deepcopy(data)
    defaults = FairDiffConfig().to_dict() if defaults is None else defaults
    for item in overrides:
        parts, value = parse_override(item)
        node, dnode = out, defaults
        for p in parts[:-1]:
            dnode = dnode.get(p) if isinstance(dnode, dict) else None
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = copy.deepcopy(dnode) if isinstance(dnode, dict) else {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: '{p}' is a value, not a section")
            node = nxt
        node[parts[-1]] = value
    return out


class _UniqueKeySafeLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"key {key!r} appears twice in one section (line {key_node.start_mark.line + 1}): "
                                  "merge the two into one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {str(p)!r} is a directory: pass a YAML file in it (see configs/)")
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist: pass an existing YAML file (see configs/)")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeySafeLoader)
    except ConfigError as e:
        raise ConfigError(f"config file {str(p)!r}: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text: save it as UTF-8 YAML") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {str(p)!r} is not valid YAML{where}: fix the syntax") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections, not {type(data).__name__}")
    return data


def from_dict(data: dict[str, Any], source: str = "config") -> FairDiffConfig:
    try:
        return FairDiffConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


# features.synthetic's keywords: the shipped synthetic-world feature net each names (in assets/synthetic-nets)
SHIPPED_FEATURES = {"default": "features", "eval": "features-eval"}

# Config fields that name local files or directories (URIs such as s3://... are left alone).
PATH_FIELDS: tuple[tuple[str, str], ...] = (
    ("run", "storage"), ("model", "path"), ("faces", "insightface_pack"), ("faces", "path"),
    ("classifier", "path"), ("classifier", "backbone"), ("features", "clip"), ("features", "dino"),
    ("features", "face_embedder"), ("features", "face_bank"), ("features", "synthetic"))


def _absolute(value: str | None, base: Path, keywords: Any = ()) -> str | None:
    if value is None or is_uri(value) or value in keywords or Path(value).is_absolute():
        return value
    return os.path.normpath(base / value)


def resolve_paths(cfg: FairDiffConfig, base: str | Path | None = None) -> FairDiffConfig:
    """The config with every relative local path made absolute against ``base`` (default: the working directory).

    Ray Train workers, Tune trials and Data actors run in their own directories, so a path like
    ``assets/synthetic-sd`` must be resolved where the user typed it: on the driver, when the config is loaded.
    """
    root = Path(base) if base is not None else Path.cwd()
    upd: dict[str, Any] = {}
    for section, key in PATH_FIELDS:
        sec = upd.get(section, getattr(cfg, section))
        keywords = SHIPPED_FEATURES if (section, key) == ("features", "synthetic") else ()
        upd[section] = sec.model_copy(update={key: _absolute(getattr(sec, key), root, keywords)})
    ev_upd: dict[str, Any] = {"classifier": cfg.eval.classifier.model_copy(update={
        k: _absolute(getattr(cfg.eval.classifier, k), root) for k in ("path", "backbone")})}
    if cfg.eval.features is not None:  # the evaluation's own feature nets: resolved like the training's
        ev_upd["features"] = cfg.eval.features.model_copy(update={
            k: _absolute(v, root, SHIPPED_FEATURES if k == "synthetic" else ())
            for k, v in cfg.eval.features.model_dump().items()})
    upd["eval"] = cfg.eval.model_copy(update=ev_upd)
    upd["data"] = cfg.data.model_copy(update={"prompt_sets": [
        ps.model_copy(update={"path": _absolute(ps.path, root)}) for ps in cfg.data.prompt_sets]})
    return cfg.model_copy(update=upd)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> FairDiffConfig:
    """Load a YAML config (or the defaults when ``path`` is None), apply ``a.b=value`` overrides and make relative
    local paths absolute against the working directory (see :func:`resolve_paths`)."""
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides or []))
    return resolve_paths(from_dict(data, source=str(path) if path is not None else "config"))


def is_finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
