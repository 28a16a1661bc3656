"""Shard writer and manifest: round trip through webdataset's reader, resume, verify, errors.

The Fashion-MNIST tests use the real dataset from the Debian package dataset-fashion-mnist.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from dist_train.data import fashion_mnist, shards
from dist_train.data.cli import add_make_shards_parser
from dist_train.data.errors import ShardsNotFound, ShardVerificationError
from dist_train.data.shards import SplitSource, read_manifest, shard_paths, verify, write_shards

pytestmark = pytest.mark.skipif(
    not fashion_mnist._has_idx_files(fashion_mnist.DEBIAN_DIR),
    reason="needs the Debian package dataset-fashion-mnist (make debs-test installs it)",
)


def _decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.fixture(scope="module")
def idx_data():
    return {split: fashion_mnist.load_idx_split(fashion_mnist.DEBIAN_DIR, prefix)
            for split, prefix in fashion_mnist.SPLIT_FILES.items()}


@pytest.fixture(scope="module")
def fmnist_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fmnist")
    fashion_mnist.write_fashion_mnist_shards(out, progress=False)
    return out


def _small_source(idx_data, n: int = 240) -> dict[str, SplitSource]:
    images, labels = idx_data["train"]
    return {"train": SplitSource(keys=[f"s{i:04d}" for i in range(n)], labels=labels[:n].tolist(),
                                 payloads=list(images[:n]), encode_image=fashion_mnist.png_bytes,
                                 image_key="png")}


def _write_small(out, idx_data, **kw):
    kw.setdefault("samples_per_shard", 50)
    return write_shards(out, dataset="fashion_mnist", classes=fashion_mnist.CLASSES,
                        image={"encoding": "png", "channels": 1, "height": 28, "width": 28},
                        splits=_small_source(idx_data), progress=False, **kw)


def test_fashion_mnist_manifest(fmnist_dir):
    manifest = read_manifest(fmnist_dir)
    assert manifest["version"] == 1 and manifest["dataset"] == "fashion_mnist"
    assert manifest["classes"] == list(fashion_mnist.CLASSES)
    assert manifest["image"] == {"encoding": "png", "channels": 1, "height": 28, "width": 28}
    for split, total in (("train", 60_000), ("test", 10_000)):
        entry = manifest["splits"][split]
        assert entry["num_samples"] == total
        assert len(entry["shards"]) >= 8  # 2 ranks x 2 workers x 2
        assert [s["name"] for s in entry["shards"]] == [f"{split}-{i:06d}.tar" for i in range(len(entry["shards"]))]
        assert sum(s["num_samples"] for s in entry["shards"]) == total
    assert not (fmnist_dir / shards.PARTIAL_MANIFEST_NAME).exists()


def test_fashion_mnist_round_trip_with_webdataset(fmnist_dir, idx_data):
    import webdataset as wds

    manifest = read_manifest(fmnist_dir)
    for split, (images, labels) in idx_data.items():
        seen = np.zeros(len(labels), dtype=bool)
        for path, record in zip(shard_paths(fmnist_dir, split), manifest["splits"][split]["shards"]):
            shard_labels = []
            for sample in wds.WebDataset(path, shardshuffle=False, nodesplitter=None):
                index = int(sample["__key__"].split("_")[1])
                assert not seen[index], f"duplicate {sample['__key__']}"
                seen[index] = True
                assert int(sample["cls"]) == labels[index]
                np.testing.assert_array_equal(_decode_png(sample["png"]), images[index])
                shard_labels.append(int(sample["cls"]))
            assert len(shard_labels) == record["num_samples"]
            assert len(set(shard_labels)) == 10, "shards should be class-mixed"
        assert seen.all()


def test_rerun_skips_finished_shards(fmnist_dir):
    before = {p.name: p.stat().st_mtime_ns for p in fmnist_dir.glob("*.tar")}
    manifest = fashion_mnist.write_fashion_mnist_shards(fmnist_dir, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in fmnist_dir.glob("*.tar")} == before
    assert manifest == read_manifest(fmnist_dir)


class _Killed(Exception):
    pass


def test_interrupted_run_resumes_to_identical_shards(tmp_path, idx_data, monkeypatch):
    reference = _write_small(tmp_path / "ref", idx_data)
    out = tmp_path / "out"
    real_write, calls, kill_at = shards._write_shard, [], [3]

    def dies_on_third(task):
        calls.append(task.path)
        if len(calls) in kill_at:
            raise _Killed  # as if the writer were killed mid-run
        return real_write(task)

    monkeypatch.setattr(shards, "_write_shard", dies_on_third)
    with pytest.raises(_Killed):
        _write_small(out, idx_data)
    (out / ".train-000002.tar.tmp-99999").write_bytes(b"half a shard")  # a killed writer's leftover
    assert not (out / "manifest.json").exists()
    with pytest.raises(ShardsNotFound, match="re-run the same `dist-train make-shards"):
        read_manifest(out)

    calls.clear()
    kill_at.clear()
    assert _write_small(out, idx_data) == reference
    assert len(calls) == len(reference["splits"]["train"]["shards"]) - 2  # two were finished
    assert not list(out.glob(".*tmp*")) and not (out / shards.PARTIAL_MANIFEST_NAME).exists()
    verify(out)


def test_parallel_writers_match_serial(tmp_path, idx_data):
    assert _write_small(tmp_path / "a", idx_data, num_workers=2) == _write_small(tmp_path / "b", idx_data)


def test_verify_names_the_corrupted_shard_and_repair_works(tmp_path, idx_data):
    manifest = _write_small(tmp_path, idx_data)
    victim = tmp_path / manifest["splits"]["train"]["shards"][1]["name"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ShardVerificationError, match=victim.name) as info:
        verify(tmp_path)
    assert info.value.bad_shards == [victim.name]
    assert "make-shards" in str(info.value)
    victim.unlink()  # what the error message says to do
    _write_small(tmp_path, idx_data)
    verify(tmp_path)


def test_truncated_shard_detected(tmp_path, idx_data):
    manifest = _write_small(tmp_path, idx_data)
    victim = tmp_path / manifest["splits"]["train"]["shards"][0]["name"]
    victim.write_bytes(victim.read_bytes()[:5000])
    with pytest.raises(ShardVerificationError, match=victim.name):
        verify(tmp_path)


def test_changed_settings_are_refused(tmp_path, idx_data):
    _write_small(tmp_path, idx_data, seed=0)
    with pytest.raises(ValueError, match="other settings"):
        _write_small(tmp_path, idx_data, seed=1)


def test_read_manifest_errors_say_how_to_fix(tmp_path, idx_data):
    with pytest.raises(ShardsNotFound, match="does not exist.*make-shards fashion-mnist"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(ShardsNotFound, match="no manifest.json.*make-shards"):
        read_manifest(tmp_path)
    manifest = _write_small(tmp_path, idx_data)
    (tmp_path / manifest["splits"]["train"]["shards"][3]["name"]).unlink()
    with pytest.raises(ShardsNotFound, match="train-000003.tar.*re-run"):
        read_manifest(tmp_path)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_cli_with_source_dir(tmp_path, idx_data):
    source = tmp_path / "idx"
    source.mkdir()
    for split, prefix in fashion_mnist.SPLIT_FILES.items():
        images, labels = idx_data[split]
        _write_idx(source / f"{prefix}-images-idx3-ubyte.gz", images[:80])
        _write_idx(source / f"{prefix}-labels-idx1-ubyte.gz", labels[:80])
    parser = argparse.ArgumentParser()
    add_make_shards_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["make-shards", "fashion-mnist", str(tmp_path / "out"), "--source", str(source),
                              "--samples-per-shard", "20", "--workers", "1", "--verify", "--no-progress"])
    assert args.func(args) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["num_samples"] == 80
    assert len(manifest["splits"]["test"]["shards"]) == 8  # min_shards beats 80 / 20 = 4


def test_missing_source_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="idx files"):
        fashion_mnist.find_idx_dir(tmp_path)
