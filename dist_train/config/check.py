"""The rules of a config that span sections, checked once before any process group starts.

Each section checks its own fields when it is built (``__post_init__``). What one section allows
depending on another (fp16 and the backend, the momentum rule and the optimizer, the batches the
schedule will ask for and the world size) is checked here, in one function that the launchers call
before anything is started or queued, and ``train`` calls before ``init_process_group``. A broken rule
is a ``ConfigError`` whose message names the fields and the fix; the command line prints it as one
``dist-train: config error: ...`` line. The components keep their own checks as a second line of
defence for callers that build them directly.
"""

from __future__ import annotations

import warnings

from dist_train.config.loader import ConfigError
from dist_train.config.schema import Config


def check(cfg: Config, world_size: int | None = None) -> None:
    """Raise ``ConfigError`` for the first cross-section rule ``cfg`` breaks.

    ``world_size`` adds the rules that need it: every global batch the schedule will use (the start, the
    momentum rule's, each milestone's, the cap, the adaptive ladder; the cosine twin rounds its own) must
    divide into micro-batches over that many ranks. Without it only the rules that hold at any world size are
    checked."""
    _check_precision(cfg)
    _check_compile(cfg)
    _check_sync_batch_norm(cfg)
    _check_ghost_batch_norm(cfg)
    _check_optimizer_and_schedule(cfg)
    _check_preconditioned_noise_scale(cfg)
    _check_ema(cfg)
    if world_size is not None:
        _check_batches(cfg, world_size)


def _check_precision(cfg: Config) -> None:
    precision, backend = cfg.train.precision, cfg.backend
    if precision == "fp16" and backend.name != "deepspeed":
        raise ConfigError(f"train.precision=fp16 needs loss scaling, which only backend.name=deepspeed provides; "
                          f"with backend.name={backend.name} use train.precision=bf16 or auto")
    if precision == "fp16" and cfg.train.device == "cpu":
        raise ConfigError("train.precision=fp16 needs a CUDA GPU (DeepSpeed refuses fp16 on CPU); use "
                          "train.precision=bf16, fp32 or auto on CPU")
    if backend.name == "deepspeed" and backend.zero_stage == 0 and precision == "bf16":
        from dist_train.backends.deepspeed import ZERO0_BF16

        raise ConfigError(ZERO0_BF16)
    if (backend.name == "deepspeed" and backend.zero_stage == 0 and cfg.optim.lookahead is not None
            and precision in ("bf16", "fp16")):
        raise ConfigError(f"optim.lookahead with backend.zero_stage=0 and train.precision={precision}: DeepSpeed "
                          f"keeps the fp32 weights where Lookahead's slow weights cannot be evaluated; use "
                          f"backend.zero_stage=1 or 2, or train.precision=fp32")


def _check_compile(cfg: Config) -> None:
    if cfg.model.compile and cfg.backend.name == "deepspeed":
        raise ConfigError("model.compile=true with backend.name=deepspeed: not built yet (DeepSpeed's ZeRO hooks on "
                          "a compiled module are untested here); use backend.name=ddp, or model.compile=false")


SYNC_BN_CPU = ("model.sync_batch_norm=true needs CUDA GPUs: torch's SyncBatchNorm raises on CPU inputs; set "
               "model.sync_batch_norm=false on CPU (each rank then normalises over its own micro-batch)")


def _check_sync_batch_norm(cfg: Config) -> None:
    if not cfg.model.sync_batch_norm:
        return
    if cfg.backend.name != "ddp":
        raise ConfigError(f"model.sync_batch_norm=true is built for backend.name=ddp; with backend.name="
                          f"{cfg.backend.name} set model.sync_batch_norm=false")
    if cfg.train.device == "cpu":
        raise ConfigError(SYNC_BN_CPU)


def _check_ghost_batch_norm(cfg: Config) -> None:
    ghost, micro = cfg.model.bn_batch_size, cfg.train.micro_batch_size
    if ghost > micro:
        raise ConfigError(f"model.bn_batch_size={ghost} is larger than train.micro_batch_size={micro}: a ghost batch "
                          f"is a chunk of one micro-batch; set model.bn_batch_size <= {micro}, or 0")
    if ghost and micro % ghost:
        raise ConfigError(f"model.bn_batch_size={ghost} does not divide train.micro_batch_size={micro}; use a "
                          f"divisor (e.g. {max(d for d in range(1, ghost + 1) if micro % d == 0)})")


