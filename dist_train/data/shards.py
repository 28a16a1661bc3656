"""Writing, reading and checking WebDataset tar shards and their ``manifest.json``.

Layout of a shard directory::

    manifest.json            # written last: its presence means every shard is finished
    train-000000.tar ...     # one tar per shard, samples shuffled across classes
    test-000000.tar ...      # (``val`` for ImageNet)

Each sample is ``{"__key__": str, "cls": b"<label>", "png"|"jpg": <image bytes>}``.

We use webdataset's ``TarWriter`` for the tar format but plan the shards ourselves instead of
streaming through ``ShardWriter``: knowing every shard's samples before writing lets worker
processes write shards in parallel and lets a re-run skip the shards already finished.
Tar headers carry a fixed mtime, so a shard's bytes (and sha256) depend only on its samples
and a shard rewritten after a crash matches the manifest of the first run.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dist_train.data.errors import ShardsNotFound, ShardVerificationError
from dist_train.files import replaced_atomically, sha256_file

MANIFEST_NAME = "manifest.json"
PARTIAL_MANIFEST_NAME = "manifest.partial.json"
MANIFEST_VERSION = 1
IMAGE_KEYS = {"png": "png", "jpeg": "jpg"}  # manifest image.encoding -> sample key

_TAR_MTIME = 0
_MAKE_SHARDS_HINT = (
    "create it with `dist-train make-shards fashion-mnist {dir}` "
    "or `dist-train make-shards imagenet SRC {dir}`"
)


@dataclass(frozen=True)
class SplitSource:
    """The samples of one split, in source order, before shuffling and sharding."""

    keys: Sequence[str]
    """A unique key per sample; no dots (webdataset splits file names at the first dot)."""
    labels: Sequence[int]
    """Class index per sample."""
    payloads: Sequence[Any]
    """Per sample, what ``encode_image`` turns into image bytes (an array, a file path)."""
    encode_image: Callable[[Any], bytes]
    """A module-level function (so worker processes can receive it): payload -> image bytes."""
    image_key: str
    """Sample key of the image bytes: ``"png"`` or ``"jpg"``."""
    sample_bytes: Sequence[int] | None = None
    """Approximate encoded size per sample; needed only for a byte target per shard."""

    def __post_init__(self):
        n = len(self.keys)
        if len(self.labels) != n or len(self.payloads) != n:
            raise ValueError(
                f"SplitSource: keys, labels and payloads must have equal lengths, "
                f"got {n}, {len(self.labels)}, {len(self.payloads)}"
            )
        if self.sample_bytes is not None and len(self.sample_bytes) != n:
            raise ValueError("SplitSource: sample_bytes must have one entry per sample")
        if self.image_key not in IMAGE_KEYS.values():
            raise ValueError(f"SplitSource.image_key must be one of {sorted(IMAGE_KEYS.values())}")


@dataclass(frozen=True)
class _ShardTask:
    path: str
    keys: list[str]
    labels: list[int]
    payloads: list[Any]
    encode_image: Callable[[Any], bytes]
    image_key: str


def plan_shards(
    num_samples: int,
    *,
    samples_per_shard: int,
    seed: int | Sequence[int],
    min_shards: int = 1,
    max_shard_bytes: int | None = None,
    sample_bytes: Sequence[int] | None = None,
) -> list[np.ndarray]:
    """Shuffle sample indices with ``seed`` and cut them into shards of near-equal count.

    The number of shards is the smallest meeting every target (samples per shard, bytes per
    shard, ``min_shards``); equal counts keep ranks and workers balanced.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    num_shards = max(min_shards, math.ceil(num_samples / samples_per_shard))
    if max_shard_bytes is not None:
        if sample_bytes is None:
            raise ValueError("max_shard_bytes needs the size of every sample (sample_bytes)")
        num_shards = max(num_shards, math.ceil(int(np.sum(sample_bytes)) / max_shard_bytes))
    num_shards = max(1, min(num_shards, num_samples))
    order = np.random.default_rng(seed).permutation(num_samples)
    return np.array_split(order, num_shards)


