"""The worker loop in one process (world size 1, gloo), on the tiny SD model: the gradient path, the
non-finite-gradient skip, the two backward schedules, seeds and the DeepSpeed config."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist

from fairdiff_ray.dist.engine import deepspeed_config
from fairdiff_ray.dist.worker import Worker, image_seeds, num_sampling_steps
from tests._helpers_train import builders, tiny_config

PROMPT = "a photo of the face of a nurse"


@pytest.fixture(scope="module", autouse=True)
def process_group():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not dist.is_initialized():
        with socket.socket() as sock:  # a free port: two xdist workers may run worker tests at the same time
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield


def _worker(tmp_path, *overrides: str) -> Worker:
    return Worker(tiny_config(tmp_path, *overrides), torch.device("cpu"), builders())


def _snapshot(w: Worker) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in w.adaptor.named_parameters().items()}


def test_step_trains_only_the_adaptor(tmp_path):
    w = _worker(tmp_path, "deepspeed.enabled=false")
    frozen = {k: v.clone() for k, v in w.comp.unet.state_dict().items() if "lora" not in k}
    before, ema_before = _snapshot(w), {k: v.clone() for k, v in w.adaptor.ema.items()}
    out = w.train_step([PROMPT], step=0)
    w.train_step([PROMPT], step=1)  # LoRA B starts at 0, so A only moves from the second step on
    after = _snapshot(w)
    assert out.metrics["applied"] == 1.0 and out.metrics["loss/align"] > 0
    assert all(float((after[k] - before[k]).abs().max()) > 0 for k in after)  # every adaptor weight moved
    assert any(float((w.adaptor.ema[k] - ema_before[k]).abs().max()) > 0 for k in after)
    for k, v in w.comp.unet.state_dict().items():  # the base model did not
        if k in frozen:
            assert torch.equal(v, frozen[k]), k
    assert sorted(out.targets) == ["gender"] and out.targets["gender"].shape == (4,)
    # the step's class shares, consistent with its bias (one prompt, two classes: bias = |2 f - 1|)
    f, m = out.metrics["train/freq/gender/female"], out.metrics["train/freq/gender/male"]
    assert f + m == pytest.approx(1.0) and abs(2 * f - 1) == pytest.approx(out.metrics["train/bias/gender"])


@pytest.mark.parametrize("engine", ["deepspeed.zero_stage=0", "deepspeed.zero_stage=2", "deepspeed.enabled=false"])
def test_non_finite_gradient_skips_optimizer_and_ema(tmp_path, engine):
    w = _worker(tmp_path, engine)
    w.train_step([PROMPT], step=0)
    before, ema_before = _snapshot(w), {k: v.clone() for k, v in w.adaptor.ema.items()}
    p = w.adaptor.trainable_parameters()[0]
    handle = p.register_hook(lambda g: torch.full_like(g, float("nan")))
    out = w.train_step([PROMPT], step=1)
    handle.remove()
    assert out.metrics["applied"] == 0.0 and out.metrics["skipped"] == 1.0
    for k, v in _snapshot(w).items():
        assert torch.equal(v, before[k]), k
        assert torch.equal(w.adaptor.ema[k], ema_before[k]), k
    out = w.train_step([PROMPT], step=2)  # and training goes on
    assert out.metrics["applied"] == 1.0 and out.metrics["skipped"] == 1.0
    assert all(torch.isfinite(v).all() for v in _snapshot(w).values())
    assert any(not torch.equal(v, before[k]) for k, v in _snapshot(w).items())


def test_fused_and_reference_schedules_give_the_same_update(tmp_path):
    states = []
    for schedule in ("fused", "reference"):
        w = _worker(tmp_path, "deepspeed.enabled=false", f"train.schedule={schedule}")
        for step in range(2):
            m = w.train_step([PROMPT], step=step).metrics
        states.append((_snapshot(w), m["loss/total"]))
    (a, la), (b, lb) = states
    assert la == pytest.approx(lb, abs=1e-6)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_chunks_spanning_prompts_give_the_same_targets_and_update(tmp_path):
    """A step's rows are chunked prompt-major across prompts: one batched chain for several prompts (and a
    chunk that cuts a prompt unevenly) gives the targets and update of chunks within each prompt, in fewer
    UNet calls."""
    prompts = [PROMPT, "a photo of the face of a pilot"]
    results = {}
    for chunk in (2, 3, 8):  # 4 chunks within the prompts / 3 chunks, two of them across / 1 chunk
        w = _worker(tmp_path, "train.prompts_per_step=2", f"train.chunk_size={chunk}")
        assert [len(c) for c in w.step_chunks(2)] == {2: [2, 2, 2, 2], 3: [3, 3, 2], 8: [4 + 4]}[chunk]
        calls = []
        w.comp.unet.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        targets = []
        for step in range(2):
            out = w.train_step(prompts, step=step)
            targets.append(out.targets)
        results[chunk] = (_snapshot(w), out.metrics, targets, len(calls))
    a, ma, ta, calls_a = results[2]
    assert ma["applied"] == 1.0 and ma["prompts"] == 2.0
    for chunk in (3, 8):
        b, mb, tb, calls_b = results[chunk]
        assert mb["loss/total"] == pytest.approx(ma["loss/total"], abs=1e-5)
        for step in range(2):
            for attr in ta[step]:
                assert torch.equal(ta[step][attr], tb[step][attr])
        # batched convolutions sum in another order; Adam (lr 1e-2) turns float rounding in a near-zero gradient
        # entry into up to ~1e-5 of weight: compare to 1e-4, well below the 2 steps' movement
        diff = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert diff < 1e-4
        assert max(float(a[k].abs().max()) for k in a if "lora_B" in k) > 1e-3  # it trained: not vacuous
        assert calls_b < calls_a  # the same images in fewer, larger UNet calls
    assert results[8][3] * 4 == calls_a


def test_validation_batches_across_prompts(tmp_path):
    """Validation chunks a rank's rows of every prompt like a training step: one chain over several prompts gives
    the labels, shares and drift of chunks within each prompt, in fewer UNet calls; no prompts is refused."""
    prompts = [PROMPT, "a photo of the face of a pilot", "a photo of the face of a chef"]
    results = {}
    for chunk in (2, 3, 12):  # 6 chunks within the prompts / 4 chunks, two across / 1 chunk
        w = _worker(tmp_path, "deepspeed.enabled=false", f"train.chunk_size={chunk}")
        w.train_step([PROMPT], step=0)  # an adaptor that differs from the base model: drift > 0
        calls = []
        w.comp.unet.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        results[chunk] = (w.validate(prompts), len(calls))
    m2, calls2 = results[2]
    assert m2["drift"] > 0 and 0.0 <= m2["distance"] <= 1.0
    assert sum(v for k, v in m2.items() if k.startswith("freq/gender/")) == pytest.approx(1.0)
    for chunk in (3, 12):
        m, calls = results[chunk]
        assert m.keys() == m2.keys()
        for k, v in m.items():
            assert v == pytest.approx(m2[k], abs=1e-5), k
        assert calls < calls2
    assert results[12][1] * 6 == calls2
    with pytest.raises(ValueError, match="at least one prompt"):
        _worker(tmp_path, "deepspeed.enabled=false").validate([])


def test_validation_samples_val_steps(tmp_path):
    """train.val_steps sets a validation's sampling steps (METHOD.md: 25); unset, sampler.steps."""
    counts = {}
    for extra in ((), ("train.val_steps=7",)):
        w = _worker(tmp_path, "deepspeed.enabled=false", *extra)
        steps = []
        w.generate = lambda texts, x_T, n, steps=steps, **kw: (steps.append(n), torch.zeros(len(texts), 3, 32, 32))[1]
        w.validate([PROMPT])
        counts[extra] = set(steps)
    assert counts[()] == {w.cfg.sampler.steps} and counts[("train.val_steps=7",)] == {7}


