"""Input checks that run before a job starts Ray or writes anything (issue 9: bad input fails fast, in one line).

Each check reads metadata only - directory listings, JSON files, safetensors headers, the prompt files and the
tokenizer - so a mistake costs seconds and leaves no cluster, run directory or output behind. A mistake raises a
UserError naming the file / key / value; prompts the tokenizer will truncate print one warning line instead.

- ``check_debias_inputs(cfg)``: `fairdiff debias` (jobs/debias.py and the demo run it before Ray starts);
- ``check_eval_inputs(cfg, adaptors)``: `fairdiff evaluate` (run_evaluation runs it first);
- `fairdiff generate` checks its own flags (generate.main) with the same functions.
"""

from __future__ import annotations

from pathlib import Path

from fairdiff_ray.config import AdaptorConfig, FairDiffConfig, FeaturesConfig
from fairdiff_ray.errors import ConfigError, ModelFileError


def _check_loss_factors(cfg: FairDiffConfig) -> None:
    for a in cfg.target_distribution().attributes:
        for key in ("mismatch_weight", "face_region_scale"):
            if a not in getattr(cfg.loss, key):
                raise ConfigError(f"loss.{key}.{a} is missing: give a factor in [0, 1] for attribute {a!r}")


def _check_feature_paths(features: FeaturesConfig, key: str = "features") -> None:
    """CLIP / DINO directories (config.json + weights), the face embedder and face bank paths: checked here, not
    first inside a Ray worker."""
    from fairdiff_ray.models.features import CLIP_HINT, DINO_HINT, check_hf_dir

    for name, hint in (("clip", CLIP_HINT), ("dino", DINO_HINT)):
        if getattr(features, name) is not None:
            check_hf_dir(getattr(features, name), f"{key}.{name}", hint)
    for name in ("face_embedder", "face_bank"):
        path = getattr(features, name)
        if path is not None and not Path(path).expanduser().exists():
            raise ModelFileError(f"{key}.{name}: {path} does not exist: give an existing local path or null")


def _check_features(features: FeaturesConfig, key: str = "features") -> None:
    """The feature nets' paths; the synthetic feature net's files (not checked by features.check_hf_dir at load)."""
    _check_feature_paths(features, key)
    if features.synthetic is None:
        return
    from fairdiff_ray.models.sd import read_safetensors_header
    from fairdiff_ray.synthetic.world import feature_source, net_files

    path, name = feature_source(features.synthetic)
    hint = "rebuild the synthetic-world nets with `python jobs/train_synthetic_nets.py`"
    if path is None and name == "features-eval":
        hint = "train it into the shipped nets with `python jobs/train_synthetic_nets.py --only features-eval`"
    files = net_files(path, name)
    for f in files:
        if not f.is_file():
            raise ModelFileError(f"{key}.synthetic: synthetic-world feature net file {f} is missing; {hint}")
    read_safetensors_header(files[0], hint)


def _warn_long(cfg: FairDiffConfig, prompts: list[list[str]], reserved: int = 0) -> None:
    from fairdiff_ray.models.sd import load_tokenizer, warn_long_prompts

    tokenizer = load_tokenizer(cfg.model.path)
    if reserved >= tokenizer.model_max_length - 2:  # BOS and EOS take two positions
        raise ConfigError(f"adaptor.soft_tokens={reserved} leaves no room for the prompt in the tokenizer's "
                          f"{tokenizer.model_max_length} tokens: use fewer soft tokens")
    for i, (ps, ps_prompts) in enumerate(zip(cfg.data.prompt_sets, prompts)):
        warn_long_prompts(tokenizer, ps_prompts, f"data.prompt_sets.{i} ({ps.path})", reserved)


def warn_ema_start(cfg: FairDiffConfig) -> float:
    """One stderr warning line when the exported EMA would still hold more than 5% of the untrained adaptor
    (adaptor.ema_decay ** train.steps, e.g. METHOD.md's 0.996 over a few hundred steps); returns that share."""
    share = 0.0 if cfg.adaptor.ema_bias_correction else cfg.adaptor.ema_decay ** cfg.train.steps
    if share > 0.05:
        import sys

        print(f"fairdiff: warning: adaptor.ema_decay={cfg.adaptor.ema_decay:g} over train.steps={cfg.train.steps} "
              f"leaves {share:.0%} of the untrained adaptor in the exported EMA: set adaptor.ema_bias_correction="
              "true, a lower ema_decay or more steps", file=sys.stderr, flush=True)
    return share


