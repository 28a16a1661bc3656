"""DeepSpeed ZeRO (stages 0, 1, 2) behind the same interface as DDP. deepspeed is imported only here.

How the trainer's step maps onto the engine (docs/deepspeed.md has the long form):

- ``set_global_batch_size(B)`` calls ``engine.set_train_batch_size(B)``: the micro-batch stays fixed and
  DeepSpeed's gradient-accumulation steps become ``B / (micro x world)``, the trainer's ``accum_steps``.
- ``grad_sync(last)`` sets the engine's accumulation boundary explicitly, so "the last micro-batch" is
  the trainer's decision and not DeepSpeed's micro-step counter. ZeRO-0/1 reduce gradients only in the
  boundary backward; ZeRO-2 reduce-scatters every micro-batch into the gradient partitions (that is what
  lets it keep only a partition) and finalises them at the boundary.
- ``backward(loss)`` is ``engine.backward(loss, scale_wrt_gas=False)``: the trainer has already divided
  the loss by the accumulation steps, and DeepSpeed would divide by them again. Each rank's accumulated
  gradient is then the mean over its B / world samples; DeepSpeed averages over ranks, so the step sees
  the mean over the global batch: the gradient DDP produces.
- ``optimizer_step`` is one ``engine.step()`` at the boundary: clipping, the step, the all-gather of
  updated weights and zeroing of gradients all happen inside it.

The optimizer is ours (``build_optimizer``), given to DeepSpeed as a client optimizer. ZeRO rewrites its
parameter groups in place to hold this rank's flat fp32 partition, so the group dicts the schedule sets
(``set_hyperparams``) are the ones DeepSpeed steps, and Lookahead (which shares the groups and state of
its inner optimizer) keeps its slow weights per partition, inside the optimizer state DeepSpeed saves.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from dist_train.backends.base import Backend, OptimizerFactory
from dist_train.backends.capabilities import LookaheadSlowWeights
from dist_train.checkpoint import CheckpointError
from dist_train.distributed import DistInfo
from dist_train.noise_scale import NoiseMeasurement

PRECISIONS = ("fp32", "bf16", "fp16")
OWNED_KEYS = {
    "train_batch_size": "train.global_batch_size (the schedule sets it every step)",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size (accumulation follows from it)",
    "gradient_clipping": "train.grad_clip_norm",
    "bf16": "train.precision",
    "fp16": "train.precision",
    "optimizer": "optim (the optimizer comes from dist_train.optim)",
    "scheduler": "schedule (the schedule sets lr and momentum every step)",
}
"""Keys of the generated config that the typed config owns, with the setting to change instead."""


# DeepSpeed 0.19 runs ZeRO-0 in bf16 through its DDP_BFLOAT16 wrapper, which accumulates and all-reduces the
# gradients in bf16 and offers no fp32 accumulation at stage 0 ("unsupported mix" of dtypes).
ZERO0_BF16 = ("backend.zero_stage=0 with train.precision=bf16: DeepSpeed then sums the gradients over micro-batches "
              "and ranks in bf16 (8 bits of mantissa), which loses the small contributions a large accumulated batch "
              "is made of; use backend.zero_stage=1 (bf16 compute, fp32 gradients and master weights), or "
              "backend.name=ddp with train.precision=bf16")


def deepspeed_config(*, micro_batch_size: int, world_size: int, zero_stage: int, precision: str,
                     grad_clip_norm: float, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The DeepSpeed config for these settings, with ``overrides`` (from a JSON file) merged in."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,  # set_global_batch_size changes it every step
        "train_batch_size": micro_batch_size * world_size,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},  # 0: dynamic
        "gradient_clipping": grad_clip_norm,
        # Buffers stay fp32 (DeepSpeed casts only the parameters): BatchNorm's running statistics average
        # thousands of steps, which bf16's 8-bit mantissa would round away. _fp32_batch_norm makes BatchNorm
        # take its half-precision weights as fp32 to match them.
        # Our optimizers (RAdam, Lookahead, QHM) are plain torch optimizers DeepSpeed has not listed.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": None,
        "wall_clock_breakdown": False,
    }
    for key, value in (overrides or {}).items():
        if key in OWNED_KEYS:
            raise ValueError(f"backend.deepspeed_config sets {key!r}, which dist_train derives from "
                             f"{OWNED_KEYS[key]}; remove it from the JSON file and set that instead")
        if key == "zero_optimization" and isinstance(value, dict) and value.get("stage", zero_stage) != zero_stage:
            raise ValueError(f"backend.deepspeed_config sets zero_optimization.stage={value['stage']}; "
                             "set backend.zero_stage instead")
        both_dicts = isinstance(value, dict) and isinstance(config.get(key), dict)
        config[key] = {**config[key], **value} if both_dicts else value
    return config


def read_overrides(path: str) -> dict[str, Any]:
    """The JSON object in ``path`` (backend.deepspeed_config); a clear error if it is not one."""
    try:
        overrides = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"backend.deepspeed_config={path!r} cannot be read as JSON: {err}") from None
    if not isinstance(overrides, dict):
        raise ValueError(f"backend.deepspeed_config={path!r} must hold a JSON object of DeepSpeed config keys")
    return overrides


class DeepSpeedBackend(LookaheadSlowWeights, Backend):
    def __init__(self, info: DistInfo, *, micro_batch_size: int, zero_stage: int = 1, precision: str = "fp32",
                 grad_clip_norm: float = 0.0, config_file: str = ""):
        super().__init__(info, micro_batch_size=micro_batch_size)
        if zero_stage not in (0, 1, 2):
            raise ValueError(f"backend.zero_stage={zero_stage} is not supported; use 0, 1 or 2")
        if precision not in PRECISIONS:
            raise ValueError(f"train.precision={precision!r} is not one of {PRECISIONS}")
        if precision == "fp16" and info.device.type != "cuda":
            raise ValueError("train.precision=fp16 needs a CUDA GPU (DeepSpeed refuses fp16 on CPU); "
                             "use train.precision=bf16 or fp32 on CPU")
        if zero_stage == 0 and precision == "bf16":
            raise ValueError(ZERO0_BF16)
        self.zero_stage = zero_stage
        self.precision = precision
        self.grad_clip_norm = grad_clip_norm
        self.config = deepspeed_config(micro_batch_size=micro_batch_size, world_size=info.world_size,
                                       zero_stage=zero_stage, precision=precision, grad_clip_norm=grad_clip_norm,
                                       overrides=read_overrides(config_file) if config_file else None)
        self._noise: _MicroBatchGradSqNorms | None = None
        self._zero_norm: torch.Tensor | None = None  # this step's ZeRO gradient norm, once taken

    # --- set-up -------------------------------------------------------------------------------
    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator().device_name()
        if accelerator != self.info.device.type:
            raise ValueError(f"DeepSpeed picked its {accelerator!r} accelerator but this run uses "
                             f"{self.info.device}; set DS_ACCELERATOR={self.info.device.type} (or train.device)")
        _ensure_process_group(self.info)
        module = model.to(self.info.device)
        # ZeRO turns every parameter into a view of a flat buffer, in the default layout, and DeepSpeed's
        # broadcast of bf16 parameters needs exactly those strides (contiguous() keeps the channels_last
        # strides of a 1x1 conv). With model.channels_last the activations stay channels_last: they
        # follow the input's layout.
        for p in module.parameters():
            p.data = p.data.clone(memory_format=torch.contiguous_format)
        self._client_optimizer = make_optimizer(module)
        # dist_init_required=False: the process group exists (torchrun/SLURM via dist_train.distributed,
        # or the one-rank group above); DeepSpeed wraps it instead of starting its own.
        self._engine, _, _, _ = deepspeed.initialize(model=module, optimizer=self._client_optimizer,
                                                     config=self.config, dist_init_required=False)
        if self.precision != "fp32":
            _cast_at_the_boundary(self._engine.module, dtype=torch.bfloat16 if self.precision == "bf16"
                                  else torch.float16)
            _fp32_batch_norm(self._engine.module)
        lookahead = hasattr(self._client_optimizer, "slow_weights")
        if lookahead and not self._steps_module_directly() and self._refresh_module() is None:
            raise ValueError(f"optim.lookahead with backend.zero_stage=0 and train.precision={self.precision}: "
                             f"DeepSpeed's {type(self._engine.optimizer).__name__} keeps the fp32 weights where "
                             "Lookahead's slow weights cannot be evaluated; use backend.zero_stage=1 or 2")

    @property
    def model(self) -> nn.Module:
        return self._engine

    @property
    def module(self) -> nn.Module:
        return self._engine.module

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        # The client optimizer, not DeepSpeed's wrapper: its param_groups are the ones DeepSpeed steps.
        return self._client_optimizer

    # --- one step ----------------------------------------------------------------------------
    def set_global_batch_size(self, global_batch_size: int) -> int:
        accum_steps = super().set_global_batch_size(global_batch_size)  # the clear error if B does not divide
        self._engine.set_train_batch_size(global_batch_size)
        return accum_steps

    @contextlib.contextmanager
    def grad_sync(self, enabled: bool) -> Iterator[None]:
        # The trainer, not DeepSpeed's micro-step counter, says which backward ends the step.
        self._engine.set_gradient_accumulation_boundary(enabled)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        # The loss is already divided by the accumulation steps: DeepSpeed must not divide again.
        self._engine.backward(loss, scale_wrt_gas=False)
        if self._noise is not None:
            self._noise.micro_steps += 1

    def discard_gradients(self) -> None:
        """Drop this step's gradients without an update (a skipped non-finite step). ZeRO holds the reduced
        gradient partition apart from ``.grad``; this clears it the way ZeRO's own step does when it skips an
        overflowed fp16 step (DeepSpeed has no public call for it)."""
        from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID, DeepSpeedZeroOptimizer

        self._zero_norm = None
        optimizer = self._engine.optimizer
        optimizer.zero_grad(set_to_none=True)
        if not isinstance(optimizer, DeepSpeedZeroOptimizer):
            return  # ZeRO-0: the gradients live in .grad (fp32) or in the wrapper's .grad copies
        optimizer.micro_step_id = INITIAL_MICRO_STEP_ID
        optimizer._release_preflattened_grad_buffers()
        if optimizer.cpu_offload:
            optimizer.reset_cpu_buffers()
        for key in optimizer.averaged_gradients:
            optimizer.averaged_gradients[key] = None
            optimizer.all_grad_tensors[key] = None

    def optimizer_step(self, *, grad_clip_norm: float = 0.0) -> torch.Tensor:
        if grad_clip_norm != self.grad_clip_norm:
            raise ValueError(f"DeepSpeed clips at the gradient_clipping set when the engine was built "
                             f"({self.grad_clip_norm}), not {grad_clip_norm}; build the backend with "
                             f"grad_clip_norm={grad_clip_norm}")
        if not self._engine.is_gradient_accumulation_boundary():
            raise RuntimeError("optimizer_step() needs the last backward to run inside grad_sync(True); "
                               "DeepSpeed would skip the step")
        norm = self._replicated_grad_norm() if self._steps_module_directly() else None
        with self._zero_norm_reused():
            self._engine.step()
        self._zero_norm = None
        if norm is None:
            norm = self._engine.get_global_grad_norm()  # before clipping, of the averaged gradient
        # None if a JSON override turned zero_optimization.compute_grad_norm off.
        return torch.as_tensor(math.nan if norm is None else norm, dtype=torch.float32).detach()

    def grads_finite(self) -> torch.Tensor:
        # ZeRO's own norm of the reduced partitions (a collective), before the step; DeepSpeed takes it again
        # inside step() for clipping: one more scalar all-reduce per step.
        if self.precision == "fp16":
            # Overflow is routine under dynamic loss scaling: DeepSpeed itself skips that step and lowers the
            # scale. Skipping it here instead would keep the scale, and overflow again, forever.
            return torch.ones((), dtype=torch.bool, device=self.info.device)
        if self._steps_module_directly():
            return torch.isfinite(self._replicated_grad_norm())
        return torch.isfinite(torch.as_tensor(self._scaled_zero_norm()))

    def _scaled_zero_norm(self) -> torch.Tensor:
        """ZeRO's norm of this step's reduced gradient partitions (a collective), computed once per step: the
        finiteness check, the noise scale and DeepSpeed's own clipping inside ``step()`` all use it."""
        if self._zero_norm is None:
            self._zero_norm = torch.as_tensor(self._engine.optimizer.scaled_global_norm())
        return self._zero_norm

    @contextlib.contextmanager
    def _zero_norm_reused(self) -> Iterator[None]:
        """Inside DeepSpeed's ``step()``, its ``scaled_global_norm()`` returns the norm this step already took.

        DeepSpeed offers no way to hand it a norm, and would otherwise run the reduction and its all-reduce
        again on unchanged gradients; the instance attribute shadows the method for the call and is removed."""
        zero = self._engine.optimizer
        if self._zero_norm is None or not hasattr(zero, "scaled_global_norm"):
            yield
            return
        cached = self._zero_norm
        shadowed = "scaled_global_norm" in vars(zero)
        previous = vars(zero).get("scaled_global_norm")
        zero.scaled_global_norm = lambda *args, **kwargs: cached
        try:
            yield
        finally:
            if shadowed:
                zero.scaled_global_norm = previous
            else:
                del zero.scaled_global_norm

    def _steps_module_directly(self) -> bool:
        """ZeRO-0 in fp32: DeepSpeed steps our optimizer on the module's parameters and records no norm."""
        return self._engine.optimizer is self._client_optimizer

    def _replicated_grad_norm(self) -> torch.Tensor:
        grads = [p.grad for p in self._engine.module.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads)

    # --- gradient noise scale ------------------------------------------------------------------
    def enable_noise_scale(self, *, preconditioned: bool = False) -> None:
        """Measure per micro-batch: B_small is the micro-batch, |G_small|^2 the mean over ranks and
        micro-steps of each micro-batch's local gradient norm, read in tensor hooks on the parameters.

        Tensor hooks fire with a parameter's gradient of one backward before it is accumulated into
        ``.grad`` and before any DeepSpeed hook reduces it, so this is exact under ZeRO-2 as well, where
        no rank ever holds its whole local gradient of the step. |G_big|^2 is the averaged gradient's
        squared norm, which ZeRO computes from its partitions (the norm it also clips with).
        """
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        if preconditioned:
            raise ValueError("the preconditioned noise scale is built for backend.name=ddp only (DeepSpeed keeps "
                             "the second moments in its partitions); use backend.name=ddp, or measure raw gradients")
        if not (self._steps_module_directly() or isinstance(self._engine.optimizer, DeepSpeedZeroOptimizer)):
            raise ValueError(f"the noise-scale measurement needs DeepSpeed's ZeRO-1/2 optimizer or fp32 ZeRO-0, "
                             f"but backend.zero_stage={self.zero_stage} with train.precision={self.precision} "
                             f"uses its {type(self._engine.optimizer).__name__}; use backend.zero_stage=2")
        self._noise = _MicroBatchGradSqNorms(self._engine.module.parameters())

    def noise_measurement(self) -> NoiseMeasurement | None:
        if self._noise is None:
            return None
        micro_mean = self._noise.pop_mean()
        if self.info.world_size * self.accum_steps < 2:
            return None
        scale = self._loss_scale()
        # Each micro-step's gradient is its micro-batch mean divided by accum_steps (and loss-scaled).
        small = micro_mean * (self.accum_steps / scale) ** 2
        if self.info.is_distributed:
            small = small / self.info.world_size
            dist.all_reduce(small)
        return NoiseMeasurement(small_sq_norm=small, small_batch_size=self.micro_batch_size,
                                big_sq_norm=self._averaged_grad_sq_norm() / scale**2,
                                big_batch_size=self.global_batch_size)

    def _averaged_grad_sq_norm(self) -> torch.Tensor:
        if self._steps_module_directly():
            return self._replicated_grad_norm().square()  # DeepSpeed averaged the module's .grad in place
        # Collective: each rank's partition norm, summed over ranks; still loss-scaled.
        return self._scaled_zero_norm().float().square()

    def _loss_scale(self) -> float:
        return float(getattr(self._engine.optimizer, "loss_scale", 1.0)) if self.precision == "fp16" else 1.0

    # --- Lookahead's slow weights --------------------------------------------------------------
    @contextlib.contextmanager
    def slow_weights(self) -> Iterator[None]:
        """Within the block the module holds Lookahead's slow weights (collective); a no-op without Lookahead.

        Under ZeRO the slow weights live beside this rank's fp32 master partition, so they are swapped into
        the master weights and the module is refreshed from them (an all-gather), and back afterwards.
        """
        swap = getattr(self._client_optimizer, "slow_weights", None)
        if swap is None or self._steps_module_directly():
            with swap() if swap is not None else contextlib.nullcontext():
                yield
            return
        refresh = self._refresh_module()
        assert refresh is not None, "setup() refuses Lookahead where the module cannot be refreshed"
        try:
            with swap():
                refresh()
                yield
        finally:
            refresh()

    def _refresh_module(self) -> Callable[[], None] | None:
        """Copies the fp32 master weights into the module (collective), where DeepSpeed keeps them apart."""
        return getattr(self._engine.optimizer, "update_lp_params", None)

    # --- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError("a DeepSpeed checkpoint is written by every rank (the optimizer state is "
                                  "sharded): use save_to(directory)/load_from(directory)")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError("a DeepSpeed checkpoint is read by every rank: use load_from(directory)")

    def save_to(self, directory: Path) -> None:
        """Collective: ``engine.save_checkpoint`` into ``directory``. The main rank writes the module's
        state_dict; every rank writes its optimizer partition with its fp32 master weights and, with
        Lookahead, its share of the slow weights. The Checkpointer renames the directory into place."""
        directory = Path(directory)
        # DeepSpeed writes to <save_dir>/<tag>/; its own 'latest' file is not needed (the Checkpointer
        # finds the latest checkpoint), and the trainer's state is in the Checkpointer's rank files.
        self._engine.save_checkpoint(str(directory.parent), tag=directory.name, save_latest=False)

    @property
    def resumes_at_any_world_size(self) -> bool:  # type: ignore[override]
        """ZeRO-1/2: ``load_from`` re-cuts the partitions (tested 2->1 and 2->3). ZeRO-0 keeps the whole
        optimizer in its model file and would likely load as it is, but that is untested: refused."""
        return self.zero_stage != 0

    def load_from(self, directory: Path) -> None:
        """Collective, strict: what ``save_to`` wrote, each rank reading its own optimizer partition; one written
        at another world size is re-partitioned (``_load_repartitioned``)."""
        directory = Path(directory)
        saved = _saved_zero_ranks(directory)
        if self._engine.save_zero_checkpoint and saved and saved != self.info.world_size:
            self._load_repartitioned(directory, saved)
            return
        # Without this rank's optimizer file DeepSpeed would warn and restart the optimizer from the weights.
        own = (f"*zero_pp_rank_{self.info.rank}_mp_rank_*_optim_states.pt" if self._engine.save_zero_checkpoint
               else "mp_rank_*_model_states.pt")
        if not any(directory.glob(own)):
            raise _checkpoint_error(f"checkpoint {directory} has no {own}: it was not written by DeepSpeed "
                                    f"ZeRO-{self.zero_stage} with train.precision={self.precision} on "
                                    f"{self.info.world_size} ranks")
        try:
            load_path, _ = self._engine.load_checkpoint(str(directory.parent), tag=directory.name,
                                                        load_module_strict=True, load_optimizer_states=True,
                                                        load_lr_scheduler_states=False)
        except (RuntimeError, KeyError, ValueError, AssertionError) as err:
            raise _checkpoint_error(f"checkpoint {directory} does not fit this run's model, optimizer or "
                                    f"DeepSpeed settings ({str(err)[:500]})") from None
        if load_path is None:
            raise _checkpoint_error(f"DeepSpeed could not load checkpoint {directory}")


    def _load_repartitioned(self, directory: Path, saved_ranks: int) -> None:
        """Collective: a ZeRO-1/2 checkpoint of ``saved_ranks`` ranks, loaded on this run's ranks.

        Written here rather than taken from DeepSpeed: DeepSpeed 0.19 refuses to load ZeRO optimizer state at
        another data-parallel size except from a universal checkpoint, and its converter to that format
        (``ds_to_universal``) keeps only the fp32 weights, ``exp_avg`` and ``exp_avg_sq``: it would drop
        Lookahead's slow weights, SGD's and QHM's momentum and RAdam's bias-correction product. So, per
        parameter group: join every saved rank's flat partition (fp32 master weights, and each optimizer
        state tensor of the partition's shape) in rank order, without the saved padding, and cut this rank's
        partition out of it at the new size, as DeepSpeed lays partitions out (equal slices of the flat group,
        zero padding at the end). The module's weights come from DeepSpeed's own module-only load; the fp32
        master weights are the saved ones, never a round trip through bf16."""
        engine, zero = self._engine, self._engine.optimizer
        try:
            engine.load_checkpoint(str(directory.parent), tag=directory.name, load_module_strict=True,
                                   load_optimizer_states=False, load_lr_scheduler_states=False, load_module_only=True)
        except (RuntimeError, KeyError, ValueError, AssertionError) as err:
            raise _checkpoint_error(f"checkpoint {directory} does not fit this run's model ({str(err)[:500]})") from None
        states = [_load_file(_zero_file(directory, r))["optimizer_state_dict"] for r in range(saved_ranks)]
        if any(len(st["single_partition_of_fp32_groups"]) != len(zero.single_partition_of_fp32_groups) for st in states):
            raise _checkpoint_error(f"checkpoint {directory} has another number of parameter groups than this run")
        aligned = [st.get("param_alignment_paddings") for st in states] + [zero.round_robin_bit16_padding]
        if any(any(any(group) for group in paddings or ()) for paddings in aligned):
            raise _checkpoint_error(f"checkpoint {directory}: zero_optimization.parameter_alignment pads each "
                                    f"parameter, and such a checkpoint resumes only on the {saved_ranks} ranks that "
                                    f"wrote it")
        rank, world = self.info.rank, self.info.world_size
        inner = zero.optimizer  # the client optimizer, stepping this rank's flat partitions
        for i, current in enumerate(zero.single_partition_of_fp32_groups):
            size = current.numel()

            def mine(tensors: list[torch.Tensor], paddings: list[int]) -> torch.Tensor:
                whole = torch.cat([t.flatten()[:t.numel() - pad] for t, pad in zip(tensors, paddings)])
                if whole.numel() > size * world:
                    raise _checkpoint_error(f"checkpoint {directory}: parameter group {i} holds {whole.numel()} "
                                            f"values, more than this run's model has")
                padded = torch.zeros(size * world, dtype=whole.dtype)
                padded[:whole.numel()] = whole
                return padded[rank * size:(rank + 1) * size]

            # The fp32 partitions were saved without their padding; the optimizer state with it.
            current.data.copy_(mine([st["single_partition_of_fp32_groups"][i] for st in states],
                                    [0] * saved_ranks))
            groups = [st["base_optimizer_state"] for st in states]
            paddings = [st["group_paddings"][i] for st in states]
            flat = inner.param_groups[i]["params"][0]
            state = {}
            for key, first in groups[0]["state"][i].items():
                values = [g["state"][i][key] for g in groups]
                partitioned = torch.is_tensor(first) and all(
                    v.numel() == st["single_partition_of_fp32_groups"][i].numel() + pad
                    for v, st, pad in zip(values, states, paddings))
                state[key] = (mine(values, paddings).to(flat.device, flat.dtype) if partitioned
                              else first)  # a per-group number (RAdam's step): the same on every saved rank
            inner.state[flat] = state
            for key, value in groups[0]["param_groups"][i].items():
                if key != "params":
                    inner.param_groups[i][key] = value
        zero.loss_scaler = states[0].get("loss_scaler", zero.loss_scaler)
        zero._link_all_hp_params()
        zero.update_lp_params()  # collective: the module from the restored fp32 master weights
        model_file = _load_file(directory / "mp_rank_00_model_states.pt")
        engine.global_steps, engine.skipped_steps = model_file["global_steps"], model_file["skipped_steps"]
        engine.global_samples = model_file.get("global_samples", engine.global_samples)