def test_a_step_needs_prompts_per_step_prompts(tmp_path):
    w = _worker(tmp_path, "deepspeed.enabled=false", "train.prompts_per_step=2")
    with pytest.raises(ValueError, match="prompts_per_step is 2"):
        w.train_step([PROMPT], step=0)


def test_selective_checkpointing_gives_the_same_update_without_recomputing(tmp_path):
    states, unet_calls = [], []
    for keep_mb in (0, 1024):  # every eps call recomputed in backward / every call's activations kept
        w = _worker(tmp_path, "deepspeed.enabled=false", "train.schedule=fused",
                    f"sampler.keep_activations_mb={keep_mb}")
        assert w.keep_activations_bytes == keep_mb * 2**20
        w.batch_reference = False  # the reference images in a chain of their own: calls counted below
        calls = []
        w.comp.unet.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        for step in range(2):
            m = w.train_step([PROMPT], step=step).metrics
        states.append((_snapshot(w), m["loss/total"]))
        unet_calls.append(len(calls))
    (a, la), (b, lb) = states
    assert la == pytest.approx(lb, abs=1e-6)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    # the recomputation skipped: one UNet call per sampling step and chunk of the gradient pass, per step
    cfg = w.cfg
    chunks = cfg.train.images_per_prompt // cfg.train.chunk_size
    assert unet_calls[0] - unet_calls[1] == chunks * sum(num_sampling_steps(cfg, s) for s in range(2))


