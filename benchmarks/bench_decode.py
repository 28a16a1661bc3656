"""JPEG decode + augment throughput per CPU core, and our shard pipeline against ImageFolder.

    OMP_NUM_THREADS=1 python benchmarks/bench_decode.py [--photos DIR] [--images 600] [--workers 1] [--augment-only]

Part 1 times each candidate decoder in this process (one core, one torch thread) on
  * the 20 real ImageNet photos of the foolbox wheel (512x512 and 1024x683, progressive), and
  * synthetic JPEGs shaped like ImageNet (~400x350 on average, ~110 KB at quality 90), made of
    gradients plus noise: right for speed, meaningless for accuracy.
Part 1b times the training decoder with each augmentation after the crop and flip (RandAugment,
TrivialAugmentWide, random erasing, and the per-sample seeding alone), side by side with the plain one, as a
ratio of cost per image; ``--augment-only`` runs only this part.
Part 2 runs whole input pipelines over the same synthetic images with the same worker count:
  * ours: shards from ``write_imagenet_shards``, read by webdataset, decoded by ``dist_train.data.jpeg``;
  * baseline: torchvision ``ImageFolder`` + ``DataLoader`` with the equivalent torchvision transforms.
Rates are images per CPU-second (this process plus the loader's workers), so they measure the
cost per core even on a shared machine; wall-clock rates are printed beside them. Every
measurement is repeated, alternating the candidates, and the median is reported. Results print
as markdown tables for docs/data.md.
"""

from __future__ import annotations

import argparse
import io
import math
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dist_train.data import jpeg
from dist_train.data.augment import Seeded, build_augment
from dist_train.data.jpeg import eval_decoder, random_resized_crop_box, resize_uint8, train_decoder

SIZE, RESIZE = 224, 256


# --- candidate decoders (train transform: RandomResizedCrop + flip; bytes -> uint8 CHW) -------

def torchvision_pil_train():
    import torchvision.transforms as T

    transform = T.Compose([T.RandomResizedCrop(SIZE), T.RandomHorizontalFlip(), T.PILToTensor()])
    return lambda data: transform(Image.open(io.BytesIO(data)).convert("RGB"))


def torchvision_pil_eval():
    import torchvision.transforms as T

    transform = T.Compose([T.Resize(RESIZE), T.CenterCrop(SIZE), T.PILToTensor()])
    return lambda data: transform(Image.open(io.BytesIO(data)).convert("RGB"))


