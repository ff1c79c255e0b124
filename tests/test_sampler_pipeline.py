"""The sampler against stock StableDiffusionPipeline on the tiny real SD components (no mocks)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline

from fairdiff_ray.core.sampler import sample_with_grad
from fairdiff_ray.models.sd import unet_eps_args, unet_eps_fn
from fairdiff_ray.models.tiny import tiny_components

PROMPT = "a photo of a person"
BATCH = 2


@pytest.fixture(scope="module")
def components():
    return tiny_components(seed=0)


def _embed(components, texts: list[str]) -> torch.Tensor:
    tok, enc = components["tokenizer"], components["text_encoder"]
    ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return enc(ids.input_ids)[0]


def make_eps_fn(components, guidance: float):
    """eps_fn(x, t) around the tiny UNet: rows [uncond ("") ; cond] under guidance, cond only otherwise."""
    cond = _embed(components, [PROMPT] * BATCH)
    emb = torch.cat([_embed(components, [""] * BATCH), cond]) if guidance > 1 else cond
    unet = components["unet"]
    return lambda x, t: unet(x, t, encoder_hidden_states=emb).sample


def _schedulers(components):
    ddim = components["scheduler"]
    return {
        "ddim": lambda: DDIMScheduler.from_config(ddim.config),
        "dpm": lambda: DPMSolverMultistepScheduler.from_config(ddim.config, algorithm_type="dpmsolver++", solver_order=2),
    }


def _latents(seed: int = 7) -> torch.Tensor:
    return torch.randn(BATCH, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind,guidance,steps", [("ddim", 7.5, 10), ("dpm", 7.5, 10), ("dpm", 1.0, 16)])
def test_no_grad_sampling_reproduces_stock_pipeline(components, kind, guidance, steps):
    make = _schedulers(components)[kind]
    pipe = StableDiffusionPipeline(**{**components, "scheduler": make()}, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        PROMPT,
        num_images_per_prompt=BATCH,
        latents=_latents(),
        num_inference_steps=steps,
        guidance_scale=guidance,
        output_type="latent",
    ).images
    with torch.no_grad():
        ours = sample_with_grad(
            make_eps_fn(components, guidance), _latents(), make(), guidance_scale=guidance, num_inference_steps=steps
        )
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() <= 1e-5


def _unet_grads(components, estimator: str, checkpoint: bool) -> dict[str, torch.Tensor]:
    unet = components["unet"]
    unet.zero_grad(set_to_none=True)
    x0 = sample_with_grad(
        make_eps_fn(components, 7.5),
        _latents(),
        _schedulers(components)["dpm"](),
        estimator=estimator,
        checkpoint=checkpoint,
        num_inference_steps=4,
        truncate_k=2,
    )
    (x0.square().mean()).backward()
    grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}
    unet.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("estimator", ["adjusted", "truncated"])
def test_gradients_reach_the_unet_and_checkpointing_does_not_change_them(components, estimator):
    with_ckpt = _unet_grads(components, estimator, checkpoint=True)
    without = _unet_grads(components, estimator, checkpoint=False)
    n_params = sum(1 for _ in components["unet"].parameters())
    assert len(with_ckpt) == n_params and with_ckpt.keys() == without.keys()
    total = torch.stack([g.abs().sum() for g in with_ckpt.values()]).sum()
    assert torch.isfinite(total) and total > 0
    for name, g in with_ckpt.items():
        assert torch.allclose(g, without[name], rtol=1e-4, atol=1e-7), name
    # the frozen text encoder (embeddings made under no_grad) gets nothing
    assert all(p.grad is None for p in components["text_encoder"].parameters())


def test_live_tensor_bytes_counts_storages_once_and_sees_frees_and_backward():
    from fairdiff_ray.profiling import LiveTensorBytes

    w = torch.randn(256, 256, requires_grad=True)  # created before the block: not counted
    mb = 256 * 256 * 4
    with LiveTensorBytes() as mem:
        a = torch.ones(256, 256)
        assert mem.live == mb
        v = a.view(-1)  # a view shares the storage
        a.mul_(2.0)  # in place: same storage
        assert mem.live == mb and v.numel() == a.numel()
        b = a * 3.0
        assert mem.live == 2 * mb
        del b
        assert mem.live == mb and mem.peak == 2 * mb
        (a @ w).sum().backward()  # a @ w is freed after the sum; the backward's w.grad is counted and kept
    assert w.grad is not None
    assert mem.live == 2 * mb and 2 * mb <= mem.peak < 2 * mb + 1024
    big = torch.randn(512, 512)  # a weight made before the block: linear views it transposed, no allocation
    with LiveTensorBytes() as mem:
        y = torch.nn.functional.linear(torch.ones(4, 512), big)
    assert y.shape == (4, 512) and mem.live == 4 * 512 * 4 and mem.peak == 2 * 4 * 512 * 4  # y; y + the ones


def _chain_peak(components, steps: int, checkpoint: bool) -> int:
    """Live-tensor peak of one adjusted backward through a DDIM chain into the CFG embeddings (UNet frozen)."""
    from fairdiff_ray.profiling import LiveTensorBytes

    unet = components["unet"].requires_grad_(False)
    emb = torch.cat([_embed(components, [""] * BATCH), _embed(components, [PROMPT] * BATCH)]).requires_grad_(True)
    sched = _schedulers(components)["ddim"]()
    try:
        with LiveTensorBytes() as mem:
            x0 = sample_with_grad(lambda x, t: unet(x, t, encoder_hidden_states=emb).sample, _latents(), sched,
                                  estimator="adjusted", checkpoint=checkpoint, num_inference_steps=steps)
            x0.square().mean().backward()
    finally:
        unet.requires_grad_(True)
    assert emb.grad is not None and bool(torch.isfinite(emb.grad).all())
    return mem.peak


def test_checkpointed_chain_memory_is_flat_in_the_number_of_steps(components):
    """Issue 8: with checkpointed eps calls the tensors alive at the peak grow only by the per-step latents
    (T=16 within 1.15x of T=4); without checkpointing they grow with T."""
    lo, hi = _chain_peak(components, 4, True), _chain_peak(components, 16, True)
    assert hi <= 1.15 * lo, (lo, hi)
    unck_lo, unck_hi = _chain_peak(components, 4, False), _chain_peak(components, 16, False)
    assert unck_hi >= 2.5 * unck_lo, (unck_lo, unck_hi)
    assert unck_lo > lo


def _graph_nodes(t: torch.Tensor) -> int:
    """Autograd nodes reachable from t.grad_fn (what the forward keeps on the host besides tensors)."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        todo += [nxt for nxt, _ in fn.next_functions]
    return len(seen)


