"""Optimizer state sharded across data-parallel ranks (ZeRO stage 1) for the DDP backend.

Each rank updates only its shard of the parameters with a local optimizer that holds only that shard's
state (moments, Lookahead slow weights), and one all-gather hands the updated shards to every rank. The
gradients reach the shards one of two ways:

* ``reduce_gradients()`` (the DDP backend's choice on NCCL): each rank holds its own, unreduced gradients
  (DDP's comm hook leaves them local), and one reduce-scatter leaves each rank the average over ranks of
  its shard only. Reduce-scatter plus all-gather move the bytes of one all-reduce: what DDP moves.
* without it (the choice on gloo, and what a plain DDP model gives): DDP has all-reduced the gradients
  already, and ``step`` takes its shard's slice of them. That moves 1.5x DDP's bytes, but on gloo it is
  the faster of the two: gloo's reduce-scatter takes about twice its all-reduce of the same tensor
  (benchmarks/bench_optim.py, docs/performance.md).

The all-gather and the reduce-scatter work in one persistent flat buffer of parameter size, made once.

Why not ``torch.distributed.optim.ZeroRedundancyOptimizer``:

* It assigns whole parameters to ranks (largest first, to the lightest rank), so a shard can never
  be smaller than the largest tensor. For ResNet-50 that is fine up to 8 ranks, but at 16 ranks
  the mean shard (1.6M elements) is below its largest tensor (2.4M) and the heaviest rank holds
  1.48x the mean (benchmarks/bench_optim.py). We cut one flat, memory-ordered view of all
  parameters into equal contiguous ranges at element granularity: shards differ by less than
  ``world_size`` elements at any world size. This is exact because every optimizer we build
  (RAdam, QHM, SGD, AdamW, Lookahead) is elementwise: a slice of a parameter updated on its own
  gives the same numbers as the whole parameter. (A per-tensor optimizer such as LARS or LAMB
  would need whole parameters.)
* It builds its local optimizer from a class and keyword arguments, which Lookahead (a wrapper of
  an optimizer instance) does not fit without an adapter. We take any builder of a local optimizer,
  so Lookahead's slow weights are sharded with the moments.
* ``state_dict()`` here is a plain collective call whose result is, on every rank, the state dict
  the unsharded optimizer would have (slow weights included). A checkpoint therefore loads at any
  world size, sharded or not (world size 1 builds the plain optimizer), with no separate
  consolidation step.

The local optimizer's parameters are views into the model's parameters (no copy of the weights),
and their gradients are views into the parameters' gradients. Do not replace ``p.data`` after
building the optimizer: the views would keep pointing at the old storage.

The collectives are ``all_gather_single``, ``reduce_scatter_single`` (torch 2.14's names for
``all_gather_into_tensor`` and ``reduce_scatter_tensor``), ``all_gather_object`` and ``gather``; gloo and NCCL
support all of them.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from dist_train.optim.lookahead import Lookahead


@dataclass(frozen=True)
class Piece:
    """The part of one parameter that one rank owns."""

    param_index: int
    """Index of the parameter in optimizer order (over groups, as in torch's state_dict)."""
    start: int
    """First owned element of the parameter, flattened in memory order."""
    stop: int
    """One past the last owned element."""


def partition(numels: Sequence[int], world_size: int) -> tuple[int, list[list[Piece]]]:
    """Cut parameters of ``numels`` elements, laid end to end, into ``world_size`` contiguous ranges of
    ``shard_numel = ceil(total / world_size)`` elements (the last may be shorter). Returns
    ``shard_numel`` and, per rank, its pieces in order; a rank's pieces tile the start of its shard."""
    total = sum(numels)
    shard_numel = max(1, math.ceil(total / world_size))
    pieces: list[list[Piece]] = [[] for _ in range(world_size)]
    offset = 0
    for index, numel in enumerate(numels):
        first_rank, last_rank = offset // shard_numel, (offset + numel - 1) // shard_numel
        for rank in range(first_rank, last_rank + 1) if numel else ():
            lo = max(offset, rank * shard_numel)
            hi = min(offset + numel, (rank + 1) * shard_numel)
            pieces[rank].append(Piece(index, lo - offset, hi - offset))
        offset += numel
    return shard_numel, pieces


def _flat(t: torch.Tensor, *, like: torch.Tensor | None = None, view: bool = False) -> torch.Tensor:
    """``t`` as a 1-D tensor in the memory order of ``like`` (default: ``t`` itself), so that channels-last
    and contiguous tensors both flatten without a copy. ``view=True`` insists on a view (for writing)."""
    ref = t if like is None else like
    order = sorted(range(ref.dim()), key=ref.stride, reverse=True)
    permuted = t.permute(order)
    return permuted.view(-1) if view else permuted.reshape(-1)


def _is_elementwise(key: str, value: Any, ref: torch.Tensor) -> bool:
    """State entries shaped like their parameter are sharded with it; anything else ("step", scalars)
    is the same on every piece of a parameter."""
    return isinstance(value, torch.Tensor) and key != "step" and value.shape == ref.shape


def _hyperparams(group: dict) -> dict:
    return {k: v for k, v in group.items() if k != "params"}


class ShardedOptimizer(Optimizer):
    """ZeRO-1 wrapper: ``param_groups`` are the full groups, ``state`` is this rank's shard of the state.

    ``make_local(groups)`` builds the inner optimizer (with Lookahead if wanted) for groups of shard
    views. ``step`` assumes the gradients are already averaged over ranks. ``state_dict`` and
    ``slow_weights`` are collective calls: every rank must make them.
    """

    def __init__(self, param_groups: list[dict], make_local: Callable[[list[dict]], Optimizer], *,
                 process_group: dist.ProcessGroup | None = None) -> None:
        super().__init__(param_groups, defaults={})
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        params = self._params()
        self._check_params(params)
        self._numels = [p.numel() for p in params]
        self._offsets = [0, *itertools.accumulate(self._numels)]
        self._shard_numel, layout = partition(self._numels, self.world_size)
        self._pieces = layout[dist.get_rank(process_group)]
        self._views = [_flat(params[pc.param_index].detach(), view=True)[pc.start:pc.stop] for pc in self._pieces]
        group_of = [gi for gi, group in enumerate(self.param_groups) for _ in group["params"]]
        local_groups = [{**_hyperparams(group),
                         "params": [v for v, pc in zip(self._views, self._pieces) if group_of[pc.param_index] == gi]}
                        for gi, group in enumerate(self.param_groups)]
        self.local = make_local(local_groups)
        self.state = self.local.state
        self._pull_hyperparams()
        owned = sum(pc.stop - pc.start for pc in self._pieces)
        # Persistent buffers: this rank's averaged gradient shard (the local views' gradients are views into
        # it), what this rank sends to the all-gather, and the flat buffer of every rank's shard.
        self._grad_shard = torch.zeros(self._shard_numel, dtype=params[0].dtype, device=params[0].device)
        self._grad_views = list(self._grad_shard[:owned].split([pc.stop - pc.start for pc in self._pieces]))
        self._send = torch.zeros_like(self._grad_shard)
        self._flat_buffer: torch.Tensor | None = None
        self._reduced = False

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @staticmethod
    def _check_params(params: list[torch.Tensor]) -> None:
        if len({(p.dtype, p.device) for p in params}) > 1:
            raise ValueError("sharded optimizer state needs all parameters in one dtype and on one device; "
                             "set backend.shard_optimizer_state=false for mixed models")
        for p in params:
            try:
                _flat(p.detach(), view=True)
            except RuntimeError:
                raise ValueError(f"sharded optimizer state needs dense parameters; got strides {p.stride()} "
                                 f"for shape {tuple(p.shape)}") from None

    def _push_hyperparams(self) -> None:
        """Hyperparameters set on the full groups (set_hyperparams, schedulers) reach the local optimizer."""
        for group, local in zip(self.param_groups, self.local.param_groups):
            local.update(_hyperparams(group))

    def _pull_hyperparams(self) -> None:
        """Counters the local optimizer keeps in its groups (Lookahead's step) show in the full groups."""
        for group, local in zip(self.param_groups, self.local.param_groups):
            group.update(_hyperparams(local))

    def _flat(self) -> torch.Tensor:
        """The persistent buffer of ``world_size`` shards, made on first use."""
        if self._flat_buffer is None:
            self._flat_buffer = torch.zeros(self.world_size * self._shard_numel, dtype=self._grad_shard.dtype,
                                            device=self._grad_shard.device)
        return self._flat_buffer

    @torch.no_grad()
    def reduce_gradients(self) -> torch.Tensor:
        """Average this rank's own (unreduced) gradients over ranks into its shard, by one reduce-scatter
        (collective). The next ``step`` uses that shard instead of slicing ``p.grad``. Returns the rank's own
        gradient, flat (in the persistent buffer: valid until ``step``), for a caller that measures it.

        A parameter without a gradient counts as zeros here (DDP gives every rank the same ones)."""
        params = self._params()
        flat = self._flat()
        targets = list(flat[:self._offsets[-1]].split(self._numels))
        with_grad = [(t, _flat(p.grad, like=p)) for t, p in zip(targets, params) if p.grad is not None]
        if len(with_grad) < len(params):
            flat.zero_()
        elif self._offsets[-1] < flat.numel():
            flat[self._offsets[-1]:].zero_()  # the last shard's padding
        if with_grad:
            torch._foreach_copy_([t for t, _ in with_grad], [g for _, g in with_grad])
        dist.reduce_scatter_single(self._grad_shard, flat, group=self.process_group)
        self._grad_shard.div_(self.world_size)
        self._reduced = True
        return flat[:self._offsets[-1]]

    def shard_gradients(self) -> list[torch.Tensor]:
        """This rank's shard of the averaged gradient, one tensor per piece, as the next ``step`` will use it
        (after ``reduce_gradients``): scale them in place to clip."""
        return self._grad_views

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Also forgets a reduced shard whose step was skipped (a non-finite step)."""
        self._reduced = False
        super().zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("the sharded optimizer takes no closure: run forward and backward before step()")
        self._push_hyperparams()
        params = self._params()
        if not self._reduced:  # gradients already averaged (DDP's all-reduce): take this shard's slice
            grads = [params[pc.param_index].grad for pc in self._pieces]
            pairs = [(buf, _flat(g, like=params[pc.param_index])[pc.start:pc.stop])
                     for buf, g, pc in zip(self._grad_views, grads, self._pieces) if g is not None]
            if pairs:
                torch._foreach_copy_([b for b, _ in pairs], [g for _, g in pairs])
        for view, buf, pc in zip(self._views, self._grad_views, self._pieces):
            view.grad = None if params[pc.param_index].grad is None else buf
        try:
            self.local.step()
        finally:
            for view in self._views:
                view.grad = None
            self._reduced = False
        self._pull_hyperparams()
        self._gather_params(params)

    def _gather_params(self, params: list[torch.Tensor]) -> None:
        """Every rank's updated shard reaches every rank, through the persistent buffers."""
        if self._views:
            torch.cat(self._views, out=self._send[:sum(v.numel() for v in self._views)])
        flat = self._flat()
        dist.all_gather_single(flat, self._send, group=self.process_group)
        targets = [_flat(p.detach(), view=True) for p in params]
        torch._foreach_copy_(targets, list(flat[:self._offsets[-1]].split(self._numels)))

    def _all_gather_flat(self, parts: list[torch.Tensor], *, dtype: torch.dtype, device: torch.device,
                         dst: int | None = None) -> torch.Tensor | None:
        """Concatenate this rank's ``parts`` (one per piece, in order) into its shard and gather the shards, to
        every rank (``dst`` None) or to rank ``dst`` only (others get None): the flat vector of all parameters'
        elements (or of one state entry)."""
        send = torch.zeros(self._shard_numel, dtype=dtype, device=device)
        if parts:
            owned = sum(pc.stop - pc.start for pc in self._pieces)
            torch.cat(parts, out=send[:owned])
        if dst is not None and self.rank != dst:
            dist.gather(send, None, dst=self._global_rank(dst), group=self.process_group)
            return None
        recv = torch.empty(self.world_size * self._shard_numel, dtype=dtype, device=device)
        if dst is None:
            dist.all_gather(list(recv.chunk(self.world_size)), send, group=self.process_group)
        else:
            dist.gather(send, list(recv.chunk(self.world_size)), dst=self._global_rank(dst), group=self.process_group)
        return recv[:self._offsets[-1]]

    def _global_rank(self, group_rank: int) -> int:
        return dist.get_global_rank(self.process_group, group_rank) if self.process_group is not None else group_rank

    def state_dict(self) -> dict[str, Any]:
        """The unsharded optimizer's state dict, identical on every rank (collective)."""
        state = self.consolidated_state_dict(dst=None)
        assert state is not None
        return state

    def consolidated_state_dict(self, *, dst: int | None = 0) -> dict[str, Any] | None:
        """The unsharded optimizer's state dict on rank ``dst`` only (None elsewhere), or on every rank for ``dst``
        None (collective). Gathering to one rank keeps the other ranks' memory at one shard: what a checkpoint
        of a large model needs."""
        self._pull_hyperparams()
        params = self._params()
        layout = self._gather_state_layout()
        state: dict[int, dict[str, Any]] = {i: dict(scalars) for i, (_, scalars) in layout.items()}
        keys = sorted({(key, dtype) for tensors, _ in layout.values() for key, dtype in tensors.items()})
        for key, dtype_name in keys:
            dtype = getattr(torch, dtype_name.removeprefix("torch."))
            parts = [self.local.state[v][key] if key in self.local.state.get(v, {})
                     else torch.zeros_like(v, dtype=dtype) for v in self._views]
            flat = self._all_gather_flat(parts, dtype=dtype, device=params[0].device, dst=dst)
            if flat is None:
                continue
            for i, (tensors, _) in layout.items():
                if key in tensors:
                    out = torch.empty_like(params[i], dtype=dtype)
                    _flat(out, view=True).copy_(flat[self._offsets[i]:self._offsets[i + 1]])
                    state[i][key] = out
        if dst is not None and self.rank != dst:
            return None
        groups, start = [], 0
        for group in self.param_groups:
            groups.append({**_hyperparams(group), "params": list(range(start, start + len(group["params"])))})
            start += len(group["params"])
        return {"state": dict(sorted(state.items())), "param_groups": groups}

    def _gather_state_layout(self) -> dict[int, tuple[dict[str, str], dict[str, Any]]]:
        """For each parameter with state on any rank: its sharded keys (with dtypes) and its other entries."""
        mine: dict[int, tuple[dict[str, str], dict[str, Any]]] = {}
        for view, pc in zip(self._views, self._pieces):
            entries = self.local.state.get(view)
            if entries:
                tensors = {k: str(v.dtype) for k, v in entries.items() if _is_elementwise(k, v, view)}
                scalars = {k: v for k, v in entries.items() if k not in tensors}
                mine[pc.param_index] = (tensors, scalars)
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, mine, group=self.process_group)
        merged: dict[int, tuple[dict[str, str], dict[str, Any]]] = {}
        for rank_layout in everyone:
            for i, entry in rank_layout.items():
                merged.setdefault(i, entry)
        return merged

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load an unsharded optimizer's state dict (from any world size); every rank takes its shard."""
        saved_groups = state_dict["param_groups"]
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("optimizer state dict does not match this model's parameter groups: "
                             f"{[len(g['params']) for g in saved_groups]} parameters per group saved, "
                             f"{[len(g['params']) for g in self.param_groups]} here")
        params = self._params()
        saved_ids = [i for group in saved_groups for i in group["params"]]
        local_state = {}
        for j, (view, pc) in enumerate(zip(self._views, self._pieces)):
            entries = state_dict["state"].get(saved_ids[pc.param_index])
            if entries is None:
                continue
            p = params[pc.param_index]
            local_state[j] = {k: _flat(v, like=p)[pc.start:pc.stop].clone() if _is_elementwise(k, v, p)
                              else (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in entries.items()}
        local_groups, start = [], 0
        for saved, local in zip(saved_groups, self.local.param_groups):
            local_groups.append({**_hyperparams(saved), "params": list(range(start, start + len(local["params"])))})
            start += len(local["params"])
        self.local.load_state_dict({"state": local_state, "param_groups": local_groups})
        self.state = self.local.state
        self._pull_hyperparams()

    @contextlib.contextmanager
    def slow_weights(self) -> Iterator[None]:
        """Lookahead's slow weights in the parameters on every rank within the block (collective)."""
        if not isinstance(self.local, Lookahead):
            yield
            return
        params = self._params()
        with torch.no_grad():
            fast = [p.detach().clone(memory_format=torch.preserve_format) for p in params]
        try:
            with self.local.slow_weights():
                with torch.no_grad():
                    self._gather_params(params)
                yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, fast)

