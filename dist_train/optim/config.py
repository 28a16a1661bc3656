"""Optimizer config (no torch import: the config tree stays light).

docs/optimizers.md explains each optimizer and what ``momentum`` means for it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class LookaheadConfig:
    k: int = 5
    """Inner (fast) steps between slow-weight syncs."""
    alpha: float = 0.5
    """Slow-weight step size: phi <- phi + alpha (theta - phi)."""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"optim.lookahead.k={self.k} must be >= 1, e.g. 5")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"optim.lookahead.alpha={self.alpha} must be in (0, 1], e.g. 0.5")


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["sgd", "radam", "qhm", "adamw"] = "sgd"
    """Optimizer by name: ``sgd`` (torch.optim.SGD), ``radam`` and ``qhm`` (ours), ``adamw`` (torch.optim.AdamW)."""
    lr: float = 0.1
    """Base learning rate at the base global batch size (the schedule scales it)."""
    momentum: float = 0.9
    """The momentum coefficient: m for sgd, beta1 for radam/adamw, beta for qhm."""
    nesterov: bool = False
    """sgd only: Nesterov momentum."""
    beta2: float = 0.999
    """radam/adamw: second-moment decay."""
    eps: float = 1e-8
    """radam/adamw: denominator epsilon."""
    qhm_nu: float = 0.7
    """qhm: gamma in docs/theory.md section 5 (1 = heavy ball, beta = Nesterov)."""
    weight_decay: float = 5e-4
    """Weight decay; biases and normalisation weights are excluded unless ``weight_decay_norm_and_bias``."""
    weight_decay_norm_and_bias: bool = False
    """Decay every parameter with ``weight_decay``, biases and normalisation weights (all parameters of at most
    one dimension) included, as torchvision's reference training script does by default. Off, those get none,
    as in timm. On, the optimizer has one parameter group instead of two, so a checkpoint resumes only with
    the setting it was written with."""
    decoupled_weight_decay: bool = False
    """Decoupled (AdamW-style) weight decay instead of L2 added to the gradient. radam and qhm offer both;
    sgd is L2 only, adamw decoupled only."""
    lookahead: LookaheadConfig | None = None
    """Wrap the optimizer in Lookahead with these settings; null disables it."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr={self.lr} must be > 0")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"optim.momentum={self.momentum} must be in [0, 1)")
        if not 0.0 <= self.beta2 < 1.0:
            raise ValueError(f"optim.beta2={self.beta2} must be in [0, 1)")
        if self.eps <= 0:
            raise ValueError(f"optim.eps={self.eps} must be > 0, e.g. 1e-8")
        if not 0.0 <= self.qhm_nu <= 1.0:
            raise ValueError(f"optim.qhm_nu={self.qhm_nu} must be in [0, 1] (1 = heavy ball, momentum = Nesterov)")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay={self.weight_decay} must be >= 0")
        if self.weight_decay_norm_and_bias and self.weight_decay == 0:
            warnings.warn("optim.weight_decay_norm_and_bias=true does nothing with optim.weight_decay=0: no "
                          "parameter is decayed", stacklevel=3)
        self._check_name_specific()

    def _check_name_specific(self) -> None:
        from dist_train.optim_info import optim_info

        info = optim_info(self.name)
        if self.nesterov and not info.nesterov:
            raise ValueError(f"optim.nesterov applies to sgd only, not {self.name!r}; for qhm set "
                             "optim.qhm_nu equal to optim.momentum to get Nesterov")
        if self.nesterov and self.momentum == 0:
            raise ValueError("optim.nesterov=true needs optim.momentum > 0")
        if info.weight_decay == "l2" and self.decoupled_weight_decay:
            raise ValueError(f"optim.name={self.name!r} has L2 weight decay only; set "
                             "optim.decoupled_weight_decay=false, or use qhm (qhm_nu=1 is heavy ball)")
        if info.weight_decay == "decoupled" and not self.decoupled_weight_decay and self.weight_decay > 0:
            raise ValueError(f"optim.name={self.name!r} decouples weight decay by definition; set "
                             "optim.decoupled_weight_decay=true (or optim.weight_decay=0), or use radam for L2")