def _emb_run(components, mode: str, steps: int, backward: bool = True):
    unet = components["unet"].requires_grad_(False)
    cond = _embed(components, [PROMPT] * BATCH).requires_grad_(True)
    uncond = _embed(components, [""] * BATCH).requires_grad_(True)
    try:
        eps = unet_eps_fn(unet, cond.detach(), uncond.detach())  # the closure's copies carry no gradient
        x0 = sample_with_grad(eps, _latents(), _schedulers(components)["dpm"](), estimator="adjusted",
                              checkpoint=True, checkpoint_mode=mode, eps_args=unet_eps_args(cond, uncond),
                              num_inference_steps=steps)
        nodes = _graph_nodes(x0)
        if backward:
            x0.square().mean().backward()
    finally:
        unet.requires_grad_(True)
    return x0.detach(), cond.grad, uncond.grad, nodes


def test_reentrant_checkpoint_same_values_and_gradients_and_a_graph_flat_in_steps(components):
    """Issue 8: checkpoint_mode 'reentrant' gives the same x_0 and the same gradients to the embeddings passed
    as eps_args (text-encoder training) and to the UNet's parameters with nothing else needing a gradient (the
    anchor input); its forward keeps a few autograd nodes per step where the non-reentrant checkpoint keeps
    the whole UNet's graph (host memory that grows with T)."""
    x_r, gc_r, gu_r, _ = _emb_run(components, "reentrant", 4)
    x_n, gc_n, gu_n, _ = _emb_run(components, "non_reentrant", 4)
    assert torch.equal(x_r, x_n)
    assert gc_r is not None and gc_r.abs().sum() > 0 and gu_r is not None
    assert torch.allclose(gc_r, gc_n, rtol=1e-4, atol=1e-8) and torch.allclose(gu_r, gu_n, rtol=1e-4, atol=1e-8)
    per_step = {m: (_emb_run(components, m, 12, False)[3] - _emb_run(components, m, 4, False)[3]) / 8
                for m in ("reentrant", "non_reentrant")}
    assert per_step["non_reentrant"] > 100 and per_step["reentrant"] * 10 < per_step["non_reentrant"], per_step
    # UNet parameters: same gradients as without checkpointing, no input needing a gradient
    unet = components["unet"]
    unet.zero_grad(set_to_none=True)
    x0 = sample_with_grad(make_eps_fn(components, 7.5), _latents(), _schedulers(components)["dpm"](),
                          estimator="adjusted", checkpoint=True, checkpoint_mode="reentrant", num_inference_steps=4)
    x0.square().mean().backward()
    reent = {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}
    unet.zero_grad(set_to_none=True)
    plain = _unet_grads(components, "adjusted", checkpoint=False)
    assert reent.keys() == plain.keys() and len(reent) == sum(1 for _ in unet.parameters())
    for name, g in reent.items():
        assert torch.allclose(g, plain[name], rtol=1e-4, atol=1e-7), name


