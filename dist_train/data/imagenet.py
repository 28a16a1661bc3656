"""ImageNet folders -> WebDataset shards of the original JPEG bytes.

Accepted layouts under SRC::

    train/<wnid>/*.JPEG
    val/<wnid>/*.JPEG                      # class folders, or the flat official layout:
    val/ILSVRC2012_val_00000001.JPEG ...   # plus one labels file (see ``read_val_labels``)

Class indices are the sorted wnids of ``train/`` (torchvision ``ImageFolder`` order).
"""

from __future__ import annotations

import csv
import io
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from dist_train.data.shards import SplitSource, write_shards

DEFAULT_SAMPLES_PER_SHARD = 1000
DEFAULT_SHARD_MB = 200
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
_TAR_OVERHEAD_BYTES = 2048  # two 512-byte headers plus padding per sample, for the size target
_WNID = re.compile(r"^n\d{8}$")
_OFFICIAL_VAL_NAME = re.compile(r"^ILSVRC2012_val_(\d{8})\.")
# Searched for in SRC, SRC/val, SRC/.. and the devkit's data/ beside them, when not given.
VAL_LABEL_FILES = ("LOC_val_solution.csv", "ILSVRC2012_validation_ground_truth.txt",
                   "imagenet_2012_validation_synset_labels.txt", "val_labels.txt")
SYNSET_MAPPING_FILES = ("meta.mat", "ILSVRC2012_mapping.txt")
_DEVKIT_DATA = Path("ILSVRC2012_devkit_t12") / "data"


@dataclass(frozen=True)
class LabelledFiles:
    """The image files of one split and the wnid of each."""

    paths: list[Path]
    wnids: list[str]


def write_imagenet_shards(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    splits: tuple[str, ...] = ("train", "val"),
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    max_shard_bytes: int | None = DEFAULT_SHARD_MB * 10**6,
    val_labels: str | os.PathLike | None = None,
    synset_mapping: str | os.PathLike | None = None,
    seed: int = 0,
    num_workers: int = 1,
    progress: bool = True,
) -> dict:
    """Shard the ImageNet ``splits`` found under ``src`` into ``out_dir``; return the manifest."""
    root = Path(src)
    if not root.is_dir():
        raise FileNotFoundError(f"ImageNet source {root} does not exist")
    unknown = set(splits) - {"train", "val"}
    if unknown:
        raise ValueError(f"unknown ImageNet split(s) {sorted(unknown)}; choose from train, val")
    classes = imagenet_classes(root)
    index = {wnid: i for i, wnid in enumerate(classes)}
    sources = {}
    for split in splits:
        files = scan_split(root, split, val_labels=val_labels, synset_mapping=synset_mapping)
        strange = sorted(set(files.wnids) - set(index))
        if strange:
            raise ValueError(f"{root}/{split} has labels that are not train/ classes: {strange[:5]}")
        sources[split] = SplitSource(
            keys=sample_keys(files.paths), labels=[index[w] for w in files.wnids],
            payloads=[str(p) for p in files.paths], encode_image=read_jpeg_bytes, image_key="jpg",
            sample_bytes=[p.stat().st_size + _TAR_OVERHEAD_BYTES for p in files.paths])
    manifest = write_shards(
        out_dir, dataset="imagenet", classes=classes, image={"encoding": "jpeg", "channels": 3},
        splits=sources, samples_per_shard=samples_per_shard, max_shard_bytes=max_shard_bytes,
        seed=seed, num_workers=num_workers, progress=progress)
    return manifest


def imagenet_classes(root: Path) -> list[str]:
    """Sorted class folder names of ``train/`` (else of ``val/`` class folders)."""
    for split in ("train", "val"):
        folders = _class_folders(root / split)
        if folders:
            return sorted(f.name for f in folders)
    raise FileNotFoundError(
        f"{root} has no class folders: expected {root}/train/<wnid>/*.JPEG (or {root}/val/<wnid>/)")


