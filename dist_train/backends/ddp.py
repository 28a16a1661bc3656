"""PyTorch DDP: NCCL on GPUs, gloo on CPUs; a plain module when there is one process."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dist_train.backends.base import BACKEND_FILE, Backend, OptimizerFactory
from dist_train.backends.capabilities import LookaheadSlowWeights
from dist_train.checkpoint import save_tensor_file
from dist_train.noise_scale import (
    AccumulationNoiseScaleProbe,
    DDPNoiseScaleProbe,
    NoiseMeasurement,
    SecondMomentPreconditioner,
    keep_local_hook,
    squared_norm,
)
from dist_train.optim.sharded import ShardedOptimizer


class DDPBackend(LookaheadSlowWeights, Backend):
    # backend.pt holds the model and the consolidated (unsharded) optimizer state: any world size loads it.
    resumes_at_any_world_size = True
    """DDP, or a plain module in one process; measures the noise scale and holds Lookahead's slow weights."""

    def __init__(self, info, *, micro_batch_size: int, precision: str = "fp32", sharded_reduction: str = "auto"):
        super().__init__(info, micro_batch_size=micro_batch_size)
        self.precision = precision
        if sharded_reduction not in ("auto", "reduce_scatter", "all_reduce"):
            raise ValueError(f"sharded_reduction={sharded_reduction!r}: use auto, reduce_scatter or all_reduce")
        # How a sharded optimizer's gradients reach their shards (dist_train/optim/sharded.py). On gloo its
        # reduce-scatter is about twice as slow as its all-reduce of the same bytes, so auto all-reduces there.
        self._sharded_reduction = (("reduce_scatter" if info.device.type == "cuda" else "all_reduce")
                                   if sharded_reduction == "auto" else sharded_reduction)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(self.info.device.type, dtype=torch.bfloat16)

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        self._module = model.to(self.info.device)
        if self.info.is_distributed:
            device_ids = [self.info.device.index] if self.info.device.type == "cuda" else None
            # gradient_as_bucket_view saves a copy of every gradient; DDP also broadcasts rank 0's
            # parameters here, so all ranks start identical whatever their seeds.
            self._model: nn.Module = DistributedDataParallel(self._module, device_ids=device_ids,
                                                             gradient_as_bucket_view=True)
        else:
            self._model = self._module
        self._optimizer = make_optimizer(self._module)
        self._probe: Any = None
        self._grad_norm: torch.Tensor | None = None  # taken by grads_finite(), reused by optimizer_step()
        # Reduce-scatter: DDP's comm hook keeps gradients local, and the sharded optimizer reduces them.
        self._sharded: ShardedOptimizer | None = (
            self._optimizer if isinstance(self._model, DistributedDataParallel)
            and isinstance(self._optimizer, ShardedOptimizer) and self._sharded_reduction == "reduce_scatter"
            else None)
        self._reduce_scatter = self._sharded is not None
        self._hook_registered = False
        self._pending_reduce = False
        self._reduced_sq_norm: torch.Tensor | None = None  # |averaged gradient|^2, this rank's shard, then all

    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def module(self) -> nn.Module:
        return self._module

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._optimizer

    def grad_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        # DDP decides at forward time whether the coming backward all-reduces, so the
        # forward must run inside no_sync() on accumulation micro-steps, not just the backward.
        if enabled or not isinstance(self._model, DistributedDataParallel):
            return contextlib.nullcontext()
        return self._model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        if self._reduce_scatter and not self._hook_registered:  # before the first backward, once
            assert isinstance(self._model, DistributedDataParallel)
            self._model.register_comm_hook(None, keep_local_hook)
            self._hook_registered = True
        loss.backward()
        self._pending_reduce = self._reduce_scatter
        if isinstance(self._probe, AccumulationNoiseScaleProbe) and self.accum_steps > 1:
            self._probe.after_micro_backward()

    def enable_noise_scale(self, *, preconditioned: bool = False) -> None:
        # Across ranks, a comm hook sees each rank's gradient before the all-reduce (B_small = B / world);
        # in one process, the micro-batches of an accumulated step are the small batches.
        preconditioner = None
        if preconditioned:
            if isinstance(self._optimizer, ShardedOptimizer):
                raise ValueError("the preconditioned noise scale needs replicated optimizer state: with sharded "
                                 "state each rank holds 1/world of P; set backend.shard_optimizer_state=false")
            preconditioner = SecondMomentPreconditioner(self._optimizer)
        if isinstance(self._model, DistributedDataParallel):
            if self._hook_registered:
                raise RuntimeError("enable_noise_scale() must come before the first backward")
            self._probe = (DDPNoiseScaleProbe(self._model, comm_hook=None) if self._reduce_scatter
                           else DDPNoiseScaleProbe(self._model, preconditioner=preconditioner))
            self._hook_registered = True
        else:
            self._probe = AccumulationNoiseScaleProbe(self._module.parameters(), preconditioner=preconditioner)

    def _reduce(self) -> None:
        """Reduce-scatter mode, once after the synchronising backward: average the gradients into the shards
        and take this rank's part of their squared norm (summed over ranks by the one all-reduce that follows,
        the noise scale's or the norm's own)."""
        if self._pending_reduce and self._sharded is not None:
            self._sharded.reduce_gradients()
            shard = self._sharded.shard_gradients()
            self._reduced_sq_norm = (torch.stack([squared_norm(g) for g in shard]).sum() if shard
                                     else torch.zeros((), device=self.info.device))
            self._pending_reduce = False

    def noise_measurement(self) -> NoiseMeasurement | None:
        if isinstance(self._probe, DDPNoiseScaleProbe):
            if not self._reduce_scatter:
                return self._probe.measure(global_batch_size=self.global_batch_size, params=self._module.parameters())
            self._reduce()
            measurement = self._probe.measure(global_batch_size=self.global_batch_size,
                                              reduced_sq_norm_part=self._reduced_sq_norm)
            self._grad_norm = torch.as_tensor(measurement.big_sq_norm).sqrt()  # the one norm of this step
            return measurement
        if isinstance(self._probe, AccumulationNoiseScaleProbe) and self.accum_steps > 1:
            return self._probe.measure(micro_batch_size=self.micro_batch_size)
        return None

    def grads_finite(self) -> torch.Tensor:
        # Gradients are identical on every rank after the all-reduce, so is this norm; the step reuses it.
        self._grad_norm = self._total_norm()
        return torch.isfinite(self._grad_norm)

    def _total_norm(self) -> torch.Tensor:
        """Norm of the averaged gradient (the same on every rank; collective in reduce-scatter mode)."""
        if not self._reduce_scatter:
            return torch.nn.utils.get_total_norm(self._grads(), foreach=True)
        if self._grad_norm is not None and not self._pending_reduce:  # the noise scale's all-reduce took it
            return self._grad_norm
        self._reduce()
        assert self._reduced_sq_norm is not None
        total = self._reduced_sq_norm.clone()
        self.all_reduce(total)
        return total.sqrt()

    def optimizer_step(self, *, grad_clip_norm: float = 0.0) -> torch.Tensor:
        norm = self._grad_norm if self._grad_norm is not None else self._total_norm()
        if grad_clip_norm > 0 and self._sharded is not None:
            # This rank's shard of the averaged gradient is what the step uses: scale it as
            # clip_grads_with_norm_ scales p.grad (which takes parameters, not bare gradient tensors).
            coef = torch.clamp(grad_clip_norm / (norm + 1e-6), max=1.0)
            torch._foreach_mul_(self._sharded.shard_gradients(), coef)
        elif grad_clip_norm > 0:
            torch.nn.utils.clip_grads_with_norm_([p for p in self._module.parameters() if p.grad is not None],
                                                 grad_clip_norm, norm, foreach=True)
        self._optimizer.step()
        self.discard_gradients()
        return norm.detach()

    def discard_gradients(self) -> None:
        self._optimizer.zero_grad(set_to_none=True)
        self._grad_norm = None
        self._reduced_sq_norm = None
        self._pending_reduce = False

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self._module.parameters() if p.grad is not None]

    def state_dict(self) -> dict[str, Any]:
        return {"model": self._module.state_dict(), "optimizer": self._optimizer.state_dict()}

    def save_to(self, directory: Path) -> None:
        """Collective: rank 0 writes the model and the consolidated optimizer state; a sharded optimizer
        gathers its state to rank 0 only, so the other ranks never hold more than their shard."""
        from dist_train.optim.sharded import ShardedOptimizer

        if isinstance(self._optimizer, ShardedOptimizer):
            optimizer = self._optimizer.consolidated_state_dict(dst=0)
        else:
            optimizer = self._optimizer.state_dict()
        if self.is_main:
            save_tensor_file({"model": self._module.state_dict(), "optimizer": optimizer}, directory / BACKEND_FILE)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._module.load_state_dict(state["model"], strict=True)
        self._optimizer.load_state_dict(state["optimizer"])