@pytest.mark.parametrize("checkpoint,keep", [(True, 0), (True, 10**9), (False, 0)])
def test_grad_rows_ride_along_and_change_nothing(components, checkpoint, keep):
    """grad_rows: the frozen model's reference rows batched behind the trained rows (one call per step) give
    the same images as two separate chains, and the trained rows' gradients are those of a chain without the
    extra rows; the extra rows get no gradient (issue 8: reference images batched with the current forward)."""
    unet = components["unet"].requires_grad_(False)
    try:
        emb = {k: _embed(components, [p] * BATCH) for k, p in (("c", PROMPT), ("r", "a photo of a face"), ("u", ""))}
        x_T = _latents()

        def run(rows: str, grad_rows=None):
            cond = torch.cat([emb[k] for k in rows]).clone().requires_grad_(True)
            uncond = torch.cat([emb["u"]] * len(rows)).clone().requires_grad_(True)
            eps = unet_eps_fn(unet, cond.detach(), uncond.detach())
            x0 = sample_with_grad(eps, torch.cat([x_T] * len(rows)), _schedulers(components)["dpm"](),
                                  estimator="adjusted", checkpoint=checkpoint, checkpoint_mode="reentrant",
                                  keep_activations_bytes=keep, eps_args=unet_eps_args(cond, uncond),
                                  num_inference_steps=4, grad_rows=grad_rows)
            x0[:BATCH].square().mean().backward()
            return x0.detach(), cond.grad, uncond.grad

        both, g_both, gu_both = run("cr", grad_rows=BATCH)
        alone, g_alone, gu_alone = run("c")
        ref, _, _ = run("r")
        assert torch.allclose(both[:BATCH], alone, atol=1e-6) and torch.allclose(both[BATCH:], ref, atol=1e-6)
        assert g_alone.abs().sum() > 0
        assert torch.allclose(g_both[:BATCH], g_alone, rtol=1e-4, atol=1e-8)
        assert torch.allclose(gu_both[:BATCH], gu_alone, rtol=1e-4, atol=1e-8)
        assert not g_both[BATCH:].any() and not gu_both[BATCH:].any()
    finally:
        unet.requires_grad_(True)


