"""One data-parallel worker of the fairness finetuning (METHOD.md sections 2-5).

Every worker handles the same prompt(s) each step and its share n = N / W of the step's N images; image j of
a prompt starts from noise seeded by (run.seed, step, prompt index, j), so W workers x n images give the
images, targets and gradient of 1 worker x W n. A rank's rows of a step (every prompt's n images, prompt-major)
are cut into chunks of ``train.chunk_size`` images; a chunk may span prompts, so several prompts share one
batched sampling chain (far fewer, larger UNet calls). One training step:

1. Reference images o_j: the base model (``adaptor.disabled()``) under no_grad from the same noise (not sampled
   when no active loss term reads them: ``FairnessLoss.needs_reference``).
2. Current images x_j and their class probabilities p_j (``train.schedule``: "fused" keeps each chunk's
   graph from this pass; "reference" samples under no_grad here and regenerates each chunk with gradients in
   step 4, memory bounded by ``train.chunk_size``; both give the same gradient).
3. All-gather p (and the face-found mask) over workers -> per prompt, expected OT targets q and confident
   targets y, computed identically on every rank from a generator seeded by (step, prompt) (core.ot); keep the
   local rows.
4. Per chunk: loss / N (global N) and backward; after the last chunk the optimizer steps (non-finite
   gradients skip the step and the EMA update, and are counted), then the EMA of the adaptor is updated.
The number of sampling steps is drawn per step in [steps - jitter, steps + jitter] from the step's seed.

Collectives (all_gather / all_reduce) are here, never in core/.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint as _checkpoint

from fairdiff_ray.config import UNET_KINDS, FairDiffConfig
from fairdiff_ray.core import metrics as cm
from fairdiff_ray.core.ot import assign_targets, expected_targets_separated
from fairdiff_ray.core.sampler import sample_with_grad
from fairdiff_ray.core.seeding import noise_from_seeds, stable_seed
from fairdiff_ray.dist.engine import TrainModules, build_engine, compute_dtype
from fairdiff_ray.training.lr import lr_at


def default_components(cfg: FairDiffConfig, device: torch.device, dtype: torch.dtype) -> Any:
    from fairdiff_ray.models.sd import load_components

    return load_components(cfg.model.path, dtype=dtype, device=device)


def default_loss(cfg: FairDiffConfig, device: torch.device) -> Any:
    from fairdiff_ray.training.loss import build_loss

    return build_loss(cfg, device)


@dataclass
class Builders:
    """How a worker gets its models (a seam for tests with tiny models); plain functions, shipped to workers."""

    components: Callable[[FairDiffConfig, torch.device, torch.dtype], Any] = default_components
    loss: Callable[[FairDiffConfig, torch.device], Any] = default_loss
    fault: Callable[[int, int], None] | None = None  # called as fault(step, rank) before every step (tests)
    # called as save_fault(steps_done, rank) in the middle of every checkpoint save (tests)
    save_fault: Callable[[int, int], None] | None = None


# -- collectives (no-ops in a single process) ----------------------------------------------------------------


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """(n, ...) per rank -> (W n, ...) in rank order (equal n on every rank)."""
    rank, size = world()
    if size == 1:
        return t
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    x = t.to(dev).contiguous()
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x)
    return torch.cat(parts).to(t.device)


def gather_by_prompt(t: torch.Tensor, n_prompts: int) -> torch.Tensor:
    """A rank's rows of every prompt, prompt-major (n_prompts x n, ...) -> (n_prompts, W x n, ...): each prompt's
    rows of all ranks in global image order (rank-major, as one worker would have them)."""
    size = world()[1]
    g = all_gather_rows(t)
    return g.view(size, n_prompts, -1, *g.shape[1:]).transpose(0, 1).reshape(n_prompts, -1, *g.shape[1:])


def all_sum(values: dict[str, float]) -> dict[str, float]:
    _, size = world()
    if size == 1 or not values:
        return dict(values)
    keys = sorted(values)
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return dict(zip(keys, t.cpu().tolist()))


# -- seeds ---------------------------------------------------------------------------------------------------


def num_sampling_steps(cfg: FairDiffConfig, step: int) -> int:
    j = cfg.sampler.steps_jitter
    if j == 0:
        return cfg.sampler.steps
    gen = torch.Generator().manual_seed(stable_seed(cfg.run.seed, "steps", step))
    return cfg.sampler.steps + int(torch.randint(-j, j + 1, (1,), generator=gen))


def image_seed(cfg: FairDiffConfig, step: int, prompt_index: int, j: int) -> int:
    """The noise seed of a step's image j (global index over workers) of one prompt."""
    return stable_seed(cfg.run.seed, "noise", step, prompt_index, j)