def write_shards(
    out_dir: str | os.PathLike,
    *,
    dataset: str,
    classes: Sequence[str],
    image: Mapping[str, Any],
    splits: Mapping[str, SplitSource],
    samples_per_shard: int,
    seed: int = 0,
    min_shards: int = 1,
    max_shard_bytes: int | None = None,
    num_workers: int = 1,
    progress: bool = True,
) -> dict:
    """Write every split as shards plus ``manifest.json``; resume an interrupted run.

    Shards already recorded (in ``manifest.partial.json`` or a finished manifest) and present
    with the recorded size are skipped. Returns the manifest.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_files(out)
    previous = _load_previous_manifest(out)
    manifest: dict[str, Any] = {
        "version": MANIFEST_VERSION,
        "dataset": dataset,
        "classes": list(classes),
        "image": dict(image),
        "seed": seed,
        "splits": {},
    }
    _check_compatible(out, previous, manifest)
    manifest["splits"].update(_other_finished_splits(out, previous, keep_out=splits))
    todo: list[tuple[str, _ShardTask]] = []
    for split, source in splits.items():
        plan = plan_shards(
            len(source.keys), samples_per_shard=samples_per_shard,
            seed=_split_seed(seed, split), min_shards=min_shards,
            max_shard_bytes=max_shard_bytes, sample_bytes=source.sample_bytes,
        )
        names = [f"{split}-{i:06d}.tar" for i in range(len(plan))]
        entry: dict[str, Any] = {"num_samples": len(source.keys), "plan_sha256": _plan_digest(source, plan, names),
                 "shards": []}
        done = _reusable_shards(out, previous, split, entry["plan_sha256"])
        entry["shards"] = [done[n] for n in names if n in done]
        manifest["splits"][split] = entry
        todo += [(split, _make_task(out / n, source, idx)) for n, idx in zip(names, plan) if n not in done]
    if todo:
        _write_json_atomic(out / PARTIAL_MANIFEST_NAME, manifest)
        (out / MANIFEST_NAME).unlink(missing_ok=True)
        _run_tasks(out, manifest, todo, num_workers=num_workers, progress=progress)
    for entry in manifest["splits"].values():
        entry["shards"].sort(key=lambda s: s["name"])
        assert sum(s["num_samples"] for s in entry["shards"]) == entry["num_samples"]
    _write_json_atomic(out / MANIFEST_NAME, manifest)
    (out / PARTIAL_MANIFEST_NAME).unlink(missing_ok=True)
    return manifest


def read_manifest(shard_dir: str | os.PathLike, *, check_files: bool = True) -> dict:
    """Load ``manifest.json`` and (``check_files``) check that every shard it lists is present beside it."""
    root = Path(shard_dir)
    hint = _MAKE_SHARDS_HINT.format(dir=root)
    if not root.is_dir():
        raise ShardsNotFound(f"shard directory {root} does not exist; {hint}")
    path = root / MANIFEST_NAME
    if not path.is_file():
        if (root / PARTIAL_MANIFEST_NAME).is_file():
            raise ShardsNotFound(
                f"{root} holds an unfinished set of shards (the writer was interrupted); re-run the "
                f"same `dist-train make-shards ...` command: finished shards are kept")
        raise ShardsNotFound(f"{root} has no {MANIFEST_NAME}; {hint}")
    manifest = parse_manifest(path.read_text(), where=str(path))
    missing = [s["name"] for e in manifest["splits"].values() for s in e["shards"]
               if check_files and not (root / s["name"]).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ShardsNotFound(
            f"{root}: {len(missing)} shard file(s) listed in {MANIFEST_NAME} are missing ({shown}); "
            f"re-run the `dist-train make-shards ...` command that wrote them to restore them")
    return manifest


SAFE_SHARD_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
"""What a shard name may be: it is formatted into paths and URLs, and ``pipe:`` URLs run in a shell."""


def parse_manifest(text: str | bytes, *, where: str) -> dict:
    """A manifest from its JSON text, checked for the version this dist_train reads, and for shard names that
    are data, never code: letters, digits and ``._-``, no ``/`` and no leading ``-`` or ``.``."""
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where} is not valid JSON ({exc}); delete it and re-run make-shards") from exc
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(
            f"{where} has manifest version {manifest.get('version')!r}, this dist_train reads "
            f"version {MANIFEST_VERSION}; re-create the shards with `dist-train make-shards`")
    bad = [str(s.get("name"))[:80] for e in manifest.get("splits", {}).values() for s in e.get("shards", [])
           if not isinstance(s.get("name"), str) or not SAFE_SHARD_NAME.match(s["name"])]
    if bad:
        raise ValueError(f"{where} lists shard names that are not plain file names ({bad[:3]}): a name may hold only "
                         f"letters, digits and ._- and may not start with - or . (names go into paths, URLs and "
                         f"pipe: shell commands); re-create the shards with `dist-train make-shards`, or fix the manifest")
    return manifest


def shard_paths(shard_dir: str | os.PathLike, split: str, manifest: dict | None = None) -> list[str]:
    """Paths of the shards of ``split``, in manifest order."""
    manifest = read_manifest(shard_dir) if manifest is None else manifest
    if split not in manifest["splits"]:
        raise ValueError(f"{shard_dir} has no split {split!r}; it has {sorted(manifest['splits'])}")
    return [str(Path(shard_dir) / s["name"]) for s in manifest["splits"][split]["shards"]]


def image_key(manifest: dict) -> str:
    """The sample key holding the image bytes (``png`` or ``jpg``)."""
    return IMAGE_KEYS[manifest["image"]["encoding"]]


def verify(shard_dir: str | os.PathLike, *, num_workers: int = 1) -> dict:
    """Re-read every shard: sha256, sample count, and that each sample has a label and an image.

    Raises ``ShardVerificationError`` naming every bad shard and what to do; returns the manifest.
    """
    root = Path(shard_dir)
    manifest = read_manifest(root)
    jobs = [(str(root / s["name"]), s, len(manifest["classes"]), image_key(manifest))
            for entry in manifest["splits"].values() for s in entry["shards"]]
    # Threads suffice: reading and hashing release the GIL, and a thread starts at no cost.
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        problems = list(pool.map(lambda job: _check_shard(*job), jobs))
    bad = [(job[1]["name"], p) for job, p in zip(jobs, problems) if p]
    if bad:
        lines = "\n".join(f"  {name}: {problem}" for name, problem in bad)
        raise ShardVerificationError(
            f"{len(bad)} bad shard(s) in {root}:\n{lines}\nDelete the bad shard file(s) and re-run "
            f"the same `dist-train make-shards ...` command: only missing shards are rewritten, "
            f"and they come out byte-identical.", bad_shards=[name for name, _ in bad])
    return manifest


# --- writing ------------------------------------------------------------------------------

class _HashingFile:
    """Write-through file wrapper that hashes what is written (saves re-reading the shard)."""

    def __init__(self, f):
        self._f, self.sha256, self.num_bytes = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.num_bytes += len(data)
        return self._f.write(data)


def _write_shard(task: _ShardTask) -> dict:
    import webdataset as wds

    final = Path(task.path)
    with replaced_atomically(final) as tmp, open(tmp, "wb") as f:  # a shard under its final name is complete
        sink = _HashingFile(f)
        with wds.TarWriter(sink, encoder=False, mtime=_TAR_MTIME) as writer:
            for key, label, payload in zip(task.keys, task.labels, task.payloads):
                writer.write({"__key__": key, "cls": str(int(label)).encode("ascii"),
                              task.image_key: task.encode_image(payload)})
        f.flush()
        os.fsync(f.fileno())
    return {"name": final.name, "num_samples": len(task.keys), "num_bytes": sink.num_bytes,
            "sha256": sink.sha256.hexdigest()}


def _make_task(path: Path, source: SplitSource, indices: np.ndarray) -> _ShardTask:
    return _ShardTask(
        path=str(path), keys=[source.keys[i] for i in indices],
        labels=[int(source.labels[i]) for i in indices],
        payloads=[source.payloads[i] for i in indices],
        encode_image=source.encode_image, image_key=source.image_key,
    )


def _run_tasks(out: Path, manifest: dict, todo: list, *, num_workers: int, progress: bool) -> None:
    from tqdm import tqdm

    split_of = {task.path: split for split, task in todo}
    tasks = [task for _, task in todo]
    bar = tqdm(total=sum(len(t.keys) for t in tasks), unit="img", desc=f"shards -> {out}",
               disable=not progress, smoothing=0.05)

    def record(result: dict, path: str) -> None:
        manifest["splits"][split_of[path]]["shards"].append(result)
        _write_json_atomic(out / PARTIAL_MANIFEST_NAME, manifest)
        bar.update(result["num_samples"])

    try:
        if num_workers <= 1:
            for task in tasks:
                record(_write_shard(task), task.path)
        else:
            _write_in_processes(tasks, record, num_workers=num_workers)
    finally:
        bar.close()


def _write_in_processes(tasks: list[_ShardTask], record: Callable[[dict, str], None], *,
                        num_workers: int) -> None:
    # spawn, not fork: the parent may hold torch threads, and fork after threads can hang.
    # An executor, not a Pool: a worker that dies (OOM killer) raises BrokenProcessPool here
    # instead of being replaced while its shard is silently lost.
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=num_workers, mp_context=context)
    try:
        futures = {pool.submit(_write_shard, task): task.path for task in tasks}
        for future in as_completed(futures):
            record(future.result(), futures[future])
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # finished shards stay recorded
        raise
    pool.shutdown(wait=True)


def _split_seed(seed: int, split: str) -> list[int]:
    return [seed, zlib.crc32(split.encode())]


def _plan_digest(source: SplitSource, plan: list[np.ndarray], names: list[str]) -> str:
    digest = hashlib.sha256(source.image_key.encode())
    for name, indices in zip(names, plan):
        digest.update(f"\n#{name}\n".encode())
        digest.update("\n".join(f"{source.keys[i]}\t{int(source.labels[i])}" for i in indices).encode())
    return digest.hexdigest()


def _load_previous_manifest(out: Path) -> dict | None:
    for name in (PARTIAL_MANIFEST_NAME, MANIFEST_NAME):
        path = out / name
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError:
                return None  # unreadable bookkeeping: rewrite everything
    return None


def _check_compatible(out: Path, previous: dict | None, manifest: dict) -> None:
    if previous is None:
        return
    for field in ("dataset", "classes", "image"):
        if previous.get(field) != manifest[field]:
            raise ValueError(
                f"{out} already holds shards with a different {field!r} "
                f"({previous.get(field)!r:.80}); write to an empty directory or delete {out}")


def _other_finished_splits(out: Path, previous: dict | None, *, keep_out: Mapping) -> dict[str, dict]:
    """Splits written by an earlier run (``--splits train`` then ``--splits val``) stay listed."""
    kept = {}
    for split, entry in (previous or {}).get("splits", {}).items():
        if split in keep_out:
            continue
        if sum(s["num_samples"] for s in entry["shards"]) != entry["num_samples"]:
            raise ValueError(
                f"{out} holds an unfinished {split!r} split from an interrupted run; finish it first "
                f"by re-running make-shards with that split included")
        kept[split] = entry
    return kept


def _reusable_shards(out: Path, previous: dict | None, split: str, plan_sha256: str) -> dict[str, dict]:
    entry = (previous or {}).get("splits", {}).get(split)
    if entry is None:
        return {}
    if entry.get("plan_sha256") != plan_sha256:
        raise ValueError(
            f"{out} holds {split!r} shards written with other settings (seed, samples per shard, "
            f"shard size or source files differ); write to an empty directory or delete {out}")
    return {s["name"]: s for s in entry["shards"]
            if (out / s["name"]).is_file() and (out / s["name"]).stat().st_size == s["num_bytes"]}


def _remove_stale_temp_files(out: Path) -> None:
    for path in out.glob(".*.tmp-*"):
        path.unlink(missing_ok=True)


def _write_json_atomic(path: Path, obj: dict) -> None:
    with replaced_atomically(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")


# --- checking -----------------------------------------------------------------------------

def _check_shard(path: str, record: dict, num_classes: int, image_field: str) -> str | None:
    """Return what is wrong with one shard, or None."""
    if not os.path.isfile(path):
        return "file is missing"
    sha = sha256_file(path)
    if sha != record["sha256"]:
        return f"sha256 is {sha[:12]}..., the manifest says {record['sha256'][:12]}... (corrupted or truncated)"
    try:
        count = _count_valid_samples(path, num_classes, image_field)
    except Exception as exc:  # any parse failure is a bad shard; report it, do not crash verify
        return f"cannot be read as a WebDataset tar: {exc}"
    if count != record["num_samples"]:
        return f"holds {count} samples, the manifest says {record['num_samples']}"
    return None


def _count_valid_samples(path: str, num_classes: int, image_field: str) -> int:
    from webdataset.tariterators import tarfile_samples

    count, seen = 0, set()
    for sample in tarfile_samples([{"url": path}]):
        key = sample["__key__"]
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen.add(key)
        label = int(sample["cls"])
        if not 0 <= label < num_classes:
            raise ValueError(f"sample {key!r} has label {label}, outside [0, {num_classes})")
        if not sample.get(image_field):
            raise ValueError(f"sample {key!r} has no {image_field!r} image")
        count += 1
    return count