def test_reference_images_ride_along_in_the_current_chain(tmp_path):
    """Fused schedule, text-encoder adaptor: the frozen model's reference images are batched into the current
    images' UNet calls (one chain instead of two: a third fewer UNet calls), with the same update and losses."""
    states, calls_per = [], []
    for batch in (True, False):
        w = _worker(tmp_path, "deepspeed.enabled=false", "train.schedule=fused", "sampler.keep_activations_mb=0")
        assert w.batch_reference  # text_lora: the UNet is the frozen one
        w.batch_reference = batch
        calls = []
        w.comp.unet.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        for step in range(2):
            m = w.train_step([PROMPT], step=step).metrics
        states.append((_snapshot(w), m))
        calls_per.append(len(calls))
    (a, ma), (b, mb) = states
    for k in ("loss/total", "loss/align", "loss/img"):
        assert ma[k] == pytest.approx(mb[k], rel=1e-5, abs=1e-6), k
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    cfg = w.cfg
    chunks = cfg.train.images_per_prompt // cfg.train.chunk_size
    sampling = chunks * sum(num_sampling_steps(cfg, s) for s in range(2))
    # separate: reference chain + forward + recompute per sampling step; batched: forward + recompute
    assert calls_per == [2 * sampling, 3 * sampling]
    assert not _worker(tmp_path, "train.schedule=fused", "adaptor.kind=both").batch_reference
    assert not _worker(tmp_path, "train.schedule=reference").batch_reference


@pytest.mark.parametrize("kind", ["text_lora", "both"])
def test_no_reference_chain_when_no_term_reads_the_originals(tmp_path, monkeypatch, kind):
    """Without L_img / L_face / preserve / detail (and presence on every image) a step samples no frozen-model
    chain: a third fewer UNet calls, the same update as a step that samples the reference and ignores it."""
    from fairdiff_ray.training.loss import FairnessLoss

    def run(force_reference: bool):
        with monkeypatch.context() as mp:
            if force_reference:
                mp.setattr(FairnessLoss, "needs_reference", property(lambda self: True))
            w = _worker(tmp_path, "deepspeed.enabled=false", "train.schedule=fused", "sampler.keep_activations_mb=0",
                        f"adaptor.kind={kind}", "loss.lambda_img=0")
            assert w.loss.needs_reference == force_reference
            w.batch_reference = False
            calls = []
            w.comp.unet.register_forward_pre_hook(lambda *_: calls.append(1))
            for step in range(2):
                m = w.train_step([PROMPT], step=step).metrics
        return _snapshot(w), m, len(calls), w.cfg

    (a, ma, calls_a, cfg), (b, mb, calls_b, _) = run(False), run(True)
    assert ma["loss/align"] > 0 and ma["loss/align"] == pytest.approx(mb["loss/align"], rel=1e-5)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    sampling = cfg.train.images_per_prompt // cfg.train.chunk_size * sum(num_sampling_steps(cfg, s) for s in range(2))
    assert (calls_a, calls_b) == (2 * sampling, 3 * sampling)  # forward + recompute; plus the reference chain


def test_reference_chain_in_its_own_dtype(tmp_path):
    """sampler.reference_dtype=bfloat16: the frozen model's images come from a bfloat16 copy of the base model
    (rounding apart the float32 ones); the adapted model and its gradients stay float32."""
    w32 = _worker(tmp_path, "deepspeed.enabled=false", "train.schedule=fused", "adaptor.kind=both")
    w16 = _worker(tmp_path, "deepspeed.enabled=false", "train.schedule=fused", "adaptor.kind=both",
                  "sampler.reference_dtype=bfloat16")
    assert w32.ref_comp is None and w16.ref_comp is not None and w16.ref_comp.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in w16.ref_comp.unet.parameters())
    assert w16.comp.dtype == torch.float32
    rows = [(0, j) for j in range(4)]
    x_T = w32._noise(0, rows)
    a = w32.generate([PROMPT] * 4, x_T, 3, grad=False, base=True)
    b = w16.generate([PROMPT] * 4, x_T, 3, grad=False, base=True)
    assert b.dtype == torch.float32 and b.shape == a.shape
    assert 0 < float((a - b).abs().mean()) < 0.02  # rounding, not another image
    before = _snapshot(w16)
    for step in range(2):
        m = w16.train_step([PROMPT], step=step).metrics
    assert m["applied"] == 1.0 and m["loss/img"] > 0
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in _snapshot(w16).values())
    assert any(not torch.equal(before[k], v) for k, v in _snapshot(w16).items())
    # the training dtype itself: no second copy
    assert _worker(tmp_path, "deepspeed.enabled=false", "sampler.reference_dtype=float32").ref_comp is None


