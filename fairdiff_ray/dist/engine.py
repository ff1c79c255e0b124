"""The optimizer engine of the worker loop: DeepSpeed (ZeRO 0-3, fp32 / bf16 / fp16, optimizer offload) or a
plain torch AdamW with summed all-reduce when ``deepspeed.enabled`` is false.

Both expose the same small surface: ``backward(loss)`` once per micro-batch (chunk), ``step()`` once per
micro-batch (the optimizer acts on the last one of a training step), ``applied`` (did the last training step
change the weights), ``save(dir)`` / ``load(dir)`` and ``gathered()`` (whole parameters for EMA / export
under ZeRO-3).

Gradient scale: the worker's loss is already divided by the GLOBAL image count N, so the wanted gradient is
the SUM over workers. DeepSpeed averages over data-parallel ranks, so the engine multiplies the loss by the
world size and turns off DeepSpeed's division by the accumulation steps.

Non-finite gradients skip the optimizer step (METHOD.md section 5) on every path: ZeRO 1-2 with the overflow
check switched on for every precision, ZeRO-3 / bf16 by DeepSpeed's invalid-norm check, fp16 by the loss
scaler, and ZeRO-0 fp32 (a plain torch optimizer underneath) by clearing all gradients, which torch's AdamW
treats as "no update, no state change".
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from fairdiff_ray.config import FairDiffConfig

PRECISION_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DS_TAG = "ds"


def compute_dtype(cfg: FairDiffConfig) -> torch.dtype:
    """dtype of the trained modules: DeepSpeed's precision when it runs, else model.dtype."""
    if cfg.deepspeed.enabled:
        return PRECISION_DTYPE[cfg.deepspeed.precision]
    return getattr(torch, cfg.model.dtype)


class TrainModules(torch.nn.Module):
    """The modules and free parameters DeepSpeed manages (it casts, partitions and hooks them).

    The adaptor's parameters live inside text_encoder / unet (LoRA, full kinds) or free (soft prompt); the
    Parameter objects are shared, so DeepSpeed re-pointing their storage is seen by the adaptor too.
    """

    def __init__(self, modules: dict[str, torch.nn.Module], free: list[torch.nn.Parameter]):
        super().__init__()
        for name, m in modules.items():
            self.add_module(name, m)
        self.free = torch.nn.ParameterList(free)

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # the worker calls the submodules directly
        raise RuntimeError("TrainModules is a container; call its submodules")


def deepspeed_config(cfg: FairDiffConfig, micro_steps: int, world_size: int) -> dict[str, Any]:
    """DeepSpeed JSON config from cfg.deepspeed / cfg.train; one optimizer step per ``micro_steps`` chunks."""
    ds, tr = cfg.deepspeed, cfg.train
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        if ds.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.zero_stage in (1, 2):
        # exact, deterministic reduction order (the data-parallel equivalence test relies on it)
        zero.update(overlap_comm=False, contiguous_gradients=True, reduce_scatter=True)
    conf: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": tr.chunk_size,
        "gradient_accumulation_steps": micro_steps,
        "train_batch_size": tr.chunk_size * micro_steps * world_size,
        "optimizer": {"type": "AdamW", "params": {
            "lr": tr.lr, "weight_decay": tr.weight_decay, "betas": [0.9, 0.999], "eps": 1e-8,
            **({} if ds.offload_optimizer else {"torch_adam": True}),
        }},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    # explicit: DeepSpeed's own default clips at 1.0
    conf["gradient_clipping"] = float(tr.max_grad_norm) if tr.max_grad_norm is not None else 0.0
    if ds.precision == "bf16":
        conf["bf16"] = {"enabled": True, "check_grad_overflow": True}
    elif ds.precision == "fp16":
        conf["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return conf


def _all_finite(params: list[torch.nn.Parameter]) -> bool:
    ok = torch.tensor([1.0])
    for p in params:
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            ok = torch.tensor([0.0])
            break
    if dist.is_available() and dist.is_initialized():
        dev = params[0].device if params and params[0].device.type == "cuda" else "cpu"
        ok = ok.to(dev)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item() > 0.5)


def _local_rank() -> int:
    try:
        import ray.train

        return int(ray.train.get_context().get_local_rank())
    except Exception:  # noqa: BLE001 - not inside Ray Train (tests, a single process)
        return 0


class DeepSpeedEngine:
    def __init__(self, cfg: FairDiffConfig, model: TrainModules, params: list[torch.nn.Parameter],
                 micro_steps: int, world_size: int):
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        os.environ.setdefault("LOCAL_RANK", str(_local_rank()))  # DeepSpeed asserts a launcher set it
        import deepspeed

        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        self.cfg, self.params, self.world = cfg, params, world_size
        self.micro_steps, self._micro = micro_steps, 0
        conf = deepspeed_config(cfg, micro_steps, world_size)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=params, config=conf)
        opt = self.engine.optimizer
        if cfg.deepspeed.zero_stage in (1, 2) and hasattr(opt, "check_grad_overflow"):
            opt.check_grad_overflow = True  # DeepSpeed checks only fp16 / bf16 by default
        self.plain_fp32 = cfg.deepspeed.zero_stage == 0 and cfg.deepspeed.precision == "fp32"
        self.applied = True

    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss * self.world, scale_wrt_gas=False)

    def step(self) -> None:
        self._micro += 1
        last = self._micro == self.micro_steps
        finite = True
        if last and self.plain_fp32:
            finite = _all_finite(self.params)
            if not finite:
                for p in self.params:
                    p.grad = None
        self.engine.step()
        if last:
            self._micro = 0
            self.applied = finite and bool(self.engine.was_step_applied())

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        if self.cfg.deepspeed.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(self.params, modifier_rank=None):
                yield
        else:
            yield

    def save(self, path: Path) -> None:
        self.engine.save_checkpoint(str(path), tag=DS_TAG, exclude_frozen_parameters=True)

    def load(self, path: Path) -> None:
        self.engine.load_checkpoint(str(path), tag=DS_TAG, load_module_strict=False,
                                    load_optimizer_states=True, load_lr_scheduler_states=False)


class PlainEngine:
    """torch AdamW; gradients SUMMED over workers with all_reduce (the loss is already divided by N)."""

    def __init__(self, cfg: FairDiffConfig, params: list[torch.nn.Parameter], micro_steps: int, rank: int):
        self.cfg, self.params, self.micro_steps, self.rank = cfg, params, micro_steps, rank
        self.optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                           betas=(0.9, 0.999), eps=1e-8)
        self._micro = 0
        self.applied = True

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self._micro += 1
        if self._micro < self.micro_steps:
            return
        self._micro = 0
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        self.applied = _all_finite(self.params)
        if self.applied:
            if self.cfg.train.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.max_grad_norm)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        yield

    def save(self, path: Path) -> None:
        if self.rank == 0:
            torch.save(self.optimizer.state_dict(), path / "optimizer.pt")

    def load(self, path: Path) -> None:
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))


def build_engine(cfg: FairDiffConfig, model: TrainModules, params: list[torch.nn.Parameter], micro_steps: int,
                 rank: int, world_size: int) -> DeepSpeedEngine | PlainEngine:
    if cfg.deepspeed.enabled:
        return DeepSpeedEngine(cfg, model, params, micro_steps, world_size)
    return PlainEngine(cfg, params, micro_steps, rank)
