"""The config tree. Defaults live here; YAML files in configs/ hold only differences."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dist_train.optim.config import OptimConfig
from dist_train.schedule.config import ScheduleConfig


@dataclass(frozen=True)
class DataConfig:
    shards: str = "data/shards/fashion_mnist"
    """Directory holding ``manifest.json`` and the train/test tar shards written by ``dist-train make-shards``."""
    shard_url: str = ""
    """Where the shard files are read from when they are not beside the manifest: a template with ``{name}``,
    e.g. ``https://host/imagenet/{name}`` or ``pipe:aws s3 cp s3://bucket/imagenet/{name} -``."""
    allow_pipe_from_remote_manifest: bool = False
    """Allow a ``pipe:`` shard_url to fetch the manifest itself (when ``shards`` holds none). Off: the manifest of a
    pipe: command must be local, as the command runs in a shell with names taken from it."""
    num_workers: int = 1
    """DataLoader worker processes per rank (decoding and augmentation). Any number works with any number of
    shards: ranks and workers are dealt ranges of samples, not whole shards."""
    shuffle_buffer: int = 2000
    """Training samples permuted together: each epoch's order (shards in a fresh permutation) is shuffled
    within windows of this many samples, whose boundaries move every epoch. A worker holds up to one
    window of encoded samples and reads up to two windows beyond its share of an epoch. 0 reads each shard
    in its stored (already shuffled) order."""
    resample: bool = False
    """Draw each epoch's shards with replacement (webdataset's resampling) instead of a permutation, so an
    "epoch" no longer sees every sample exactly once. Off by default: true epochs."""
    image_size: int = 0
    """Training crop size in pixels; 0 keeps the stored size (Fashion-MNIST's 28)."""
    eval_image_size: int = 0
    """JPEG shards: the evaluation's centre crop in pixels; 0 takes ``image_size`` (and 224 when that is 0).
    torchvision's new ResNet-50 recipe trains at 176 and evaluates at 224 (FixRes: test crops larger than the
    training ones see objects at the size training saw them)."""
    eval_resize: int = 0
    """JPEG shards: the shorter side the evaluation image is resized to before its centre crop; 0 takes
    ``eval_image_size`` x 256 / 224 (256 for 224, the classic ratio). torchvision's new recipe uses 232."""
    auto_augment: Literal["none", "randaugment", "trivialaugment"] = "none"
    """JPEG shards, training only: a random policy of image ops after the crop and flip, on the uint8 image.
    ``randaugment`` is torchvision's ``RandAugment(randaugment_num_ops, randaugment_magnitude)``,
    ``trivialaugment`` its ``TrivialAugmentWide()``, both with bilinear interpolation as in torchvision's
    reference recipes. Their random draws come from the sample's own generator, so resume stays exact. Cost per
    image: docs/data.md."""
    randaugment_num_ops: int = 2
    """``auto_augment=randaugment`` only: ops applied to each image in turn (torchvision's default, 2)."""
    randaugment_magnitude: int = 9
    """``auto_augment=randaugment`` only: the strength of every op, 0 to 30 (torchvision's 31 bins; its
    recipes use 9)."""
    random_erasing: float = 0.0
    """JPEG shards, training only: the probability of erasing one random rectangle of each image (torchvision's
    ``RandomErasing(p)``: 2-33% of the area, aspect 0.3-3.3), after ``auto_augment``. The rectangle takes the
    dataset's mean colour in whole grey levels, which normalises to 0 within 0.01: torchvision's recipe erases
    with 0 after normalisation (docs/data.md). 0 turns it off; torchvision's recipes use 0.1 to 0.25."""
    repeated_augmentation: int = 1
    """Repeated augmentation (Hoffer et al. 2019, DeiT; torchvision's ``--ra-sampler --ra-reps``), JPEG shards
    only: each epoch takes the first ceil(N / k) samples of its order and draws each of them k times, with other
    crops and augmentations, the copies in the same step on consecutive ranks. An epoch stays N samples drawn,
    so ``train.epochs`` and the schedule keep their meaning and cost, and an epoch shows about N / k distinct
    images (docs/data.md). 1 turns it off; DeiT uses 3."""
    max_bad_sample_fraction: float = 0.01
    """Stop the run when more than this fraction of samples fail to decode."""

    def __post_init__(self) -> None:
        if self.shard_url and "{name}" not in self.shard_url:
            raise ValueError(f"data.shard_url={self.shard_url!r} needs a {{name}} placeholder for the shard file name, "
                             f"e.g. https://host/imagenet/{{name}}")
        if self.num_workers < 0:
            raise ValueError("data.num_workers must be >= 0")
        if self.shuffle_buffer < 0:
            raise ValueError("data.shuffle_buffer must be >= 0 (0 reads shards in their stored order)")
        if not 0.0 <= self.max_bad_sample_fraction < 1.0:
            raise ValueError("data.max_bad_sample_fraction must be in [0, 1)")
        self._check_augmentation()
        if self.eval_image_size < 0 or self.eval_resize < 0:
            raise ValueError("data.eval_image_size and data.eval_resize must be >= 0 (0 derives them from "
                             "data.image_size)")
        crop = self.eval_image_size or self.image_size or 224
        if self.eval_resize and self.eval_resize < crop:
            raise ValueError(f"data.eval_resize={self.eval_resize} is smaller than the evaluation crop {crop}: the "
                             f"centre crop must fit in the resized image; set data.eval_resize >= {crop}, or 0")

    def _check_augmentation(self) -> None:
        policies = ("none", "randaugment", "trivialaugment")  # the Literal's: the YAML loader checks those
        if self.auto_augment not in policies:
            raise ValueError(f"data.auto_augment={self.auto_augment!r} is not one of {list(policies)}")
        if self.auto_augment != "randaugment" and (self.randaugment_num_ops, self.randaugment_magnitude) != (2, 9):
            raise ValueError(f"data.randaugment_num_ops and data.randaugment_magnitude apply to "
                             f"data.auto_augment=randaugment only, and it is {self.auto_augment!r}; set "
                             f"data.auto_augment=randaugment or remove them")
        if self.randaugment_num_ops < 1:
            raise ValueError(f"data.randaugment_num_ops={self.randaugment_num_ops} must be >= 1 (2 is usual); for "
                             f"no policy set data.auto_augment=none")
        if not 0 <= self.randaugment_magnitude <= 30:
            raise ValueError(f"data.randaugment_magnitude={self.randaugment_magnitude} must be in 0..30 "
                             f"(torchvision's 31 magnitude bins), e.g. 9")
        if not 0.0 <= self.random_erasing <= 1.0:
            raise ValueError(f"data.random_erasing={self.random_erasing} is a probability: use a value in [0, 1], "
                             f"e.g. 0.25 (0 turns it off)")
        if self.repeated_augmentation < 1:
            raise ValueError(f"data.repeated_augmentation={self.repeated_augmentation} must be >= 1: the number of "
                             f"times each drawn sample appears in an epoch (1 turns it off, DeiT uses 3)")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "cifar_resnet20"
    """Model by name: ``resnet18``, ``resnet50`` (torchvision) or ``cifar_resnet{8,20,32,56}`` for 28-32 px inputs."""
    channels_last: bool = False
    """Use the channels_last memory format: faster on GPUs with tensor cores, and on an AVX2 CPU measured 4-27%
    faster for the demo model and torchvision ResNets (slower for a width-4 toy; docs/performance.md). On CPU
    the few convolutions that oneDNN mishandles in it stay in the default layout (docs/cpu.md)."""
    width: int = 16
    """Channels in the first stage of a CIFAR-style ResNet (ignored by torchvision models)."""
    sync_batch_norm: bool = False
    """DDP on GPUs only: BatchNorm statistics over the whole global micro-batch, all ranks together
    (``torch.nn.SyncBatchNorm.convert_sync_batchnorm``), instead of over each rank's micro-batch. One
    all-reduce per BN layer per forward. torch's SyncBatchNorm raises on CPU inputs, so CPU runs refuse it."""
    bn_batch_size: int = 0
    """Ghost batch norm: BatchNorm training statistics over chunks of this many samples of each micro-batch
    (e.g. 32, Goyal et al.'s images per BN), whatever the micro-batch (``models.GhostBatchNorm2d``). 0 uses
    the whole micro-batch. Must divide ``train.micro_batch_size``."""
    zero_init_residual: bool = False
    """Start the last BatchNorm weight (gamma) of every residual block at 0, so that each block begins as
    relu(shortcut(x)) and a deep ResNet starts as a shallow one (Goyal et al. 2017). torchvision's own
    ``zero_init_residual`` for its ResNets, the same rule for the CIFAR ones. A fresh model only: a resumed
    run loads its weights."""
    compile: bool = False
    """``torch.compile`` the model (inductor; on CPU it needs g++ and Python's headers). DDP only for now.
    Checkpoints keep the plain parameter names. The first steps pay the compile (docs/performance.md)."""

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ValueError("model.width must be >= 1")
        if self.bn_batch_size < 0:
            raise ValueError(f"model.bn_batch_size={self.bn_batch_size} must be >= 0 (0: BN over the whole "
                             "micro-batch)")
        if self.bn_batch_size and self.sync_batch_norm:
            raise ValueError("model.bn_batch_size (BN over chunks of a rank's micro-batch) and "
                             "model.sync_batch_norm (BN over all ranks' micro-batches) contradict each other; "
                             "choose one")


