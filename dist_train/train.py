"""Assemble a run from its config and train: the one entry point torchrun, SLURM and the demo call."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from dist_train.config import Config, check, flatten, load_config, to_dict

if TYPE_CHECKING:
    from dist_train.cpu import Precision

log = logging.getLogger("dist_train")


def run(config_path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Train with the config at ``config_path`` plus dotted ``overrides``; returns the final metrics."""
    cfg = load_config(config_path, overrides)
    from dist_train.distributed import init_distributed, read_launch_env, shutdown

    check(cfg, world_size=read_launch_env()[1])  # every rank, before the process group: one line each

    info = init_distributed(device=cfg.train.device, threads_per_rank=cfg.train.threads_per_rank,
                            timeout_s=cfg.train.dist_timeout_s)
    try:
        return train(cfg, info)
    finally:
        shutdown()


def train(cfg: Config, info: Any) -> dict[str, Any]:
    """Build every part of the run from ``cfg``, the Trainer once from them, resume if asked, and train."""
    from dist_train.checkpoint import Checkpointer
    from dist_train.data.reader import load_manifest
    from dist_train.distributed import barrier, broadcast_object, seed_everything
    from dist_train.trainer import Trainer

    check(cfg, world_size=info.world_size)  # also for callers that skip run()
    seed_everything(cfg.train.seed)
    configure_cuda(cfg, info.device)
    manifest = load_manifest(cfg.data.shards, cfg.data.shard_url,
                             allow_pipe_from_remote_manifest=cfg.data.allow_pipe_from_remote_manifest)
    run_dir = Path(cfg.train.run_dir)
    checkpointer = Checkpointer(cfg.checkpoint.dir or run_dir / "checkpoints", keep_last=cfg.checkpoint.keep_last,
                                rank=info.rank, world_size=info.world_size, barrier=partial(barrier, info),
                                broadcast=partial(broadcast_object, info), trust_pickle=cfg.checkpoint.trust_pickle)
    latest = checkpointer.choose_resume() if cfg.checkpoint.resume else None  # rank 0 decides for all
    precision = _precision(cfg, info, recorded=Checkpointer.run_facts(latest).get("precision"))
    parts = _parts(cfg, info, manifest, precision=precision, checkpointer=checkpointer)
    # Tracking starts once everything is built, so a run that cannot start leaves no MLflow run behind;
    # from here on every outcome, a failed resume included, ends the MLflow run with a status.
    run_id = _continued_run_id(latest, run_dir)
    tracker = _start_tracking_on_every_rank(cfg, info, run_dir, run_id, precision=precision)
    parts = replace(parts, tracker=tracker, logged_through_step=tracker.last_logged_step() if run_id else 0)
    trainer = Trainer(cfg.train, parts, max_bad_sample_fraction=cfg.data.max_bad_sample_fraction,
                      checkpoint_every_steps=cfg.checkpoint.every_steps,
                      checkpoint_every_minutes=cfg.checkpoint.every_minutes)
    return _fit_and_report(trainer, info, run_dir, resume_from=latest,
                           log_model=cfg.tracking.enabled and cfg.tracking.log_model)


def configure_cuda(cfg: Config, device: Any) -> None:
    """cuDNN's autotuner on CUDA (``train.cudnn_benchmark``); nothing on CPU."""
    import torch

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark


def _precision(cfg: Config, info: Any, *, recorded: str | None) -> Precision:
    """``train.precision`` resolved for this device, before the backend exists (DeepSpeed casts the model at
    set-up); a resumed run keeps the precision its checkpoint records (docs/cpu.md)."""
    from dist_train.cpu import resolve_precision

    zero0 = cfg.backend.name == "deepspeed" and cfg.backend.zero_stage == 0  # refuses bf16 (backends/deepspeed.py)
    precision, warnings = resolve_precision(cfg.train.precision, info.device, recorded=recorded, bf16_ok=not zero0)
    for warning in warnings if info.is_main else ():
        log.warning("%s", warning)
    return precision


