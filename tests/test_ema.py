"""The EMA of the weights (train.ema_decay): the average itself, exact resume, evaluation, export, config.

Every expectation is computed here from the trained module's own weights, not read back from the EMA.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from harness import global_batches, make_trainer, params_of, train_losses
from multiproc import run_ranks
from torch import nn

from dist_train.backends.export import model_state_dict
from dist_train.checkpoint import CheckpointError
from dist_train.config import ConfigError, TrainConfig, check, load_config
from dist_train.ema import EMA_MODEL_FILE
from dist_train.optim.config import LookaheadConfig, OptimConfig

SGD = OptimConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4)
RADAM_LA = OptimConfig(name="radam", lr=0.01, momentum=0.9, weight_decay=1e-4,
                       lookahead=LookaheadConfig(k=3, alpha=0.5))
SIZES = [16, 16, 16, 16, 32, 32, 32, 32]  # the batch grows after the checkpoint of the resume tests


def bn_net(seed: int = 0) -> nn.Module:
    """harness.tiny_net with a BatchNorm, whose running statistics the EMA averages too."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 13 * 13, 10))


def _floats(module: nn.Module) -> dict[str, torch.Tensor]:
    """The floating-point entries of a state_dict, in float64. BatchNorm's integer step counter is left out:
    upstream averages it too, then truncates it to an integer."""
    return {k: v.detach().double().clone() for k, v in module.state_dict().items() if v.is_floating_point()}


# --- the average ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("optim, decay, every", [(SGD, 0.9, 1), (RADAM_LA, 0.6, 3)], ids=["sgd-every-step",
                                                                                         "lookahead-every-3"])
def test_the_ema_is_the_hand_computed_average_of_the_weights_after_each_update(optim, decay, every):
    # e_1 = theta_1 at the first update (upstream copies it), then e = d e + (1 - d) theta at each update step,
    # over weights and BN statistics. With Lookahead, theta is what the optimizer steps: the fast weights.
    trainer = make_trainer(0, 1, batches=global_batches(7, 16), micro=8, optim=optim, model_fn=bn_net,
                           ema_decay=decay, ema_every_steps=every)
    expected = None
    for step in range(1, 8):
        trainer.train_step(trainer.schedule.state_at(trainer.progress.samples_seen))
        if step % every == 0:
            theta = _floats(trainer.backend.module)
            expected = theta if expected is None else {k: decay * expected[k] + (1 - decay) * theta[k] for k in theta}
    assert expected is not None
    got = _floats(trainer.ema.module)
    assert got.keys() == expected.keys() and "1.running_var" in got
    for key in expected:
        assert torch.allclose(got[key], expected[key], rtol=1e-6, atol=1e-7), key
    last = _floats(trainer.backend.module)
    assert max((expected[k] - last[k]).abs().max().item() for k in last) > 1e-3  # the average is not the model
    assert trainer.ema.updates == 7 // every


def test_a_step_skipped_as_non_finite_is_not_averaged_in():
    trainer = make_trainer(0, 1, batches=global_batches(3, 16), micro=8, optim=SGD, model_fn=bn_net, ema_decay=0.5)
    trainer.cfg = replace(trainer.cfg, nonfinite_loss="skip")
    train_losses(trainer, 2)
    before = _floats(trainer.ema.module)
    with torch.no_grad():
        next(trainer.backend.module.parameters())[0, 0, 0, 0] = math.nan  # the loss of the next step is NaN
    trainer.train_step(trainer.schedule.state_at(trainer.progress.samples_seen))
    assert trainer.progress.skipped_steps == 1 and trainer.ema.updates == 2
    assert all(torch.equal(v, before[k]) for k, v in _floats(trainer.ema.module).items())


# --- exact resume ----------------------------------------------------------------------------------------------
def _run(rank, world_size, run_dir, *, stop_at, shard=False):
    """8 steps with an EMA every 2nd step, interrupted after ``stop_at`` (0: not) and resumed in a fresh trainer;
    the losses, the parameters, the EMA and this rank's own BatchNorm statistics at the end."""
    kwargs = dict(batches=global_batches(8, SIZES), micro=4, optim=RADAM_LA, model_fn=bn_net, shard=shard,
                  run_dir=run_dir, ema_decay=0.8, ema_every_steps=2)
    trainer = make_trainer(rank, world_size, **kwargs)
    losses = train_losses(trainer, stop_at or 8)
    if stop_at:
        trainer.save_checkpoint()
        trainer = make_trainer(rank, world_size, **kwargs)  # a fresh model, optimizer, EMA and data stream
        trainer.load_checkpoint(trainer.checkpointer.latest_valid())
        losses += train_losses(trainer, 8 - stop_at)
    return (losses, params_of(trainer), trainer.ema.module.state_dict(), trainer.ema.updates,
            trainer.backend.module.state_dict()["1.running_mean"].clone())


