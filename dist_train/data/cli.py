"""The ``dist-train make-shards`` command: ``fashion-mnist``, ``imagenet`` and ``verify``.

Writers are imported inside the handlers so that ``dist-train --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os


def add_make_shards_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``make-shards`` and its sub-commands; each sets ``func(args) -> int``."""
    parser = subparsers.add_parser(
        "make-shards", help="convert a dataset into WebDataset tar shards with a manifest",
        description="Convert a dataset into WebDataset tar shards plus manifest.json. Re-running "
                    "the same command resumes an interrupted run and skips finished shards.")
    commands = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")

    fmnist = commands.add_parser("fashion-mnist", help="Fashion-MNIST (60,000 + 10,000 PNGs)")
    fmnist.add_argument("out_dir", metavar="OUT_DIR")
    fmnist.add_argument("--source", default=None, metavar="DIR",
                        help="directory with the idx files (default: the Debian package "
                             "dataset-fashion-mnist, else a torchvision download)")
    fmnist.add_argument("--samples-per-shard", type=_positive_int, default=None)
    _add_common(fmnist)
    fmnist.set_defaults(func=_run_fashion_mnist)

    imagenet = commands.add_parser(
        "imagenet", help="ImageNet folders (train/<wnid>/*.JPEG; val as class folders or flat)")
    imagenet.add_argument("src", metavar="SRC", help="directory holding train/ and val/")
    imagenet.add_argument("out_dir", metavar="OUT_DIR")
    imagenet.add_argument("--val-labels", default=None, metavar="FILE",
                          help="labels of a flat val/ folder: LOC_val_solution.csv, "
                               "ILSVRC2012_validation_ground_truth.txt, one wnid per line, or "
                               "'<file> <wnid>' lines (default: looked for in and beside SRC)")
    imagenet.add_argument("--synset-mapping", default=None, metavar="FILE",
                          help="ILSVRC2012 id -> wnid, needed by the ground-truth .txt: the devkit's "
                               "meta.mat, or a text file of wnids in id order (not the sorted "
                               "LOC_synset_mapping.txt) (default: looked for in and beside SRC)")
    imagenet.add_argument("--samples-per-shard", type=_positive_int, default=None)
    imagenet.add_argument("--shard-size-mb", type=_positive_int, default=None,
                          help="target shard size in MB (whichever target gives more shards wins)")
    imagenet.add_argument("--splits", default="train,val",
                          help="comma-separated splits to convert (default: train,val)")
    _add_common(imagenet)
    imagenet.set_defaults(func=_run_imagenet)

    check = commands.add_parser("verify", help="re-read every shard of OUT_DIR against its manifest")
    check.add_argument("out_dir", metavar="OUT_DIR")
    check.add_argument("--workers", type=_positive_int, default=1)
    check.set_defaults(func=_run_verify)
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle before sharding")
    parser.add_argument("--workers", type=_positive_int, default=max(1, min(8, os.cpu_count() or 1)),
                        help="parallel writer processes (default: min(8, CPUs))")
    parser.add_argument("--verify", action="store_true", help="re-read and check every shard afterwards")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _run_fashion_mnist(args: argparse.Namespace) -> int:
    from dist_train.data import fashion_mnist

    spc = args.samples_per_shard or fashion_mnist.DEFAULT_SAMPLES_PER_SHARD
    manifest = fashion_mnist.write_fashion_mnist_shards(
        args.out_dir, samples_per_shard=spc, seed=args.seed, source=args.source,
        num_workers=args.workers, progress=not args.no_progress)
    return _finish(args, manifest)


def _run_imagenet(args: argparse.Namespace) -> int:
    from dist_train.data import imagenet

    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    manifest = imagenet.write_imagenet_shards(
        args.src, args.out_dir, splits=splits,
        samples_per_shard=args.samples_per_shard or imagenet.DEFAULT_SAMPLES_PER_SHARD,
        max_shard_bytes=(args.shard_size_mb or imagenet.DEFAULT_SHARD_MB) * 10**6,
        val_labels=args.val_labels, synset_mapping=args.synset_mapping, seed=args.seed,
        num_workers=args.workers, progress=not args.no_progress)
    return _finish(args, manifest)


def _run_verify(args: argparse.Namespace) -> int:
    from dist_train.data.shards import verify

    _report(verify(args.out_dir, num_workers=args.workers), args.out_dir, verified=True)
    return 0


def _finish(args: argparse.Namespace, manifest: dict) -> int:
    if args.verify:
        from dist_train.data.shards import verify

        verify(args.out_dir, num_workers=args.workers)
    _report(manifest, args.out_dir, verified=args.verify)
    return 0


def _report(manifest: dict, out_dir: str, *, verified: bool) -> None:
    parts = [f"{split}: {e['num_samples']} samples in {len(e['shards'])} shards"
             for split, e in manifest["splits"].items()]
    print(f"{out_dir}: {manifest['dataset']}, {'; '.join(parts)}" + (" (verified)" if verified else ""))