def _zero_file(directory: Path, rank: int) -> Path:
    found = sorted(directory.glob(f"*zero_pp_rank_{rank}_mp_rank_*_optim_states.pt"))
    if len(found) != 1:
        raise _checkpoint_error(f"checkpoint {directory} has {len(found)} optimizer files of rank {rank}, not 1")
    return found[0]


def _saved_zero_ranks(directory: Path) -> int:
    """How many ranks wrote the ZeRO optimizer partitions in ``directory`` (0: none, ZeRO-0)."""
    return len(list(directory.glob("*zero_pp_rank_*_mp_rank_*_optim_states.pt")))


def _load_file(path: Path) -> Any:
    # Inside the trainer's weights_only_loading: DeepSpeed's record types are allowed, nothing else.
    return torch.load(path, map_location="cpu", weights_only=True)


def _ensure_process_group(info: DistInfo) -> None:
    """DeepSpeed needs a process group even for one process: an in-memory one-rank group then."""
    # DeepSpeed reads LOCAL_RANK from the environment; a bare srun (or one process) does not set it.
    os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
    if dist.is_initialized():
        return
    if info.is_distributed:
        raise RuntimeError("no process group: start it with dist_train.distributed.init_distributed first")
    dist.init_process_group("nccl" if info.device.type == "cuda" else "gloo", store=dist.HashStore(),
                            rank=0, world_size=1)