def _assert_same_run(got, ref):
    losses, params, ema, updates, _ = got
    assert losses == ref[0] and torch.equal(params, ref[1])  # bit for bit
    assert ema.keys() == ref[2].keys() and all(torch.equal(ema[k], ref[2][k]) for k in ema)
    assert updates == ref[3] == 4


def test_one_process_resumed_between_two_ema_updates_ends_with_the_same_ema_bit_for_bit(tmp_path):
    # Step 5: after the update of step 4, before that of step 6, inside the second k=3 Lookahead cycle.
    ref = _run(0, 1, str(tmp_path / "a"), stop_at=0)
    got = _run(0, 1, str(tmp_path / "b"), stop_at=5)
    _assert_same_run(got, ref)
    assert (tmp_path / "b" / "step-00000005" / EMA_MODEL_FILE).is_file()


def _two_rank_runs(rank, world_size, run_dir):
    return {shard: (_run(rank, world_size, f"{run_dir}/a-{shard}", stop_at=0, shard=shard),
                    _run(rank, world_size, f"{run_dir}/b-{shard}", stop_at=5, shard=shard))
            for shard in (False, True)}


def test_two_ranks_resumed_between_two_ema_updates_end_with_the_same_ema_bit_for_bit(tmp_path):
    ranks = run_ranks(_two_rank_runs, str(tmp_path), world_size=2)
    for shard in (False, True):  # replicated and sharded optimizer state
        (ref0, got0), (ref1, got1) = ranks[0][shard], ranks[1][shard]
        _assert_same_run(got0, ref0)
        _assert_same_run(got1, ref1)
        # Each rank's BatchNorm kept statistics of its own micro-batches, yet the EMA is the same on both:
        # rank 0's, which is what the checkpoint holds and both ranks resume from.
        assert not torch.equal(ref0[4], ref1[4])
        assert all(torch.equal(ref0[2][k], ref1[2][k]) for k in ref0[2])


def test_a_resume_that_switches_the_ema_on_or_off_is_refused(tmp_path):
    for written, resumed in ((0.9, 0.0), (0.0, 0.9)):
        run_dir = str(tmp_path / f"{written}-{resumed}")
        first = make_trainer(0, 1, batches=global_batches(2, 16), micro=8, optim=SGD, run_dir=run_dir,
                             ema_decay=written)
        train_losses(first, 1)
        first.save_checkpoint()
        second = make_trainer(0, 1, batches=global_batches(2, 16), micro=8, optim=SGD, run_dir=run_dir,
                              ema_decay=resumed)
        with pytest.raises(CheckpointError, match="EMA of the weights switched on or off"):
            second.load_checkpoint(second.checkpointer.latest_valid())


# --- evaluation and export -------------------------------------------------------------------------------------
def _by_hand(state: dict[str, torch.Tensor], batches: list[dict]) -> tuple[float, float]:
    """Loss and top-1 of a fresh model holding ``state`` over ``batches``, normalised as the harness does."""
    model = bn_net(seed=1)
    model.load_state_dict(state)
    model.eval()
    images = torch.cat([b["image"] for b in batches]).float()
    labels = torch.cat([b["label"] for b in batches])
    with torch.no_grad():
        logits = model((images - 0.5 * 255) / (0.25 * 255))
    return F.cross_entropy(logits, labels).item(), (logits.argmax(dim=1) == labels).double().mean().item()


def test_evaluation_reports_the_model_and_its_ema_each_from_its_own_weights():
    trainer = make_trainer(0, 1, batches=global_batches(4, 16), micro=8, optim=SGD, model_fn=bn_net, ema_decay=0.7)
    train_losses(trainer, 4)
    held_out = global_batches(3, 10, seed=5)
    trainer.parts = replace(trainer.parts, eval_loader_fn=lambda: iter(held_out))
    metrics = trainer.evaluate()
    loss, acc1 = _by_hand(trainer.backend.module.state_dict(), held_out)
    ema_loss, ema_acc1 = _by_hand(trainer.ema.module.state_dict(), held_out)
    assert metrics["eval/loss"] == pytest.approx(loss, rel=1e-5) and metrics["eval/acc1"] == pytest.approx(acc1)
    assert metrics["eval/ema_loss"] == pytest.approx(ema_loss, rel=1e-5)
    assert metrics["eval/ema_acc1"] == pytest.approx(ema_acc1)
    assert 0 <= metrics["eval/ema_acc5"] <= 1 and metrics["eval/samples"] == 30
    assert abs(ema_loss - loss) > 1e-4  # two models, two measurements


