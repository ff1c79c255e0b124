"""Sampling with gradients through a diffusers scheduler (METHOD.md section 4: adjusted direct finetuning).

The sampler never calls ``scheduler.step`` (stateful, not written for autograd). It reads the schedule the
scheduler computed in ``set_timesteps`` and writes each update as an explicit linear combination of latents
and model outputs, so autograd sees exactly the solver's coefficients.

Notation (<name in code> -> <name in the papers>):
- ``x``                 -> x_t (DDIM) / z_t (METHOD.md), the latent at the current step
- ``m``                 -> the post-guidance model output (eps_theta, or v for v-prediction)
- ``alpha_s, sigma_s``  -> sqrt(alpha_bar_s), sqrt(1 - alpha_bar_s): x_s = alpha_s x_0 + sigma_s eps
- ``alpha_t, sigma_t``  -> the same for the latent the step produces
- ``x0_hat, eps_hat``   -> f_theta(x_s, s) (DDIM eq. 9 / "predicted x_0") and the implied noise
- ``h``                 -> lambda_t - lambda_s, lambda = log(alpha / sigma) (DPM-Solver++)
- ``grad_coef``         -> c_t (METHOD.md section 4), normalised to geometric mean 1

Papers: DDIM (arXiv:2010.02502), DPM-Solver++ (arXiv:2211.01095), v-prediction (arXiv:2202.00512),
adjusted DFT (Shen et al., ICLR 2024), DRaFT-K (arXiv:2309.17400), AlignProp (arXiv:2310.03739).

The model seam is ``eps_fn(x, t) -> m`` (k-diffusion style): ``x`` is (B', C, h, w) after
``scheduler.scale_model_input``; ``t`` is the scheduler timestep as a 0-d int64 tensor on ``x``'s device.
With ``guidance_scale > 1`` the sampler passes B' = 2B rows ``cat([x, x])`` and expects
``cat([m_uncond, m_cond])`` back (diffusers' convention); otherwise B' = B and ``m`` is returned directly.
Tensors the model reads that need a gradient (the text embeddings) may be handed over as ``eps_args``:
the sampler then calls ``eps_fn(x, t, *eps_args)``, which the reentrant checkpoint needs (it can only pass
gradients to its explicit inputs; see ``checkpoint_mode``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

EpsFn = Callable[..., Tensor]
ESTIMATORS = ("exact", "adjusted", "truncated", "random_truncation", "adjusted_subsampled")
# non_reentrant: torch's default checkpoint - the forward records autograd's graph of every op of every model
#   call (its saved tensors are dropped and recomputed): host memory grows with T by that graph (nodes, saved-
#   variable records), ~0.2 MB per call of the tiny UNet, several MB for SD v1.5.
# reentrant: the model call runs under no_grad and autograd records one node per call; its backward re-runs
#   the call with gradients on and backpropagates inside - nothing but the call's inputs stays per step.
#   Gradients reach the model's parameters and the explicit inputs (x, eps_args) only: a tensor eps_fn closes
#   over must not need a gradient (pass it in eps_args). With ZeRO-2/3 the nested backward of every call
#   accumulates a trainable UNet parameter's gradient T times, which DeepSpeed's reduction hooks refuse.
CHECKPOINT_MODES = ("non_reentrant", "reentrant")
_PREDICTION_TYPES = ("epsilon", "v_prediction")


def grad_coefficients(alphas_cumprod: Tensor, alphas: Tensor, timesteps: Tensor) -> Tensor:
    """Adjusted-DFT step weights c_t (METHOD.md section 4, step 2), float64 (T), geometric mean 1.

    alphas_cumprod: (num_train_timesteps,) alpha_bar of the TRAINING schedule; alphas: (num_train_timesteps,)
    single-step alpha_t = 1 - beta_t; timesteps: (T,) integer timesteps of the sampling schedule.
    c_t = sqrt(alpha_bar_t) * sqrt(1 - alpha_bar_t) / (1 - alpha_t), then divided by the geometric mean.
    """
    alphas_cumprod = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)
    alphas = torch.as_tensor(alphas).detach().to("cpu", torch.float64)
    timesteps = torch.as_tensor(timesteps).detach().to("cpu")
    if alphas_cumprod.ndim != 1 or alphas.shape != alphas_cumprod.shape:
        raise ValueError(
            f"alphas_cumprod and alphas must be 1-D of the same length, got {tuple(alphas_cumprod.shape)} "
            f"and {tuple(alphas.shape)}"
        )
    if timesteps.ndim != 1 or timesteps.numel() == 0 or timesteps.is_floating_point():
        raise ValueError(f"timesteps must be a non-empty 1-D integer tensor, got {timesteps!r}")
    if int(timesteps.min()) < 0 or int(timesteps.max()) >= alphas_cumprod.numel():
        raise ValueError(
            f"timesteps must lie in [0, {alphas_cumprod.numel() - 1}], got range "
            f"[{int(timesteps.min())}, {int(timesteps.max())}]"
        )
    abar, alpha = alphas_cumprod[timesteps], alphas[timesteps]
    if not (bool(((abar > 0) & (abar < 1)).all()) and bool(((alpha > 0) & (alpha < 1)).all())):
        raise ValueError("alphas_cumprod and alphas must lie strictly inside (0, 1) at the sampled timesteps")
    # 1. Raw weights: the inverse of the DDPM chain's noise coefficient carried to x_0, so every step's
    #    gradient reaches eps on the same scale.
    coef = abar.sqrt() * (1.0 - abar).sqrt() / (1.0 - alpha)
    # 2. Normalise by the geometric mean (computed in log space) so the overall gradient scale is kept.
    return coef / coef.log().mean().exp()


@dataclass(frozen=True)
class _Step:
    """One solver step x_s -> x_t. Coefficients are 0-d tensors in the compute dtype: constants for autograd.

    They are evaluated with the same operations, in the same order, as the diffusers scheduler evaluates them,
    so float32 sampling matches the stock pipeline to rounding (not just to the math).
    """

    timestep: int
    alpha_s: Tensor
    sigma_s: Tensor
    alpha_t: Tensor
    sigma_t: Tensor
    order: int = 1  # DPM-Solver++: 1 = first-order update, 2 = multistep second-order (2M)
    h: Tensor | None = None  # lambda_t - lambda_s (DPM-Solver++ only)
    r0: Tensor | None = None  # h_{i-1} / h_i (order 2 only)


def _check_prediction_type(config: Any) -> str:
    pred = config.prediction_type
    if pred not in _PREDICTION_TYPES:
        raise ValueError(f"scheduler prediction_type {pred!r} is not supported; use one of {_PREDICTION_TYPES}")
    if getattr(config, "thresholding", False):
        raise ValueError("scheduler thresholding=True is not differentiable here; build it with thresholding=False")
    return pred


def _ddim_steps(scheduler: Any, dtype: torch.dtype) -> list[_Step]:
    """The DDIM (eta = 0) schedule exactly as DDIMScheduler.step walks it."""
    cfg = scheduler.config
    if cfg.clip_sample:
        raise ValueError("DDIMScheduler clip_sample=True is not supported; build it with clip_sample=False (as SD does)")
    ac = scheduler.alphas_cumprod.detach().to("cpu", dtype)
    final_ac = torch.as_tensor(scheduler.final_alpha_cumprod).detach().to("cpu", dtype)
    # DDIMScheduler steps to t - num_train_timesteps // num_inference_steps whatever the spacing; we copy it.
    ratio = cfg.num_train_timesteps // scheduler.num_inference_steps
    steps = []
    for t in scheduler.timesteps.tolist():
        abar_s, abar_t = ac[t], (ac[t - ratio] if t - ratio >= 0 else final_ac)
        steps.append(_Step(t, abar_s**0.5, (1 - abar_s) ** 0.5, abar_t**0.5, (1 - abar_t) ** 0.5))
    return steps


def _dpmpp_steps(scheduler: Any, dtype: torch.dtype) -> list[_Step]:
    """The DPM-Solver++ (multistep, order <= 2) schedule exactly as DPMSolverMultistepScheduler.step walks it."""
    cfg = scheduler.config
    if cfg.algorithm_type != "dpmsolver++":
        raise ValueError(f"DPMSolverMultistepScheduler algorithm_type {cfg.algorithm_type!r} is not supported; use 'dpmsolver++'")
    if cfg.solver_order not in (1, 2):
        raise ValueError(f"DPMSolverMultistepScheduler solver_order {cfg.solver_order} is not supported; use 1 or 2")
    if cfg.solver_type not in ("midpoint", "heun"):
        raise ValueError(f"DPMSolverMultistepScheduler solver_type {cfg.solver_type!r} is not supported")
    if getattr(cfg, "use_flow_sigmas", False) or getattr(cfg, "variance_type", None) is not None:
        raise ValueError("DPMSolverMultistepScheduler with flow sigmas or a learned variance is not supported")
    # The scheduler's sigma is sqrt((1 - abar) / abar): alpha = 1 / sqrt(sigma^2 + 1), sigma_t = sigma * alpha.
    # Element by element (0-d ops), as the scheduler does, so vectorised kernels cannot change the rounding.
    ve = scheduler.sigmas.detach().to("cpu", dtype)
    alphas = [1 / ((ve[j] ** 2 + 1) ** 0.5) for j in range(len(ve))]
    sigmas = [ve[j] * alphas[j] for j in range(len(ve))]
    lambdas = [torch.log(a) - torch.log(s) for a, s in zip(alphas, sigmas)]  # +inf for a final sigma of 0
    timesteps = scheduler.timesteps.tolist()
    n = len(timesteps)
    steps = []
    for i, t in enumerate(timesteps):
        final = i == n - 1 and (
            cfg.euler_at_final or (cfg.lower_order_final and n < 15) or cfg.final_sigmas_type == "zero"
        )
        order = 1 if (cfg.solver_order == 1 or i == 0 or final) else 2
        h = lambdas[i + 1] - lambdas[i]
        r0 = (lambdas[i] - lambdas[i - 1]) / h if order == 2 else None
        steps.append(_Step(t, alphas[i], sigmas[i], alphas[i + 1], sigmas[i + 1], order, h, r0))
    return steps


def _solver_steps(scheduler: Any, dtype: torch.dtype) -> tuple[str, list[_Step]]:
    names = {c.__name__ for c in type(scheduler).__mro__}
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("scheduler has no schedule yet: call scheduler.set_timesteps(n) or pass num_inference_steps=n")
    _check_prediction_type(scheduler.config)
    if "DDIMScheduler" in names:
        return "ddim", _ddim_steps(scheduler, dtype)
    if "DPMSolverMultistepScheduler" in names:
        return "dpmsolver++", _dpmpp_steps(scheduler, dtype)
    raise ValueError(
        f"scheduler {type(scheduler).__name__} is not supported; use DDIMScheduler or DPMSolverMultistepScheduler"
    )


def _predict(x: Tensor, m: Tensor, st: _Step, prediction_type: str) -> tuple[Tensor, Tensor]:
    """(x0_hat, eps_hat) from the model output: DDIM eq. (9) for eps, Salimans & Ho 2022 section 4 for v."""
    if prediction_type == "epsilon":
        return (x - st.sigma_s * m) / st.alpha_s, m
    return st.alpha_s * x - st.sigma_s * m, st.alpha_s * m + st.sigma_s * x


def _ddim_update(x0_hat: Tensor, eps_hat: Tensor, st: _Step) -> Tensor:
    """DDIM eq. (12) with eta = 0: x_t = alpha_t * x0_hat + sigma_t * eps_hat."""
    return st.alpha_t * x0_hat + st.sigma_t * eps_hat


def _dpmpp_update(x: Tensor, x0_hat: Tensor, x0_prev: Tensor | None, st: _Step, solver_type: str) -> Tensor:
    """DPM-Solver++ (arXiv:2211.01095): the first-order update (== DDIM) or the 2M multistep update (Algorithm 2).

    1. phi = alpha_t * (exp(-h) - 1); exp(-inf) = 0 makes a final sigma of 0 return x0_hat exactly.
    2. x_t = (sigma_t / sigma_s) x_s - phi * D0, with D0 = x0_hat (the data prediction at s).
    3. Order 2 adds the D1 = (D0 - x0_prev) / r0 correction, midpoint or Heun form as diffusers names them.
    """
    phi = st.alpha_t * (torch.exp(-st.h) - 1.0)
    x_t = (st.sigma_t / st.sigma_s) * x - phi * x0_hat
    if st.order == 1:
        return x_t
    if x0_prev is None:
        raise ValueError("DPM-Solver++(2M) step without the previous data prediction")
    d1 = (1.0 / st.r0) * (x0_hat - x0_prev)
    if solver_type == "midpoint":
        return x_t - 0.5 * phi * d1
    return x_t + (st.alpha_t * ((torch.exp(-st.h) - 1.0) / st.h + 1.0)) * d1


def _first_grad_step(estimator: str, truncate_k: int | None, n: int, generator: torch.Generator | None) -> int:
    """Index of the first step that carries gradient (0 = all steps)."""
    if estimator in ("exact", "adjusted", "adjusted_subsampled"):
        return 0  # truncate_k is ignored here so one config can sweep over estimators
    if truncate_k is None or int(truncate_k) < 1:
        raise ValueError(f"estimator {estimator!r} needs truncate_k >= 1, got {truncate_k!r}")
    k = int(truncate_k)
    if estimator == "random_truncation":
        # AlignProp: K ~ Uniform{1, ..., truncate_k}, drawn from the caller's generator (on its device).
        gen_device = generator.device if generator is not None else "cpu"
        k = int(torch.randint(1, k + 1, (1,), generator=generator, device=gen_device).item())
    return max(n - k, 0)


def subsampled_steps(k: int | None, n: int, generator: torch.Generator | None) -> set[int]:
    """The steps whose model call carries gradient under "adjusted_subsampled": k of the n steps, drawn uniformly
    without replacement from ``generator`` (all n when k >= n)."""
    if k is None or int(k) < 1:
        raise ValueError(f"estimator 'adjusted_subsampled' needs subsample_k >= 1, got {k!r}")
    if int(k) >= n:
        return set(range(n))
    gen_device = generator.device if generator is not None else "cpu"
    return set(torch.randperm(n, generator=generator, device=gen_device)[: int(k)].tolist())


def _guided_output(
    eps_fn: EpsFn, x_in: Tensor, t: Tensor, scheduler: Any, guidance_scale: float
) -> Tensor:
    """Post-CFG model output (B, C, h, w), exactly as StableDiffusionPipeline forms it."""
    cfg_on = guidance_scale > 1.0
    x_model = torch.cat([x_in, x_in]) if cfg_on else x_in
    x_model = scheduler.scale_model_input(x_model, t)
    out = eps_fn(x_model, t)
    if out.shape != x_model.shape:
        raise ValueError(
            f"eps_fn returned shape {tuple(out.shape)} for input {tuple(x_model.shape)}; with guidance_scale > 1 "
            "it must return cat([eps_uncond, eps_cond]) for the doubled batch"
        )
    if not cfg_on:
        return out
    m_uncond, m_cond = out.chunk(2)
    return m_uncond + guidance_scale * (m_cond - m_uncond)


class _SavedBytes:
    """A saved-tensors pack hook that counts the bytes of the activations autograd keeps (tensors on the
    gradient path; frozen weights do not need a gradient and are not counted), each storage once."""

    def __init__(self) -> None:
        self.bytes = 0
        self._seen: set[int] = set()

    def pack(self, t: Tensor) -> Tensor:
        if t.requires_grad:
            storage = t.untyped_storage()
            if storage.data_ptr() not in self._seen:
                self._seen.add(storage.data_ptr())
                self.bytes += storage.nbytes()
        return t


def _unpack(t: Tensor) -> Tensor:
    return t


class _ReentrantCheckpoint(torch.autograd.Function):
    """The reentrant checkpoint of one model call: the forward runs it on the whole batch without recording
    (one autograd node), the backward re-runs it with gradients on for the first ``n_grad`` rows and
    backpropagates inside (into the model's parameters, x and the explicit inputs). With n_grad None it is
    checkpoint_mode 'reentrant' (inputs whole); with n_grad rows the rest ride along in the forward
    (e.g. the frozen model's reference images next to the current ones when only the text encoder is adapted)
    and cost nothing in backward - the model must then treat rows independently (no batch statistics), as a
    UNet does. ``_anchor``, an empty leaf that needs a gradient, puts the output in the graph even when no
    input needs one (UNet-only adaptors: x detached, the embeddings frozen)."""

    @staticmethod
    def forward(ctx, run, n_grad: int | None, x: Tensor, t: Tensor, _anchor: Tensor, *args: Tensor) -> Tensor:  # type: ignore[override]
        ctx.run, ctx.n_grad = run, n_grad
        ctx.devices = sorted({a.device for a in (x, *args) if a.device.type == "cuda"}, key=str)
        ctx.rng = torch.get_rng_state()
        ctx.cuda_rng = [torch.cuda.get_rng_state(d) for d in ctx.devices]
        ctx.save_for_backward(x, t, *args)
        with torch.no_grad():
            return run(x, t, *args)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, t, *args = ctx.saved_tensors
        n = ctx.n_grad  # None: every row, and the inputs are not split (their rows need not be the images')
        xs = (x if n is None else x[:n]).detach().requires_grad_(x.requires_grad)
        subs = [(a if n is None else a[:n]).detach().requires_grad_(a.requires_grad) for a in args]
        with torch.random.fork_rng(devices=ctx.devices), torch.enable_grad():
            torch.set_rng_state(ctx.rng)
            for d, state in zip(ctx.devices, ctx.cuda_rng):
                torch.cuda.set_rng_state(state, d)
            out = ctx.run(xs, t, *subs)
        torch.autograd.backward(out, grad if n is None else grad[:n])

        def padded(full: Tensor, part: Tensor) -> Tensor | None:
            if part.grad is None or n is None:
                return part.grad
            return torch.cat([part.grad, part.grad.new_zeros((full.shape[0] - n, *full.shape[1:]))])

        return (None, None, padded(x, xs), None, None, *(padded(a, s) for a, s in zip(args, subs)))


def _grad_rows_output(
    eps_fn: EpsFn, x_in: Tensor, t: Tensor, scheduler: Any, guidance_scale: float, eps_args: tuple[Tensor, ...],
    n_grad: int | None, checkpoint: bool,
) -> Tensor:
    """The post-CFG output of all rows, differentiable through the first ``n_grad`` rows only (the rest is
    computed without gradient; None: every row, ``eps_args`` passed whole). Checkpointed: one batched call (_ReentrantCheckpoint, reentrant); else two calls,
    the trailing rows under no_grad, so autograd never holds their activations."""

    def run(x: Tensor, t_: Tensor, *args: Tensor) -> Tensor:
        return _guided_output(lambda xx, tt: eps_fn(xx, tt, *args), x, t_, scheduler, guidance_scale)

    if checkpoint:
        anchor = torch.empty(0, device=x_in.device, requires_grad=True)
        return _ReentrantCheckpoint.apply(run, n_grad, x_in, t, anchor, *eps_args)
    if n_grad is None:
        return run(x_in, t, *eps_args)
    head = run(x_in[:n_grad], t, *(a[:n_grad] for a in eps_args))
    with torch.no_grad():
        tail = run(x_in[n_grad:], t, *(a[n_grad:] for a in eps_args))
    return torch.cat([head, tail])


def sample_with_grad(
    eps_fn: EpsFn,
    x_T: Tensor,
    scheduler: Any,
    *,
    estimator: str = "adjusted",
    truncate_k: int | None = None,
    checkpoint: bool = True,
    guidance_scale: float = 7.5,
    generator: torch.Generator | None = None,
    num_inference_steps: int | None = None,
    return_trajectory: bool = False,
    keep_activations_bytes: int = 0,
    checkpoint_mode: str = "non_reentrant",
    eps_args: tuple[Tensor, ...] = (),
    grad_rows: int | None = None,
    subsample_k: int | None = None,
    grad_steps: set[int] | None = None,
) -> Tensor | tuple[Tensor, list[Tensor]]:
    """Run the scheduler's sampler from x_T and return x_0 (B, C, h, w), differentiable per ``estimator``.

    eps_fn(x, t): x (B', C, h, w), t the scheduler timestep as a 0-d int64 tensor on x's device; returns the
      model output of x's shape. guidance_scale > 1 -> B' = 2B, x = cat([x, x]) and the output must be
      cat([m_uncond, m_cond]); m = m_uncond + guidance_scale * (m_cond - m_uncond) (diffusers' convention).

    x_T: (B, C, h, w) initial noise (scaled by ``scheduler.init_noise_sigma`` here, as the pipeline does).
    scheduler: a diffusers DDIMScheduler (eta = 0) or DPMSolverMultistepScheduler ('dpmsolver++', order <= 2);
      ``num_inference_steps`` given -> ``scheduler.set_timesteps`` is called here, else it must have been.
      Only its schedule is read; its step state is never touched.
    estimator:
      "exact"             full autograd through every model call and every latent;
      "adjusted"          model input detached (no d eps / d x), the solver's linear path between latents kept,
                          the gradient reaching each step's post-CFG output scaled by c_t (grad_coefficients);
      "truncated"         exact gradients through the last ``truncate_k`` steps only, earlier steps under no_grad;
      "random_truncation" as truncated with K ~ Uniform{1..truncate_k} drawn from ``generator``.
      "adjusted_subsampled" adjusted, with the model-parameter path of only ``subsample_k`` of the T steps
                          (drawn from ``generator``, or ``grad_steps`` given), each scaled by T / K: the other
                          calls run under no_grad (no activations, no backward) while the linear path between
                          latents keeps its gradient. Under "adjusted" the steps' parameter gradients are
                          separate terms (no d eps / d x), so this is an unbiased estimate of the adjusted
                          gradient at about K / T of its backward cost (the average over all K-subsets equals it).
      ``truncate_k`` is ignored by "exact", "adjusted" and "adjusted_subsampled" (truncation and adjustment do
      not combine); ``subsample_k`` / ``grad_steps`` are read by "adjusted_subsampled" only.
    checkpoint: wrap every model call in torch.utils.checkpoint (non-reentrant), keeping memory flat in T.
    keep_activations_bytes: selective checkpointing (with ``checkpoint``): model calls run without the
      checkpoint, their activations kept for backward (no recomputation), until the activations so kept reach
      this many bytes (counted as autograd saves them; one call may cross the limit); later calls are
      checkpointed. Values and gradients are the same either way; 0 checkpoints every call.
    checkpoint_mode: how checkpointed calls are wrapped (CHECKPOINT_MODES): "non_reentrant" (torch's default)
      or "reentrant" (no per-op graph kept in the forward: host memory flat in T; eps_fn must take the tensors
      that need a gradient as ``eps_args``). Same values; the same gradients up to float summation order (the
      reentrant one adds each call's parameter gradients into ``.grad`` separately).
    eps_args: tensors passed to every model call as eps_fn(x, t, *eps_args) (default: none, eps_fn(x, t)).
    grad_rows: with gradients on, only the first ``grad_rows`` images of the batch are differentiated; the
      others ride along in the same model calls (checkpointed: one batched call, recomputed in backward for
      the first rows only; not checkpointed: a separate no-grad call) and come out without a gradient path
      through the model. Needs ``eps_args`` (their rows split like the images; eps_fn must accept any batch)
      and a model that treats rows independently; its checkpointed calls use the reentrant checkpoint whatever
      ``checkpoint_mode`` says. None = all rows (the default).
    Works under torch.no_grad (generation). With ``return_trajectory`` also returns the N + 1 latents
    [x_T * init_noise_sigma, ..., x_0].
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if x_T.ndim != 4:
        raise ValueError(f"x_T must be (B, C, h, w), got shape {tuple(x_T.shape)}")
    if keep_activations_bytes < 0:
        raise ValueError(f"keep_activations_bytes must be >= 0, got {keep_activations_bytes}")
    if checkpoint_mode not in CHECKPOINT_MODES:
        raise ValueError(f"checkpoint_mode must be one of {CHECKPOINT_MODES}, got {checkpoint_mode!r}")
    eps_args = tuple(eps_args)
    model = (lambda xx, tt: eps_fn(xx, tt, *eps_args)) if eps_args else eps_fn
    if grad_rows is not None and grad_rows >= x_T.shape[0]:
        grad_rows = None
    if grad_rows is not None:
        if not 0 < grad_rows or not eps_args:
            raise ValueError(f"grad_rows={grad_rows} needs 0 < grad_rows and eps_args (the model's per-row inputs)")
        if any(a.shape[0] != x_T.shape[0] for a in eps_args):
            raise ValueError(f"grad_rows: every eps_args tensor needs {x_T.shape[0]} rows (one per image), got "
                             f"{[tuple(a.shape) for a in eps_args]}")
    if num_inference_steps is not None:
        scheduler.set_timesteps(num_inference_steps, device=x_T.device)
    # Coefficients in the latent's dtype (float32 at least) so float32 runs round exactly as diffusers does.
    coef_dtype = torch.promote_types(x_T.dtype, torch.float32)
    kind, steps = _solver_steps(scheduler, coef_dtype)
    prediction_type = scheduler.config.prediction_type
    first_grad = _first_grad_step(estimator, truncate_k, len(steps), generator)
    grad_on = torch.is_grad_enabled()
    adjusted = estimator in ("adjusted", "adjusted_subsampled")
    grad_coef = (
        grad_coefficients(scheduler.alphas_cumprod, scheduler.alphas, torch.tensor([s.timestep for s in steps]))
        if adjusted
        else None
    )
    model_grad = set(range(len(steps)))  # steps whose model call carries gradient
    if estimator == "adjusted_subsampled":
        if grad_steps is not None:
            model_grad = {int(i) for i in grad_steps}
            if not model_grad or not model_grad <= set(range(len(steps))):
                raise ValueError(f"grad_steps must be a non-empty subset of 0..{len(steps) - 1}, got {grad_steps}")
        elif grad_on:  # under no_grad (generation) nothing is drawn: the generator stays where it is
            model_grad = subsampled_steps(subsample_k, len(steps), generator)
        grad_coef = grad_coef * (len(steps) / len(model_grad))

    kept = _SavedBytes()
    x = x_T * scheduler.init_noise_sigma
    trajectory = [x]
    x0_prev: Tensor | None = None
    for i, st in enumerate(steps):
        step_grad = grad_on and i >= first_grad
        call_grad = step_grad and i in model_grad  # the model call's parameter path (adjusted_subsampled: K steps)
        with torch.set_grad_enabled(step_grad):
            t = torch.tensor(st.timestep, dtype=torch.long, device=x.device)
            # 1. Model output. Adjusted DFT (METHOD 4, step 1) feeds the model a detached latent.
            x_in = x.detach() if adjusted else x
            # selective checkpointing: calls keep their activations (counted by kept.pack) until the budget is
            # spent; later ones are checkpointed - the reentrant way (one node per call) or torch's default
            ckpt = call_grad and checkpoint and kept.bytes >= keep_activations_bytes
            if ckpt and (grad_rows is not None or checkpoint_mode == "reentrant"):
                m = _grad_rows_output(eps_fn, x_in, t, scheduler, guidance_scale, eps_args, grad_rows, True)
            elif ckpt:
                m = _torch_checkpoint(_guided_output, model, x_in, t, scheduler, guidance_scale, use_reentrant=False)
            elif call_grad:
                with torch.autograd.graph.saved_tensors_hooks(kept.pack, _unpack) if checkpoint else contextlib.nullcontext():
                    m = _grad_rows_output(eps_fn, x_in, t, scheduler, guidance_scale, eps_args, grad_rows, False)
            else:
                with torch.no_grad():
                    m = _guided_output(model, x_in, t, scheduler, guidance_scale)
            # 2. Adjusted DFT (METHOD 4, step 2): scale the gradient arriving at this step's output by c_t.
            if adjusted and m.requires_grad:
                c_t = float(grad_coef[i])
                m.register_hook(lambda g, c_t=c_t: g * c_t)
            # 3. Solver update, linear in (x, m) and, for DPM-Solver++(2M), the previous data prediction.
            x0_hat, eps_hat = _predict(x, m, st, prediction_type)
            if kind == "ddim":
                x = _ddim_update(x0_hat, eps_hat, st)
            else:
                # Like the scheduler, update half-precision latents in float32 (small sigmas lose digits).
                x = _dpmpp_update(x.to(coef_dtype), x0_hat, x0_prev, st, scheduler.config.solver_type).to(x.dtype)
            x0_prev = x0_hat
        trajectory.append(x)
    return (x, trajectory) if return_trajectory else x