def scan_split(root: Path, split: str, *, val_labels=None, synset_mapping=None) -> LabelledFiles:
    """The files of ``split`` with their wnids, in sorted path order."""
    directory = root / split
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} does not exist")
    if _class_folders(directory):
        return _scan_class_folders(directory)
    if split != "val":
        raise FileNotFoundError(f"{directory} has no class folders (<wnid>/*.JPEG)")
    paths = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"{directory} holds neither class folders nor images")
    labels_file = Path(val_labels) if val_labels else _find_first(root, VAL_LABEL_FILES)
    if labels_file is None:
        raise FileNotFoundError(
            f"{directory} is a flat folder of images and no labels file was found; pass "
            f"--val-labels with one of: {', '.join(VAL_LABEL_FILES)}")
    mapping = Path(synset_mapping) if synset_mapping else _find_first(root, SYNSET_MAPPING_FILES)
    return LabelledFiles(paths, read_val_labels(labels_file, [p.name for p in paths], synset_mapping=mapping))


def read_val_labels(path: Path, filenames: list[str], *, synset_mapping: Path | None) -> list[str]:
    """The wnid of each file in ``filenames`` (sorted), from one of the common label files.

    * ``LOC_val_solution.csv``: ``ImageId,PredictionString`` rows; the first token is the wnid.
    * one wnid per line, in sorted file name order (``imagenet_2012_validation_synset_labels.txt``);
    * ``<file name> <wnid>`` per line;
    * ``ILSVRC2012_validation_ground_truth.txt``: 1-based ILSVRC2012 ids, one per line in
      sorted file name order; these ids follow the devkit's ``meta.mat`` order, so it needs
      ``synset_mapping`` (``meta.mat``, or a text file listing wnids in that order).
    """
    if not path.is_file():
        raise FileNotFoundError(f"validation labels file {path} does not exist")
    if path.suffix.lower() == ".csv":
        return _labels_by_name(path, _read_solution_csv(path), filenames)
    lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
    if all(len(t) == 1 and t[0].isdigit() for t in lines):
        ids = [int(t[0]) for t in lines]
        if synset_mapping is None:
            raise FileNotFoundError(
                f"{path.name} holds ILSVRC2012 ids; they need the devkit's id -> wnid mapping: pass "
                f"--synset-mapping ILSVRC2012_devkit_t12/data/meta.mat (or use LOC_val_solution.csv)")
        wnids = read_synset_mapping(synset_mapping)
        bad = [i for i in ids if not 1 <= i <= len(wnids)]
        if bad:
            raise ValueError(f"{path}: ids {bad[:5]} are outside 1..{len(wnids)} of {synset_mapping}")
        return _labels_in_order(path, [wnids[i - 1] for i in ids], filenames)
    if all(len(t) == 1 and _WNID.match(t[0]) for t in lines):
        return _labels_in_order(path, [t[0] for t in lines], filenames)
    if all(len(t) == 2 and _WNID.match(t[1]) for t in lines):
        return _labels_by_name(path, {Path(t[0]).stem: t[1] for t in lines}, filenames)
    raise ValueError(
        f"cannot read {path}: expected LOC_val_solution.csv, ILSVRC2012_validation_ground_truth.txt "
        f"(ids), one wnid per line, or '<file> <wnid>' lines")


def read_synset_mapping(path: Path) -> list[str]:
    """wnids in ILSVRC2012 id order (index = id - 1), from ``meta.mat`` or a text file."""
    if path.suffix == ".mat":
        from scipy.io import loadmat  # only needed for this one layout

        synsets = loadmat(str(path), squeeze_me=True)["synsets"]
        pairs = sorted((int(s["ILSVRC2012_ID"]), str(s["WNID"])) for s in synsets
                       if int(s["num_children"]) == 0)
        return [wnid for _, wnid in pairs]
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    if all(len(r) >= 2 and r[0].isdigit() and _WNID.match(r[1]) for r in rows):  # "<id> <wnid>"
        by_id = {int(r[0]): r[1] for r in rows}
        return [by_id[i] for i in range(1, len(by_id) + 1)]
    wnids = [r[0] for r in rows]
    if not all(_WNID.match(w) for w in wnids):
        raise ValueError(f"cannot read {path}: expected meta.mat, '<wnid> ...' or '<id> <wnid>' lines")
    if wnids == sorted(wnids):
        # LOC_synset_mapping.txt and synset_words.txt list wnids sorted; ILSVRC2012 ids are not
        # in that order (id 1 is n02119789), so using them would mislabel almost every image.
        raise ValueError(
            f"{path} lists wnids in sorted order, which is not the ILSVRC2012 id order of the "
            f"ground-truth file; pass --synset-mapping ILSVRC2012_devkit_t12/data/meta.mat, or "
            f"give --val-labels LOC_val_solution.csv instead")
    return wnids


