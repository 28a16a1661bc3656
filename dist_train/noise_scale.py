"""The measured gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al.; docs/theory.md section 2).

Three parts, each usable alone:

- ``GradientNoiseScale``: turns one ``NoiseMeasurement`` per optimizer step (squared gradient norms at
  two batch sizes) into unbiased |G|^2 and tr(Sigma) estimates, smooths each with a bias-corrected EMA,
  and exposes ``b_simple``. It keeps its state in tensors on the gradients' device, so ``update`` never
  waits for the GPU; reading ``b_simple`` (or ``metrics()``) does.
- ``DDPNoiseScaleProbe``: a DDP communication hook. For every gradient bucket it records the squared
  norm of the local gradient before the all-reduce and of the averaged one after it; ``measure()`` then
  averages the local norms over ranks with one scalar all-reduce. B_small is the per-rank batch.
- ``AccumulationNoiseScaleProbe``: one process with gradient accumulation. A gradient hook on each
  parameter sees each micro-batch's own gradient before it is accumulated; B_small is the micro batch.

Both probes can measure the preconditioned gradient instead (``SecondMomentPreconditioner``): the step an
Adam-type optimizer takes is P^-1 g with P = sqrt(v_hat) + eps, so the noise that matters to it is that of
P^-1 g, and B_simple = tr(P^-1 Sigma P^-1) / |P^-1 G|^2 (docs/theory.md section 2). P is fixed within a step
(the second moments before its update), so the same two-batch-size estimator applies to P^-1 g.

Both probes assume the loss of each micro-step is the mean over its samples divided by the number of
accumulation steps, so the final gradient is the mean over the global batch (what the backends do).
A different common scale of the gradient changes |G|^2 and tr(Sigma) by its square and leaves B_simple.

Per step, for the trainer (DDP)::

    probe = DDPNoiseScaleProbe(ddp_model)             # once; replaces DDP's built-in all-reduce
    noise = GradientNoiseScale(ema_decay=cfg.schedule.noise_scale.ema_decay)
    ... micro-steps under no_sync(), last one synced ...
    noise.update(probe.measure(global_batch_size=B))  # after the synced backward, on every rank
"""

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

Number = float | torch.Tensor


@dataclass(frozen=True)
class NoiseMeasurement:
    """Squared norms of the mean gradient over two batch sizes of one optimizer step."""

    small_sq_norm: Number
    """|G_small|^2: mean over the small batches of their gradient's squared norm."""
    small_batch_size: int
    """B_small: samples behind each small-batch gradient (per rank, or per micro-batch)."""
    big_sq_norm: Number
    """|G_big|^2: squared norm of the gradient over the whole global batch."""
    big_batch_size: int
    """B_big: the global batch."""

    def __post_init__(self) -> None:
        if not 0 < self.small_batch_size < self.big_batch_size:
            raise ValueError(f"need 0 < small_batch_size={self.small_batch_size} < big_batch_size="
                             f"{self.big_batch_size}: the noise scale needs two different batch sizes "
                             "(more than one rank, or gradient accumulation)")


def unbiased_estimates(m: NoiseMeasurement) -> tuple[Number, Number]:
    """One step's unbiased (|G|^2, tr(Sigma)) from E|G_B|^2 = |G|^2 + tr(Sigma)/B at two batch sizes."""
    b_small, b_big = m.small_batch_size, m.big_batch_size
    grad_sq_norm = (b_big * m.big_sq_norm - b_small * m.small_sq_norm) / (b_big - b_small)
    trace_cov = (m.small_sq_norm - m.big_sq_norm) / (1.0 / b_small - 1.0 / b_big)
    return grad_sq_norm, trace_cov


