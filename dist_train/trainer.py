"""The training loop. It sees only interfaces: backend, schedule, optimizer, data, tracker, checkpointer.

One optimizer step, read top to bottom:
  1. the schedule maps samples seen to (lr, global batch B, momentum);
  2. the backend turns B into accumulation steps of fixed micro-batches;
  3. each micro-batch runs forward and backward; only the last one all-reduces gradients;
  4. the optimizer steps, and exactly B samples have been consumed.
Metrics stay on the device and are reduced every ``log_every_steps`` steps, not per step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F

from dist_train.backends import Backend, HoldsSlowWeights, MeasuresNoiseScale
from dist_train.checkpoint import CheckpointError, weights_only_loading
from dist_train.config import TrainConfig
from dist_train.faults import NonFiniteLoss, Preempted, PreemptionFlag, StepFlags, step_flags
from dist_train.parts import Stateful, TrainerParts
from dist_train.schedule import ScheduleState

log = logging.getLogger(__name__)

@dataclass
class Progress:
    """The loop's counters; model, optimizer, RNGs and the data position are states of their own."""

    step: int = 0
    samples_seen: int = 0
    bad_samples: int = 0
    skipped_steps: int = 0
    """Steps whose update was skipped because the loss was not finite."""

    def state_dict(self) -> dict[str, int]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in vars(self):  # strict: a missing counter is an error; micro_batches of older runs is ignored
            setattr(self, key, int(state[key]))


class Normalise:
    """uint8 NCHW batches on the host -> normalised float on the device."""

    def __init__(self, mean: Iterable[float], std: Iterable[float], *, device: torch.device, channels_last: bool):
        self.mean = torch.tensor(list(mean), device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(list(std), device=device).view(1, -1, 1, 1) * 255
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True).float()
        return ((x - self.mean) / self.std).contiguous(memory_format=self.memory_format)


class TorchRNG:
    """torch's CPU random state, as a ``Stateful``: dropout and random augmentations on the device draw from it."""

    def state_dict(self) -> dict[str, Any]:
        return {"cpu": torch.get_rng_state()}

    def load_state_dict(self, state: dict[str, Any] | torch.Tensor) -> None:
        # Checkpoints written before the rng was a Stateful hold the bare tensor.
        torch.set_rng_state(state if isinstance(state, torch.Tensor) else state["cpu"])


