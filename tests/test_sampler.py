"""Float64 gradient tests for fairdiff_ray.core.sampler against an analytic eps function (no network).

Like diffusers' scheduler tests, the UNet is swapped for a formula with parameters theta:
    eps(x, t) = a * tanh(W x) + b * t / 1000 + beta[step(t)]      (+ delta * tanh(x) on the conditional half)
so every gradient can be checked against finite differences or a hand derivation.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from fairdiff_ray.core.sampler import grad_coefficients, sample_with_grad
from fairdiff_ray.models.tiny import tiny_scheduler

F64 = torch.float64
B, C, H, W = 2, 2, 3, 3


def make_scheduler(kind: str, n: int, **kw):
    base = tiny_scheduler().config
    if kind == "ddim":
        sched = DDIMScheduler.from_config(base, **kw)
    else:
        kw = {"algorithm_type": "dpmsolver++", "solver_order": 2, **kw}
        sched = DPMSolverMultistepScheduler.from_config(base, **kw)
    sched.set_timesteps(n)
    return sched


class AnalyticEps:
    """The analytic model. theta (flat, float64) = [W (C*C), a (C), b (C), delta (C), beta (N*C)]."""

    def __init__(self, theta: torch.Tensor, timesteps: list[int], guided: bool, depends_on_x: bool = True):
        n = len(timesteps)
        assert theta.numel() == self.size(n)
        self.step_of = {t: i for i, t in enumerate(timesteps)}
        self.w = theta[: C * C].view(C, C)
        self.a, self.b, self.delta = theta[C * C : C * C + 3 * C].view(3, C, 1, 1)
        self.beta = theta[C * C + 3 * C :].view(n, C, 1, 1)
        self.guided, self.depends_on_x = guided, depends_on_x
        self.calls: list[int] = []

    @staticmethod
    def size(n: int) -> int:
        return C * C + 3 * C + n * C

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.ndim == 0 and t.dtype == torch.long
        self.calls.append(int(t))
        out = (self.b * (t.to(x.dtype) / 1000) + self.beta[self.step_of[int(t)]]).expand_as(x)
        if self.depends_on_x:
            out = out + self.a * torch.tanh(torch.einsum("ij,bjhw->bihw", self.w, x))
        if self.guided:
            assert x.shape[0] == 2 * B
            cond = self.delta * torch.tanh(x[B:]) if self.depends_on_x else self.delta.expand_as(x[B:])
            out = torch.cat([out[:B], out[B:] + cond])
        return out


def _theta(n: int, seed: int = 0) -> torch.Tensor:
    return 0.5 * torch.randn(AnalyticEps.size(n), generator=torch.Generator().manual_seed(seed), dtype=F64)


def _x_T(seed: int = 1) -> torch.Tensor:
    return torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _loss(x0: torch.Tensor) -> torch.Tensor:
    r = torch.linspace(-1.0, 1.0, x0.numel(), dtype=x0.dtype).view_as(x0)
    return (r * x0 + 0.05 * x0**2).sum()  # nonlinear but not saturating


def _grads(sched, estimator: str, guidance: float, theta, x_T, depends_on_x=True, **kw):
    theta = theta.clone().requires_grad_()
    x_T = x_T.clone().requires_grad_()
    ts = sched.timesteps.tolist()
    eps = AnalyticEps(theta, ts, guided=guidance > 1, depends_on_x=depends_on_x)
    x0 = sample_with_grad(eps, x_T, sched, estimator=estimator, guidance_scale=guidance, **kw)
    g_theta, g_x = torch.autograd.grad(_loss(x0), (theta, x_T), allow_unused=True)
    return x0.detach(), g_theta, g_x


# --- grad_coefficients --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,n", [("ddim", 10), ("dpm", 20), ("dpm", 50)])
def test_grad_coefficients_geometric_mean_one_positive_finite(kind, n):
    sched = make_scheduler(kind, n)
    c = grad_coefficients(sched.alphas_cumprod, sched.alphas, sched.timesteps)
    assert c.shape == (n,) and c.dtype == F64
    assert torch.isfinite(c).all() and (c > 0).all()
    assert c.log().mean().abs() < 1e-12
    # The ratio of two coefficients is the ratio of the raw formula (normalisation is one common factor).
    ac, al = sched.alphas_cumprod.double(), sched.alphas.double()
    t0, t1 = sched.timesteps[0], sched.timesteps[-1]
    raw = [ac[t].sqrt() * (1 - ac[t]).sqrt() / (1 - al[t]) for t in (t0, t1)]
    assert torch.isclose(c[0] / c[-1], raw[0] / raw[1], rtol=1e-12)


def test_grad_coefficients_rejects_bad_input():
    sched = make_scheduler("ddim", 5)
    with pytest.raises(ValueError, match="timesteps must lie"):
        grad_coefficients(sched.alphas_cumprod, sched.alphas, torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match="integer"):
        grad_coefficients(sched.alphas_cumprod, sched.alphas, torch.tensor([1.5]))
    with pytest.raises(ValueError, match="same length"):
        grad_coefficients(sched.alphas_cumprod, sched.alphas[:10], sched.timesteps)


# --- forward pass: the sampler walks the scheduler's own schedule -----------------------------------------------


def _scheduler_loop(sched, eps_fn, x, guidance):
    """The stock pipeline's loop with scheduler.step (the reference)."""
    x = x * sched.init_noise_sigma
    for t in sched.timesteps:
        x_in = torch.cat([x, x]) if guidance > 1 else x
        out = eps_fn(sched.scale_model_input(x_in, t), t)
        if guidance > 1:
            u, c = out.chunk(2)
            out = u + guidance * (c - u)
        x = sched.step(out, t, x).prev_sample
    return x