def image_seeds(cfg: FairDiffConfig, step: int, prompt_index: int, rows: range) -> list[int]:
    return [image_seed(cfg, step, prompt_index, j) for j in rows]


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@dataclass
class StepOutput:
    metrics: dict[str, float] = field(default_factory=dict)
    targets: dict[str, torch.Tensor] = field(default_factory=dict)  # last prompt's global targets (tests)


class Worker:
    """Models, adaptor, loss and engine of one rank; ``train_step`` and ``validate`` as described above."""

    def __init__(self, cfg: FairDiffConfig, device: torch.device, builders: Builders | None = None,
                 adaptor_state: dict[str, torch.Tensor] | None = None):
        from fairdiff_ray.models.adaptors import attach_adaptor

        self.cfg, self.device = cfg, device
        self.builders = builders or Builders()
        self.rank, self.world = world()
        n = cfg.train.images_per_prompt
        if n % self.world:
            raise ValueError(f"train.images_per_prompt={n} does not divide over {self.world} workers")
        self.n_local = n // self.world
        self.target = cfg.target_distribution()
        self.comp = self.builders.components(cfg, device, compute_dtype(cfg))
        self.adaptor = attach_adaptor(self.comp, cfg.adaptor, seed=cfg.run.seed)
        if adaptor_state is not None:  # before the engine copies the weights into its master copies
            self.adaptor.load_state_dict(adaptor_state)
        self.adaptor.train(True)
        self.loss = self.builders.loss(cfg, device)
        params = self.adaptor.trainable_parameters()
        in_modules = {id(p) for m in (self.comp.text_encoder, self.comp.unet) for p in m.parameters()}
        free = [p for p in params if id(p) not in in_modules]
        self.modules = TrainModules({"text_encoder": self.comp.text_encoder, "unet": self.comp.unet,
                                     "vae": self.comp.vae}, free)
        micro = len(self.step_chunks(cfg.train.prompts_per_step))  # one backward per chunk of a step
        self.engine = build_engine(cfg, self.modules, params, micro, self.rank, self.world)
        self.skipped = 0
        # selective checkpointing (sampler.keep_activations_mb -> core.sampler keep_activations_bytes): the eps
        # calls of each chunk's gradient pass keep their activations up to this many bytes instead of being
        # recomputed in backward (the fused schedule holds every chunk of the step until its backward, so the
        # step keeps up to chunks x this); 0 = checkpoint every call
        self.keep_activations_bytes = int(cfg.sampler.keep_activations_mb * 2**20)
        self.checkpoint_mode = cfg.checkpoint_mode()  # how checkpointed eps calls are wrapped (auto resolved)
        # sampler.reference_dtype: the reference chain on its own frozen base model in that dtype
        ref_dtype = getattr(torch, cfg.sampler.reference_dtype or "float32")
        self.ref_comp = None
        if cfg.sampler.reference_dtype is not None and ref_dtype != compute_dtype(cfg):
            self.ref_comp = self.builders.components(cfg, device, ref_dtype)
            for m in (self.ref_comp.text_encoder, self.ref_comp.unet, self.ref_comp.vae):
                m.requires_grad_(False).eval()
        # fused schedule, adaptor outside the UNet (the frozen and the current model share it), a reference in the
        # training dtype that some loss term reads: the reference images ride along in the current images' UNet
        # calls (core.sampler grad_rows) instead of a chain of their own
        self.batch_reference = (cfg.train.schedule == "fused" and cfg.adaptor.kind not in UNET_KINDS
                                and self.ref_comp is None and self.loss.needs_reference)

    # -- generation ----------------------------------------------------------------------------------------

    def _embeddings(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(cond, uncond or None without guidance) of the adaptor as it is now (enabled or not)."""
        cond = self.adaptor.encode(prompts)  # first, as before (LoRA dropout draws in this order)
        return cond, self.adaptor.uncond(len(prompts)) if self.cfg.sampler.guidance_scale > 1 else None

    def _latents(self, cond: torch.Tensor, uncond: torch.Tensor | None, x_T: torch.Tensor, steps: int, grad: bool,
                 trunc_seed: int, grad_rows: int | None = None, unet: torch.nn.Module | None = None) -> torch.Tensor:
        """x_0 (B, 4, h, w) of the sampling chain on these embeddings (core.sampler); with ``grad_rows`` only the
        first rows are differentiated; ``unet``: another UNet than the adapted one (the reference copy)."""
        from fairdiff_ray.models.sd import make_scheduler, unet_eps_args, unet_eps_fn

        s = self.cfg.sampler
        return sample_with_grad(
            unet_eps_fn(unet or self.comp.unet, cond, uncond), x_T,
            make_scheduler(s.scheduler, self.comp.scheduler_config),
            estimator=s.estimator, truncate_k=s.truncate_k, subsample_k=s.subsample_k, checkpoint=s.checkpoint and grad,
            guidance_scale=s.guidance_scale, generator=torch.Generator().manual_seed(trunc_seed),
            num_inference_steps=steps, keep_activations_bytes=self.keep_activations_bytes if grad else 0,
            checkpoint_mode=self.checkpoint_mode, eps_args=unet_eps_args(cond, uncond), grad_rows=grad_rows,
        )

    def _decode(self, x_0: torch.Tensor, grad: bool, vae: torch.nn.Module | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) float32 in [-1, 1]; the VAE decoder checkpointed when it carries gradients."""
        from fairdiff_ray.models.sd import decode_latents

        vae = vae or self.comp.vae
        if grad and self.cfg.sampler.checkpoint:
            return _checkpoint(decode_latents, vae, x_0, use_reentrant=False).float()
        return decode_latents(vae, x_0).float()

    def generate(self, prompts: list[str], x_T: torch.Tensor, steps: int, *, grad: bool, base: bool = False,
                 trunc_seed: int = 0) -> torch.Tensor:
        """Images (b, 3, H, W) float32 in [-1, 1] for b prompts/noises; the base model when ``base`` (its own
        frozen copy in ``sampler.reference_dtype`` when one is set)."""
        if base and self.ref_comp is not None:
            from fairdiff_ray.models.sd import encode_prompts

            rc = self.ref_comp
            with torch.no_grad():
                cond = encode_prompts(rc.tokenizer, rc.text_encoder, prompts)
                uncond = (encode_prompts(rc.tokenizer, rc.text_encoder, [""] * len(prompts))
                          if self.cfg.sampler.guidance_scale > 1 else None)
                x_0 = self._latents(cond, uncond, x_T.to(rc.dtype), steps, False, trunc_seed, unet=rc.unet)
                return self._decode(x_0, False, vae=rc.vae)
        ctx = self.adaptor.disabled() if base else contextlib.nullcontext()
        with ctx, torch.set_grad_enabled(grad):
            return self._decode(self._latents(*self._embeddings(prompts), x_T, steps, grad, trunc_seed), grad)

    def generate_with_reference(self, prompts: list[str], x_T: torch.Tensor, steps: int,
                                trunc_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(current images with gradients, the base model's images without) from the same noises, in one chain:
        the base rows batched behind the current ones in every UNet call, differentiated through the current
        rows only. Only for adaptors outside the UNet (``batch_reference``)."""
        b = len(prompts)
        cond, uncond = self._embeddings(prompts)
        with torch.no_grad(), self.adaptor.disabled():
            cond_base, uncond_base = self._embeddings(prompts)
        both = torch.cat([uncond, uncond_base]) if uncond is not None else None
        x_0 = self._latents(torch.cat([cond, cond_base]), both, torch.cat([x_T, x_T]), steps, True, trunc_seed,
                            grad_rows=b)
        images = self._decode(x_0[:b], True)
        with torch.no_grad():
            ref = self._decode(x_0[b:].detach(), False)
        return images, ref

    def _noise(self, step: int, rows: list[tuple[int, int]]) -> torch.Tensor:
        """x_T for this rank's rows (prompt index, local image index) of the step."""
        start = self.rank * self.n_local
        seeds = [image_seed(self.cfg, step, p, start + j) for p, j in rows]
        return noise_from_seeds(seeds, self.comp.latent_shape(), dtype=compute_dtype(self.cfg), device=self.device)

    def step_chunks(self, n_prompts: int) -> list[list[tuple[int, int]]]:
        """This rank's rows of a step, (prompt index, local image index) prompt-major, cut into chunks of
        ``train.chunk_size`` images; a chunk may span prompts (one batched chain for several prompts)."""
        flat = [(p, j) for p in range(n_prompts) for j in range(self.n_local)]
        return [flat[sl] for sl in _chunks(len(flat), self.cfg.train.chunk_size)]

    # -- one training step -------------------------------------------------------------------------------

    def train_step(self, prompts: list[str], step: int) -> StepOutput:
        cfg = self.cfg
        t0, c0 = time.perf_counter(), time.process_time()
        torch.manual_seed(stable_seed(cfg.run.seed, "dropout", step, self.rank))  # LoRA dropout only
        steps = num_sampling_steps(cfg, step)
        lr = lr_at(step, cfg.train)
        self.engine.set_lr(lr)
        n_prompts, n = len(prompts), self.n_local
        if n_prompts != cfg.train.prompts_per_step:
            raise ValueError(f"a step got {n_prompts} prompts; train.prompts_per_step is {cfg.train.prompts_per_step}")
        n_global = cfg.train.images_per_prompt * n_prompts
        fused = cfg.train.schedule == "fused"
        chunks = self.step_chunks(n_prompts)
        parts: dict[str, float] = {}
        stats: dict[str, list[float]] = {}
        out = StepOutput()

        def chain_inputs(rows: list[tuple[int, int]]) -> tuple[list[str], torch.Tensor, int]:
            # the truncation draw (truncated estimators) is the chunk's first prompt's
            return ([prompts[p] for p, _ in rows], self._noise(step, rows),
                    stable_seed(cfg.run.seed, "truncate", step, rows[0][0]))

        refs, kept, probs, found = [], [], [], []
        for rows in chunks:  # passes 1-2: reference and current images, probabilities
            texts, x_T, trunc = chain_inputs(rows)
            if self.batch_reference:
                images, ref_images = self.generate_with_reference(texts, x_T, steps, trunc_seed=trunc)
                with torch.no_grad():
                    refs.append(self.loss.reference(ref_images))
                scored = self.loss.score(images)
            else:  # no reference chain when no active term reads the original images
                with torch.no_grad():
                    refs.append(self.loss.reference(self.generate(texts, x_T, steps, grad=False, base=True,
                                                                  trunc_seed=trunc))
                                if self.loss.needs_reference else None)
                with contextlib.nullcontext() if fused else torch.no_grad():
                    images = self.generate(texts, x_T, steps, grad=fused, trunc_seed=trunc)
                    scored = self.loss.score(images)
            kept.append((images, scored) if fused else None)
            probs.append(scored.probs)
            found.append(scored.faces.found.cpu())

        # pass 3: one all-gather of every prompt's rows, then the same OT targets per prompt on every rank
        g_found = gather_by_prompt(torch.cat(found), n_prompts)
        g_probs = {a: gather_by_prompt(torch.cat([p[a] for p in probs]).float().cpu(), n_prompts)
                   for a in self.loss.attributes}
        local_y: dict[str, list[torch.Tensor]] = {}
        base_row = self.rank * n
        for p_idx in range(n_prompts):
            p_found = g_found[p_idx]
            p_probs = {a: t[p_idx] for a, t in g_probs.items()}
            q = expected_targets_separated(
                p_probs, self.target, cfg.loss.ot_separate, valid=p_found, method=cfg.loss.ot_method,
                num_draws=cfg.loss.num_draws,
                generator=torch.Generator().manual_seed(stable_seed(cfg.run.seed, "ot", step, p_idx)),
                age_asymmetric=cfg.loss.age_asymmetric_cost)
            y = assign_targets(q, cfg.loss.threshold, cfg.loss.thresholds)
            out.targets = y
            self._batch_stats(stats, p_probs, p_found, y)
            for a, t in y.items():
                local_y.setdefault(a, []).append(t[base_row:base_row + n])
        targets = {a: torch.cat(ts) for a, ts in local_y.items()}  # this rank's rows, prompt-major

        # pass 4: loss on the local rows, backward per chunk
        first = 0
        for c, rows in enumerate(chunks):
            if kept[c] is None:
                texts, x_T, trunc = chain_inputs(rows)
                images = self.generate(texts, x_T, steps, grad=True, trunc_seed=trunc)
                scored = self.loss.score(images)
            else:
                images, scored = kept[c]
                kept[c] = None
            sl = slice(first, first + len(rows))
            first += len(rows)
            loss, m = self.loss(images, scored, refs[c], {a: t[sl] for a, t in targets.items()}, n_global)
            if not loss.requires_grad:  # nothing to learn from this chunk: still a (zero) gradient for
                loss = loss + sum(p.sum() * 0.0 for p in self.engine.params)  # every parameter
            self.engine.backward(loss)
            self.engine.step()
            for k, v in m.items():
                if k.startswith("loss"):
                    parts[k] = parts.get(k, 0.0) + float(v)
        applied = bool(self.engine.applied)
        if applied:
            with self.engine.gathered():
                self.adaptor.ema_update()
        else:
            self.skipped += 1
        out.metrics = self._step_metrics(parts, stats, n_prompts, applied, steps, n_global, t0)
        # this rank's CPU time for the step: beside images_per_s it tells computing from waiting (shared cores)
        out.metrics["cpu_s"] = time.process_time() - c0
        out.metrics["lr"] = lr
        out.metrics.update({f"targets/{a}": t.tolist() for a, t in out.targets.items()})  # last prompt's
        return out

    def _batch_stats(self, stats: dict[str, list[float]], probs: dict[str, torch.Tensor], found: torch.Tensor,
                     y: dict[str, torch.Tensor]) -> None:
        labels = {a: torch.where(found, p.argmax(dim=1), -1) for a, p in probs.items()}
        n_found = int(found.sum())
        stats.setdefault("train/face_rate", []).append(float(found.float().mean()))
        for a, lab in labels.items():
            stats.setdefault(f"train/bias/{a}", []).append(cm.bias(lab, probs[a].shape[1]))
            # class shares of the step's images (mean over its prompts): where a run's overall share drifts
            for cls, f in zip(self.target.attributes[a], cm.frequencies(lab, probs[a].shape[1]).tolist()):
                stats.setdefault(f"train/freq/{a}/{cls}", []).append(f)
            conf = float((y[a] != -1).sum()) / n_found if n_found else 0.0
            stats.setdefault(f"train/confident/{a}", []).append(conf)
        stats.setdefault("train/distance", []).append(cm.target_distance(labels, self.target))

    def _step_metrics(self, parts: dict[str, float], stats: dict[str, list[float]], n_prompts: int, applied: bool,
                      steps: int, n_global: int, t0: float) -> dict[str, float]:
        total = all_sum(parts)  # each rank's share is already divided by the global N
        # "loss/total" rather than "loss": Tune reads "/" as nesting, and "loss" would clash with "loss/align"
        m: dict[str, float] = {("loss/total" if k == "loss" else "loss/" + k.removeprefix("loss_")): v
                               for k, v in total.items()}
        for k, vals in stats.items():
            good = [v for v in vals if not math.isnan(v)]
            m[k] = sum(good) / len(good) if good else float("nan")
        m.update(applied=float(applied), skipped=float(self.skipped), sampling_steps=float(steps),
                 images_per_s=n_global / max(time.perf_counter() - t0, 1e-9), prompts=float(n_prompts))
        return m

    # -- validation ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self, prompts: list[str]) -> dict[str, float]:
        """EMA weights, cfg.sampler.steps, N images per val prompt: bias, class shares, target distance, drift.

        Like a training step, a rank's rows of every prompt (prompt-major) are generated in chunks of
        ``train.chunk_size`` images that may span prompts, and gathered once per attribute."""
        cfg = self.cfg
        if not prompts:
            raise ValueError("validation needs at least one prompt (train.val_prompts)")
        n_attr = self.target.num_classes
        n_prompts = len(prompts)
        start = self.rank * self.n_local
        lab_local: dict[str, list[torch.Tensor]] = {a: [] for a in self.loss.attributes}
        drift_sum, drift_n = 0.0, 0
        val_steps = cfg.train.val_steps or cfg.sampler.steps
        with self.engine.gathered(), self.adaptor.ema_applied():
            for rows in self.step_chunks(n_prompts):
                texts = [prompts[p] for p, _ in rows]
                seeds = [stable_seed(cfg.run.seed, "val", prompts[p], start + j) for p, j in rows]
                x_T = noise_from_seeds(seeds, self.comp.latent_shape(), compute_dtype(cfg), self.device)
                images = self.generate(texts, x_T, val_steps, grad=False)
                scored = self.loss.score(images)
                found = scored.faces.found.cpu()
                for a in self.loss.attributes:
                    lab_local[a].append(torch.where(found, scored.probs[a].argmax(1).cpu(), -1))
                if self.loss.features:
                    ref = self.generate(texts, x_T, val_steps, grad=False, base=True)
                    for net in self.loss.features.values():
                        d = 1 - torch.nn.functional.cosine_similarity(net(images).float(), net(ref).float())
                        drift_sum, drift_n = drift_sum + float(d.sum()), drift_n + len(rows)
        labels: dict[str, list[torch.Tensor]] = {}
        per_prompt: dict[str, list[float]] = {}
        for a in self.loss.attributes:
            labels[a] = list(gather_by_prompt(torch.cat(lab_local[a]), n_prompts))
            per_prompt[a] = [cm.bias(lab, n_attr[a]) for lab in labels[a]]
        tot = all_sum({"d": drift_sum, "n": float(drift_n)})
        drift = tot["d"] / tot["n"] if tot["n"] else 0.0
        all_labels = {a: torch.cat(v) for a, v in labels.items()}
        distance = cm.target_distance(all_labels, self.target)
        m = {f"bias/{a}": cm.bias_over_prompts(v)[0] for a, v in per_prompt.items()}
        for a, lab in all_labels.items():
            for cls, f in zip(self.target.attributes[a], cm.frequencies(lab, n_attr[a]).tolist()):
                m[f"freq/{a}/{cls}"] = f
        m.update(distance=distance, drift=drift, objective=cm.validation_objective(distance, drift))
        return m


# -- checkpoints and the Ray Train loop ----------------------------------------------------------------------

CKPT_ADAPTOR = "adaptor_state.safetensors"  # trainable weights + "ema." copies
CKPT_STATE = "state.json"  # steps done, skipped steps, last validation metrics
CKPT_CONFIG = "config.yaml"  # the resolved run config
ENGINE_DIR = "engine"  # optimizer state (DeepSpeed: every rank's ZeRO partition)
EXPORT_DIR = "adaptor"  # the final checkpoint also holds the exported EMA adaptor


def export_metadata(cfg: FairDiffConfig, steps_done: int) -> dict[str, Any]:
    t = cfg.target_distribution()
    return {"attributes": t.attributes, "target": cfg.target, "config": cfg.to_dict(), "step": steps_done,
            "run": cfg.run.name}


def save_checkpoint(w: Worker, path: Any, steps_done: int, state: dict[str, Any], export: bool) -> None:
    """Every rank writes its part into ``path`` (Ray merges the ranks' directories into one checkpoint), then
    its manifest (dist.ckpt): a checkpoint missing a rank's manifest or with a file that does not match it is
    known to be damaged on resume."""
    import json

    from safetensors.torch import save_file

    from fairdiff_ray.dist.ckpt import write_manifest

    path.mkdir(parents=True, exist_ok=True)
    with w.engine.gathered():
        sd = {k: v.detach().cpu().contiguous() for k, v in w.adaptor.state_dict().items()}
        if export and w.rank == 0:
            w.adaptor.export(str(path / EXPORT_DIR), export_metadata(w.cfg, steps_done), use_ema=True)
    if w.rank == 0:
        save_file(sd, str(path / CKPT_ADAPTOR))
        (path / CKPT_STATE).write_text(json.dumps({**state, "step": steps_done, "skipped": w.skipped}, indent=1))
        (path / CKPT_CONFIG).write_text(w.cfg.to_yaml())
    if w.builders.save_fault is not None:
        w.builders.save_fault(steps_done, w.rank)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, path / f"rng_rank{w.rank}.pt")
    (path / ENGINE_DIR).mkdir(exist_ok=True)
    w.engine.save(path / ENGINE_DIR)
    write_manifest(path, w.rank, w.world, steps_done)


def _validation_due(cfg: FairDiffConfig, steps_done: int) -> bool:
    every = cfg.train.validate_every
    return every > 0 and (steps_done % every == 0 or steps_done == cfg.train.steps)


def _same_on_every_rank(name: str | None) -> None:
    """Every rank must restore the same checkpoint (they read the same storage; a mismatch is a storage fault)."""
    _, size = world()
    if size == 1:
        return
    mine = torch.tensor([stable_seed(str(name))], dtype=torch.int64)
    lo, hi = mine.clone(), mine.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if int(lo) != int(hi):
        raise RuntimeError(f"workers chose different checkpoints to resume from (this rank: {name}): storage "
                           "is inconsistent between workers")


def progress_line(done: int, total: int, m: dict[str, Any], elapsed: float, steps_run: int) -> str:
    """One line of training progress: step, loss, the batch's bias per attribute, speed and time left."""
    per_step = elapsed / max(steps_run, 1)
    eta = per_step * (total - done)
    bias = " ".join(f"{k.removeprefix('train/bias/')} {v:.2f}" for k, v in m.items()
                    if k.startswith("train/bias/") and isinstance(v, float) and not math.isnan(v))
    return (f"[train] step {done}/{total}  loss {m.get('loss/total', float('nan')):.3f}  batch bias: {bias or '-'}  "
            f"lr {m.get('lr', float('nan')):.2e}  {per_step:.1f} s/step  {eta / 60:.1f} min left")


def _quiet_ray_train_reports() -> None:
    """Ray Train V2 logs every ray.train.report at INFO ("Reporting training result ..."), one line per step and
    worker in the driver's output; our own progress lines say the same. Its logger is named by its file path."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as ray_train_context
    except ImportError:  # another Ray layout: leave its logging alone
        return
    logging.getLogger(ray_train_context.__file__).setLevel(logging.WARNING)


def _stdout_line(s: str) -> None:
    """One line to the worker's stdout (Ray forwards it to the driver). Not print(): Ray Train V2 patches print
    in its workers to log through the root logger, and the line reached the driver twice."""
    sys.stdout.write(s + "\n")
    sys.stdout.flush()


def train_loop(config: dict[str, Any]) -> None:
    """The Ray Train worker function. config: {"cfg": FairDiffConfig dict, "builders": Builders | None}."""
    import json
    import tempfile
    from pathlib import Path

    import ray.data
    import ray.train
    from safetensors.torch import load_file

    from fairdiff_ray.config import from_dict
    from fairdiff_ray.dist.ckpt import checkpoint_name, open_intact
    from fairdiff_ray.dist.data import iter_rows, take_prompts
    from fairdiff_ray.dist.metrics import MetricsWriter

    _quiet_ray_train_reports()
    cfg = from_dict(config["cfg"])
    builders = config.get("builders") or Builders()
    device = ray.train.torch.get_device() if cfg.ray.use_gpu else torch.device("cpu")
    rank = ray.train.get_context().get_world_rank()
    start, state = 0, {}
    log = _stdout_line if rank == 0 else (lambda s: None)
    # Ray's latest checkpoint, or the newest intact one before it when that one is damaged (said in the log)
    with open_intact(ray.train.get_checkpoint(), log) as restored:
        d, attempt = restored.dir, restored.attempt
        _same_on_every_rank(restored.name)
        adaptor_sd = None
        if d is not None:
            adaptor_sd = load_file(str(d / CKPT_ADAPTOR))
            state = json.loads((d / CKPT_STATE).read_text())
            start = int(state["step"])
        w = Worker(cfg, device, builders, adaptor_sd)
        if d is not None:
            w.engine.load(d / ENGINE_DIR)
            w.skipped = int(state.get("skipped", 0))
            rng_file = d / f"rng_rank{rank}.pt"
            if rng_file.is_file():
                torch.set_rng_state(torch.load(rng_file, weights_only=True)["torch"])
    run_dir = Path(config["run_dir"])
    writer = MetricsWriter(run_dir, start) if rank == 0 else None
    pps = cfg.train.prompts_per_step
    # the prompt stream is consumed a few rows per step: Ray Data's progress bar would print a line per step
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = iter_rows(ray.train.get_dataset_shard("train"), start * pps)
    val_prompts = ([r["prompt"] for r in iter_rows(ray.train.get_dataset_shard("val"))]
                   if cfg.train.validate_every else [])
    last_val: dict[str, float] = state.get("last_val", {})
    # damaged checkpoints skipped on resume, carried into every later checkpoint and finished.json
    recovered = [*state.get("recovered", []), *({"damaged": n, "problem": r, "resumed_from": restored.name}
                                                 for n, r in restored.damaged)]
    if cfg.train.validate_every and start == 0:
        last_val = w.validate(val_prompts)  # the model before training: where the shares start from
        last_val["distance_start"] = last_val["distance"]  # kept in every later report (sweep.distance relative)
    t_start = time.perf_counter()
    for step in range(start, cfg.train.steps):
        if builders.fault is not None:
            builders.fault(step, rank)
        batch = take_prompts(rows, pps)
        out = w.train_step([r["prompt"] for r in batch], step)
        done = step + 1
        if _validation_due(cfg, done):
            last_val = {**last_val, **w.validate(val_prompts)}  # keeps distance_start
        metrics: dict[str, Any] = {"step": step, **out.metrics, **last_val}
        metrics.setdefault("objective", metrics["train/distance"])  # until the first validation
        if writer is not None:
            writer.write(step, metrics)
        if done % cfg.train.log_every == 0 or done == cfg.train.steps:
            log(progress_line(done, cfg.train.steps, metrics, time.perf_counter() - t_start, done - start))
        if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps:
            with tempfile.TemporaryDirectory(prefix="fairdiff-ckpt-") as tmp:
                save_checkpoint(w, Path(tmp), done, {"last_val": last_val, "recovered": recovered},
                                export=done == cfg.train.steps)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=checkpoint_name(done, attempt))
        else:
            ray.train.report(metrics)
    if writer is not None:
        writer.close()
