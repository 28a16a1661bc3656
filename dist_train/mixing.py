"""MixUp and CutMix of the training micro-batch on the device, with draws keyed by (seed, step, rank, micro-batch).

torchvision's v2 ``MixUp`` and ``CutMix`` do the mixing and its checks: each sample is blended with (MixUp),
or has a box pasted from (CutMix), the sample before it in the micro-batch (``roll(1, 0)``; the training
stream is shuffled, so neighbours are random pairs), and the labels become class probabilities
``lam * one_hot(y) + (1 - lam) * one_hot(y_prev)``, lam being CutMix's pasted area's complement.

Why not upstream's sampling: it draws lam from ``torch.distributions.Beta`` and CutMix's box centre with
``torch.randint``, both from torch's global generator. Every rank seeds that generator alike
(``seed_everything``), so every rank would draw the same lam; and each draw would shift whatever draws
next from it (dropout, other augmentations), so turning mixing on would change the rest of the run, and
the mixing of step s would depend on all that came before it. As for the data (``dist_train/data/loader.py``),
the draws here come from a generator of their own, a pure function of (seed, step, rank, micro-batch):
exact on resume with no state to checkpoint, and the global generators are left untouched. Only
``make_params`` (the sampling) is replaced; the mixing and the label arithmetic stay upstream's.

Cost per micro-batch of ``m`` samples and ``K`` classes: one copy of the images (the rolled partner),
an (m, K) float32 target (256 x 1000 x 4 bytes = 1 MB), and a NumPy generator made on the host (tens of
microseconds). Nothing is read back from the device.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torchvision.transforms.v2 import CutMix, MixUp

from dist_train.config import TrainConfig


class _KeyedMixUp(MixUp):
    """torchvision's MixUp with lam drawn from ``rng``, the generator of the current call."""

    rng: np.random.Generator

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"lam": float(self.rng.beta(self.alpha, self.alpha))}


class _KeyedCutMix(CutMix):
    """torchvision's CutMix with lam and the box drawn from ``rng``: upstream's box rule, our draws."""

    rng: np.random.Generator

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        lam = float(self.rng.beta(self.alpha, self.alpha))
        height, width = flat_inputs[0].shape[-2:]
        centre_x, centre_y = int(self.rng.integers(width)), int(self.rng.integers(height))
        # A box of about (1 - lam) of the area around the centre, cut at the borders; the label weight then
        # follows the area actually pasted.
        half = 0.5 * math.sqrt(1.0 - lam)
        half_w, half_h = int(half * width), int(half * height)
        x1, y1 = max(centre_x - half_w, 0), max(centre_y - half_h, 0)
        x2, y2 = min(centre_x + half_w, width), min(centre_y + half_h, height)
        return {"box": (x1, y1, x2, y2), "lam_adjusted": 1.0 - (x2 - x1) * (y2 - y1) / (width * height)}


class MixUpCutMix:
    """Mixes a device micro-batch with MixUp or CutMix (one of the two per micro-batch when both are on).

    ``mixer(images, labels, step=, rank=, micro_batch=)`` returns the mixed images and the targets as
    class probabilities, shape (micro, ``num_classes``), each row summing to 1. The same key gives the
    same mix; every micro-batch of every rank and step gets its own draws."""

    def __init__(self, *, mixup_alpha: float, cutmix_alpha: float, switch_prob: float, num_classes: int, seed: int):
        assert mixup_alpha > 0 or cutmix_alpha > 0, "nothing to mix: build no mixer"
        assert 0.0 <= switch_prob <= 1.0 and num_classes >= 1
        self.mixup = _KeyedMixUp(alpha=mixup_alpha, num_classes=num_classes) if mixup_alpha > 0 else None
        self.cutmix = _KeyedCutMix(alpha=cutmix_alpha, num_classes=num_classes) if cutmix_alpha > 0 else None
        self.switch_prob = switch_prob
        self.seed = seed % 2**63  # SeedSequence entropy must be >= 0

    def generator(self, *, step: int, rank: int, micro_batch: int) -> np.random.Generator:
        """The generator of one micro-batch's draws."""
        return np.random.default_rng([self.seed, step, rank, micro_batch])

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, *, step: int, rank: int,
                 micro_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = self.generator(step=step, rank=rank, micro_batch=micro_batch)
        transform: _KeyedMixUp | _KeyedCutMix
        if self.mixup is not None and self.cutmix is not None:
            # The choice first, then lam (and the box), all from the same generator.
            transform = self.cutmix if rng.random() < self.switch_prob else self.mixup
        else:
            transform = self.mixup or self.cutmix  # type: ignore[assignment]
        transform.rng = rng
        mixed, targets = transform(images, labels)
        return mixed, targets


def build_mixer(cfg: TrainConfig, *, num_classes: int, seed: int) -> MixUpCutMix | None:
    """The run's mixer from ``train.mixup_alpha``, ``cutmix_alpha`` and ``mix_switch_prob``; None when both are off."""
    if cfg.mixup_alpha <= 0 and cfg.cutmix_alpha <= 0:
        return None
    return MixUpCutMix(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, switch_prob=cfg.mix_switch_prob,
                       num_classes=num_classes, seed=seed)
