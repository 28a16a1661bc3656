"""Config: strict keys, types and values, with messages that say what to do."""

from pathlib import Path

import pytest

from dist_train.config import ConfigError, accumulation_steps, flatten, load_config, to_dict

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides():
    cfg = load_config(None, ["optim.lr=0.4", "train.global_batch_size=512", "schedule.mode=decay_lr",
                              "schedule.milestones_epochs=[1, 2]"])
    assert cfg.optim.lr == 0.4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.global_batch_size == 512
    assert cfg.schedule.milestones_epochs == (1.0, 2.0)
    assert flatten(cfg)["optim.lr"] == 0.4


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("optim:\n  lr: 0.2\n  name: radam\ntrain:\n  epochs: 2\n")
    cfg = load_config(path, ["optim.lr=0.3"])
    assert (cfg.optim.name, cfg.optim.lr, cfg.train.epochs) == ("radam", 0.3, 2.0)


def test_unknown_key_names_the_field_and_suggests_the_fix():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.lrr'.*Did you mean 'lr'"):
        load_config(None, ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'.*Did you mean 'train'"):
        load_config(None, ["trian.epochs=1"])


def test_unknown_key_without_a_close_match_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"Valid keys here: .*global_batch_size"):
        load_config(None, ["train.zzzz=1"])


def test_wrong_types_are_errors():
    with pytest.raises(ConfigError, match=r"optim\.lr: expected a number, got 'fast'"):
        load_config(None, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"train\.global_batch_size: expected an integer, got 25\.5"):
        load_config(None, ["train.global_batch_size=25.5"])
    with pytest.raises(ConfigError, match=r"train\.progress_bar: expected true or false"):
        load_config(None, ["train.progress_bar=1"])
    with pytest.raises(ConfigError, match=r"optim\.name: 'radm' is not one of .*Did you mean 'radam'"):
        load_config(None, ["optim.name=radm"])


def test_non_divisible_batch_is_an_error_with_the_fix():
    with pytest.raises(ConfigError, match=r"global_batch_size=200 is not a multiple of train\.micro_batch_size=128"):
        load_config(None, ["train.global_batch_size=200"])
    cfg = load_config(None, ["train.global_batch_size=384", "train.micro_batch_size=128"])
    with pytest.raises(ConfigError, match=r"not divisible by train\.micro_batch_size x world size = 128 x 2 = 256"):
        accumulation_steps(cfg.train.global_batch_size, micro_batch_size=128, world_size=2)
    assert accumulation_steps(1024, micro_batch_size=128, world_size=2) == 4


def test_impossible_values_are_errors():
    with pytest.raises(ConfigError, match=r"optim\.momentum=1\.5 must be in \[0, 1\)"):
        load_config(None, ["optim.momentum=1.5"])
    with pytest.raises(ConfigError, match="no length"):
        load_config(None, ["train.epochs=0"])


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(None, ["optim.lr"])


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert to_dict(cfg)["train"]["global_batch_size"] == cfg.train.global_batch_size


def test_non_finite_numbers_are_errors():
    for text in ("optim.lr=.nan", "optim.lr=.inf", "train.epochs=-.inf"):
        with pytest.raises(ConfigError, match="is not a finite number"):
            load_config(None, [text])
