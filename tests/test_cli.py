"""The ``dist-train`` command line: dotted overrides may sit before, between or after options."""

from __future__ import annotations

import pytest

from dist_train import cli


def test_overrides_after_an_option_are_kept_in_order(capsys):
    rc = cli.main(["launch", "local", "optim.lr=0.5", "--nproc", "2", "train.global_batch_size=256",
                   "--dry-run", "optim.lr=0.25", "train.device=cpu"])
    assert rc == 0
    command = capsys.readouterr().out
    assert "--nproc_per_node=2" in command or "--nproc-per-node=2" in command
    # Every override reaches the ranks, in the order given, so the later optim.lr wins.
    tail = command.split("train", 1)[1]
    positions = [tail.index(o) for o in ("optim.lr=0.5", "train.global_batch_size=256", "optim.lr=0.25",
                                         "train.device=cpu")]
    assert positions == sorted(positions)


def test_config_command_applies_overrides_from_either_side_of_nothing(capsys):
    assert cli.main(["config", "optim.lr=0.5", "optim.name=radam"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.5" in out and "name: radam" in out


@pytest.mark.parametrize("argv", [["launch", "local", "--nproc", "2", "--no-such-option"],
                                  ["launch", "local", "optim.lr=1", "--nproc", "2", "stray"],
                                  ["report", "--experiment", "x", "optim.lr=1"]])
def test_unknown_arguments_are_still_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err