class GradientNoiseScale:
    """Bias-corrected moving averages of |G|^2 and tr(Sigma), and their ratio B_simple.

    The averages are ``ema / weight`` where ``weight`` is the same average taken of 1s, i.e. Adam's
    bias correction 1 - decay^t; a step whose estimates are not finite (an overflowed gradient) is
    skipped without a host-device sync.
    """

    def __init__(self, *, ema_decay: float = 0.99):
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay={ema_decay} must be in [0, 1)")
        self.ema_decay = ema_decay
        self._state = torch.zeros(3, dtype=torch.float64)  # ema |G|^2, ema tr(Sigma), ema weight

    def update(self, measurement: NoiseMeasurement) -> None:
        """Fold in one optimizer step's measurement (call it on every rank: the values agree)."""
        g2, trace = unbiased_estimates(measurement)
        device = g2.device if isinstance(g2, torch.Tensor) else self._state.device
        g2, trace = (torch.as_tensor(v, dtype=torch.float64, device=device) for v in (g2, trace))
        new = torch.stack([g2, trace, torch.ones_like(g2)])  # no host constant copied to the device
        state = self._state.to(device)
        decayed = self.ema_decay * state + (1.0 - self.ema_decay) * new
        self._state = torch.where(torch.isfinite(new).all(), decayed, state)

    def _averages(self) -> tuple[float, float] | None:
        g2, trace, weight = self._state.tolist()
        return None if weight == 0.0 else (g2 / weight, trace / weight)

    @property
    def grad_sq_norm(self) -> float | None:
        """Smoothed |G|^2; None before the first update."""
        avg = self._averages()
        return None if avg is None else avg[0]

    @property
    def trace_cov(self) -> float | None:
        """Smoothed tr(Sigma), the per-example gradient variance summed over parameters; None before updates."""
        avg = self._averages()
        return None if avg is None else avg[1]

    @property
    def b_simple(self) -> float | None:
        """tr(Sigma) / |G|^2 from the smoothed values; None before updates or while |G|^2 <= 0."""
        avg = self._averages()
        if avg is None or avg[0] <= 0.0:
            return None
        return avg[1] / avg[0]

    def b_simple_exceeds(self, threshold: float) -> torch.Tensor:
        """``b_simple > threshold`` as a 0-dim bool tensor on the state's device, without reading it on the
        host; False where ``b_simple`` is None. The same float64 operations as the property, so the answer
        is the one the host would give."""
        g2, trace, weight = self._state.unbind()
        defined = (weight != 0) & (g2 / weight > 0)
        return defined & ((trace / weight) / (g2 / weight) > threshold)

    def metrics(self, prefix: str = "noise_scale/") -> dict[str, float]:
        """The defined values among grad_sq_norm, trace_cov and b_simple, for a tracker."""
        values = {"grad_sq_norm": self.grad_sq_norm, "trace_cov": self.trace_cov, "b_simple": self.b_simple}
        return {prefix + k: v for k, v in values.items() if v is not None and math.isfinite(v)}

    def state_dict(self) -> dict[str, Any]:
        g2, trace, weight = self._state.tolist()
        return {"grad_sq_norm_ema": g2, "trace_cov_ema": trace, "weight": weight}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keys = ("grad_sq_norm_ema", "trace_cov_ema", "weight")
        if set(state) != set(keys):
            raise KeyError(f"GradientNoiseScale state has keys {sorted(state)}; expected {sorted(keys)}")
        self._state = torch.tensor([float(state[k]) for k in keys], dtype=torch.float64)


class SecondMomentPreconditioner:
    """P^-1 per parameter, for P = sqrt(v_hat) + eps from an Adam-type optimizer's second moments.

    ``v_hat = exp_avg_sq / (1 - beta2^t)`` with the parameter's step count t and its group's ``betas`` and
    ``eps`` (RAdam, torch's Adam and AdamW, and Lookahead over them, which shares their state). P is the
    identity for a parameter with no second moment yet, and for our RAdam while its next step is
    unrectified (momentum SGD: the step is then not preconditioned). A constant factor in P (RAdam's r_t,
    the lr) changes both terms of B_simple alike and is left out.

    ``inverse(p)`` caches P^-1 per parameter until the parameter's step count changes: one division per
    element per optimizer step, and one parameter-sized buffer.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        from dist_train.optim.radam import RAdam

        inner = getattr(optimizer, "inner", optimizer)  # Lookahead shares the inner optimizer's state
        if not all("betas" in g and "eps" in g for g in inner.param_groups):
            raise ValueError(f"the preconditioned noise scale needs an Adam-type optimizer (radam, adamw); "
                             f"{type(inner).__name__} keeps no second moments")
        self._optimizer = inner
        self._rectified = isinstance(inner, RAdam)
        self._group_of = {p: g for g in inner.param_groups for p in g["params"]}
        self._cache: dict[torch.Tensor, tuple[int, torch.Tensor | None]] = {}

    def inverse(self, param: torch.Tensor) -> torch.Tensor | None:
        """P^-1 for ``param`` (shaped like it), or None for the identity."""
        from dist_train.optim.radam import rectification

        state = self._optimizer.state.get(param)
        if not state or "exp_avg_sq" not in state:
            return None
        step = int(state["step"])  # an int for our RAdam; a CPU tensor for torch's Adam: no device sync
        cached = self._cache.get(param)
        if cached is not None and cached[0] == step:
            return cached[1]
        group = self._group_of[param]
        beta2, eps = group["betas"][1], group["eps"]
        inv: torch.Tensor | None
        if self._rectified and rectification(step + 1, beta2) is None:
            inv = None
        else:
            inv = ((state["exp_avg_sq"] / (1.0 - beta2**step)).sqrt_().add_(eps)).reciprocal_()
        self._cache[param] = (step, inv)
        return inv


def preconditioned_sq_norm(grads: Iterable[torch.Tensor], params: Iterable[torch.Tensor],
                           preconditioner: SecondMomentPreconditioner | None) -> torch.Tensor:
    """sum over parameters of |P^-1 g|^2 (|g|^2 without a preconditioner), a float32 scalar tensor."""
    terms = []
    for g, p in zip(grads, params):
        inv = preconditioner.inverse(p) if preconditioner is not None else None
        terms.append(squared_norm(g if inv is None else g * inv))
    return torch.stack(terms).sum()


def squared_norm(tensor: torch.Tensor) -> torch.Tensor:
    """|tensor|^2 as a float32 scalar tensor on the tensor's device (no host sync)."""
    return torch.linalg.vector_norm(tensor, dtype=torch.float32).square()