def _parts(cfg: Config, info: Any, manifest: dict[str, Any], *, precision: Precision, checkpointer: Any) -> Any:
    """Model, backend, schedule, noise scale and data of the run, as the Trainer's parts (no tracker yet)."""
    import torch

    from dist_train.backends import build_backend
    from dist_train.cpu import apply_memory_format
    from dist_train.data import loader
    from dist_train.distributed import data_seed, mixing_seed
    from dist_train.mixing import build_mixer
    from dist_train.models import build_model, compile_in_place, use_ghost_batch_norm
    from dist_train.optim import build_optimizer, set_hyperparams
    from dist_train.parts import TrainerParts
    from dist_train.schedule import Schedule, optimizer_family
    from dist_train.trainer import Normalise

    dataset_size = int(manifest["splits"]["train"]["num_samples"])
    num_classes = len(manifest["classes"])
    model = build_model(cfg.model.name, num_classes=num_classes,
                        in_channels=manifest["image"]["channels"], width=cfg.model.width,
                        zero_init_residual=cfg.model.zero_init_residual)
    if cfg.model.bn_batch_size:
        use_ghost_batch_norm(model, cfg.model.bn_batch_size)
    if cfg.model.sync_batch_norm:
        if info.device.type != "cuda":  # train.device=auto found no GPU: the config check could not know
            from dist_train.config import ConfigError
            from dist_train.config.check import SYNC_BN_CPU

            raise ConfigError(SYNC_BN_CPU)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    apply_memory_format(model, channels_last=cfg.model.channels_last, device=info.device)  # CPU-safe: docs/cpu.md
    if cfg.model.compile:
        compile_in_place(model)
    backend = build_backend(cfg.backend.name, info, micro_batch_size=cfg.train.micro_batch_size,
                            **cfg.backend.options(replace(cfg.train, precision=precision)))
    backend.setup(model, lambda m: build_optimizer(m, cfg.optim, shard=cfg.backend.shard_optimizer_state))
    ema = _weight_ema(cfg, backend.module, info)  # a copy of the module as set up: on its device, in its layout
    schedule = Schedule(cfg.schedule, base_lr=cfg.optim.lr, base_momentum=cfg.optim.momentum,
                        base_global_batch_size=cfg.train.global_batch_size, dataset_size=dataset_size,
                        optimizer_family=optimizer_family(cfg.optim.name),
                        batch_granularity=cfg.train.micro_batch_size * info.world_size, total_epochs=cfg.train.epochs)
    noise, controller = _noise_scale(cfg, backend, schedule, info)
    mean, std = loader.NORMALISATION.get(manifest["dataset"], ((0.5,) * manifest["image"]["channels"],) * 2)
    micro = cfg.train.micro_batch_size
    return TrainerParts(
        backend=backend, schedule=schedule, set_hyperparams=set_hyperparams,
        train_data=loader.TrainStream(manifest, cfg.data, micro_batch_size=micro, rank=info.rank,
                                      world_size=info.world_size, seed=data_seed(cfg.train.seed)),
        eval_loader_fn=lambda: loader.eval_batches(manifest, cfg.data, micro_batch_size=micro, rank=info.rank,
                                                   world_size=info.world_size),
        normalise=Normalise(mean, std, device=info.device, channels_last=cfg.model.channels_last), ema=ema,
        dataset_size=dataset_size, checkpointer=checkpointer, noise=noise, batch_controller=controller,
        batch_mixer=build_mixer(cfg.train, num_classes=num_classes, seed=mixing_seed(cfg.train.seed)))


def _fit_and_report(trainer: Any, info: Any, run_dir: Path, *, resume_from: Path | None,
                    log_model: bool) -> dict[str, Any]:
    """Resume from ``resume_from`` if given, and train; the main rank writes ``summary.json``, final metrics
    and (``log_model``) the model artifact; the MLflow run gets its status (FAILED if the resume fails)."""
    from dist_train.faults import Preempted

    status = "FAILED"
    try:
        if resume_from is not None:
            trainer.load_checkpoint(resume_from)
            log.warning("resumed from %s at step %d", resume_from, trainer.progress.step)
        summary = trainer.fit()
        summary["is_main"] = info.is_main
        if info.is_main:
            summary["mlflow_run_id"] = trainer.tracker.run_id
            if trainer.tracker.run_id:  # known late if the server was down at the start
                (run_dir / "mlflow_run_id").write_text(trainer.tracker.run_id)
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            if log_model:
                _log_model(trainer, run_dir)
            trainer.tracker.log_metrics({f"final/{k}": v for k, v in summary.items()
                                         if isinstance(v, (int, float)) and not isinstance(v, bool)},
                                        step=trainer.progress.step)
        status = "FINISHED"
    except Preempted:
        status = "KILLED"  # continued under the same run id when the job restarts
        raise
    finally:
        trainer.tracker.finish(status)
    return summary


def _weight_ema(cfg: Config, module: Any, info: Any) -> Any:
    """The EMA of ``module``'s weights (``train.ema_decay``), or None when it is off."""
    if not cfg.train.ema_decay:
        return None
    from dist_train.distributed import broadcast_tensors
    from dist_train.ema import WeightEMA

    return WeightEMA(module, decay=cfg.train.ema_decay, every_steps=cfg.train.ema_every_steps,
                     broadcast_buffers=partial(broadcast_tensors, info))


