"""Training augmentations after the crop and flip, on the uint8 CHW image: torchvision's own ops, seeded per sample.

``auto_augment`` is torchvision's ``RandAugment`` or ``TrivialAugmentWide`` (``torchvision.transforms.v2``), and
``random_erasing`` its ``RandomErasing``; see ``DataConfig`` for the settings. We run upstream's transforms
unchanged and own only where their random numbers come from (``Seeded``).

Random erasing runs here, on the uint8 image, not after normalisation on the device as in torchvision's
recipe: there it erases with 0, which is the mean colour of the dataset; here it erases with that mean rounded
to whole grey levels, which normalises to within 0.01 of 0 (ImageNet: 124, 116, 104 against 123.7, 116.3,
103.5). On the device it would need a generator per step and per rank, and could not follow a sample through
a restart as the per-sample generator does.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

import torch

Augment = Callable[[torch.Tensor, random.Random], torch.Tensor]
"""``augment(image, rng)``: the uint8 CHW image augmented with draws from ``rng``, the sample's generator."""

POLICIES = ("none", "randaugment", "trivialaugment")


class Seeded:
    """Runs ``transform`` with torch's CPU generator seeded from the sample's ``random.Random``.

    Why: torchvision's v2 transforms draw from torch's global generator, and neither ``RandAugment``,
    ``TrivialAugmentWide`` nor ``RandomErasing`` takes one of its own. Left to it, an augmentation would depend on
    what else that process drew before (which worker decoded the sample, and after how many samples), so a
    resumed run could not repeat it; and with ``data.num_workers=0`` it would also shift the trainer's own draws.
    So the transform runs inside ``fork_rng``, which restores the global state afterwards, with the generator
    seeded by 63 bits of the sample's generator: the same sample position gives the same ops, anywhere.
    That costs about 8 us per image (2-core EPYC), against 1-2 ms for the ops themselves.
    """

    def __init__(self, transform: Callable[[torch.Tensor], torch.Tensor]):
        self.transform = transform

    def __call__(self, image: torch.Tensor, rng: random.Random) -> torch.Tensor:
        seed = rng.getrandbits(63)
        # devices=[]: only the CPU generator, the one these transforms use; torch.manual_seed would also seed
        # (and leave changed) the CUDA generators of a process that decodes on the main thread.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.transform(image).contiguous()


def upstream_transform(auto_augment: str, *, num_ops: int = 2, magnitude: int = 9, random_erasing: float = 0.0,
                       erase_value: Sequence[int] = (0, 0, 0)) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """torchvision's transforms for these settings, in torchvision's recipe order (policy, then erasing);
    None when there is nothing to do. ``erase_value``: the uint8 colour of an erased rectangle."""
    from torchvision.transforms import v2

    if auto_augment not in POLICIES:
        raise ValueError(f"auto_augment must be one of {POLICIES}, got {auto_augment!r}")
    steps: list[Callable[[torch.Tensor], torch.Tensor]] = []
    bilinear = v2.InterpolationMode.BILINEAR  # as torchvision's reference recipes (presets.py) pass it
    if auto_augment == "randaugment":
        steps.append(v2.RandAugment(num_ops=num_ops, magnitude=magnitude, interpolation=bilinear))
    elif auto_augment == "trivialaugment":
        steps.append(v2.TrivialAugmentWide(interpolation=bilinear))
    if random_erasing > 0:
        steps.append(v2.RandomErasing(p=random_erasing, value=[int(v) for v in erase_value]))
    if not steps:
        return None
    return steps[0] if len(steps) == 1 else v2.Compose(steps)


def build_augment(auto_augment: str, *, num_ops: int = 2, magnitude: int = 9, random_erasing: float = 0.0,
                  mean: Sequence[float] = (0.5, 0.5, 0.5)) -> Augment | None:
    """The per-sample augmentation for these settings, or None; ``mean``: the dataset's mean colour in [0, 1],
    which erased rectangles take (see the module's docstring)."""
    transform = upstream_transform(auto_augment, num_ops=num_ops, magnitude=magnitude, random_erasing=random_erasing,
                                   erase_value=erase_colour(mean))
    return None if transform is None else Seeded(transform)


def erase_colour(mean: Sequence[float]) -> tuple[int, ...]:
    """The uint8 colour nearest to ``mean`` (per channel, in [0, 1])."""
    return tuple(round(255 * m) for m in mean)