def _fp32_batch_norm(module: nn.Module) -> None:
    """Every BatchNorm in ``module`` normalises half-precision inputs with fp32 running statistics and its
    half-precision weight and bias taken as fp32, so the statistics stay fp32 buffers.

    torch's batch_norm accepts a bf16/fp16 input with fp32 statistics only if the weight and bias are fp32
    too (its mixed-type kernel), and DeepSpeed holds them in half precision; the casts are differentiable, so
    the gradients reach the half-precision parameters as before. Written here because neither torch nor
    DeepSpeed offers it for a module DeepSpeed has cast. Modules with ``momentum=None`` (a cumulative average)
    or without running statistics keep their own forward."""
    for bn in module.modules():
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.momentum is None or not bn.track_running_stats:
            continue
        mean, var, tracked = bn.running_mean, bn.running_var, bn.num_batches_tracked
        assert mean is not None and var is not None and tracked is not None  # track_running_stats
        mean.data, var.data = mean.data.float(), var.data.float()

        def forward(x: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm = bn, momentum: float = bn.momentum,
                    tracked: torch.Tensor = tracked) -> torch.Tensor:
            bn._check_input_dim(x)
            if bn.training:
                tracked.add_(1)  # as torch's own forward counts them
            weight = bn.weight.float() if bn.weight is not None else None
            bias = bn.bias.float() if bn.bias is not None else None
            return torch.nn.functional.batch_norm(x, bn.running_mean, bn.running_var, weight, bias, bn.training,
                                                  momentum, bn.eps)

        bn.forward = forward  # type: ignore[method-assign, assignment]