CommHook = Callable[[Any, dist.GradBucket], torch.futures.Future[torch.Tensor]]


class DDPNoiseScaleProbe:
    """Records local and averaged gradient norms in a DDP communication hook.

    Registering it replaces DDP's reduction by ``comm_hook`` (default: upstream's averaging
    ``allreduce_hook``, the same result as DDP's built-in one) wrapped with the two norm records; a DDP
    model takes one comm hook, so another hook (e.g. ``default_hooks.bf16_compress_hook``) is passed here.

    The hook fires only on the backward that synchronises. Under ``no_sync()`` accumulation the bucket then
    holds the rank's gradient accumulated over its micro-steps, so B_small = global batch / world size.

    ``comm_hook=None`` leaves the gradients unreduced (``keep_local_hook``), for a sharded optimizer that
    reduce-scatters them itself; ``measure`` then takes this rank's part of |G_big|^2 from the caller.

    With a ``preconditioner`` the norms are of P^-1 g: the local ones per parameter of each bucket, and the
    averaged one from the parameters' gradients in ``measure(params=...)``, after the reduction.
    """

    def __init__(self, ddp_model: torch.nn.parallel.DistributedDataParallel, *,
                 process_group: dist.ProcessGroup | None = None,
                 comm_hook: CommHook | None = default_hooks.allreduce_hook,
                 preconditioner: SecondMomentPreconditioner | None = None):
        self.process_group = process_group
        self.preconditioner = preconditioner
        self.world_size = dist.get_world_size(process_group)
        if self.world_size < 2:
            raise ValueError("DDPNoiseScaleProbe needs at least 2 ranks; with one process use "
                             "AccumulationNoiseScaleProbe and gradient accumulation")
        self._comm_hook = comm_hook
        # Lists, not running sums: with gloo the after-reduce callbacks run on the process group's threads.
        self._local: list[torch.Tensor] = []
        self._reduced: list[torch.Tensor] = []
        self._synced_backwards = 0
        ddp_model.register_comm_hook(self, _record_norms_hook)

    def measure(self, *, global_batch_size: int, reduced_sq_norm_part: torch.Tensor | None = None,
                params: Iterable[torch.Tensor] = ()) -> NoiseMeasurement:
        """After the synchronising backward: this step's measurement, the same on every rank.

        Collective: one all-reduce of a scalar (two, stacked, with ``reduced_sq_norm_part``). Call it on all
        ranks, once per optimizer step. Without a reducing comm hook, ``reduced_sq_norm_part`` is this rank's
        share of |G_big|^2 (its shard of the averaged gradient), summed over ranks here. With a
        preconditioner, ``params`` are the model's parameters, whose averaged gradients give |P^-1 G_big|^2."""
        if global_batch_size % self.world_size:
            raise ValueError(f"global_batch_size={global_batch_size} is not divisible by the world size "
                             f"{self.world_size}")
        reduces = self._comm_hook is not None
        records_reduced = reduces and self.preconditioner is None
        if self._synced_backwards != 1 or (records_reduced and len(self._local) != len(self._reduced)):
            raise RuntimeError(f"{self._synced_backwards} synchronising backward(s) since the last measure(); "
                               "call measure() exactly once per optimizer step, after the backward that "
                               "synchronises gradients")
        if reduces == (reduced_sq_norm_part is not None):
            raise ValueError("pass reduced_sq_norm_part exactly when the comm hook leaves gradients unreduced "
                             "(comm_hook=None)")
        local = torch.stack(self._local).sum() / self.world_size
        self._local.clear()
        self._synced_backwards = 0
        if reduced_sq_norm_part is None:
            if records_reduced:
                reduced = torch.stack(self._reduced).sum()
            else:
                pairs = [(p.grad, p) for p in params if p.grad is not None]
                if not pairs:
                    raise ValueError("a preconditioned measure() needs the model's parameters, with gradients")
                reduced = preconditioned_sq_norm([g for g, _ in pairs], [p for _, p in pairs], self.preconditioner)
            self._reduced.clear()
            dist.all_reduce(local, group=self.process_group)  # mean over ranks of |G_local|^2
        else:
            both = torch.stack([local, reduced_sq_norm_part.to(local.dtype)])
            dist.all_reduce(both, group=self.process_group)
            local, reduced = both.unbind()
        return NoiseMeasurement(small_sq_norm=local, small_batch_size=global_batch_size // self.world_size,
                                big_sq_norm=reduced, big_batch_size=global_batch_size)


