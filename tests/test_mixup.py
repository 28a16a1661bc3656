"""MixUp and CutMix of the device micro-batch (train.mixup_alpha, train.cutmix_alpha, train.mix_switch_prob).

The expectations are computed here, not taken from the code under test: lam is read back from the targets
and the mixed images are checked against lam x + (1 - lam) x' with the partner x' found by search; CutMix's
pasted pixels are counted; the loss is cross-entropy written out by hand. Labels are distinct within a
micro-batch, so a target's two weights can be told apart.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
from harness import global_batches, make_trainer, params_of, train_losses
from test_host_syncs import recorded_host_reads

from dist_train.config import ConfigError, TrainConfig, load_config
from dist_train.mixing import MixUpCutMix, build_mixer
from dist_train.optim.config import OptimConfig

K = 10  # classes
SGD = OptimConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4)


def _mixer(*, mixup: float = 0.0, cutmix: float = 0.0, switch: float = 0.5, seed: int = 7) -> MixUpCutMix:
    return MixUpCutMix(mixup_alpha=mixup, cutmix_alpha=cutmix, switch_prob=switch, num_classes=K, seed=seed)


def _micro_batch(n: int = 8, size: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Normal-distributed images (no two pixels equal) and distinct labels."""
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, 1, size, size, generator=g), torch.randperm(K, generator=g)[:n]


def _mix(mixer: MixUpCutMix, step: int = 0, rank: int = 0, micro_batch: int = 0):
    x, y = _micro_batch()
    mixed, targets = mixer(x.clone(), y.clone(), step=step, rank=rank, micro_batch=micro_batch)
    return x, y, mixed, targets


def _partner(x: torch.Tensor, residual: torch.Tensor) -> int:
    """The index of the image in ``x`` closest to ``residual``."""
    return int((x - residual).flatten(1).norm(dim=1).argmin())


# --- targets ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [dict(mixup=0.2), dict(cutmix=1.0), dict(mixup=0.2, cutmix=1.0)],
                         ids=["mixup", "cutmix", "both"])
def test_targets_are_class_probabilities_on_two_labels(kind):
    mixer = _mixer(**kind)
    for step in range(20):
        x, y, mixed, targets = _mix(mixer, step)
        assert targets.shape == (len(y), K) and targets.dtype.is_floating_point
        assert torch.allclose(targets.sum(dim=1), torch.ones(len(y)), atol=1e-6)
        assert (targets >= 0).all()
        assert ((targets > 0).sum(dim=1) <= 2).all()  # the own label and the partner's
        assert mixed.shape == x.shape


# --- MixUp --------------------------------------------------------------------------------------------------
def test_mixup_images_are_lam_x_plus_one_minus_lam_partner_with_the_lam_of_the_targets():
    mixer = _mixer(mixup=1.0)
    lams = []
    for step in range(12):
        x, y, mixed, targets = _mix(mixer, step)
        lam = targets[torch.arange(len(y)), y]
        assert torch.allclose(lam, lam[0].expand_as(lam), atol=1e-6)  # one lam per micro-batch
        lam = float(lam[0])
        assert 0.0 < lam < 1.0
        lams.append(lam)
        partners = []
        for i in range(len(y)):
            j = _partner(x, (mixed[i] - lam * x[i]) / (1 - lam))
            assert j != i
            torch.testing.assert_close(mixed[i], lam * x[i] + (1 - lam) * x[j], rtol=1e-5, atol=1e-5)
            assert float(targets[i, y[j]]) == pytest.approx(1 - lam, abs=1e-6)  # the partner's label, 1 - lam
            partners.append(j)
        assert sorted(partners) == list(range(len(y)))  # a permutation: every sample is someone's partner
    assert len(set(lams)) == len(lams)  # a fresh lam every step