def test_grad_rows_with_unet_parameters_and_bad_input(components):
    """UNet weights get the trained rows' gradient only; grad_rows needs eps_args with one row per image."""
    unet = components["unet"]
    cond, uncond = _embed(components, [PROMPT] * BATCH), _embed(components, [""] * BATCH)
    ref = _embed(components, ["a photo of a face"] * BATCH)
    sched = _schedulers(components)["dpm"]

    def grads(two: bool) -> dict[str, torch.Tensor]:
        unet.zero_grad(set_to_none=True)
        c, u = (torch.cat([cond, ref]), torch.cat([uncond, uncond])) if two else (cond, uncond)
        x0 = sample_with_grad(unet_eps_fn(unet, c, u), torch.cat([_latents()] * (2 if two else 1)), sched(),
                              estimator="adjusted", checkpoint=True, checkpoint_mode="reentrant",
                              eps_args=unet_eps_args(c, u), num_inference_steps=3, grad_rows=BATCH if two else None)
        x0[:BATCH].square().mean().backward()
        out = {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}
        unet.zero_grad(set_to_none=True)
        return out

    a, b = grads(True), grads(False)
    assert a.keys() == b.keys() and len(a) == sum(1 for _ in unet.parameters())
    for name, g in a.items():
        assert torch.allclose(g, b[name], rtol=1e-4, atol=1e-7), name
    with pytest.raises(ValueError, match="eps_args"):
        sample_with_grad(unet_eps_fn(unet, cond, uncond), _latents(), sched(), num_inference_steps=2, grad_rows=1)
    with pytest.raises(ValueError, match="rows"):
        sample_with_grad(unet_eps_fn(unet, cond, uncond), _latents(), sched(), num_inference_steps=2, grad_rows=1,
                         eps_args=(cond[:1], uncond[:1]))


def test_reentrant_checkpoint_passes_inputs_whose_rows_are_not_the_images(components):
    """checkpoint_mode 'reentrant' hands eps_args over whole: one (2B, L, D) tensor of CFG embeddings for B
    images (bench_sampler_memory's seam) gets the non-reentrant checkpoint's gradient."""
    unet = components["unet"].requires_grad_(False)
    base = torch.cat([_embed(components, [""] * BATCH), _embed(components, [PROMPT] * BATCH)])
    grads = []
    try:
        for mode in ("reentrant", "non_reentrant"):
            emb = base.clone().requires_grad_(True)
            x0 = sample_with_grad(lambda x, t, e: unet(x, t, encoder_hidden_states=e).sample, _latents(),
                                  _schedulers(components)["ddim"](), estimator="adjusted", checkpoint=True,
                                  checkpoint_mode=mode, eps_args=(emb,), num_inference_steps=3)
            x0.square().mean().backward()
            grads.append(emb.grad)
    finally:
        unet.requires_grad_(True)
    assert grads[0].shape == base.shape and grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-8)


def test_adjusted_subsampled_on_the_tiny_unet_averages_to_adjusted(components):
    """adjusted_subsampled with the worker's settings (reentrant checkpoint, reference rows riding along,
    embeddings as eps_args): the mean of the embeddings' gradients over all K-subsets of the steps is the
    adjusted gradient; one subset alone is not, and the images are the same."""
    import itertools

    unet = components["unet"].requires_grad_(False)
    try:
        emb = {k: _embed(components, [p] * BATCH) for k, p in (("c", PROMPT), ("r", "a photo of a face"), ("u", ""))}
        x_T = _latents()

        def run(**kw):
            cond = torch.cat([emb["c"], emb["r"]]).clone().requires_grad_(True)
            uncond = torch.cat([emb["u"]] * 2).clone().requires_grad_(True)
            x0 = sample_with_grad(unet_eps_fn(unet, cond.detach(), uncond.detach()), torch.cat([x_T] * 2),
                                  _schedulers(components)["dpm"](), checkpoint=True, checkpoint_mode="reentrant",
                                  eps_args=unet_eps_args(cond, uncond), num_inference_steps=4, grad_rows=BATCH, **kw)
            x0[:BATCH].square().mean().backward()
            return x0.detach(), torch.cat([cond.grad, uncond.grad])

        x_adj, g_adj = run(estimator="adjusted")
        total = torch.zeros_like(g_adj)
        subsets = list(itertools.combinations(range(4), 2))
        for steps in subsets:
            x_sub, g_sub = run(estimator="adjusted_subsampled", grad_steps=set(steps))
            assert torch.equal(x_sub, x_adj)
            total += g_sub
        assert g_adj.abs().sum() > 0 and not torch.allclose(g_sub, g_adj, rtol=1e-2)
        assert torch.allclose(total / len(subsets), g_adj, rtol=1e-4, atol=1e-8)
    finally:
        unet.requires_grad_(True)