class Trainer:
    def __init__(self, cfg: TrainConfig, parts: TrainerParts, *, max_bad_sample_fraction: float,
                 checkpoint_every_steps: int = 0, checkpoint_every_minutes: float = 0.0):
        self.cfg = cfg
        self.parts = parts
        self.backend = parts.backend
        self.schedule = parts.schedule
        self.tracker = parts.tracker
        self.checkpointer = parts.checkpointer
        self.noise = parts.noise
        self.batch_controller = parts.batch_controller
        self.normalise = parts.normalise
        self.dataset_size = parts.dataset_size
        self.max_bad_sample_fraction = max_bad_sample_fraction
        self.checkpoint_every_steps = checkpoint_every_steps
        self.checkpoint_every_minutes = checkpoint_every_minutes
        self._last_checkpoint_time = time.monotonic()
        self.progress = Progress()
        self.states: dict[str, Stateful] = {"progress": self.progress, "torch_rng": TorchRNG(),
                                            "data": parts.train_data}
        """This rank's training state besides model and optimizer (those belong to the backend), by name."""
        self._noise_probe: MeasuresNoiseScale | None = None
        if parts.noise is not None:
            # Asked once, not per step: train refuses a noise scale the backend cannot measure.
            assert isinstance(self.backend, MeasuresNoiseScale), f"{type(self.backend).__name__} cannot measure it"
            self._noise_probe = self.backend
            self.states["noise"] = parts.noise
        if parts.batch_controller is not None:
            self.states["batch_controller"] = parts.batch_controller
        self.ema = parts.ema
        if self.ema is not None:
            self.states["ema"] = self.ema  # its update count; the weights go to their own file (_save_model_files)
        self.total_samples = self._total_samples()
        self._stream: Iterator[dict] | None = None
        self._window = _MetricWindow(self.backend.info.device)
        self._bar: Any = None
        self._next_eval = math.inf
        self._tic = (time.perf_counter(), 0)

    # --- state -------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Collective: every rank writes its part, rank 0 makes the checkpoint appear atomically."""
        path = self.checkpointer.save(step=self.progress.step, states=self.states,
                                      save_backend=self._save_model_files,
                                      run={"precision": self.backend.precision})
        self._last_checkpoint_time = time.monotonic()
        # The steps at which checkpoints exist, beside the metrics (the directory is the checkpoint.dir param).
        if self.progress.step > self.parts.logged_through_step:
            self.tracker.log_metrics({"train/checkpoint_step": float(self.progress.step)}, step=self.progress.step)
        return path

    def _save_model_files(self, directory: Path) -> None:
        """Collective: the backend's files, and the weights of the other models evaluated, for export."""
        self.backend.save_to(directory)
        if isinstance(self.backend, HoldsSlowWeights):  # with Lookahead: the evaluated model, for export
            self.backend.save_slow_weights(directory)
        if self.ema is not None and self.backend.is_main:  # the same on every rank: written once
            self.ema.save_weights(directory)

    def load_checkpoint(self, path: Path) -> None:
        """Restore every state from checkpoint ``path``; one of another world size if the backend allows it
        (the data position is then re-dealt to this run's ranks: docs/data.md)."""
        self.checkpointer.load_states(path, self.states, elastic=self.backend.resumes_at_any_world_size)
        with weights_only_loading(f"checkpoint {path}", trust_pickle=self.checkpointer.trust_pickle):
            self.backend.load_from(path)  # DeepSpeed's loader asks torch for a full unpickle: refused here
        if self.ema is not None:
            self.ema.load_weights(path)
        self._stream = None  # re-created at the restored data position on next use
        # The batch a restored controller chose must divide over this run's ranks (elastic resume).
        try:
            self.backend.set_global_batch_size(self._schedule_state().global_batch_size)
        except ValueError as err:
            raise CheckpointError(f"cannot resume {path} on {self.backend.info.world_size} ranks: {err}") from None

    def collect_train_metrics(self) -> dict[str, float]:
        """Collective: the training metrics summed on the device since the last call, reduced over ranks
        (``train/loss``, ``train/acc1``, ``train/grad_norm`` of the last step...); the sums restart."""
        return self._window.reduce(self.backend)

    # --- the loop ----------------------------------------------------------------------------
    def _total_samples(self) -> int:
        """Samples the configured epochs take; 0 when only ``max_steps`` bounds the run."""
        return math.ceil(self.cfg.epochs * self.dataset_size) if self.cfg.epochs > 0 else 0

    def _done(self) -> bool:
        p = self.progress
        if self.cfg.max_steps and p.step >= self.cfg.max_steps:
            return True
        return self.cfg.epochs > 0 and p.samples_seen >= self.total_samples

    def _next_micro_batch(self) -> dict:
        if self._stream is None:  # starts at the data position: the run's start, or the restored one
            self._stream = iter(self.parts.train_data)
        return next(self._stream)

    def fit(self) -> dict[str, float]:
        """Train to the configured length; evaluate and checkpoint at the end. Raises ``Preempted``
        after saving a checkpoint when a preemption signal arrives."""
        self._bar = _progress_bar(self) if self.backend.is_main and self.cfg.progress_bar else None
        self._next_eval = self._next_eval_epoch()
        self._tic = (time.perf_counter(), self.progress.samples_seen)
        try:
            with PreemptionFlag() as preemption:
                while not self._done():
                    state = self._schedule_state()
                    flags = self.train_step(state, preemption=preemption)
                    self._after_step(state, flags)
                    if flags.stop:
                        path = self.save_checkpoint()  # collective: every rank has written its part
                        raise Preempted(f"stopped at step {self.progress.step} on a preemption signal; "
                                        f"checkpoint {path}; run the same command again to continue",
                                        requeue=flags.requeue)
        finally:
            if self._bar is not None:
                self._bar.close()
            # Stop the DataLoader workers now. Left to interpreter exit, the join of the still-referenced
            # workers can wait minutes for their watchdog (seen when the tracker was unreachable).
            self._stream = None
        last_eval = self.evaluate()
        self.save_checkpoint()
        return {**last_eval, "step": self.progress.step, "samples_seen": self.progress.samples_seen,
                "epoch": self._epoch(), "skipped_steps": self.progress.skipped_steps}

    def _after_step(self, state: ScheduleState, flags: StepFlags) -> None:
        """Batch-size decision, logging, evaluation and checkpoints due after a step (``flags.checkpoint``: the
        time-based one rank 0 called for; ``flags.stop``: the caller saves the checkpoint itself)."""
        checkpoint_now, stopping = flags.checkpoint, flags.stop
        if flags.grow and self.batch_controller is not None:  # decided on the device, read with the flags
            self.batch_controller.grow(self.progress.step)
        if self.progress.step % self.cfg.log_every_steps == 0 or self._done():
            tic, samples_at_tic = self._tic
            rate = (self.progress.samples_seen - samples_at_tic) / max(time.perf_counter() - tic, 1e-9)
            metrics = self._log_train(state, rate)
            self._tic = (time.perf_counter(), self.progress.samples_seen)
            if self._bar is not None:
                self._bar.update(self.progress.samples_seen - self._bar.n)
                # B_simple beside B: the batch grows while the measured noise scale is above it. Read
                # from this log step's metrics, so the bar adds no host read to other steps.
                measured = metrics.get("noise_scale/b_simple")
                extra = {"B_simple": f"{measured:.3g}"} if measured is not None else {}
                self._bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", B=state.global_batch_size, **extra,
                                      lr=f"{state.lr:.3g}", m=f"{state.momentum:.3g}",
                                      g=f"{state.noise_scale:.3g}")
        if self.cfg.eval_every_epochs and self._epoch() >= self._next_eval and not self._done():
            self.evaluate()
            self._next_eval = self._next_eval_epoch()
        if (checkpoint_now or self._checkpoint_due()) and not (self._done() or stopping):
            self.save_checkpoint()

    def _schedule_state(self) -> ScheduleState:
        if self.batch_controller is None:
            return self.schedule.state_at(self.progress.samples_seen)
        return self.schedule.state_at(self.progress.samples_seen,
                                      global_batch_size=self.batch_controller.global_batch_size)

    def train_step(self, state: ScheduleState, *, preemption: PreemptionFlag | None = None) -> StepFlags:
        """One optimizer step at the schedule's ``state``: exactly ``state.global_batch_size`` samples.

        Returns what every rank agreed on after it: skip (non-finite), stop, requeue, checkpoint. The loss is
        cross-entropy with ``train.label_smoothing``; ``evaluate`` keeps plain cross-entropy. With a batch mixer
        (MixUp/CutMix) each normalised micro-batch is mixed before the forward and its labels become class
        probabilities p; torch then smooths them to (1 - eps) p + eps / K, which is timm's mixed smoothed target
        and torchvision's recipe (label smoothing 0.1 with MixUp and CutMix)."""
        backend = self.backend
        mixer = self.parts.batch_mixer
        accum_steps = backend.set_global_batch_size(state.global_batch_size)
        self.parts.set_hyperparams(backend.optimizer, lr=state.lr, momentum=state.momentum)
        backend.model.train()
        step_loss = torch.zeros((), device=backend.info.device)
        for i in range(accum_steps):
            batch = self._next_micro_batch()
            # non_blocking: from the loader's pinned memory the copy is queued, not waited for (GPU)
            images = self.normalise(batch["image"])
            labels = batch["label"].to(backend.info.device, non_blocking=True)
            if mixer is not None:  # keyed by the step, so a resumed run mixes as the uninterrupted one did
                images, labels = mixer(images, labels, step=self.progress.step, rank=backend.info.rank, micro_batch=i)
            with backend.grad_sync(i == accum_steps - 1):
                with backend.autocast():
                    logits = backend.model(images)
                    loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.label_smoothing)
                backend.backward(loss / accum_steps)
            step_loss += loss.detach()
            self._window.add(loss.detach(), logits.detach(), labels, batch["bad_samples"])
        if self.noise is not None and self._noise_probe is not None:
            # Before the step, which consumes the gradients. Non-finite estimates are ignored by update().
            measurement = self._noise_probe.noise_measurement()
            if measurement is not None:
                self.noise.update(measurement)
        # One small all-reduce (and host sync) per step: every rank must skip, stop or go on together. The
        # gradients are checked first, so that a finite loss with non-finite gradients is caught too.
        # Read the signal flag now, not when the step began: a signal during the step stops after it.
        flags = step_flags(loss_sum=step_loss, grads_finite=backend.grads_finite(), preemption=preemption,
                           checkpoint_due=self._minutes_checkpoint_due(), grow=self._growth_wanted(),
                           all_reduce=backend.all_reduce)
        if flags.nonfinite:
            self._on_nonfinite_loss()
        else:
            self._window.grad_norm = backend.optimizer_step(grad_clip_norm=self.cfg.grad_clip_norm)
        self.progress.step += 1
        self.progress.samples_seen += state.global_batch_size
        if self.ema is not None and not flags.nonfinite:  # a skipped step changed no weight: nothing to average
            self.ema.update(backend.module, step=self.progress.step)
        return flags

    def _growth_wanted(self) -> torch.Tensor | None:
        """The adaptive batch's decision after this step, as a device bool (None: no decision due)."""
        if self.batch_controller is None or self.noise is None:  # adaptive mode needs both
            return None
        threshold = self.batch_controller.threshold_at(self.progress.step + 1)
        return None if threshold is None else self.noise.b_simple_exceeds(threshold)

    def _on_nonfinite_loss(self) -> None:
        if self.cfg.nonfinite_loss == "stop":
            raise NonFiniteLoss(
                f"the loss or the gradient norm was NaN or Inf at step {self.progress.step + 1}; the last good "
                f"checkpoint is kept. "
                f"Lower optim.lr, set train.grad_clip_norm, or set train.nonfinite_loss=skip to skip such steps")
        self.backend.discard_gradients()
        self.progress.skipped_steps += 1
        log.warning("non-finite loss or gradients at step %d: update skipped (%d so far)", self.progress.step + 1,
                    self.progress.skipped_steps)

    def _epoch(self) -> float:
        return self.progress.samples_seen / self.dataset_size

    def _next_eval_epoch(self) -> float:
        every = self.cfg.eval_every_epochs
        return (math.floor(self._epoch() / every + 1e-9) + 1) * every if every else math.inf

    def _checkpoint_due(self) -> bool:
        every = self.checkpoint_every_steps
        return bool(every) and self.progress.step % every == 0

    def _minutes_checkpoint_due(self) -> bool:
        """Rank 0's view (the others' clocks are not asked): a time-based checkpoint is due."""
        every = self.checkpoint_every_minutes
        return bool(every) and self.backend.is_main and time.monotonic() - self._last_checkpoint_time >= every * 60

    # --- metrics -----------------------------------------------------------------------------
    def _log_train(self, state: ScheduleState, samples_per_s: float) -> dict[str, float]:
        window = self.collect_train_metrics()
        self.progress.bad_samples += int(window.pop("bad_samples"))
        seen = self.progress.samples_seen + self.progress.bad_samples
        if seen and self.progress.bad_samples / seen > self.max_bad_sample_fraction:
            raise RuntimeError(
                f"{self.progress.bad_samples} of {seen} training samples could not be decoded, more than "
                f"data.max_bad_sample_fraction={self.max_bad_sample_fraction}; check the shards with "
                f"`dist-train make-shards ... --verify`")
        metrics = {**window, "lr": state.lr, "global_batch_size": state.global_batch_size,
                   "momentum": state.momentum, "samples_seen": self.progress.samples_seen, "epoch": self._epoch(),
                   "throughput/samples_per_s": samples_per_s, "train/bad_samples": self.progress.bad_samples}
        metrics["train/skipped_steps"] = self.progress.skipped_steps
        metrics.update(self.schedule_metrics(state))
        if self.noise is not None:
            metrics.update(self.noise.metrics())
        # A resumed run recomputes (identically) the steps after its checkpoint that the tracker may
        # already hold; log only steps it does not have, so no step appears twice.
        if self.progress.step > self.parts.logged_through_step:
            self.tracker.log_metrics(metrics, step=self.progress.step)
        return metrics

    def schedule_metrics(self, state: ScheduleState) -> dict[str, float]:
        return {"noise_scale/analytic": state.noise_scale}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss (plain cross-entropy, without the training loss's label smoothing), top-1 and top-5 over the
        whole evaluation split; each sample counted once across ranks.

        ``eval/*`` measure the module (Lookahead's slow weights, where there are any); with an EMA of the
        weights, ``eval/ema_*`` measure the EMA too, in the same pass over the data, as torchvision's
        reference script reports both."""
        modules = {"eval/": self.backend.module}
        if self.ema is not None:
            modules["eval/ema_"] = self.ema.module
        for module in modules.values():
            module.eval()
        totals = torch.zeros(len(modules), 4, dtype=torch.float64, device=self.backend.info.device)
        swap = self.backend.slow_weights() if isinstance(self.backend, HoldsSlowWeights) else contextlib.nullcontext()
        with swap:  # Lookahead's slow weights, when there are any
            for batch in self.parts.eval_loader_fn():
                images, labels = self.normalise(batch["image"]), batch["label"].to(self.backend.info.device)
                for i, module in enumerate(modules.values()):
                    with self.backend.autocast():
                        logits = module(images).float()
                    totals[i] += _eval_sums(logits, labels)
        self.backend.all_reduce(totals)
        metrics: dict[str, float] = {}
        for prefix, (loss, top1, top5, count) in zip(modules, totals.tolist()):
            metrics.update({f"{prefix}loss": loss / max(count, 1), f"{prefix}acc1": top1 / max(count, 1),
                            f"{prefix}acc5": top5 / max(count, 1)})
        metrics["eval/samples"] = count
        self.tracker.log_metrics(metrics, step=self.progress.step)
        return metrics


def _eval_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy, top-1 and top-5 hits and the sample count of one evaluation batch, in float64."""
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = top5 == labels[:, None]
    return torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(), hits[:, 0].sum().double(),
                        hits.any(dim=1).sum().double(),
                        torch.tensor(float(labels.numel()), device=logits.device).double()])


class _MetricWindow:
    """Sums of loss and accuracy since the last log, kept on the device to avoid per-step host syncs.

    With mixed targets (MixUp/CutMix: rows of class probabilities) a sample's accuracy is the target's weight
    on the predicted class: 1 for a hit on an unmixed sample, lam when the model names the sample's own
    label and 1 - lam when it names its partner's, lam + (1 - lam) = 1 when both share the label. It is the
    top-1 accuracy against a label drawn from the target, and plain top-1 accuracy without mixing."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)
        self.grad_norm = torch.zeros((), device=device)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, bad_samples: torch.Tensor) -> None:
        n = labels.shape[0]
        predicted = logits.argmax(dim=1)
        if labels.ndim == 2:  # class probabilities: the weight each target gives the predicted class
            correct = labels.gather(1, predicted[:, None]).sum()
        else:
            correct = (predicted == labels).sum()
        # torch.full writes n in a kernel; torch.tensor(n, device=...) would copy it from the host and wait.
        self.sums += torch.stack([loss.double() * n, correct.double(),
                                  torch.full((), n, device=self.device, dtype=torch.float64),
                                  bad_samples.to(self.device, non_blocking=True).double(),
                                  torch.ones((), device=self.device, dtype=torch.float64)])

    def reduce(self, backend: Backend) -> dict[str, float]:
        sums = backend.all_reduce(self.sums.clone())
        loss, correct, count, bad, _ = sums.tolist()
        out = {"train/loss": loss / max(count, 1), "train/acc1": correct / max(count, 1), "bad_samples": bad,
               "train/grad_norm": float(self.grad_norm)}
        self.sums.zero_()
        return out


def _progress_bar(trainer: Trainer):
    from tqdm import tqdm

    return tqdm(total=trainer.total_samples or None, initial=trainer.progress.samples_seen, unit="img",
                unit_scale=True, dynamic_ncols=True, desc="train")
