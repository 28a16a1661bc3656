"""ImageNet JPEG decoding with augmentation: encoded bytes -> uint8 CHW tensor.

Training: RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3)) and a horizontal flip with
probability 1/2, then optionally torchvision's RandAugment, TrivialAugmentWide and RandomErasing on the uint8
image (``dist_train/data/augment.py``). Evaluation: resize the shorter side to ``resize``, centre-crop
``size``. Normalisation is left to the device.

Why not torchvision's PIL transforms (measurements in benchmarks/bench_decode.py, docs/data.md):

* decoding: simplejpeg, where installed, decodes into a numpy array with libjpeg-turbo, with
  output identical to Pillow's but about 1.3x faster; Pillow is the fallback, and the decoder
  for anything simplejpeg refuses (non-JPEG files, corrupt data);
* the crop box is chosen from the header *before* decoding, so libjpeg can decode at 1/2, 1/4
  or 1/8 scale whenever the crop still gets enough pixels (large photos; rarely at ImageNet's
  ~400x350);
* resizing: torch's uint8 antialiased bilinear kernel matches Pillow's BILINEAR to within one
  grey level and is about 3x faster; no intermediate RGB copy or cropped image.

The crop sampling follows torchvision's ``RandomResizedCrop.get_params`` (same distribution),
and evaluation equals torchvision's ``Resize`` + ``CenterCrop`` to within one grey level.
"""

from __future__ import annotations

import io
import math
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from dist_train.data.augment import Augment
from dist_train.data.errors import BadSample

try:  # optional: a faster decoder of the same libjpeg-turbo output
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    simplejpeg = None

# What Pillow raises on data it cannot decode: unidentified or truncated files (OSError),
# corrupt headers (SyntaxError, ValueError), and absurd sizes (DecompressionBombError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
_JPEG_MAGIC = b"\xff\xd8\xff"
# simplejpeg's output equals Pillow's for these; CMYK/YCCK go to Pillow, whose conversion we keep.
_SIMPLEJPEG_COLORSPACES = ("YCbCr", "Gray", "RGB")
BACKENDS = ("auto", "simplejpeg", "pillow")

Box = tuple[float, float, float, float]  # left, top, right, bottom in source pixels


def train_decoder(size: int = 224, *, seed: int | None = None,
                  scale: tuple[float, float] = (0.08, 1.0),
                  ratio: tuple[float, float] = (3 / 4, 4 / 3), backend: str = "auto",
                  augment: Augment | None = None) -> TrainDecoder:
    """RandomResizedCrop + horizontal flip, then ``augment``; see ``TrainDecoder`` for how ``seed`` is used."""
    return TrainDecoder(size, seed=seed, scale=scale, ratio=ratio, backend=backend, augment=augment)


def eval_decoder(size: int = 224, resize: int = 256, *, backend: str = "auto") -> EvalDecoder:
    """Resize the shorter side to ``resize``, then centre-crop ``size`` x ``size``."""
    return EvalDecoder(size, resize=resize, backend=backend)


