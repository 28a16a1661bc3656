"""ImageNet folders -> shards -> decoded tensors, on 20 real ImageNet photos.

The photos come from the foolbox wheel (see fixtures_data.py); their class indices are real,
the wnids built from them (n00000243, ...) are stand-ins with the real format.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_data import photo_class_index
from PIL import Image

from dist_train.data import imagenet, jpeg
from dist_train.data.cli import add_make_shards_parser
from dist_train.data.errors import BadSample
from dist_train.data.jpeg import eval_decoder, random_resized_crop_box, resize_uint8, train_decoder
from dist_train.data.shards import read_manifest, shard_paths, verify


def _wnid(class_index: int) -> str:
    return f"n{class_index:08d}"


@pytest.fixture(scope="module")
def imagenet_src(tmp_path_factory, imagenet_photos):
    """train/<wnid>/<wnid>_<NN>.JPEG, and a flat val/ with LOC_val_solution.csv."""
    root = tmp_path_factory.mktemp("imagenet")
    rows = []
    for number, photo in enumerate(imagenet_photos, start=1):
        wnid = _wnid(photo_class_index(photo))
        (root / "train" / wnid).mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, root / "train" / wnid / f"{wnid}_{number}.JPEG")
        (root / "val").mkdir(exist_ok=True)
        shutil.copy(photo, root / "val" / f"ILSVRC2012_val_{number:08d}.JPEG")
        rows.append((f"ILSVRC2012_val_{number:08d}", f"{wnid} 10 20 300 400 {wnid} 1 2 3 4"))
    with open(root / "LOC_val_solution.csv", "w", newline="") as f:
        csv.writer(f).writerows([("ImageId", "PredictionString"), *rows])
    return root


def _make_shards(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_make_shards_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["make-shards", *argv])
    return args.func(args)


def test_convert_verify_and_read_back_with_webdataset(imagenet_src, tmp_path):
    import webdataset as wds

    out = tmp_path / "shards"
    assert _make_shards(["imagenet", str(imagenet_src), str(out), "--samples-per-shard", "6",
                         "--workers", "2", "--verify", "--no-progress"]) == 0
    manifest = read_manifest(out)
    classes = sorted(p.name for p in (imagenet_src / "train").iterdir())
    assert manifest["dataset"] == "imagenet" and manifest["classes"] == classes
    assert manifest["image"] == {"encoding": "jpeg", "channels": 3}
    originals = {"train": {p.stem: p for p in (imagenet_src / "train").rglob("*.JPEG")},
                 "val": {p.stem: p for p in (imagenet_src / "val").glob("*.JPEG")}}
    for split, files in originals.items():
        entry = manifest["splits"][split]
        assert entry["num_samples"] == len(files) == 20 and len(entry["shards"]) == 4
        seen = set()
        for sample in wds.WebDataset(shard_paths(out, split), shardshuffle=False, nodesplitter=None):
            original = files[sample["__key__"]]
            assert sample["jpg"] == original.read_bytes()  # the original bytes, not re-encoded
            wnid = original.parent.name if split == "train" else None
            expected = classes.index(wnid) if wnid else classes.index(_val_wnid(imagenet_src, original))
            assert int(sample["cls"]) == expected
            seen.add(sample["__key__"])
        assert seen == set(files)


def _val_wnid(src: Path, path: Path) -> str:
    with open(src / "LOC_val_solution.csv") as f:
        return {r["ImageId"]: r["PredictionString"].split()[0] for r in csv.DictReader(f)}[path.stem]


def test_splits_written_one_at_a_time_share_one_manifest(imagenet_src, tmp_path):
    imagenet.write_imagenet_shards(imagenet_src, tmp_path, splits=("train",), samples_per_shard=10, progress=False)
    manifest = imagenet.write_imagenet_shards(imagenet_src, tmp_path, splits=("val",), samples_per_shard=10,
                                              progress=False)
    assert sorted(manifest["splits"]) == ["train", "val"]
    verify(tmp_path)


def test_shard_size_target_splits_further(imagenet_src, tmp_path):
    total = sum(p.stat().st_size for p in (imagenet_src / "train").rglob("*.JPEG"))
    manifest = imagenet.write_imagenet_shards(
        imagenet_src, tmp_path, splits=("train",), samples_per_shard=1000,
        max_shard_bytes=total // 5, progress=False)
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) >= 5 and sum(s["num_samples"] for s in shards) == 20
    verify(tmp_path)


def test_ground_truth_ids_with_devkit_meta_mat(tmp_path):
    from scipy.io import savemat

    wnids = ["n02119789", "n02100735", "n01440764"]  # devkit id order is not sorted order
    synsets = np.zeros(4, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    for i, (wnid, children) in enumerate([*[(w, 0) for w in wnids], ("n00001740", 5)]):
        synsets[i] = (i + 1, wnid, children)
    savemat(tmp_path / "meta.mat", {"synsets": synsets})
    truth = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    truth.write_text("3\n1\n2\n3\n")
    names = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in (1, 2, 4)]  # a subset: picked by number
    labels = imagenet.read_val_labels(truth, names, synset_mapping=tmp_path / "meta.mat")
    assert labels == ["n01440764", "n02119789", "n01440764"]


def test_flat_val_with_devkit_files_found_automatically(imagenet_src, tmp_path):
    from scipy.io import savemat

    src = tmp_path / "imagenet"
    shutil.copytree(imagenet_src, src, ignore=shutil.ignore_patterns("*.csv"))
    devkit = src / "ILSVRC2012_devkit_t12" / "data"
    devkit.mkdir(parents=True)
    wnids = sorted(p.name for p in (src / "train").iterdir())
    id_order = wnids[::-1]  # ILSVRC2012 ids are not in sorted wnid order
    synsets = np.zeros(len(id_order), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    for i, wnid in enumerate(id_order):
        synsets[i] = (i + 1, wnid, 0)
    savemat(devkit / "meta.mat", {"synsets": synsets})
    truth = [id_order.index(_val_wnid(imagenet_src, p)) + 1 for p in sorted((src / "val").glob("*.JPEG"))]
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{i}\n" for i in truth))
    manifest = imagenet.write_imagenet_shards(src, tmp_path / "out", splits=("val",), progress=False)
    expected = {p.stem: wnids.index(_val_wnid(imagenet_src, p)) for p in (src / "val").glob("*.JPEG")}
    from webdataset.tariterators import tarfile_samples

    got = {s["__key__"]: int(s["cls"]) for s in tarfile_samples(
        [{"url": u} for u in shard_paths(tmp_path / "out", "val", manifest)])}
    assert got == expected


def test_sorted_synset_mapping_is_refused_for_ground_truth_ids(tmp_path):
    (tmp_path / "LOC_synset_mapping.txt").write_text("n01440764 tench\nn01443537 goldfish\n")
    (tmp_path / "gt.txt").write_text("1\n2\n")
    with pytest.raises(ValueError, match="not the ILSVRC2012 id order.*meta.mat"):
        imagenet.read_val_labels(tmp_path / "gt.txt", ["a.JPEG", "b.JPEG"],
                                 synset_mapping=tmp_path / "LOC_synset_mapping.txt")
    with pytest.raises(FileNotFoundError, match="--synset-mapping"):
        imagenet.read_val_labels(tmp_path / "gt.txt", ["a.JPEG", "b.JPEG"], synset_mapping=None)


def test_other_label_file_variants(tmp_path):
    names = ["b.JPEG", "c.JPEG"]
    (tmp_path / "per_line.txt").write_text("n01440764\nn02119789\n")
    assert imagenet.read_val_labels(tmp_path / "per_line.txt", names, synset_mapping=None) == \
        ["n01440764", "n02119789"]
    (tmp_path / "pairs.txt").write_text("c.JPEG n02119789\nb.JPEG n01440764\n")
    assert imagenet.read_val_labels(tmp_path / "pairs.txt", names, synset_mapping=None) == \
        ["n01440764", "n02119789"]
    (tmp_path / "odd.txt").write_text("b.JPEG 65\n")
    with pytest.raises(ValueError, match="cannot read"):
        imagenet.read_val_labels(tmp_path / "odd.txt", names, synset_mapping=None)


def test_flat_val_without_labels_is_a_clear_error(imagenet_photos, tmp_path):
    (tmp_path / "src" / "train" / "n00000001").mkdir(parents=True)
    shutil.copy(imagenet_photos[0], tmp_path / "src" / "train" / "n00000001" / "a.JPEG")
    (tmp_path / "src" / "val").mkdir()
    shutil.copy(imagenet_photos[1], tmp_path / "src" / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(FileNotFoundError, match="--val-labels"):
        imagenet.write_imagenet_shards(tmp_path / "src", tmp_path / "out", progress=False)


def test_non_jpeg_file_is_stored_as_jpeg(tmp_path, imagenet_photos):
    fake = tmp_path / "n02105855_2933.JPEG"  # ImageNet's PNG in disguise has this name
    Image.open(imagenet_photos[0]).save(fake, format="PNG")
    with pytest.warns(UserWarning, match="not a JPEG"):
        data = imagenet.read_jpeg_bytes(str(fake))
    assert data[:3] == b"\xff\xd8\xff" and Image.open(io.BytesIO(data)).size == Image.open(fake).size
    original = imagenet_photos[0].read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert imagenet.read_jpeg_bytes(str(imagenet_photos[0])) == original


# --- decoding ---------------------------------------------------------------------------------

@pytest.fixture(params=["pillow", pytest.param("simplejpeg", marks=pytest.mark.skipif(
    jpeg.simplejpeg is None, reason="simplejpeg (the optional faster decoder) is not installed"))])
def backend(request) -> str:
    return request.param


def test_decoders_give_uint8_chw(imagenet_photos, backend):
    train, evaluate = train_decoder(224, seed=0, backend=backend), eval_decoder(224, 256, backend=backend)
    for photo in imagenet_photos:
        data = photo.read_bytes()
        for out in (train(data), evaluate(data)):
            assert out.dtype == torch.uint8 and out.shape == (3, 224, 224) and out.is_contiguous()


def test_train_decoder_is_seeded(imagenet_photos, backend):
    data = [p.read_bytes() for p in imagenet_photos[:5]]
    a, b, c = (train_decoder(224, seed=s, backend=backend) for s in (1, 1, 2))
    outs_a, outs_b, outs_c = ([d(x) for x in data] for d in (a, b, c))
    assert all(torch.equal(x, y) for x, y in zip(outs_a, outs_b))
    assert not all(torch.equal(x, y) for x, y in zip(outs_a, outs_c))


@pytest.mark.skipif(jpeg.simplejpeg is None, reason="simplejpeg (the optional faster decoder) is not installed")
def test_backends_give_identical_tensors(imagenet_photos):
    for photo in imagenet_photos:
        data = photo.read_bytes()
        assert torch.equal(eval_decoder(backend="pillow")(data), eval_decoder(backend="simplejpeg")(data))
        assert torch.equal(train_decoder(seed=3, backend="pillow")(data),
                           train_decoder(seed=3, backend="simplejpeg")(data))


def test_eval_decoder_matches_torchvision_resize_center_crop(imagenet_photos, backend):
    import torchvision.transforms as T

    reference = T.Compose([T.Resize(256), T.CenterCrop(224), T.PILToTensor()])
    ours = eval_decoder(224, 256, backend=backend)
    for photo in imagenet_photos:
        expected = reference(Image.open(photo).convert("RGB")).float()
        diff = (ours(photo.read_bytes()).float() - expected).abs().mean().item()
        assert diff < 0.1, f"{photo.name}: mean |difference| {diff:.2f} of 255"


def test_the_evaluation_crop_and_resize_come_from_the_config(imagenet_photos):
    # torchvision's new recipe: train at 176, evaluate a 224 crop of the image resized to 232.
    import torchvision.transforms as T

    from dist_train.config import DataConfig
    from dist_train.data.loader import image_decoder

    manifest = {"image": {"encoding": "jpeg"}}
    cfg = DataConfig(image_size=176, eval_image_size=224, eval_resize=232)
    _, decode = image_decoder(manifest, train=False, image_size=cfg.image_size,
                              eval_image_size=cfg.eval_image_size, eval_resize=cfg.eval_resize)
    _, plain = image_decoder(manifest, train=False, image_size=176)  # the crop follows the training size
    reference = T.Compose([T.Resize(232), T.CenterCrop(224), T.PILToTensor()])
    for photo in imagenet_photos[:4]:
        ours = decode(photo.read_bytes())
        assert ours.shape == (3, 224, 224) and plain(photo.read_bytes()).shape == (3, 176, 176)
        expected = reference(Image.open(photo).convert("RGB")).float()
        assert (ours.float() - expected).abs().mean().item() < 0.1, photo.name
    with pytest.raises(ValueError, match="data.eval_resize=200"):
        DataConfig(eval_image_size=224, eval_resize=200)


def _decode_crop(data: bytes, box, backend: str) -> tuple[torch.Tensor, tuple[int, int]]:
    header = jpeg.read_header(data, use_simplejpeg=backend == "simplejpeg")
    pixels, (left, top, right, bottom) = jpeg.decode_pixels(data, header, box, 224, reducing_gap=1.0)
    crop = pixels[:, :, round(top):round(bottom), round(left):round(right)]
    return resize_uint8(crop, 224, 224)[0].float(), (pixels.shape[3], pixels.shape[2])


def test_train_crop_equals_torchvision_resized_crop_at_full_scale(imagenet_photos, backend):
    import torchvision.transforms.functional as F

    photo = imagenet_photos[0]
    full = Image.open(photo).convert("RGB")
    for left, top, right, bottom in [(10, 20, 300, 260), (100, 100, 180, 170), (0, 0, 400, 300)]:
        ours, _ = _decode_crop(photo.read_bytes(), (left, top, right, bottom), backend)
        expected = F.pil_to_tensor(F.resized_crop(full, top, left, bottom - top, right - left, [224, 224])).float()
        assert (ours - expected).abs().max().item() <= 1  # torch's and Pillow's kernels agree


def test_reduced_scale_decode_is_close_to_full_decode(imagenet_photos, backend):
    import torchvision.transforms.functional as F

    big = [p for p in imagenet_photos if Image.open(p).size[0] >= 1000]
    assert big, "the foolbox photos include 1024x683 ones"
    for photo in big:
        width, height = Image.open(photo).size
        ours, decoded_size = _decode_crop(photo.read_bytes(), (100, 50, 700, 550), backend)
        assert decoded_size == (width // 2, math.ceil(height / 2)), "should decode at 1/2 scale"
        expected = F.pil_to_tensor(F.resized_crop(Image.open(photo).convert("RGB"), 50, 100, 500, 600,
                                                  [224, 224], antialias=True)).float()
        assert (ours - expected).abs().mean().item() < 3.0


def test_crop_boxes_follow_torchvision_distribution():
    import torchvision.transforms as T

    rng, width, height, draws = random.Random(0), 500, 375, 3000
    torch.manual_seed(0)
    ours = [random_resized_crop_box(width, height, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
            for _ in range(draws)]
    theirs = [T.RandomResizedCrop.get_params(torch.empty(3, height, width), [0.08, 1.0], [3 / 4, 4 / 3])
              for _ in range(draws)]
    ours_area = np.mean([(r - x0) * (b - t) for x0, t, r, b in ours]) / (width * height)
    theirs_area = np.mean([h * w for _, _, h, w in theirs]) / (width * height)
    ours_left = np.mean([x0 for x0, _, _, _ in ours])
    theirs_left = np.mean([j for _, j, _, _ in theirs])
    assert abs(ours_area - theirs_area) < 0.03 and abs(ours_left - theirs_left) < 8
    assert all(0 <= x0 < r <= width and 0 <= t < b <= height for x0, t, r, b in ours)


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_greyscale_and_cmyk_jpegs_become_rgb(imagenet_photos, mode, backend):
    buffer = io.BytesIO()
    Image.open(imagenet_photos[0]).convert(mode).save(buffer, format="JPEG")
    expected = eval_decoder(224, 256, backend="pillow")(buffer.getvalue())
    assert torch.equal(eval_decoder(224, 256, backend=backend)(buffer.getvalue()), expected)
    assert train_decoder(224, seed=0, backend=backend)(buffer.getvalue()).shape == (3, 224, 224)


def test_corrupt_jpegs_raise_bad_sample(imagenet_photos, backend):
    data = imagenet_photos[0].read_bytes()
    corrupt = {"truncated": data[: len(data) // 3], "garbage": bytes(range(256)) * 40, "empty": b"",
               "header only": data[:600], "png bytes": b"\x89PNG\r\n\x1a\n" + data[8:2000]}
    for name, payload in corrupt.items():
        for decode in (train_decoder(224, seed=0, backend=backend), eval_decoder(224, 256, backend=backend)):
            with pytest.raises(BadSample):
                decode(payload)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend"):
        train_decoder(224, backend="turbo")


# --- the streaming reader on ImageNet shards ---------------------------------------------------------

def _val_labels_on_rank(rank, world_size, shards, shard_url):
    from dist_train.config import DataConfig
    from dist_train.data.loader import eval_batches

    cfg = DataConfig(shards=str(shards), num_workers=2, shard_url=shard_url)
    labels, bad = [], 0
    for batch in eval_batches(read_manifest(shards), cfg, micro_batch_size=4, rank=rank, world_size=world_size):
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1:] == (3, 224, 224)
        labels += batch["label"].tolist()
        bad += int(batch["bad_samples"])
    return labels, bad


@pytest.fixture(scope="module")
def imagenet_shards(imagenet_src, tmp_path_factory):
    out = tmp_path_factory.mktemp("imagenet_shards")
    assert _make_shards(["imagenet", str(imagenet_src), str(out), "--samples-per-shard", "6", "--no-progress"]) == 0
    return out


def test_every_validation_sample_is_seen_exactly_once_across_two_ranks(imagenet_shards):
    from multiproc import run_ranks

    (alone, _), = run_ranks(_val_labels_on_rank, imagenet_shards, "", world_size=1)
    outs = run_ranks(_val_labels_on_rank, imagenet_shards, "", world_size=2)
    assert len(alone) == 20 and all(len(labels) > 0 for labels, _ in outs)
    assert sorted(outs[0][0] + outs[1][0]) == sorted(alone)


def test_pipe_and_http_shard_sources_read_the_same_samples(imagenet_shards, tmp_path):
    import sys

    from infra.daemons import free_port, port_open, spawn, stop, wait_until
    from multiproc import run_ranks

    (local, _), = run_ranks(_val_labels_on_rank, imagenet_shards, "", world_size=1)
    (piped, _), = run_ranks(_val_labels_on_rank, imagenet_shards, f"pipe:cat {imagenet_shards}/{{name}}", world_size=1)
    assert piped == local
    port = free_port()
    server = spawn("http", [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                            str(imagenet_shards)], log=tmp_path / "http.log")
    try:
        wait_until(lambda: port_open(port), what="http.server", timeout_s=30, daemons=(server,))
        (served, _), = run_ranks(_val_labels_on_rank, imagenet_shards, f"http://127.0.0.1:{port}/{{name}}",
                                 world_size=1)
    finally:
        stop([server])
    assert served == local


def test_corrupt_jpeg_in_a_shard_is_skipped_and_counted(imagenet_photos, tmp_path):
    from dist_train.config import DataConfig
    from dist_train.data.loader import TrainStream, eval_batches
    from dist_train.data.shards import SplitSource, write_shards

    payloads = [p.read_bytes() for p in imagenet_photos[:10]]
    payloads[3] = payloads[3][:2000]  # truncated: the header decodes, the data does not
    payloads[7] = b"\xff\xd8\xff\xe0 not a jpeg at all"
    source = SplitSource(keys=[f"img{i:02d}" for i in range(10)], labels=[i % 3 for i in range(10)],
                         payloads=payloads, encode_image=bytes, image_key="jpg")
    manifest = write_shards(tmp_path, dataset="imagenet", classes=["a", "b", "c"],
                            image={"encoding": "jpeg", "channels": 3}, splits={"train": source, "val": source},
                            samples_per_shard=5, progress=False)
    cfg = DataConfig(shards=str(tmp_path), num_workers=0, shuffle_buffer=0)
    batches = list(eval_batches(manifest, cfg, micro_batch_size=4, rank=0, world_size=1))
    assert sum(len(b["label"]) for b in batches) == 8 and sum(int(b["bad_samples"]) for b in batches) == 2
    stream = iter(TrainStream(manifest, cfg, micro_batch_size=4, rank=0, world_size=1, seed=0))
    drawn = [next(stream) for _ in range(10)]  # 40 samples: 4 epochs of 10, 2 bad ones in each
    assert sum(int(b["bad_samples"]) for b in drawn) == 8
    # A bad sample's slot holds a good sample of its micro-batch: the batch keeps its size, the position its count.
    assert all(len(b["label"]) == 4 and b["image"].shape == (4, 3, 224, 224) for b in drawn)
    assert all(len(set(b["index"].tolist())) == 4 - int(b["bad_samples"]) for b in drawn)


# --- the recipes themselves, on a CPU ----------------------------------------------------------------
@pytest.mark.parametrize("recipe, backend", [("goyal_sgd_b8192.yaml", "ddp"),
                                             ("radam_lookahead_b8192.yaml", "deepspeed"),
                                             ("torchvision_new_b1024.yaml", "ddp")])
def test_a_recipe_with_data_batch_and_step_overrides_runs_on_cpu_at_cpu_precision(imagenet_shards, tmp_path,
                                                                                    recipe, backend):
    # The recipes say train.precision=auto: bf16 on GPUs, fp32 on a CPU without native bf16, where bf16
    # would be emulated at 8-15x the cost (docs/cpu.md). A try-out on a laptop needs no precision override.
    import json
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    from dist_train.config import load_config
    from dist_train.cpu import native_bf16

    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "dist_train", "train", str(repo / "configs" / "imagenet" / recipe),
           f"data.shards={imagenet_shards}", "data.num_workers=0", "train.global_batch_size=4",
           "train.micro_batch_size=2", "train.max_steps=2", "train.progress_bar=false", f"backend.name={backend}",
           # Goyal's ghost batches of 32 must fit the micro-batch: 2 here, one ghost batch
           *(["model.bn_batch_size=2"] if load_config(repo / "configs" / "imagenet" / recipe).model.bn_batch_size
             else [])]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)  # runs/ and mlflow.db here
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = "bf16" if native_bf16() else "fp32"
    assert "emulated" not in proc.stderr
    (checkpoint,) = (tmp_path / "runs" / "imagenet" / Path(recipe).stem / "checkpoints").glob("step-*")
    assert json.loads((checkpoint / "MANIFEST.json").read_text())["run"]["precision"] == expected
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("imagenet_resnet50").experiment_id])
    assert run.data.params["train.precision"] == "auto" and run.data.params["precision"] == expected