def _cast_at_the_boundary(module: nn.Module, *, dtype: torch.dtype) -> None:
    """DeepSpeed casts the module's parameters to bf16/fp16 but leaves its inputs alone. Cast floating
    inputs to ``dtype`` on the way in and logits back to fp32 on the way out, so the trainer, evaluation
    and export call the module exactly as in fp32, and the loss is computed in fp32."""

    def cast_inputs(_: nn.Module, args: tuple) -> tuple:
        return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    def cast_output(_: nn.Module, __: tuple, out: Any) -> Any:
        return out.float() if torch.is_tensor(out) and out.is_floating_point() else out

    module.register_forward_pre_hook(cast_inputs)
    module.register_forward_hook(cast_output)


class _MicroBatchGradSqNorms:
    """Sum over micro-steps of the squared norm of each backward's fresh (local, unreduced) gradient."""

    def __init__(self, params: Iterator[nn.Parameter]):
        self.total: torch.Tensor | None = None
        self.micro_steps = 0
        self._handles = [p.register_hook(self._add) for p in params if p.requires_grad]

    def _add(self, grad: torch.Tensor) -> None:
        sq = torch.linalg.vector_norm(grad, dtype=torch.float32).square()
        self.total = sq if self.total is None else self.total + sq

    def pop_mean(self) -> torch.Tensor:
        """Mean over this step's micro-steps; resets for the next step."""
        if self.total is None or self.micro_steps == 0:
            raise RuntimeError("no backward since the last noise measurement: measure once per optimizer step, "
                               "after the last backward")
        mean = self.total / self.micro_steps
        self.total, self.micro_steps = None, 0
        return mean


def _checkpoint_error(message: str) -> CheckpointError:
    return CheckpointError(message + "; resume with the config it was written with, or start afresh in a new "
                           "train.run_dir (or checkpoint.resume=false)")