def torchvision_io_train():
    """libjpeg-turbo through torchvision.io, then crop by slicing and an antialiased tensor resize."""
    import torchvision.transforms.functional as F
    from torchvision.io import ImageReadMode, decode_jpeg

    rng = random.Random(0)

    def decode(data: bytes) -> torch.Tensor:
        image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        left, top, right, bottom = random_resized_crop_box(image.shape[2], image.shape[1], rng,
                                                           scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
        out = F.resize(image[:, top:bottom, left:right], [SIZE, SIZE], antialias=True)
        return out.flip(-1) if rng.random() < 0.5 else out

    return decode


def simplejpeg_any_scale_train():
    """simplejpeg letting libjpeg pick any n/8 scale factor (we keep to 1/2, 1/4, 1/8)."""
    import simplejpeg

    rng = random.Random(0)

    def decode(data: bytes) -> torch.Tensor:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        box = random_resized_crop_box(width, height, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
        need_w = math.ceil(width * SIZE / (box[2] - box[0]))
        need_h = math.ceil(height * SIZE / (box[3] - box[1]))
        hwc = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=need_w, min_height=need_h)
        sx, sy = hwc.shape[1] / width, hwc.shape[0] / height
        left, top, right, bottom = round(box[0] * sx), round(box[1] * sy), round(box[2] * sx), round(box[3] * sy)
        pixels = torch.from_numpy(hwc).permute(2, 0, 1).unsqueeze(0)
        out = resize_uint8(pixels[:, :, top:bottom, left:right], SIZE, SIZE)
        return (out.flip(-1) if rng.random() < 0.5 else out)[0].contiguous()

    return decode


def backends() -> list[str]:
    return ["pillow", "simplejpeg"] if jpeg.simplejpeg is not None else ["pillow"]


def candidates() -> dict[str, object]:
    found = {"train: Pillow + torchvision transforms (ImageFolder's)": torchvision_pil_train()}
    for backend in backends():
        found[f"train: ours, {backend} backend"] = train_decoder(SIZE, seed=0, backend=backend)
    found["train: torchvision.io.decode_jpeg + tensor resize"] = torchvision_io_train()
    if jpeg.simplejpeg is not None:
        found["train: simplejpeg, any n/8 scale"] = simplejpeg_any_scale_train()
    else:
        print("simplejpeg not installed: its rows are skipped", file=sys.stderr)
    found["eval: Pillow + torchvision Resize/CenterCrop"] = torchvision_pil_eval()
    for backend in backends():
        found[f"eval: ours, {backend} backend"] = eval_decoder(SIZE, RESIZE, backend=backend)
    return found


IMAGENET_MEAN = (0.485, 0.456, 0.406)


def augmented_decoders() -> dict[str, object]:
    """Our training decoder (default backend), plain and with each augmentation after the crop and flip."""
    settings = {
        "decode + crop + flip (plain)": None,
        "+ per-sample seeding alone (fork_rng, no op)": Seeded(lambda image: image),
        "+ RandAugment(2, 9)": build_augment("randaugment", num_ops=2, magnitude=9),
        "+ TrivialAugmentWide": build_augment("trivialaugment"),
        "+ RandomErasing(0.25)": build_augment("none", random_erasing=0.25, mean=IMAGENET_MEAN),
        "+ RandAugment(2, 9) + RandomErasing(0.25)": build_augment("randaugment", random_erasing=0.25,
                                                                   mean=IMAGENET_MEAN),
        "+ TrivialAugmentWide + RandomErasing(0.25)": build_augment("trivialaugment", random_erasing=0.25,
                                                                    mean=IMAGENET_MEAN),
    }
    return {label: train_decoder(SIZE, seed=0, augment=augment) for label, augment in settings.items()}


def print_augment_table(datasets: dict[str, list[bytes]], *, repeats: int) -> None:
    rates = decoder_rates(augmented_decoders(), datasets, repeats=repeats)
    plain = "decode + crop + flip (plain)"
    print("\n| training decoder (one core) | " + " | ".join(f"{n}: ms/img | vs plain" for n in datasets) + " |")
    print("|---|" + "---:|---:|" * len(datasets))
    for label in dict.fromkeys(label for label, _ in rates):
        cells = [f"{1e3 / rates[(label, n)]:.2f} | {rates[(plain, n)] / rates[(label, n)]:.2f}x" for n in datasets]
        print(f"| {label} | " + " | ".join(cells) + " |")
    seeded, image, rng, calls = Seeded(lambda x: x), torch.zeros(3, SIZE, SIZE, dtype=torch.uint8), random.Random(0), 20000
    start = time.process_time()
    for _ in range(calls):
        seeded(image, rng)
    print(f"per-sample seeding alone (fork_rng + manual_seed, no op): {(time.process_time() - start) / calls * 1e6:.1f} "
          f"us per image")


# --- data --------------------------------------------------------------------------------------

def synthetic_jpegs(count: int, *, seed: int = 0) -> list[bytes]:
    """JPEGs with ImageNet-like sizes (long side 250-550, common aspect ratios) and ~110 KB."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        width = int(rng.uniform(250, 550))
        height = int(width / rng.choice([0.75, 1.0, 4 / 3, 1.5]))
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        phase = rng.uniform(0, 6, 3)
        base = np.stack([128 + 100 * np.sin(x / (20 + 10 * c) + y / (31 + 7 * c) + phase[c]) for c in range(3)], -1)
        pixels = np.clip(base + rng.normal(0, 50, base.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def write_image_folder(root: Path, images: list[bytes], num_classes: int = 10) -> None:
    for i, data in enumerate(images):
        folder = root / "train" / f"n{i % num_classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img_{i:06d}.JPEG").write_bytes(data)


# --- measurement -------------------------------------------------------------------------------

def decoder_rates(decoders: dict, datasets: dict[str, list[bytes]], *, repeats: int) -> dict:
    """Median images per CPU-second of each decoder on each dataset, in this process."""
    rates = {(d, name): [] for d in decoders for name in datasets}
    for _ in range(repeats):
        for name, images in datasets.items():
            for label, decode in decoders.items():
                for data in images[:3]:
                    decode(data)  # warm up
                start = time.process_time()
                for data in images:
                    decode(data)
                rates[(label, name)].append(len(images) / (time.process_time() - start))
    return {key: statistics.median(values) for key, values in rates.items()}


def _cpu_seconds() -> float:
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def loader_rate(loader) -> tuple[float, float]:
    """(images per CPU-second, images per wall-second) over one full pass.

    CPU time counts this process and the loader's worker processes (reaped when the pass ends),
    so the first figure is the cost per core whatever else the machine is running.
    """
    count, cpu, wall = 0, _cpu_seconds(), time.perf_counter()
    for images, _labels in loader:
        count += len(images)
    wall = time.perf_counter() - wall
    del loader  # workers are shut down and reaped at the end of the pass
    return count / (_cpu_seconds() - cpu), count / wall


def shard_loader(urls: list[str], decode, *, workers: int, batch_size: int):
    import webdataset as wds

    def to_pair(sample):
        return decode(sample["jpg"]), int(sample["cls"])

    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls), wds.split_by_worker, wds.tarfile_to_samples(), wds.map(to_pair),
        wds.batched(batch_size, collation_fn=lambda items: [torch.stack([i for i, _ in items]),
                                                            torch.tensor([label for _, label in items])]))
    return torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=workers)


def folder_loader(root: Path, transform, *, workers: int, batch_size: int):
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(root), transform=transform)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers)


def pipeline_rates(images: list[bytes], *, workers: int, repeats: int, batch_size: int = 32) -> dict:
    import torchvision.transforms as T

    from dist_train.data.imagenet import write_imagenet_shards
    from dist_train.data.shards import shard_paths

    transforms = {"train": T.Compose([T.RandomResizedCrop(SIZE), T.RandomHorizontalFlip(), T.PILToTensor()]),
                  "eval": T.Compose([T.Resize(RESIZE), T.CenterCrop(SIZE), T.PILToTensor()])}
    ours = {(mode, backend): train_decoder(SIZE, backend=backend) if mode == "train" else
            eval_decoder(SIZE, RESIZE, backend=backend) for mode in transforms for backend in backends()}
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "shards"
        write_image_folder(src, images)
        write_imagenet_shards(src, out, splits=("train",), samples_per_shard=max(1, len(images) // (4 * workers)),
                              progress=False)
        urls = shard_paths(out, "train")
        rates = {(mode, kind): [] for mode in transforms for kind in ("folder", *backends())}
        for _ in range(repeats):
            for mode in transforms:
                rates[(mode, "folder")].append(loader_rate(
                    folder_loader(src / "train", transforms[mode], workers=workers, batch_size=batch_size)))
                for backend in backends():
                    rates[(mode, backend)].append(loader_rate(
                        shard_loader(urls, ours[(mode, backend)], workers=workers, batch_size=batch_size)))
    return {key: tuple(statistics.median(v) for v in zip(*values)) for key, values in rates.items()}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, default=Path(".cache/test-data/foolbox-imagenet"),
                        help="folder of real photos (imagenet_*.jpg); the tests' fixture fills the default")
    parser.add_argument("--images", type=int, default=600, help="synthetic JPEGs for the pipelines")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers for both pipelines")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--augment-only", action="store_true", help="only the augmentation costs (part 1b)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    synthetic = synthetic_jpegs(args.images)
    sizes = np.array([Image.open(io.BytesIO(d)).size for d in synthetic])
    print(f"CPU: {cpu_model()}; torch {torch.__version__}; Pillow {Image.__version__}; 1 torch thread")
    print(f"synthetic: {len(synthetic)} JPEGs, mean {sizes[:, 0].mean():.0f}x{sizes[:, 1].mean():.0f}, "
          f"mean {np.mean([len(d) for d in synthetic]) / 1e3:.0f} KB")
    datasets = {"synthetic": synthetic[:200]}
    photos = sorted(args.photos.glob("imagenet_*.jpg"))
    if photos:
        datasets["real photos"] = [p.read_bytes() for p in photos] * 3
    else:
        print(f"no photos in {args.photos}: run tests/test_imagenet.py once to fetch them", file=sys.stderr)

    if args.augment_only:
        print_augment_table(datasets, repeats=args.repeats)
        return
    rates = decoder_rates(candidates(), datasets, repeats=args.repeats)
    print("\n| decoder (one core) | " + " | ".join(f"{n} img/CPU-s" for n in datasets) + " |")
    print("|---|" + "---:|" * len(datasets))
    for label in dict.fromkeys(label for label, _ in rates):
        print(f"| {label} | " + " | ".join(f"{rates[(label, n)]:.0f}" for n in datasets) + " |")

    print_augment_table(datasets, repeats=args.repeats)

    pipes = pipeline_rates(synthetic, workers=args.workers, repeats=args.repeats)
    print(f"\n| pipeline, {args.workers} worker(s), {len(synthetic)} synthetic JPEGs | img/CPU-s | "
          f"vs ImageFolder | img/s wall |")
    print("|---|---:|---:|---:|")
    for mode in ("train", "eval"):
        base = pipes[(mode, "folder")][0]
        print(f"| {mode}: ImageFolder + DataLoader, torchvision transforms | {base:.0f} | 1.00x | "
              f"{pipes[(mode, 'folder')][1]:.0f} |")
        for backend in backends():
            ours, wall = pipes[(mode, backend)]
            print(f"| {mode}: shards + webdataset + ours, {backend} | {ours:.0f} | {ours / base:.2f}x | {wall:.0f} |")
    print()
    for backend in backends():
        per_core = pipes[("train", backend)][0]
        print(f"train pipeline, {backend}: {per_core:.0f} img/s per CPU core; "
              f"~{math.ceil(3000 / per_core)} such cores feed one GPU at 3000 img/s")

if __name__ == "__main__":
    main()