SCHEDULES = [
    ("ddim", 6, {}),
    ("ddim", 20, {"prediction_type": "v_prediction"}),
    ("ddim", 7, {"timestep_spacing": "trailing"}),
    ("dpm", 6, {}),
    ("dpm", 20, {}),
    ("dpm", 8, {"final_sigmas_type": "sigma_min"}),
    ("dpm", 8, {"solver_type": "heun"}),
    ("dpm", 8, {"lower_order_final": False, "final_sigmas_type": "sigma_min"}),
    ("dpm", 10, {"use_karras_sigmas": True}),
    ("dpm", 9, {"prediction_type": "v_prediction"}),
    ("dpm", 5, {"solver_order": 1}),
]


@pytest.mark.parametrize("kind,n,kw", SCHEDULES)
def test_forward_matches_scheduler_step_loop(kind, n, kw):
    # float32: diffusers' DPM-Solver upcasts to float32 itself, so that is the dtype to compare in.
    x_T = _x_T().float()
    theta = _theta(n).float()
    sched = make_scheduler(kind, n, **kw)
    eps = AnalyticEps(theta, sched.timesteps.tolist(), guided=True)
    ref = _scheduler_loop(make_scheduler(kind, n, **kw), eps, x_T, 7.5)
    with torch.no_grad():
        ours = sample_with_grad(eps, x_T, sched, guidance_scale=7.5)
    assert (ours - ref).abs().max() <= 1e-5
    # Only the schedule was read: the scheduler's own step state is untouched.
    assert getattr(sched, "_step_index", None) is None


def test_estimators_and_checkpointing_do_not_change_values():
    sched = make_scheduler("dpm", 8)
    theta, x_T = _theta(8), _x_T()
    outs = [
        _grads(sched, est, 3.0, theta, x_T, truncate_k=3, subsample_k=3, checkpoint=ck)[0]
        for est in ("exact", "adjusted", "truncated", "random_truncation", "adjusted_subsampled")
        for ck in (True, False)
    ]
    with torch.no_grad():
        plain = sample_with_grad(AnalyticEps(theta, sched.timesteps.tolist(), True), x_T, sched, guidance_scale=3.0)
    assert plain.grad_fn is None
    for out in outs:
        assert torch.equal(out, plain)