def keep_local_hook(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """A DDP comm hook that communicates nothing: each rank keeps its own gradient (a sharded optimizer
    reduce-scatters it later). Under ``no_sync()`` accumulation it is the rank's sum over its micro-steps."""
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


# No ``from __future__ import annotations`` in this module: DDP checks the hook's annotations as objects.
def _record_norms_hook(probe: "DDPNoiseScaleProbe", bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    # Before the reduction the bucket holds this rank's gradient; the inner hook divides it in place.
    if probe.preconditioner is None:
        probe._local.append(squared_norm(bucket.buffer()))
    else:
        probe._local.append(preconditioned_sq_norm(bucket.gradients(), bucket.parameters(), probe.preconditioner))
    if bucket.is_last():
        probe._synced_backwards += 1

    def record_reduced(fut: torch.futures.Future) -> torch.Tensor:
        value = fut.value()
        reduced = value[0] if isinstance(value, list) else value
        probe._reduced.append(squared_norm(reduced))
        return reduced

    if probe._comm_hook is None:
        return keep_local_hook(None, bucket)
    if probe.preconditioner is not None:  # the averaged norm comes from the parameters' gradients in measure()
        return probe._comm_hook(probe.process_group, bucket)
    return probe._comm_hook(probe.process_group, bucket).then(record_reduced)


class AccumulationNoiseScaleProbe:
    """Per-micro-batch gradient norms of one process, from gradient hooks on the parameters.

    A hook on a leaf tensor sees the gradient of the current backward before it is added to ``.grad``,
    i.e. one micro-batch's gradient: its squared norm costs one read of the gradients per micro-step,
    no copy. ``after_micro_backward()`` closes a micro-step; a backward left unclosed (a step without
    accumulation, which is not measured) is dropped when the next backward reaches the same parameter,
    so nothing piles up. ``remove()`` takes the hooks off.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], *,
                 preconditioner: SecondMomentPreconditioner | None = None):
        self.params = [p for p in params if p.requires_grad]
        self.preconditioner = preconditioner
        # Squared norms of this backward's parameter gradients, by parameter index, until after_micro_backward().
        self._pending: dict[int, torch.Tensor] = {}
        self._micro_sq_norms: list[torch.Tensor] = []
        self._handles = [p.register_hook(functools.partial(self._record, i)) for i, p in enumerate(self.params)]

    def _record(self, index: int, grad: torch.Tensor) -> None:
        if index in self._pending:  # a new backward, and the previous one was never closed: drop it
            self._pending.clear()
        self._pending[index] = preconditioned_sq_norm([grad], [self.params[index]], self.preconditioner)

    def after_micro_backward(self) -> None:
        """Call right after each micro-step's ``backward()``; grads accumulate and are zeroed between steps."""
        if not self._pending:
            raise RuntimeError("no parameter gradient was seen since the last micro-step; call "
                               "after_micro_backward() once after each backward through the model")
        self._micro_sq_norms.append(torch.stack(list(self._pending.values())).sum())
        self._pending.clear()

    def measure(self, *, micro_batch_size: int) -> NoiseMeasurement:
        """After the last micro-step of an optimizer step (before the optimizer zeroes the grads)."""
        steps = len(self._micro_sq_norms)
        if steps < 2 or self._pending:
            raise RuntimeError(f"{steps} micro-step(s) recorded since the last measure(), and "
                               f"{'some' if self._pending else 'no'} unmarked backward; the accumulation probe "
                               "needs >= 2, each followed by after_micro_backward()")
        pairs = [(p.grad, p) for p in self.params if p.grad is not None]
        big = preconditioned_sq_norm([g for g, _ in pairs], [p for _, p in pairs], self.preconditioner)
        # The loss is divided by the accumulation steps, so each micro-step's gradient is 1/steps of its
        # micro-batch mean gradient.
        small = torch.stack(self._micro_sq_norms).mean() * steps**2
        self._micro_sq_norms.clear()
        return NoiseMeasurement(small_sq_norm=small, small_batch_size=micro_batch_size,
                                big_sq_norm=big, big_batch_size=micro_batch_size * steps)

    def remove(self) -> None:
        """Take the gradient hooks off the parameters."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