def _log_model(trainer: Any, run_dir: Path) -> None:
    """The final checkpoint's evaluated weights, exported to ``<run_dir>/model/model.pt`` and logged there; with
    an EMA of the weights, the EMA too, as ``model/model-ema.pt``."""
    from dist_train.backends.export import export_state_dict

    final = trainer.checkpointer.paths()[-1]  # fit() always checkpoints at the end
    exports = {"model.pt": "evaluated", **({"model-ema.pt": "ema"} if trainer.ema is not None else {})}
    for name, weights in exports.items():
        try:
            model_file = export_state_dict(final, run_dir / "model" / name, weights=weights)
        except Exception as err:  # the run itself succeeded: keep it FINISHED, say how to get the model
            log.warning("could not export the final model for MLflow (%s); the checkpoint %s is complete: run "
                        "`dist-train export --weights %s %s %s` by hand", err, final, weights, final, name)
            continue
        trainer.tracker.log_artifact(model_file, artifact_path="model")


def _noise_scale(cfg: Config, backend: Any, schedule: Any, info: Any) -> tuple[Any, Any]:
    """The gradient-noise-scale estimator and, in adaptive mode, the batch controller it drives."""
    adaptive = cfg.schedule.mode == "adaptive"
    if not (cfg.schedule.noise_scale.enabled or adaptive):
        return None, None
    from dist_train.backends import MeasuresNoiseScale
    from dist_train.config import ConfigError
    from dist_train.noise_scale import GradientNoiseScale
    from dist_train.schedule import BatchSizeController

    if not isinstance(backend, MeasuresNoiseScale):
        raise ConfigError(f"backend.name={cfg.backend.name} cannot measure the gradient noise scale; set "
                          f"schedule.noise_scale.enabled=false and use a schedule.mode other than adaptive")
    backend.enable_noise_scale(preconditioned=cfg.schedule.noise_scale.preconditioned)
    noise = GradientNoiseScale(ema_decay=cfg.schedule.noise_scale.ema_decay)
    if not adaptive:
        return noise, None
    controller = BatchSizeController(cfg.schedule.adaptive, start_global_batch_size=schedule.start_global_batch_size,
                                     max_global_batch_size=cfg.schedule.max_global_batch_size,
                                     batch_granularity=cfg.train.micro_batch_size * info.world_size)
    return noise, controller


def _continued_run_id(latest: Path | None, run_dir: Path) -> str | None:
    """The MLflow run a resumed run continues: the id its earlier start wrote beside the checkpoints."""
    run_id_file = run_dir / "mlflow_run_id"
    if latest is None or not run_id_file.is_file():
        return None
    return run_id_file.read_text().strip()


def _start_tracking_on_every_rank(cfg: Config, info: Any, run_dir: Path, run_id: str | None, *,
                                  precision: str) -> Any:
    """Collective: the main rank's tracker (the others' track nothing). A server that refuses the credentials
    stops every rank with the same error, not rank 0 alone while the others wait in the first collective."""
    from dist_train.distributed import broadcast_object
    from dist_train.tracking import NodeSystemMetrics, NullTracker, TrackingRefused

    refused, tracker = None, NullTracker()
    try:
        tracker = _start_tracking(cfg, info, run_dir, run_id, precision=precision)
    except TrackingRefused as err:
        refused = str(err)
    refused, main_run = broadcast_object(info, (refused, tracker.run_id))
    if refused is not None:
        raise TrackingRefused(refused)
    node = info.rank // info.local_world_size
    per_node = cfg.tracking.enabled and cfg.tracking.system_metrics and cfg.tracking.system_metrics_per_node
    if per_node and not info.is_main and info.local_rank == 0 and main_run is not None:
        # (main_run is None while the server is down at the start: those nodes then log nothing)
        return NodeSystemMetrics(cfg.tracking, run_id=main_run, node=node, continued=run_id is not None)
    return tracker


def _start_tracking(cfg: Config, info: Any, run_dir: Path, run_id: str | None, *, precision: str) -> Any:
    from dist_train.tracking import build_tracker

    tracker = build_tracker(cfg.tracking, is_main=info.is_main, run_id=run_id,
                            pending_file=run_dir / "mlflow-pending.jsonl", node=info.rank // info.local_world_size)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config_file = run_dir / "config.yaml"
        config_file.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        if tracker.run_id:
            (run_dir / "mlflow_run_id").write_text(tracker.run_id)
        if run_id is None:  # a continued run already has its params
            # train.precision may say auto: what it resolved to is a param of its own
            tracker.log_params({**flatten(cfg), "world_size": info.world_size, "precision": precision})
            tracker.log_artifact(config_file)
    return tracker