def test_export_writes_the_ema_with_the_models_own_keys_and_the_default_stays_the_evaluated_weights(tmp_path):
    from dist_train.cli import main

    trainer = make_trainer(0, 1, batches=global_batches(3, 16), micro=8, optim=SGD, model_fn=bn_net,
                           run_dir=str(tmp_path / "run"), ema_decay=0.5)
    train_losses(trainer, 3)
    path = trainer.save_checkpoint()
    out = tmp_path / "ema.pt"
    assert main(["export", str(path), str(out), "--weights", "ema"]) == 0
    exported = torch.load(out, weights_only=True)
    assert list(exported) == list(bn_net().state_dict())  # no "module." prefix, no n_averaged
    ema = trainer.ema.module.state_dict()
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
    bn_net().load_state_dict(exported, strict=True)
    evaluated = model_state_dict(path)  # the default: what eval/* measured, the trained weights here
    trained = trainer.backend.module.state_dict()
    assert all(torch.equal(evaluated[k], trained[k]) for k in trained)
    assert not torch.equal(evaluated["4.weight"], exported["4.weight"])


def test_exporting_the_ema_of_a_run_without_one_says_so(tmp_path):
    trainer = make_trainer(0, 1, batches=global_batches(1, 16), micro=8, optim=SGD, run_dir=str(tmp_path))
    train_losses(trainer, 1)
    with pytest.raises(CheckpointError, match="without train.ema_decay"):
        model_state_dict(trainer.save_checkpoint(), weights="ema")


def test_a_run_with_an_ema_reports_it_checkpoints_it_and_logs_both_models(small_shards, tmp_path, capsys):
    from dist_train.cli import main
    from dist_train.train import _log_model

    run_dir = tmp_path / "run"
    assert main(["train", f"data.shards={small_shards}", f"train.run_dir={run_dir}", "model.name=cifar_resnet8",
                 "model.width=4", "data.num_workers=0", "train.global_batch_size=32", "train.micro_batch_size=16",
                 "train.max_steps=3", "train.device=cpu", "train.progress_bar=false", "train.eval_every_epochs=0",
                 "tracking.enabled=false", "train.ema_decay=0.9", "train.ema_every_steps=2"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {"eval/acc1", "eval/ema_acc1", "eval/ema_loss"} <= summary.keys() and summary["step"] == 3
    assert f"(EMA of the weights: {summary['eval/ema_acc1']:.4f})" in capsys.readouterr().out
    checkpoint = run_dir / "checkpoints" / "step-00000003"
    assert torch.load(checkpoint / "rank-0.pt", weights_only=True)["ema"]["n_averaged"] == 1  # step 2 only
    logged = []
    trainer = SimpleNamespace(checkpointer=SimpleNamespace(paths=lambda: [checkpoint]), ema=object(),
                              tracker=SimpleNamespace(log_artifact=lambda f, artifact_path: logged.append(f.name)))
    _log_model(trainer, run_dir)
    assert logged == ["model.pt", "model-ema.pt"]
    exported = torch.load(run_dir / "model" / "model-ema.pt", weights_only=True)
    saved = torch.load(checkpoint / EMA_MODEL_FILE, weights_only=True)
    assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)


# --- config ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decay", [1.0, 1.5, -0.1, math.nan])
def test_an_ema_decay_outside_zero_to_one_is_an_error_naming_the_field(decay):
    with pytest.raises(ValueError, match=r"train\.ema_decay=.* must be in \(0, 1\)"):
        TrainConfig(ema_decay=decay)
    with pytest.raises(ConfigError, match="train.ema_decay"):
        load_config(None, [f"train.ema_decay={decay}"])


def test_ema_every_steps_must_be_positive_and_warns_when_the_ema_is_off():
    with pytest.raises(ConfigError, match="train.ema_every_steps=0 must be >= 1"):
        load_config(None, ["train.ema_decay=0.99", "train.ema_every_steps=0"])
    with pytest.warns(UserWarning, match="does nothing with train.ema_decay=0"):
        TrainConfig(ema_every_steps=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TrainConfig(ema_decay=0.9998, ema_every_steps=32)


def test_the_ema_with_deepspeed_is_refused_before_anything_starts():
    with pytest.raises(ConfigError, match="train.ema_decay with backend.name=deepspeed.*use backend.name=ddp"):
        check(load_config(None, ["train.ema_decay=0.9998", "backend.name=deepspeed"]))
    check(load_config(None, ["train.ema_decay=0.9998"]))