def _check_optimizer_and_schedule(cfg: Config) -> None:
    from dist_train.schedule import optimizer_family
    from dist_train.schedule.config import COSINE_MODES

    if cfg.schedule.momentum_rule_momentum is not None and optimizer_family(cfg.optim.name) != "sgd":
        raise ConfigError(f"schedule.momentum_rule_momentum applies to momentum SGD, not optim.name="
                          f"{cfg.optim.name}: with normalised momentum (radam, qhm, adamw) beta does not change "
                          f"the noise scale alpha N / B, so there is no batch to trade for it; remove "
                          f"schedule.momentum_rule_momentum, or use optim.name=sgd")
    mode, warmup = cfg.schedule.mode, cfg.schedule.warmup_epochs
    if mode in COSINE_MODES and not cfg.train.epochs > warmup:
        raise ConfigError(f"schedule.mode={mode} decays along a cosine over train.epochs, which must be > "
                          f"schedule.warmup_epochs={warmup:g}, got train.epochs={cfg.train.epochs:g}; set train.epochs "
                          f"(train.max_steps alone gives the cosine no length)")


def _check_preconditioned_noise_scale(cfg: Config) -> None:
    if not cfg.schedule.noise_scale.preconditioned:
        return
    if not cfg.schedule.noise_scale.enabled:
        raise ConfigError("schedule.noise_scale.preconditioned=true but the noise scale is off; set "
                          "schedule.noise_scale.enabled=true, or remove preconditioned")
    if cfg.optim.name not in ("radam", "adamw"):
        raise ConfigError(f"schedule.noise_scale.preconditioned needs an optimizer with second moments (radam, "
                          f"adamw); optim.name={cfg.optim.name} has none: its step is the raw gradient's, so "
                          f"remove preconditioned")
    if cfg.backend.name != "ddp" or cfg.backend.shard_optimizer_state:
        raise ConfigError("schedule.noise_scale.preconditioned is built for backend.name=ddp with replicated "
                          "optimizer state only (with sharded state each rank holds 1/world of P: not built "
                          "yet); set backend.shard_optimizer_state=false or backend.name=ddp, or remove "
                          "preconditioned")


def _check_ema(cfg: Config) -> None:
    if cfg.train.ema_decay and cfg.backend.name != "ddp":
        raise ConfigError(f"train.ema_decay with backend.name={cfg.backend.name}: not built yet (DeepSpeed's module "
                          f"holds bf16 weights under bf16, whose average would round away each (1 - decay) "
                          f"update, and the fp32 master weights live in ZeRO's partitions); use backend.name=ddp, "
                          f"or train.ema_decay=0")


def _check_batches(cfg: Config, world_size: int) -> None:
    from dist_train.config import accumulation_steps
    from dist_train.schedule import BatchSizeController, Schedule, optimizer_family

    if world_size < 1:
        raise ConfigError(f"world size {world_size} must be >= 1")
    train, schedule_cfg = cfg.train, cfg.schedule
    accumulation_steps(train.global_batch_size, micro_batch_size=train.micro_batch_size, world_size=world_size)
    granularity = train.micro_batch_size * world_size
    # The schedule's batches depend on the config and the world size only: the dataset size moves the
    # milestones in samples, not the batches, so any size will do here.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a rounded milestone is warned about once, at run time
            schedule = Schedule(schedule_cfg, base_lr=cfg.optim.lr, base_momentum=cfg.optim.momentum,
                                base_global_batch_size=train.global_batch_size, dataset_size=1_281_167,
                                optimizer_family=optimizer_family(cfg.optim.name), batch_granularity=granularity,
                                total_epochs=train.epochs)
            if schedule_cfg.mode == "adaptive":
                BatchSizeController(schedule_cfg.adaptive, start_global_batch_size=schedule.start_global_batch_size,
                                    max_global_batch_size=schedule_cfg.max_global_batch_size,
                                    batch_granularity=granularity)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(f"at world size {world_size} (train.micro_batch_size x world size = {granularity}): "
                          f"{err}") from None