class TrainDecoder:
    """Callable ``bytes -> uint8 tensor (3, size, size)`` with random crop and flip, then ``augment``.

    The training stream passes each call a generator seeded by the sample's place in the epoch order, so
    a crop does not depend on which worker decodes it. Called without one, random numbers come from a
    private generator created on first use in each process, so every DataLoader worker draws its own
    stream. Its seed is ``(seed, worker id)`` when ``seed`` is given, else ``torch.initial_seed()``, which
    the DataLoader already makes distinct per worker and reproducible from ``torch.manual_seed``. ``augment``
    draws from the same generator after the crop and flip, so without it the crops are what they were.
    """

    def __init__(self, size: int, *, seed: int | None = None,
                 scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), backend: str = "auto",
                 augment: Augment | None = None):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        self.size, self.seed, self.scale, self.ratio, self.augment = size, seed, scale, ratio, augment
        self.use_simplejpeg = _use_simplejpeg(backend)
        self._rng: random.Random | None = None
        self._rng_pid: int | None = None

    def __call__(self, data: bytes, rng: random.Random | None = None) -> torch.Tensor:
        """The augmented image; its crop and flip come from ``rng`` (the training stream passes one seeded per
        sample), else from this process's generator."""
        rng = rng if rng is not None else self._process_rng()
        header = read_header(data, use_simplejpeg=self.use_simplejpeg)
        box = random_resized_crop_box(header.width, header.height, rng, scale=self.scale, ratio=self.ratio)
        flip = rng.random() < 0.5
        pixels, box = decode_pixels(data, header, box, self.size, reducing_gap=1.0)
        # Whole pixels: exact on a full-scale decode; on a reduced one the shift is under half a
        # reduced pixel, immaterial for a random crop.
        left, top, right, bottom = (round(v) for v in box)
        out = resize_uint8(pixels[:, :, top:bottom, left:right], self.size, self.size)
        image = (out.flip(-1) if flip else out)[0].contiguous()
        return image if self.augment is None else self.augment(image, rng)

    def _process_rng(self) -> random.Random:
        if self._rng_pid != os.getpid():  # first call in this process (or a forked copy)
            self._rng, self._rng_pid = random.Random(self._process_seed()), os.getpid()
        assert self._rng is not None
        return self._rng

    def _process_seed(self) -> int | str:
        if self.seed is None:
            return torch.initial_seed()
        worker = torch.utils.data.get_worker_info()
        return f"{self.seed}/{worker.id if worker is not None else -1}"

    def __getstate__(self):  # a copy sent to a worker process starts a fresh stream there
        return {**self.__dict__, "_rng": None, "_rng_pid": None}


class EvalDecoder:
    """Callable ``bytes -> uint8 tensor (3, size, size)``: resize shorter side, centre-crop.

    Reduced-scale decoding only with a 2x gap (see ``decode_pixels``), so that evaluation stays
    within about one grey level of torchvision's ``Resize`` + ``CenterCrop``, against which
    published accuracies are measured.
    """

    reducing_gap = 2.0

    def __init__(self, size: int, *, resize: int, backend: str = "auto"):
        if not 1 <= size <= resize:
            raise ValueError(f"need 1 <= size <= resize, got size={size}, resize={resize}")
        self.size, self.resize = size, resize
        self.use_simplejpeg = _use_simplejpeg(backend)

    def __call__(self, data: bytes) -> torch.Tensor:
        header = read_header(data, use_simplejpeg=self.use_simplejpeg)
        width, height = header.width, header.height
        (resized_w, resized_h), (left, top) = center_crop_geometry(width, height, size=self.size,
                                                                    resize=self.resize)
        sx, sy = width / resized_w, height / resized_h  # resized -> source pixels
        box = (left * sx, top * sy, (left + self.size) * sx, (top + self.size) * sy)
        pixels, _ = decode_pixels(data, header, box, self.size, reducing_gap=self.reducing_gap)
        out = resize_uint8(pixels, resized_h, resized_w)
        return out[0, :, top:top + self.size, left:left + self.size].contiguous()


@dataclass(frozen=True)
class Header:
    """Image size read from the header; ``image`` is the lazily decoding Pillow image, or None
    when simplejpeg will decode."""

    width: int
    height: int
    image: Image.Image | None


def read_header(data: bytes, *, use_simplejpeg: bool) -> Header:
    """Read the image size without decoding pixels; undecodable data raises ``BadSample``."""
    if use_simplejpeg and data[:3] == _JPEG_MAGIC:
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            colorspace = None  # let Pillow judge it, so both backends reject the same files
        if colorspace in _SIMPLEJPEG_COLORSPACES:
            return Header(width, height, None)
    image = open_image(data)
    return Header(*image.size, image)


def open_image(data: bytes) -> Image.Image:
    """Pillow image from bytes, header only; undecodable data raises ``BadSample``."""
    try:
        return Image.open(io.BytesIO(data))
    except _DECODE_ERRORS as exc:
        raise BadSample(f"cannot identify image ({len(data)} bytes): {exc}") from exc