def check_soft_replace(adaptor: AdaptorConfig, model_path: str, prompts: list[list[str]], where: str) -> None:
    """A soft prompt with ``soft_position: replace``: its words are ``soft_tokens`` tokens and start every prompt."""
    if adaptor.kind != "soft_prompt" or adaptor.soft_position != "replace":
        return
    from fairdiff_ray.models.adaptors import soft_replace_ids
    from fairdiff_ray.models.sd import load_tokenizer

    tok = load_tokenizer(model_path)
    want = soft_replace_ids(tok, adaptor)
    assert want is not None
    for p in (p for ps in prompts for p in ps):
        if list(tok(p).input_ids[1 : 1 + len(want)]) != want:
            raise ConfigError(f"{where}: prompt {p!r} does not start with adaptor.soft_replace "
                              f"{adaptor.soft_replace!r}; use prompts that do, or adaptor.soft_position prefix or suffix")


def check_debias_inputs(cfg: FairDiffConfig) -> None:
    """Model directory, classifier vs target classes, detector, feature net and prompt sets of a debias run."""
    from fairdiff_ray.dist.data import check_prompt_sets
    from fairdiff_ray.models.classifiers import check_target_classes, classifier_classes
    from fairdiff_ray.models.faces import check_detector
    from fairdiff_ray.models.sd import check_model_dir

    check_model_dir(cfg.model.path)
    classes = classifier_classes(cfg.classifier, "classifier")
    check_target_classes(cfg.target, classes, f"classifier ({cfg.classifier.kind})")
    _check_loss_factors(cfg)
    from fairdiff_ray.models.faces import detector_class
    from fairdiff_ray.training.loss import check_presence_detector, check_preserve

    check_preserve(cfg.loss.preserve, list(cfg.target_distribution().attributes), list(classes))
    check_detector(cfg.faces)
    check_presence_detector(cfg, detector_class(cfg.faces.detector))
    _check_features(cfg.features)
    prompts = check_prompt_sets(cfg)
    check_soft_replace(cfg.adaptor, cfg.model.path, prompts, f"data.prompt_sets (split {cfg.data.split})")
    soft_inserted = cfg.adaptor.kind == "soft_prompt" and cfg.adaptor.soft_position != "replace"
    _warn_long(cfg, prompts, cfg.adaptor.soft_tokens if soft_inserted else 0)


def check_eval_inputs(cfg: FairDiffConfig, adaptors: dict[str, str], models: bool = True,
                      scorer: bool = True) -> None:
    """Prompt sets of eval.split; with ``models``, the model directory and that every adaptor fits it; with
    ``scorer``, the detector and that the eval classifier predicts the target's classes. Tests that inject
    stand-in generators or scorers turn the matching part off."""
    from fairdiff_ray.dist.data import check_prompt_sets

    if models:
        from fairdiff_ray.models.adaptors import check_adaptor
        from fairdiff_ray.models.sd import check_model_dir

        check_model_dir(cfg.model.path)
        for path in adaptors.values():
            check_adaptor(path, cfg.model.path)
        if cfg.model.device.startswith("cuda") and cfg.eval.gpus_per_actor == 0:
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(f"model.device={cfg.model.device}: no CUDA device here; use model.device=cpu or "
                                  "auto (on a GPU cluster also set eval.gpus_per_actor)")
    if scorer:
        from fairdiff_ray.models.classifiers import check_target_classes, classifier_classes
        from fairdiff_ray.models.faces import check_detector

        classes = classifier_classes(cfg.eval.classifier, "eval.classifier")
        check_target_classes(cfg.target, classes, f"eval.classifier ({cfg.eval.classifier.kind})")
        check_detector(cfg.faces)
        _check_features(cfg.eval.features or cfg.features, "eval.features" if cfg.eval.features else "features")
    prompts = check_prompt_sets(cfg, [cfg.eval.split])
    if models:
        from fairdiff_ray.models.adaptors import read_adaptor_meta

        for name, path in adaptors.items():
            meta = read_adaptor_meta(path).get("adaptor")
            if isinstance(meta, dict):  # check_adaptor (above) vouched for the rest of the export
                check_soft_replace(AdaptorConfig(**meta), cfg.model.path, prompts, f"adaptor {name}")
        _warn_long(cfg, prompts)