@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_mixup_lam_follows_beta_alpha_alpha(alpha):
    # Beta(a, a) has mean 1/2 and variance 1 / (4 (2a + 1)): 0.179 for a=0.2, 0.083 for a=1, apart by 2x.
    mixer, (x, y) = _mixer(mixup=alpha), _micro_batch(n=2)
    lams = np.array([float(mixer(x, y, step=s, rank=0, micro_batch=0)[1][0, y[0]]) for s in range(600)])
    assert lams.mean() == pytest.approx(0.5, abs=0.05)
    assert lams.var() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.15)


# --- CutMix -------------------------------------------------------------------------------------------------
def test_cutmix_pastes_a_box_from_the_partner_whose_area_is_the_partner_label_weight():
    mixer = _mixer(cutmix=1.0)
    areas = []
    for step in range(30):
        x, y, mixed, targets = _mix(mixer, step)
        changed = (mixed != x).any(dim=1)  # (n, H, W): pixels that are no longer the sample's own
        assert (changed == changed[0]).all()  # the same box for the whole micro-batch
        rows, cols = changed[0].any(dim=1).nonzero().flatten(), changed[0].any(dim=0).nonzero().flatten()
        area = int(changed[0].sum())
        if area:  # a rectangle: its bounding box is filled
            assert area == len(rows) * len(cols) == (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
        fraction = area / changed[0].numel()
        areas.append(fraction)
        for i in range(len(y)):
            assert float(targets[i, y[i]]) == pytest.approx(1 - fraction, abs=1e-6)
            if area:
                box = changed[i]
                j = _partner(x[:, :, box], mixed[i][:, box])
                assert j != i and torch.equal(mixed[i][:, box], x[j][:, box])  # pasted as is, same place
                assert float(targets[i, y[j]]) == pytest.approx(fraction, abs=1e-6)
    assert 0 < np.mean(areas) < 1 and len(set(areas)) > 10  # boxes of many sizes


# --- both ---------------------------------------------------------------------------------------------------
def test_with_both_on_the_switch_probability_is_the_share_of_cutmix_micro_batches():
    mixer, (x, y) = _mixer(mixup=1.0, cutmix=1.0, switch=0.3), _micro_batch(n=4)
    cutmix = 0
    for step in range(400):
        mixed, _ = mixer(x, y, step=step, rank=0, micro_batch=0)
        cutmix += bool((mixed == x).any())  # CutMix keeps pixels outside the box; MixUp changes every one
    assert cutmix / 400 == pytest.approx(0.3, abs=0.07)


# --- randomness ---------------------------------------------------------------------------------------------
def test_the_same_key_gives_the_same_batch_and_any_other_key_another():
    mixer = _mixer(mixup=0.2, cutmix=1.0)
    _, _, mixed, targets = _mix(mixer, step=3, rank=1, micro_batch=2)
    _, _, again, again_targets = _mix(_mixer(mixup=0.2, cutmix=1.0), step=3, rank=1, micro_batch=2)
    assert torch.equal(mixed, again) and torch.equal(targets, again_targets)
    for other in [_mix(mixer, step=4, rank=1, micro_batch=2), _mix(mixer, step=3, rank=0, micro_batch=2),
                  _mix(mixer, step=3, rank=1, micro_batch=1), _mix(_mixer(mixup=0.2, cutmix=1.0, seed=8), 3, 1, 2)]:
        assert not torch.equal(other[3], targets)


def _rng_states():
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def test_a_mixed_training_step_leaves_the_global_generators_as_they_were():
    trainer = make_trainer(0, 1, batches=global_batches(2, 16), micro=8, optim=SGD,
                           batch_mixer=_mixer(mixup=0.2, cutmix=1.0))
    torch_state, np_state, py_state = _rng_states()
    train_losses(trainer, 2)
    after = _rng_states()
    assert torch.equal(after[0], torch_state) and np.array_equal(after[1], np_state) and after[2] == py_state
    # The check can fail: torchvision's own MixUp draws lam from torch's global generator.
    from torchvision.transforms.v2 import MixUp

    MixUp(alpha=0.2, num_classes=K)(*_micro_batch())
    assert not torch.equal(torch.get_rng_state(), torch_state)


def test_a_mixed_step_reads_nothing_back_to_the_host_but_the_agreed_flags():
    trainer = make_trainer(0, 1, batches=global_batches(2, 16), micro=8, optim=SGD,
                           batch_mixer=_mixer(mixup=0.2, cutmix=1.0))
    for _ in range(2):
        with recorded_host_reads() as calls:
            trainer.train_step(trainer._schedule_state())
        assert len(calls) == 1 and calls[0].startswith("tolist at faults.py:"), calls


# --- the loss and train/acc1 ---------------------------------------------------------------------------------
def _cross_entropy_by_hand(logits: torch.Tensor, targets: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Per sample: -sum_k q_k log softmax(logits)_k, with q = (1 - eps) targets + eps / K."""
    q = (1 - epsilon) * targets.double() + epsilon / targets.shape[1]
    return -(q * torch.log_softmax(logits.double(), dim=1)).sum(dim=1)


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_training_loss_and_accuracy_are_those_of_the_mixed_micro_batches(epsilon):
    batches = global_batches(1, 16, seed=3)
    mixer = _mixer(mixup=0.2, cutmix=1.0)
    trainer = make_trainer(0, 1, batches=batches, micro=8, optim=SGD, batch_mixer=mixer)
    trainer.cfg = dataclasses.replace(trainer.cfg, label_smoothing=epsilon)
    losses, plain_losses, weights = [], [], []
    with torch.no_grad():  # the weights do not change within a step: the optimizer steps after the micro-batches
        for i in range(2):
            images = trainer.normalise(batches[0]["image"][8 * i:8 * (i + 1)])
            labels = batches[0]["label"][8 * i:8 * (i + 1)]
            mixed, targets = mixer(images, labels, step=0, rank=0, micro_batch=i)
            logits = trainer.backend.module(mixed)
            losses.append(_cross_entropy_by_hand(logits, targets, epsilon))
            weights.append(targets[torch.arange(8), logits.argmax(dim=1)])
            plain = torch.nn.functional.one_hot(labels, K).double()
            plain_losses.append(_cross_entropy_by_hand(trainer.backend.module(images), plain, epsilon))
    trainer.train_step(trainer._schedule_state())
    metrics = trainer.collect_train_metrics()
    expected = float(torch.cat(losses).mean())
    assert metrics["train/loss"] == pytest.approx(expected, rel=1e-6)
    assert abs(expected - float(torch.cat(plain_losses).mean())) > 1e-3  # mixing changed the loss: this can fail
    assert metrics["train/acc1"] == pytest.approx(float(torch.cat(weights).mean()), abs=1e-9)


def test_train_accuracy_with_soft_targets_is_the_weight_on_the_predicted_class():
    from dist_train.trainer import _MetricWindow

    window = _MetricWindow(torch.device("cpu"))
    targets = torch.tensor([[0.7, 0.3, 0.0, 0.0],   # predicts 0, its own label: 0.7
                            [0.7, 0.3, 0.0, 0.0],   # predicts 1, the partner's: 0.3
                            [0.0, 0.0, 0.6, 0.4],   # predicts 0, neither: 0
                            [0.0, 0.0, 0.0, 1.0]])  # unmixed hit: 1
    logits = torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0], [5.0, 0, 0, 0], [0, 0, 0, 5.0]])
    window.add(torch.tensor(1.0), logits, targets, torch.zeros((), dtype=torch.long))
    window.add(torch.tensor(1.0), logits, torch.tensor([0, 0, 2, 3]), torch.zeros((), dtype=torch.long))  # 2 of 4

    class _OneRank:
        def all_reduce(self, t):
            return t

    assert window.reduce(_OneRank())["train/acc1"] == pytest.approx((0.7 + 0.3 + 0 + 1 + 2) / 8)


# --- exact resume -------------------------------------------------------------------------------------------
SIZES = [16, 16, 16, 32, 32, 32]  # micro 4: 4, then 8 accumulation steps


def _run(run_dir, *, stop_at: int = 0, mixer=True):
    batches = global_batches(len(SIZES), SIZES, seed=2)

    def trainer():
        return make_trainer(0, 1, batches=batches, micro=4, optim=SGD, run_dir=str(run_dir),
                            batch_mixer=_mixer(mixup=0.4, cutmix=1.0) if mixer else None)

    first = trainer()
    if not stop_at:
        return train_losses(first, len(SIZES)), params_of(first)
    losses = train_losses(first, stop_at)
    first.save_checkpoint()
    second = trainer()  # a fresh model, optimizer, stream and mixer
    second.load_checkpoint(second.checkpointer.latest_valid())
    return losses + train_losses(second, len(SIZES) - stop_at), params_of(second)


def test_a_resumed_mixed_run_gives_the_uninterrupted_losses_and_parameters_bit_for_bit(tmp_path):
    ref_losses, ref_params = _run(tmp_path / "a")
    losses, params = _run(tmp_path / "b", stop_at=4)  # after the batch grew, with 8 micro-batches a step
    assert losses == ref_losses and torch.equal(params, ref_params)
    unmixed, _ = _run(tmp_path / "c", mixer=False)
    assert unmixed != ref_losses  # the mixer was applied, so the comparison above can fail


# --- config ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, words", [
    (["train.mixup_alpha=-0.1"], ["train.mixup_alpha=-0.1", ">= 0"]),
    (["train.cutmix_alpha=-1"], ["train.cutmix_alpha=-1", ">= 0"]),
    (["train.mixup_alpha=0.2", "train.cutmix_alpha=1.0", "train.mix_switch_prob=1.0"],
     ["train.mix_switch_prob=1.0", "(0, 1)", "train.mixup_alpha=0"]),
    (["train.mixup_alpha=0.2", "train.cutmix_alpha=1.0", "train.mix_switch_prob=0"],
     ["train.mix_switch_prob=0", "train.cutmix_alpha=0"]),
    (["train.mixup_alpha=0.2", "train.mix_switch_prob=0.3"], ["train.mix_switch_prob=0.3", "both"]),
    (["train.cutmix_alpha=1.0", "train.micro_batch_size=1", "train.global_batch_size=8"],
     ["train.micro_batch_size >= 2"]),
])
def test_impossible_mixing_settings_are_errors_naming_the_field_and_the_fix(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_torchvisions_recipe_loads_and_builds_a_mixer_and_the_default_builds_none():
    cfg = load_config(None, ["train.mixup_alpha=0.2", "train.cutmix_alpha=1.0", "train.label_smoothing=0.1"])
    mixer = build_mixer(cfg.train, num_classes=K, seed=0)
    assert isinstance(mixer, MixUpCutMix) and mixer.mixup is not None and mixer.cutmix is not None
    assert mixer.mixup.alpha == 0.2 and mixer.cutmix.alpha == 1.0 and mixer.mixup.num_classes == K
    assert build_mixer(TrainConfig(), num_classes=K, seed=0) is None


def test_the_run_builds_its_mixer_with_the_manifests_classes(tmp_path):
    from conftest import write_fmnist_subset

    from dist_train.distributed import DistInfo
    from dist_train.train import _parts

    manifest = write_fmnist_subset(tmp_path, n_train=16, n_test=8, samples_per_shard=8)
    info = DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
    for overrides, mixes in ([], False), (["train.cutmix_alpha=1.0"], True):
        cfg = load_config("configs/demo.yaml", [f"data.shards={tmp_path}", "train.device=cpu", *overrides])
        mixer = _parts(cfg, info, manifest, precision="fp32", checkpointer=None).batch_mixer
        assert (mixer is not None) == mixes
    assert isinstance(mixer, MixUpCutMix) and mixer.cutmix is not None and mixer.cutmix.num_classes == 10