def decode_pixels(data: bytes, header: Header, box: Box, size: int, *,
                  reducing_gap: float) -> tuple[torch.Tensor, Box]:
    """Decode to a uint8 RGB tensor (1, 3, H, W) in channels-last memory, and map ``box``
    (source pixels) onto it.

    libjpeg decodes at 1/2, 1/4 or 1/8 scale when the box keeps at least
    ``reducing_gap * size`` pixels per side. Its scaled IDCT filters differently from an
    antialiased resize; a gap of 2 (as in Pillow's ``thumbnail``) leaves at least a 2x resize
    after it, which hides the difference. (simplejpeg's other n/8 factors decode slower.)
    """
    factor = _reduction(box, size * reducing_gap)
    hwc = None
    if header.image is None:
        hwc = _decode_simplejpeg(data, header, factor)
    if hwc is None:
        image = header.image if header.image is not None else open_image(data)
        hwc = _decode_pillow(image, factor)
    sx, sy = hwc.shape[1] / header.width, hwc.shape[0] / header.height
    box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    return torch.from_numpy(hwc).permute(2, 0, 1).unsqueeze(0), box


def resize_uint8(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bilinear resize of a uint8 (1, 3, H, W) channels-last tensor."""
    return torch.nn.functional.interpolate(pixels, size=(height, width), mode="bilinear",
                                           antialias=True, align_corners=False)


def random_resized_crop_box(width: int, height: int, rng: random.Random, *,
                            scale: tuple[float, float], ratio: tuple[float, float]) -> Box:
    """A crop box distributed as torchvision's ``RandomResizedCrop.get_params``."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return (left, top, left + w, top + h)
    # After 10 misses (extreme aspect ratios), the largest centred box within the ratio range.
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return (left, top, left + w, top + h)


def center_crop_geometry(width: int, height: int, *, size: int,
                         resize: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``Resize(resize)`` then ``CenterCrop(size)``: the resized (width, height) and the crop's
    (left, top) in it, rounded as torchvision rounds them."""
    if width <= height:
        resized_w, resized_h = resize, int(resize * height / width)
    else:
        resized_w, resized_h = int(resize * width / height), resize
    left = int(round((resized_w - size) / 2.0))
    top = int(round((resized_h - size) / 2.0))
    return (resized_w, resized_h), (left, top)


def _reduction(box: Box, min_pixels: float) -> int:
    """The largest of 8, 4, 2 that leaves ``min_pixels`` across both sides of ``box``, else 1."""
    side = min(box[2] - box[0], box[3] - box[1])
    return next((f for f in (8, 4, 2) if side / f >= min_pixels), 1)


def _decode_simplejpeg(data: bytes, header: Header, factor: int) -> np.ndarray | None:
    """RGB pixels, or None for data that libjpeg flags (truncated, corrupt, CMYK...)."""
    # min_width/min_height make libjpeg pick exactly 1/factor: the next smaller factor, 3/8,
    # would fall short of them.
    scaled = {} if factor == 1 else {"min_width": header.width // factor, "min_height": header.height // factor}
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", **scaled)
    except ValueError:
        return None  # Pillow decides: it tolerates harmless warnings and rejects the rest


def _decode_pillow(image: Image.Image, factor: int) -> np.ndarray:
    try:
        if factor > 1 and image.format == "JPEG":
            image.draft("RGB", (image.size[0] // factor, image.size[1] // factor))
        if image.mode != "RGB":  # greyscale and CMYK JPEGs exist in ImageNet
            image = image.convert("RGB")
        return np.array(image)  # a writable copy: torch warns on a read-only view
    except _DECODE_ERRORS as exc:
        raise BadSample(f"cannot decode {image.format or 'image'} {image.size}: {exc}") from exc


def _use_simplejpeg(backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "simplejpeg" and simplejpeg is None:
        raise ValueError("backend='simplejpeg' needs the simplejpeg package: pip install simplejpeg")
    return backend != "pillow" and simplejpeg is not None