@dataclass(frozen=True)
class TrainConfig:
    global_batch_size: int = 256
    """Samples per optimizer step across all ranks: micro_batch_size x world size x accumulation steps."""
    micro_batch_size: int = 128
    """Samples per forward/backward on one rank. The global batch must be a multiple of micro x world size."""
    epochs: float = 5.0
    """Training length in epochs of the training set (samples seen / dataset size)."""
    max_steps: int = 0
    """Stop after this many optimizer steps; 0 means no limit beyond ``epochs``."""
    eval_every_epochs: float = 1.0
    """Evaluate on the test shards every this many epochs, and always at the end; 0 evaluates only at the end."""
    log_every_steps: int = 10
    """Send per-step metrics to the tracker every this many optimizer steps."""
    seed: int = 0
    """Seeds every RNG (python, numpy, torch, data order). Ranks derive their own streams from it."""
    run_dir: str = "runs/default"
    """This run's outputs: the resolved config, ``summary.json`` and, unless set elsewhere, checkpoints."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto`` picks CUDA when available (one GPU per local rank), else CPU."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    """Numerics of the forward pass: DDP runs it under bf16 autocast (fp32 weights and optimizer); DeepSpeed
    trains in bf16, or fp16 with loss scaling on GPUs, keeping fp32 master weights. ``auto`` is bf16 on CUDA
    GPUs and CPUs with native bf16, fp32 elsewhere: emulated bf16 costs 8-15x on a CPU without it
    (docs/cpu.md). A resumed run keeps the precision its checkpoint records."""
    nonfinite_loss: Literal["stop", "skip"] = "stop"
    """On a NaN/Inf loss: ``stop`` with a clear error (the last good checkpoint stays), or ``skip`` the update
    and count it (``train/skipped_steps``)."""
    grad_clip_norm: float = 0.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the weights and BatchNorm statistics, e <- d e + (1 - d) theta
    after every ``ema_every_steps``-th optimizer step (torch's ``AveragedModel``, as torchvision's recipe), and
    evaluate it beside the model (``eval/ema_*``); ``dist-train export --weights ema`` writes it. d is per
    update, in (0, 1), e.g. 0.9998: the average spans about ema_every_steps x B / (1 - d) samples. 0 turns it
    off. DDP only (docs/optimizers.md)."""
    ema_every_steps: int = 1
    """Update the EMA after every this many optimizer steps (torchvision's ``--model-ema-steps``, 32 there):
    fewer updates cost less, and ``ema_decay`` then applies per update."""
    label_smoothing: float = 0.0
    """Label smoothing epsilon of the training loss, through torch's ``cross_entropy(label_smoothing=)``: the
    target puts 1 - epsilon on the label and spreads epsilon evenly over all classes. The evaluation loss stays
    plain cross-entropy, so with epsilon > 0 ``train/loss`` (which cannot fall to 0) and ``eval/loss`` measure
    different things. 0 turns it off; 0.1 is the usual ImageNet value."""
    mixup_alpha: float = 0.0
    """MixUp (Zhang et al. 2018) of the training micro-batches: each image becomes lam x + (1 - lam) x' with its
    neighbour x' in the micro-batch, and its target lam y + (1 - lam) y', where lam ~ Beta(alpha, alpha) is drawn
    once per micro-batch. 0 turns it off; 0.2 is torchvision's ImageNet recipe (docs/study.md)."""
    cutmix_alpha: float = 0.0
    """CutMix (Yun et al. 2019) of the training micro-batches: a box of about 1 - lam of the image, lam ~
    Beta(alpha, alpha), is pasted from the neighbour, and the target weighs the two labels by area. 0 turns it
    off; 1.0 is torchvision's ImageNet recipe. With ``mixup_alpha`` too, each micro-batch gets one of the two."""
    mix_switch_prob: float = 0.5
    """With both ``mixup_alpha`` and ``cutmix_alpha`` > 0: the probability that a micro-batch gets CutMix rather
    than MixUp (timm's ``switch_prob``; 0.5 is torchvision's ``RandomChoice([MixUp, CutMix])``)."""
    progress_bar: bool = True
    """Show a progress bar on rank 0."""
    dist_timeout_s: int = 1800
    """Timeout of collectives and of the process-group set-up; a rank that hangs longer fails the job, so
    ``torchrun --max-restarts`` can restart it from the last checkpoint."""
    threads_per_rank: int = 0
    """torch intra-op threads per rank; 0 divides the machine's cores among the local ranks."""
    cudnn_benchmark: bool = True
    """On CUDA, let cuDNN time its convolution algorithms for each input shape and keep the fastest
    (``torch.backends.cudnn.benchmark``). The micro-batch is fixed, so it times once per shape; turn it off
    for bit-for-bit repeatable GPU runs. No effect on CPU."""

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1 or self.global_batch_size < 1:
            raise ValueError("train.global_batch_size and train.micro_batch_size must be >= 1")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                f"train.micro_batch_size={self.micro_batch_size}; pick a global batch that is "
                f"micro_batch_size x world size x accumulation steps"
            )
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ValueError("set train.epochs > 0 or train.max_steps > 0, or the run has no length")
        if self.log_every_steps < 1:
            raise ValueError("train.log_every_steps must be >= 1")
        self._check_ema()
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"train.label_smoothing={self.label_smoothing} must be in [0, 1), e.g. 0.1 (0 turns "
                             f"it off)")
        self._check_mixing()

    def _check_mixing(self) -> None:
        for name in ("mixup_alpha", "cutmix_alpha"):
            alpha = getattr(self, name)
            if not 0.0 <= alpha < math.inf:  # also refuses NaN
                raise ValueError(f"train.{name}={alpha} must be a finite number >= 0 (0 turns it off)")
        mixup, cutmix = self.mixup_alpha > 0, self.cutmix_alpha > 0
        if mixup and cutmix and not 0.0 < self.mix_switch_prob < 1.0:
            alone, off = ("CutMix", "mixup_alpha") if self.mix_switch_prob >= 1.0 else ("MixUp", "cutmix_alpha")
            raise ValueError(f"train.mix_switch_prob={self.mix_switch_prob} must be in (0, 1) when both MixUp and "
                             f"CutMix are on; for {alone} alone set train.{off}=0 and remove mix_switch_prob")
        if not (mixup and cutmix) and self.mix_switch_prob != 0.5:
            raise ValueError(f"train.mix_switch_prob={self.mix_switch_prob} chooses between MixUp and CutMix, but "
                             f"not both train.mixup_alpha and train.cutmix_alpha are > 0; remove it, or turn both on")
        if (mixup or cutmix) and self.micro_batch_size < 2:
            raise ValueError("train.mixup_alpha and train.cutmix_alpha mix each sample with another of its "
                             "micro-batch, so they need train.micro_batch_size >= 2")


    def _check_ema(self) -> None:
        if not (self.ema_decay == 0.0 or 0.0 < self.ema_decay < 1.0):  # also refuses NaN
            raise ValueError(f"train.ema_decay={self.ema_decay} must be in (0, 1), the weight each update keeps "
                             f"of the average (e.g. 0.9998), or 0 to turn the EMA off")
        if self.ema_every_steps < 1:
            raise ValueError(f"train.ema_every_steps={self.ema_every_steps} must be >= 1 (1 updates the EMA after "
                             f"every optimizer step)")
        if self.ema_every_steps != 1 and self.ema_decay == 0.0:
            warnings.warn(f"train.ema_every_steps={self.ema_every_steps} does nothing with train.ema_decay=0: the "
                          f"EMA of the weights is off", stacklevel=2)


