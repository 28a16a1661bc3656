"""RandAugment, TrivialAugmentWide and random erasing in the JPEG training pipeline, and repeated augmentation.

The augmentations are torchvision's own, drawn from the sample's generator (seed, epoch, position) instead of
torch's global one: so the expectations here are torchvision's transforms run under the seed that generator
gives, and the same sample position must give the same image anywhere, without touching the global state.
"""

from __future__ import annotations

import io
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from dist_train.config import ConfigError, DataConfig
from dist_train.config.loader import from_dict
from dist_train.data.augment import build_augment
from dist_train.data.jpeg import train_decoder
from dist_train.data.loader import NORMALISATION, TrainStream, _sample_rng, train_augment
from dist_train.data.shards import SplitSource, write_shards

SIZE = 32
BILINEAR = v2.InterpolationMode.BILINEAR
IMAGENET_MEAN_UINT8 = (124, 116, 104)  # 255 x (0.485, 0.456, 0.406), rounded


def _jpegs(count: int, *, seed: int = 0) -> list[bytes]:
    """Small JPEGs of assorted sizes: colour gradients plus noise, each a different hue."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        width, height = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        base = np.stack([x * 255 / width, y * 255 / height, np.full_like(x, 37.0 * (i % 7))], -1)
        pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    return _jpegs(24)


@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory, jpegs):
    """24 training JPEGs in 3 shards of 8."""
    out = tmp_path_factory.mktemp("jpeg_shards")
    source = SplitSource(keys=[f"img{i:02d}" for i in range(len(jpegs))], labels=[i % 3 for i in range(len(jpegs))],
                         payloads=jpegs, encode_image=bytes, image_key="jpg")
    return write_shards(out, dataset="imagenet", classes=["a", "b", "c"], image={"encoding": "jpeg", "channels": 3},
                        splits={"train": source}, samples_per_shard=8, progress=False), out


POLICIES = {
    "randaugment": (dict(auto_augment="randaugment", num_ops=2, magnitude=9),
                    lambda: v2.RandAugment(num_ops=2, magnitude=9, interpolation=BILINEAR)),
    "randaugment 3 ops at 15": (dict(auto_augment="randaugment", num_ops=3, magnitude=15),
                                lambda: v2.RandAugment(num_ops=3, magnitude=15, interpolation=BILINEAR)),
    "trivialaugment": (dict(auto_augment="trivialaugment"), lambda: v2.TrivialAugmentWide(interpolation=BILINEAR)),
    "trivialaugment + erasing": (
        dict(auto_augment="trivialaugment", random_erasing=0.5),
        lambda: v2.Compose([v2.TrivialAugmentWide(interpolation=BILINEAR),
                            v2.RandomErasing(p=0.5, value=list(IMAGENET_MEAN_UINT8))])),
    "erasing alone": (dict(auto_augment="none", random_erasing=1.0),
                      lambda: v2.RandomErasing(p=1.0, value=list(IMAGENET_MEAN_UINT8))),
}


def _decoder(settings: dict):
    return train_decoder(SIZE, augment=build_augment(**settings, mean=NORMALISATION["imagenet"][0]))


@pytest.mark.parametrize("policy", POLICIES)
def test_the_result_is_torchvisions_transform_under_the_seed_the_sample_gives(jpegs, policy):
    settings, upstream = POLICIES[policy]
    ours, plain = _decoder(settings), train_decoder(SIZE)
    changed = 0
    for position, data in enumerate(jpegs[:12]):
        rng = _sample_rng(7, 2, position)
        cropped = plain(data, rng)  # the same crop and flip draws, then the seed is the generator's next 63 bits
        torch.manual_seed(rng.getrandbits(63))
        expected = upstream()(cropped)
        got = ours(data, _sample_rng(7, 2, position))
        assert got.dtype == torch.uint8 and got.shape == (3, SIZE, SIZE) and got.is_contiguous()
        assert torch.equal(got, expected)
        changed += not torch.equal(got, cropped)
    assert changed >= 6  # the transform does something: a no-op would not equal upstream's either


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment + erasing"])
def test_a_sample_position_gives_one_augmentation_anywhere_and_other_positions_other_ones(jpegs, policy):
    settings, _ = POLICIES[policy]
    first, second = _decoder(settings), _decoder(settings)
    data = jpegs[0]
    for position in range(4):  # another decoder object, after other draws: the same image
        second(jpegs[1], _sample_rng(7, 0, 99))
        assert torch.equal(first(data, _sample_rng(7, 0, position)), second(data, _sample_rng(7, 0, position)))
    # The crops of one image at other positions, epochs and seeds differ; only the rng decides them.
    keys = [(7, 0, p) for p in range(6)] + [(7, 1, 0), (8, 0, 0)]
    images = [first(data, _sample_rng(*key)) for key in keys]
    assert all(not torch.equal(images[i], images[j]) for i in range(len(images)) for j in range(i))


def test_the_global_random_state_is_left_untouched(jpegs):
    decode = _decoder(POLICIES["trivialaugment + erasing"][0])
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(5)
    expected = torch.rand(4), random.random(), np.random.rand()
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(5)
    state = torch.get_rng_state()
    for position, data in enumerate(jpegs[:8]):
        decode(data, _sample_rng(0, 0, position))
    assert torch.equal(torch.get_rng_state(), state)
    assert (torch.rand(4), random.random(), np.random.rand())[1:] == expected[1:]
    torch.set_rng_state(state)
    assert torch.equal(torch.rand(4), expected[0])


def test_erasing_fills_a_rectangle_with_the_mean_colour_which_normalises_to_about_zero(jpegs):
    decode = _decoder(POLICIES["erasing alone"][0])
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in NORMALISATION["imagenet"])
    for position, data in enumerate(jpegs[:6]):
        image = decode(data, _sample_rng(0, 0, position))
        erased = (image == torch.tensor(IMAGENET_MEAN_UINT8).view(3, 1, 1)).all(0)
        rows, cols = erased.any(1).nonzero(), erased.any(0).nonzero()
        height, width = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert int(erased.sum()) == height * width >= 0.02 * SIZE * SIZE  # one solid rectangle, 2-33% of the area
        normalised = (image.float() / 255 - mean) / std
        assert normalised[:, erased].abs().max() < 0.01  # torchvision erases with 0 after normalising


def test_the_settings_are_checked_strictly():
    with pytest.raises(ConfigError, match="not one of.*Did you mean 'randaugment'"):
        from_dict(DataConfig, {"auto_augment": "randaugmnet"})
    with pytest.raises(ValueError, match="data.auto_augment='autoaugment' is not one of"):
        DataConfig(auto_augment="autoaugment")
    with pytest.raises(ValueError, match="apply to data.auto_augment=randaugment only"):
        DataConfig(auto_augment="trivialaugment", randaugment_magnitude=15)
    with pytest.raises(ValueError, match="randaugment_magnitude=31 must be in 0..30"):
        DataConfig(auto_augment="randaugment", randaugment_magnitude=31)
    with pytest.raises(ValueError, match="randaugment_num_ops=0 must be >= 1"):
        DataConfig(auto_augment="randaugment", randaugment_num_ops=0)
    with pytest.raises(ValueError, match="random_erasing=1.5 is a probability"):
        DataConfig(random_erasing=1.5)
    with pytest.raises(ValueError, match="repeated_augmentation=0 must be >= 1"):
        DataConfig(repeated_augmentation=0)
    assert DataConfig(auto_augment="randaugment", randaugment_num_ops=3, randaugment_magnitude=0).auto_augment


def test_the_data_settings_build_torchvisions_transforms_with_imagenets_mean_for_erasing(jpegs):
    manifest = {"dataset": "imagenet", "image": {"encoding": "jpeg", "channels": 3}}
    assert train_augment(manifest, DataConfig(repeated_augmentation=3)) is None  # crop and flip only
    augment = train_augment(manifest, DataConfig(auto_augment="randaugment", randaugment_num_ops=3,
                                                 randaugment_magnitude=15, random_erasing=0.5))
    upstream = v2.Compose([v2.RandAugment(num_ops=3, magnitude=15, interpolation=BILINEAR),
                           v2.RandomErasing(p=0.5, value=list(IMAGENET_MEAN_UINT8))])
    assert augment is not None
    for seed in range(6):  # several draws of ops, so that another magnitude or colour would show
        image = train_decoder(SIZE)(jpegs[seed], random.Random(seed))
        torch.manual_seed(random.Random(seed).getrandbits(63))
        assert torch.equal(augment(image, random.Random(seed)), upstream(image))


def test_png_shards_refuse_augmentation_they_would_not_get():
    manifest = {"dataset": "fashion_mnist", "image": {"encoding": "png", "channels": 1}}
    assert train_augment(manifest, DataConfig()) is None
    for setting in ({"auto_augment": "trivialaugment"}, {"random_erasing": 0.25}, {"repeated_augmentation": 3}):
        with pytest.raises(ValueError, match=f"data.{next(iter(setting))}=.* need JPEG shards"):
            train_augment(manifest, DataConfig(**setting))


# --- repeated augmentation, through the training stream ---------------------------------------------------

def _stream(shards, *, rank=0, world_size=1, num_workers=0, **data):
    manifest, root = shards
    cfg = DataConfig(shards=str(root), num_workers=num_workers, shuffle_buffer=4, image_size=SIZE, **data)
    return TrainStream(manifest, cfg, micro_batch_size=4, rank=rank, world_size=world_size, seed=11)


def _draw(stream, micro_batches):
    it = iter(stream)
    batches = [next(it) for _ in range(micro_batches)]
    return [(int(i), image) for b in batches for i, image in zip(b["index"], b["image"])]


def test_an_epoch_of_repeats_draws_a_third_of_the_samples_three_times_each_on_both_ranks(jpeg_shards):
    # 24 samples, 2 ranks x micro-batch 4: an epoch is 3 rounds of both ranks, 24 draws.
    ranks = [_draw(_stream(jpeg_shards, rank=r, world_size=2, repeated_augmentation=3,
                           auto_augment="trivialaugment"), 3) for r in range(2)]
    counts = Counter(i for drawn in ranks for i, _ in drawn)
    assert counts.total() == 24 and len(counts) == 8 and set(counts.values()) == {3}
    assert all({i for i, _ in drawn} & set(counts) for drawn in ranks)
    # With two ranks the three copies cannot all be apart: each sample is on both of them.
    assert all(sum(i == s for i, _ in drawn) for drawn in ranks for s in counts)
    copies: dict[int, list[torch.Tensor]] = {}
    for drawn in ranks:
        for i, image in drawn:
            copies.setdefault(i, []).append(image)
    assert all(not torch.equal(a, b) for images in copies.values() for n, a in enumerate(images) for b in images[:n])
    # The next epoch draws another third (of another permutation of the shards), again three times each.
    later = Counter(i for r in range(2) for i, _ in _draw(_stream(jpeg_shards, rank=r, world_size=2,
                                                                  repeated_augmentation=3), 6)[12:])
    assert later.total() == 24 and set(later.values()) == {3} and set(later) != set(counts)


def test_a_repeated_stream_resumed_mid_epoch_continues_exactly(jpeg_shards):
    settings = dict(repeated_augmentation=3, auto_augment="randaugment", random_erasing=0.25, num_workers=2)
    whole = _draw(_stream(jpeg_shards, **settings), 9)  # an epoch and a half
    first = _stream(jpeg_shards, **settings)
    _draw(first, 2)
    resumed = _stream(jpeg_shards, **settings)
    resumed.load_state_dict(first.state_dict())
    after = _draw(resumed, 7)
    assert [i for i, _ in after] == [i for i, _ in whole[8:]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(after, whole[8:]))


def test_a_position_saved_with_other_repeats_is_refused(jpeg_shards):
    state = _stream(jpeg_shards).state_dict()
    assert "repeats" not in state["order"]  # positions saved before the option existed still load
    with pytest.raises(ValueError, match="data.repeated_augmentation"):
        _stream(jpeg_shards, repeated_augmentation=3).load_state_dict(state)