def test_num_inference_steps_sets_the_schedule_and_trajectory():
    sched = make_scheduler("ddim", 3)
    ref = make_scheduler("ddim", 5)
    eps = AnalyticEps(_theta(5), ref.timesteps.tolist(), guided=False)
    with torch.no_grad():
        x0, traj = sample_with_grad(eps, _x_T(), sched, num_inference_steps=5, guidance_scale=1.0, return_trajectory=True)
    assert torch.equal(sched.timesteps, ref.timesteps)
    assert eps.calls == ref.timesteps.tolist()
    assert len(traj) == 6 and torch.equal(traj[0], _x_T()) and torch.equal(traj[-1], x0)


# --- gradients ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,kw,guidance,ck",
    [
        ("ddim", {}, 1.0, True),
        ("ddim", {"prediction_type": "v_prediction"}, 3.0, False),
        ("dpm", {}, 3.0, True),
        ("dpm", {"final_sigmas_type": "sigma_min", "solver_type": "heun"}, 1.0, False),
    ],
)
def test_exact_matches_finite_differences(kind, kw, guidance, ck):
    n = 5
    sched = make_scheduler(kind, n, **kw)
    ts = sched.timesteps.tolist()

    def x0_of(theta, x_T):
        eps = AnalyticEps(theta, ts, guided=guidance > 1)
        return sample_with_grad(eps, x_T, sched, estimator="exact", guidance_scale=guidance, checkpoint=ck)

    inputs = (_theta(n).requires_grad_(), _x_T().requires_grad_())
    assert torch.autograd.gradcheck(x0_of, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_adjusted_matches_hand_derived_ddim(guidance):
    """dL/dtheta = sum_i c_i * B_i * (dL/dx_0 * prod_{j > i} A_j) . d eps_i / dtheta, with the UNet input detached.

    DDIM (eta = 0) with eps-prediction: x_{i+1} = A_i x_i + B_i eps_i,
      A_i = sqrt(abar_prev) / sqrt(abar),  B_i = sqrt(1 - abar_prev) - sqrt(abar_prev) sqrt(1 - abar) / sqrt(abar).
    """
    n = 6
    sched = make_scheduler("ddim", n)
    theta, x_T = _theta(n, seed=3), _x_T(seed=4)
    ts = sched.timesteps.tolist()
    ac, al = sched.alphas_cumprod.double(), sched.alphas.double()
    ratio = sched.config.num_train_timesteps // n
    final = torch.tensor(float(sched.final_alpha_cumprod), dtype=F64)
    A, Bc, c = [], [], []
    for t in ts:
        ab, abp = ac[t], (ac[t - ratio] if t - ratio >= 0 else final)
        A.append(abp.sqrt() / ab.sqrt())
        Bc.append((1 - abp).sqrt() - abp.sqrt() * (1 - ab).sqrt() / ab.sqrt())
        c.append(ab.sqrt() * (1 - ab).sqrt() / (1 - al[t]))
    c = torch.stack(c)
    c = c / c.log().mean().exp()

    def guided_eps(th, x, t):
        eps = AnalyticEps(th, ts, guided=guidance > 1)
        if guidance <= 1:
            return eps(x, torch.tensor(t))
        u, cond = eps(torch.cat([x, x]), torch.tensor(t)).chunk(2)
        return u + guidance * (cond - u)

    xs = [x_T]
    for i, t in enumerate(ts):
        xs.append(A[i] * xs[-1] + Bc[i] * guided_eps(theta, xs[-1], t))
    x0 = xs[-1].clone().requires_grad_()
    g = torch.autograd.grad(_loss(x0), x0)[0]
    expected = torch.zeros_like(theta)
    for i in reversed(range(n)):
        th = theta.clone().requires_grad_()
        expected += c[i] * Bc[i] * torch.autograd.grad(guided_eps(th, xs[i], ts[i]), th, grad_outputs=g)[0]
        g = A[i] * g  # gradient at x_i through the direct (linear) path only

    x0_s, g_theta, g_x = _grads(sched, "adjusted", guidance, theta, x_T)
    assert torch.allclose(x0_s, xs[-1], rtol=1e-12, atol=1e-12)
    assert torch.allclose(g_theta, expected, rtol=1e-9, atol=1e-12)
    assert torch.allclose(g_x, g, rtol=1e-9, atol=1e-12)
    # and it is not the exact gradient (the coupled paths and c_t do matter here)
    assert not torch.allclose(_grads(sched, "exact", guidance, theta, x_T)[1], expected, rtol=1e-3)


@pytest.mark.parametrize("kind", ["ddim", "dpm"])
def test_adjusted_scales_each_step_by_its_coefficient(kind):
    """With eps independent of x, the only difference from exact is c_t on each step's own parameter beta_t."""
    n = 8
    sched = make_scheduler(kind, n)
    theta, x_T = _theta(n), _x_T()
    _, g_exact, gx_exact = _grads(sched, "exact", 3.0, theta, x_T, depends_on_x=False)
    _, g_adj, gx_adj = _grads(sched, "adjusted", 3.0, theta, x_T, depends_on_x=False)
    c = grad_coefficients(sched.alphas_cumprod, sched.alphas, sched.timesteps)
    beta_exact = g_exact[C * C + 3 * C :].view(n, C)
    beta_adj = g_adj[C * C + 3 * C :].view(n, C)
    assert (beta_exact.abs() > 1e-8).all()
    assert torch.allclose(beta_adj, c[:, None] * beta_exact, rtol=1e-10, atol=1e-14)
    assert torch.allclose(gx_adj, gx_exact, rtol=1e-10, atol=1e-14)


def _beta_grad(g_theta: torch.Tensor, n: int) -> torch.Tensor:
    return g_theta[C * C + 3 * C :].view(n, C)


@pytest.mark.parametrize("kind", ["ddim", "dpm"])
def test_truncated_gives_exactly_zero_gradient_through_early_steps(kind):
    n, k = 8, 3
    sched = make_scheduler(kind, n)
    theta, x_T = _theta(n), _x_T()
    _, g_theta, g_x = _grads(sched, "truncated", 3.0, theta, x_T, truncate_k=k)
    beta = _beta_grad(g_theta, n)
    assert (beta[: n - k] == 0).all()  # exactly zero, not small
    assert (beta[n - k :].abs() > 1e-8).all()
    assert g_x is None or (g_x == 0).all()

    # The truncated gradient is the exact gradient of x_0 as a function of the theta used in the last k steps
    # only, with the early steps frozen at the current theta (DRaFT-K), checked by central differences.
    ts = sched.timesteps.tolist()

    def loss_late(th_late):
        early, late = AnalyticEps(theta, ts, True), AnalyticEps(th_late, ts, True)
        eps = lambda x, t: early(x, t) if ts.index(int(t)) < n - k else late(x, t)  # noqa: E731
        with torch.no_grad():
            return float(_loss(sample_with_grad(eps, x_T, sched, estimator="exact", guidance_scale=3.0)))

    h = 1e-6
    basis = torch.eye(len(theta), dtype=F64)
    fd = torch.tensor([(loss_late(theta + h * e) - loss_late(theta - h * e)) / (2 * h) for e in basis], dtype=F64)
    assert torch.allclose(g_theta, fd, rtol=1e-6, atol=1e-8)


def test_truncated_with_k_at_least_steps_is_exact():
    sched = make_scheduler("dpm", 5)
    theta, x_T = _theta(5), _x_T()
    _, g_exact, gx_exact = _grads(sched, "exact", 3.0, theta, x_T)
    _, g_trunc, gx_trunc = _grads(sched, "truncated", 3.0, theta, x_T, truncate_k=7)
    assert torch.equal(g_exact, g_trunc) and torch.equal(gx_exact, gx_trunc)


def test_random_truncation_draws_k_uniformly_from_the_generator():
    n, k_max = 6, 3
    sched = make_scheduler("ddim", n)
    theta, x_T = _theta(n), _x_T()

    def draws(seed: int, count: int) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        ks = []
        for _ in range(count):
            _, g_theta, _ = _grads(sched, "random_truncation", 1.0, theta, x_T, truncate_k=k_max, generator=gen)
            nonzero = (_beta_grad(g_theta, n) != 0).any(dim=1)
            k = int(nonzero.sum())
            assert nonzero[n - k :].all()  # the steps with gradient are the last k
            ks.append(k)
        return ks

    ks = draws(0, 30)
    assert set(ks) == {1, 2, 3}
    assert draws(0, 30) == ks


@pytest.mark.parametrize("kind", ["ddim", "dpm"])
def test_adjusted_subsampled_averages_to_the_adjusted_gradient(kind):
    """Each K-subset's gradient: the chosen steps' parameter terms of the adjusted gradient times T / K, the
    others exactly zero, the latent path unchanged; the mean over all K-subsets is the adjusted gradient."""
    import itertools

    n, k = 6, 2
    sched = make_scheduler(kind, n)
    theta, x_T = _theta(n), _x_T()
    _, g_adj, gx_adj = _grads(sched, "adjusted", 3.0, theta, x_T)
    subsets = list(itertools.combinations(range(n), k))
    total = torch.zeros_like(g_adj)
    for steps in subsets:
        _, g_sub, gx_sub = _grads(sched, "adjusted_subsampled", 3.0, theta, x_T, grad_steps=set(steps))
        beta_sub, beta_adj = _beta_grad(g_sub, n), _beta_grad(g_adj, n)
        chosen = torch.tensor([i in steps for i in range(n)])
        assert (beta_sub[~chosen] == 0).all()
        assert torch.allclose(beta_sub[chosen], (n / k) * beta_adj[chosen], rtol=1e-10, atol=1e-14)
        assert torch.allclose(gx_sub, gx_adj, rtol=1e-10, atol=1e-14)
        total += g_sub
    assert not torch.allclose(g_sub, g_adj, rtol=1e-3)  # one subset alone is not the adjusted gradient
    assert torch.allclose(total / len(subsets), g_adj, rtol=1e-10, atol=1e-14)


def test_adjusted_subsampled_draws_k_steps_from_the_generator():
    n, k = 6, 2
    sched = make_scheduler("ddim", n)
    theta, x_T = _theta(n), _x_T()

    def draws(seed: int, count: int) -> list[tuple[int, ...]]:
        gen = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(count):
            _, g_theta, _ = _grads(sched, "adjusted_subsampled", 1.0, theta, x_T, subsample_k=k, generator=gen)
            out.append(tuple(torch.nonzero((_beta_grad(g_theta, n) != 0).any(dim=1)).flatten().tolist()))
        return out

    got = draws(0, 30)
    assert all(len(s) == k for s in got) and len(set(got)) > 5
    assert {i for s in got for i in s} == set(range(n))
    assert draws(0, 30) == got
    _, g_all, _ = _grads(sched, "adjusted_subsampled", 1.0, theta, x_T, subsample_k=n + 1)
    assert torch.equal(g_all, _grads(sched, "adjusted", 1.0, theta, x_T)[1])  # K >= T: the adjusted gradient


@pytest.mark.parametrize("estimator", ["exact", "adjusted", "truncated", "adjusted_subsampled"])
def test_checkpoint_on_off_same_gradients(estimator):
    sched = make_scheduler("dpm", 6)
    theta, x_T = _theta(6), _x_T()
    kw = {"truncate_k": 4, "grad_steps": {0, 3, 4}}
    x_on, g_on, gx_on = _grads(sched, estimator, 3.0, theta, x_T, checkpoint=True, **kw)
    x_off, g_off, gx_off = _grads(sched, estimator, 3.0, theta, x_T, checkpoint=False, **kw)
    assert torch.equal(x_on, x_off)
    assert torch.allclose(g_on, g_off, rtol=1e-13, atol=1e-15)
    if estimator == "truncated":  # x_T feeds only no-grad steps
        assert gx_on is None and gx_off is None
    else:
        assert torch.allclose(gx_on, gx_off, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("estimator", ["exact", "adjusted"])
def test_selective_checkpointing_keeps_activations_within_the_budget_and_changes_nothing(estimator):
    n = 6
    sched = make_scheduler("dpm", n)
    theta, x_T = _theta(n), _x_T()
    full = _grads(sched, estimator, 3.0, theta, x_T, checkpoint=True)
    # budget -> model calls (forward + recomputed in backward): 0 recomputes all n calls, 1 byte keeps only the
    # first call (it crosses the limit), a large budget keeps all of them
    for budget, calls in ((0, 2 * n), (1, 2 * n - 1), (10**9, n)):
        theta_k = theta.clone().requires_grad_()
        x_k = x_T.clone().requires_grad_()
        eps = AnalyticEps(theta_k, sched.timesteps.tolist(), guided=True)
        x0 = sample_with_grad(eps, x_k, sched, estimator=estimator, guidance_scale=3.0, checkpoint=True,
                              keep_activations_bytes=budget)
        g_theta, g_x = torch.autograd.grad(_loss(x0), (theta_k, x_k))
        assert len(eps.calls) == calls, budget
        assert torch.equal(x0.detach(), full[0])
        assert torch.allclose(g_theta, full[1], rtol=1e-13, atol=1e-15)
        assert torch.allclose(g_x, full[2], rtol=1e-13, atol=1e-15)
    with pytest.raises(ValueError, match="keep_activations_bytes"):
        _run(sched, keep_activations_bytes=-1)


# --- misuse -------------------------------------------------------------------------------------------------


def _run(sched, eps=None, **kw):
    eps = eps or (lambda x, t: torch.zeros_like(x))
    return sample_with_grad(eps, _x_T(), sched, **kw)


@pytest.mark.parametrize(
    "make,kw,match",
    [
        (lambda: make_scheduler("ddim", 4), {"estimator": "magic"}, "estimator must be one of"),
        (lambda: make_scheduler("ddim", 4), {"estimator": "truncated"}, "truncate_k"),
        (lambda: make_scheduler("ddim", 4), {"estimator": "random_truncation", "truncate_k": 0}, "truncate_k"),
        (lambda: make_scheduler("ddim", 4), {"estimator": "adjusted_subsampled"}, "subsample_k"),
        (lambda: make_scheduler("ddim", 4), {"estimator": "adjusted_subsampled", "grad_steps": {4}}, "grad_steps"),
        (lambda: make_scheduler("ddim", 4, clip_sample=True), {}, "clip_sample"),
        (lambda: make_scheduler("ddim", 4, prediction_type="sample"), {}, "prediction_type"),
        (lambda: make_scheduler("dpm", 4, solver_order=3), {}, "solver_order"),
        (lambda: make_scheduler("dpm", 4, algorithm_type="sde-dpmsolver++"), {}, "algorithm_type"),
        (lambda: EulerDiscreteScheduler.from_config(tiny_scheduler().config), {"num_inference_steps": 4}, "not supported"),
        (lambda: tiny_scheduler(), {}, "set_timesteps"),
    ],
)
def test_misuse_raises_value_error(make, kw, match):
    with pytest.raises(ValueError, match=match):
        _run(make(), **kw)


def test_eps_fn_must_return_the_doubled_batch_under_guidance():
    sched = make_scheduler("ddim", 3)
    with pytest.raises(ValueError, match="cat\\(\\[eps_uncond, eps_cond\\]\\)"):
        _run(sched, eps=lambda x, t: torch.zeros_like(x[: x.shape[0] // 2]), guidance_scale=7.5)