@pytest.mark.parametrize("engine", ["deepspeed.zero_stage=0", "deepspeed.zero_stage=1"])
def test_reentrant_checkpoint_gives_the_same_gradients(tmp_path, engine):
    """sampler.checkpoint_mode=reentrant: text-encoder and UNet LoRA (embeddings through eps_args, UNet weights
    through the nested backward) get the same gradients as with the default checkpoint, under DeepSpeed.
    Gradients, not updated weights: Adam's first steps move every weight by ~lr * sign(g), so a gradient that is
    zero up to rounding (the reentrant checkpoint sums each call's UNet gradient into .grad separately) could
    move a weight either way."""
    grads, losses = [], []
    for mode in ("non_reentrant", "reentrant"):
        w = _worker(tmp_path, engine, "adaptor.kind=both", "train.schedule=fused", "sampler.keep_activations_mb=0",
                    f"sampler.checkpoint_mode={mode}")
        got: dict[str, torch.Tensor] = {}
        for name, p in w.adaptor.named_parameters().items():  # the last accumulation of the step is the sum
            p.register_post_accumulate_grad_hook(lambda p, name=name, got=got: got.__setitem__(name, p.grad.clone()))
        w.train_step([PROMPT], step=0)
        got.clear()
        losses.append(w.train_step([PROMPT], step=1).metrics["loss/total"])
        grads.append(got)
    a, b = grads
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    assert a.keys() == b.keys() and any("unet" in k for k in a) and any("text" in k for k in a)
    for k in a:
        scale = float(a[k].abs().max())
        assert scale > 0, k
        assert float((a[k] - b[k]).abs().max()) <= 1e-4 * scale, k


def test_seeds_and_step_counts():
    cfg = tiny_config_no_files()
    # the global image index, not the rank, picks the noise: rank r of W owns rows [r n, (r + 1) n)
    assert image_seeds(cfg, 5, 0, range(4)) == image_seeds(cfg, 5, 0, range(2)) + image_seeds(cfg, 5, 0, range(2, 4))
    assert image_seeds(cfg, 5, 0, range(2)) != image_seeds(cfg, 6, 0, range(2))
    steps = [num_sampling_steps(cfg, s) for s in range(200)]
    assert set(steps) == {19, 20, 21, 22, 18} and steps == [num_sampling_steps(cfg, s) for s in range(200)]


def tiny_config_no_files():
    from fairdiff_ray.config import load_config

    return load_config(None, ["sampler.steps=20", "sampler.steps_jitter=2"])


def test_deepspeed_config_follows_the_run_config():
    from fairdiff_ray.config import load_config

    cfg = load_config(None, ["deepspeed.zero_stage=3", "deepspeed.precision=bf16", "deepspeed.offload_optimizer=true",
                             "train.chunk_size=4", "train.max_grad_norm=1.0", "train.lr=0.001"])
    c = deepspeed_config(cfg, micro_steps=3, world_size=2)
    assert c["train_batch_size"] == 4 * 3 * 2 and c["gradient_accumulation_steps"] == 3
    assert c["zero_optimization"]["stage"] == 3 and c["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert c["bf16"]["enabled"] and c["gradient_clipping"] == 1.0 and c["optimizer"]["params"]["lr"] == 0.001
    with pytest.raises(ValueError, match="zero_stage >= 1"):
        deepspeed_config(load_config(None, ["deepspeed.offload_optimizer=true"]), 1, 1)


@pytest.mark.parametrize("stage", [0, 2])
def test_steps_use_the_scheduled_learning_rate(tmp_path, stage: int) -> None:
    """Through DeepSpeed (ZeRO-0 torch optimizer, ZeRO-2 partitioned optimizer) each step's lr is training/lr.py's."""
    w = _worker(tmp_path, f"deepspeed.zero_stage={stage}", "train.lr_schedule=linear", "train.steps=3",
                "train.lr=0.01", "sampler.steps=2", "sampler.steps_jitter=0")
    for step, want in enumerate([0.01, 0.005, 0.0]):
        out = w.train_step([PROMPT], step)
        assert out.metrics["lr"] == pytest.approx(want)
        groups = w.engine.engine.optimizer.param_groups
        assert [g["lr"] for g in groups] == pytest.approx([want] * len(groups))