@dataclass(frozen=True)
class BackendConfig:
    name: Literal["ddp", "deepspeed"] = "ddp"
    """Distributed backend: PyTorch DDP (NCCL on GPU, gloo on CPU) or DeepSpeed ZeRO."""
    shard_optimizer_state: bool = False
    """DDP only: shard optimizer state across ranks (ZeRO-1); each rank keeps only its share."""
    sharded_reduction: Literal["auto", "reduce_scatter", "all_reduce"] = "auto"
    """DDP with ``shard_optimizer_state`` only: how gradients reach the shards. ``reduce_scatter`` moves DDP's
    bytes (reduce-scatter, then all-gather of the updated shard); ``all_reduce`` lets DDP all-reduce, overlapped
    with the backward, and moves 1.5x. ``auto``: reduce_scatter on GPUs, all_reduce on gloo, whose
    reduce-scatter is slower than its all-reduce (docs/performance.md)."""
    zero_stage: int = 1
    """DeepSpeed only: ZeRO stage. 0 replicates everything like DDP, 1 shards the optimizer state (and
    Lookahead's slow weights), 2 also shards the gradients."""
    deepspeed_config: str = ""
    """DeepSpeed only: a JSON file whose keys override the DeepSpeed config generated from this config
    (e.g. ``{"zero_optimization": {"reduce_bucket_size": 5e7}}``). Keys that other settings own (batch
    sizes, precision, clipping, optimizer, scheduler, ZeRO stage) are refused with the setting to use."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"backend.zero_stage={self.zero_stage} is not supported; use 0, 1 or 2")
        if self.name != "deepspeed" and self.deepspeed_config:
            raise ValueError(f"backend.deepspeed_config is set but backend.name={self.name!r}; set "
                             "backend.name=deepspeed or remove it")
        if self.sharded_reduction != "auto" and not (self.name == "ddp" and self.shard_optimizer_state):
            raise ValueError(f"backend.sharded_reduction={self.sharded_reduction!r} applies to backend.name=ddp "
                             "with backend.shard_optimizer_state=true only; remove it or turn sharding on")
        if self.name == "deepspeed" and self.shard_optimizer_state:
            raise ValueError("backend.shard_optimizer_state is for DDP; with DeepSpeed set backend.zero_stage=1 "
                             "(or 2) instead")
        if self.deepspeed_config and not Path(self.deepspeed_config).is_file():
            raise ValueError(f"backend.deepspeed_config={self.deepspeed_config!r} is not a file")

    def options(self, train: TrainConfig) -> dict[str, Any]:
        """Keyword options of ``build_backend`` for this backend; an error for settings it cannot honour."""
        if self.name == "deepspeed":
            return {"zero_stage": self.zero_stage, "precision": train.precision,
                    "grad_clip_norm": train.grad_clip_norm, "config_file": self.deepspeed_config}
        if train.precision == "fp16":
            raise ValueError("train.precision=fp16 needs loss scaling, which only backend.name=deepspeed "
                             "provides; use bf16 or the deepspeed backend")
        return {"precision": train.precision, "sharded_reduction": self.sharded_reduction}


@dataclass(frozen=True)
class TrackingConfig:
    tracking_uri: str = ""
    """MLflow tracking URI. Empty: ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///mlflow.db``."""
    experiment: str = "dist_train"
    """MLflow experiment name."""
    run_name: str = ""
    """MLflow run name; empty lets MLflow choose one."""
    enabled: bool = True
    """Track the run in MLflow at all."""
    log_model: bool = True
    """At the end, log the final checkpoint's evaluated weights (Lookahead's slow ones where used) as the
    artifact ``model/model.pt``, a plain state_dict as ``dist-train export`` writes it; with ``train.ema_decay``,
    the EMA of the weights too, as ``model/model-ema.pt``."""
    system_metrics: bool = True
    """Log CPU, memory, disk and network use (and GPU use where MLflow finds nvidia-ml-py) as ``system/*``
    metrics of the run, through MLflow's own monitor, from the main rank."""
    system_metrics_interval_s: float = 10.0
    """Seconds between two samples of the system metrics."""
    system_metrics_per_node: bool = False
    """Log the system metrics of every node, not only the main rank's: local rank 0 of node k logs
    ``system/node<k>/*`` into the same run, and tags the run ``dist_train.node<k>`` with its host name."""

    def __post_init__(self) -> None:
        from urllib.parse import urlsplit

        if self.system_metrics_interval_s <= 0:
            raise ValueError("tracking.system_metrics_interval_s must be > 0")
        if urlsplit(self.tracking_uri).password is not None:
            raise ValueError("tracking.tracking_uri holds a password, and the config is logged as the run's params "
                             "and written to config.yaml: put the user and password in MLFLOW_TRACKING_USERNAME "
                             "and MLFLOW_TRACKING_PASSWORD instead (docs/launch.md)")


@dataclass(frozen=True)
class CheckpointConfig:
    dir: str = ""
    """Directory for checkpoints; empty means ``<train.run_dir>/checkpoints``."""
    every_steps: int = 0
    """Save every this many optimizer steps, and always at the end; 0 saves only at the end."""
    every_minutes: float = 0.0
    """Also save when this many minutes have passed since the last checkpoint (steps grow longer as the batch
    grows; minutes bound the work a crash loses). Rank 0's clock decides; 0 turns it off."""
    resume: bool = True
    """Resume from the latest checkpoint in ``dir`` when one exists."""
    keep_last: int = 3
    """Keep this many most recent checkpoints."""
    trust_pickle: bool = False
    """Let a resume unpickle the backend's files in full (DeepSpeed's; dist_train's own are tensors only). Off,
    every file loads weights-only, and one that holds other Python objects is refused: unpickling it could run
    code. Turn on only for a checkpoint from a source you trust, e.g. one a newer DeepSpeed wrote."""

    def __post_init__(self) -> None:
        if self.every_steps < 0 or self.every_minutes < 0 or self.keep_last < 1:
            raise ValueError("checkpoint.every_steps and checkpoint.every_minutes must be >= 0 and "
                             "checkpoint.keep_last >= 1")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