def sample_keys(paths: list[Path]) -> list[str]:
    """File stems as keys (no dots: webdataset splits names at the first dot); prefixed with
    the class folder if stems collide."""
    keys = [p.stem.replace(".", "_") for p in paths]
    if len(set(keys)) != len(keys):
        keys = [f"{p.parent.name}_{k}" for p, k in zip(paths, keys)]
    duplicates = [k for k, n in Counter(keys).items() if n > 1]
    if duplicates:
        raise ValueError(f"file names give duplicate sample keys, e.g. {duplicates[:3]}")
    return keys


def read_jpeg_bytes(path: str) -> bytes:
    """The file's bytes, unchanged if JPEG. ImageNet has a few non-JPEGs (a PNG and a CMYK file
    named .JPEG); non-JPEG files are re-encoded to JPEG so the ``jpg`` key holds JPEG. A file that
    cannot be read as an image is kept as is: the reader counts it as a bad sample."""
    data = Path(path).read_bytes()
    if data[:3] == b"\xff\xd8\xff":
        return data
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="JPEG", quality=95)
    except (OSError, SyntaxError, ValueError) as exc:
        warnings.warn(f"{path} is not a readable image ({exc}); stored unchanged", stacklevel=2)
        return data
    warnings.warn(f"{path} is not a JPEG; stored re-encoded as JPEG (quality 95)", stacklevel=2)
    return buffer.getvalue()


def _scan_class_folders(directory: Path) -> LabelledFiles:
    paths, wnids = [], []
    for folder in sorted(_class_folders(directory)):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        wnids += [folder.name] * len(files)
    if not paths:
        raise FileNotFoundError(f"{directory}: class folders hold no images ({sorted(IMAGE_SUFFIXES)})")
    return LabelledFiles(paths, wnids)


def _class_folders(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return [p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")]


def _find_first(root: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        for folder in (root, root / "val", root / _DEVKIT_DATA, root.parent, root.parent / _DEVKIT_DATA):
            if (folder / name).is_file():
                return folder / name
    return None


def _read_solution_csv(path: Path) -> dict[str, str]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not {"ImageId", "PredictionString"} <= set(reader.fieldnames or ()):
            raise ValueError(f"{path}: expected the columns ImageId,PredictionString")
        return {row["ImageId"]: row["PredictionString"].split()[0] for row in reader}


def _labels_by_name(path: Path, by_stem: dict[str, str], filenames: list[str]) -> list[str]:
    missing = [f for f in filenames if Path(f).stem not in by_stem]
    if missing:
        raise ValueError(f"{path} has no label for {len(missing)} file(s), e.g. {missing[:3]}")
    return [by_stem[Path(f).stem] for f in filenames]


def _labels_in_order(path: Path, wnids: list[str], filenames: list[str]) -> list[str]:
    """Line i labels the i-th file; official names (ILSVRC2012_val_<i>) pick their line, so a
    subset of the validation images works too."""
    numbers = [_OFFICIAL_VAL_NAME.match(f) for f in filenames]
    if all(numbers):
        lines = [int(m.group(1)) for m in numbers if m is not None]
        if max(lines) > len(wnids):
            raise ValueError(f"{path} has {len(wnids)} lines, fewer than image number {max(lines)}")
        return [wnids[i - 1] for i in lines]
    if len(wnids) != len(filenames):
        raise ValueError(
            f"{path} has {len(wnids)} labels for {len(filenames)} images; its lines must match the "
            f"images in sorted file name order one to one")
    return wnids
