"""Fuzzed configs: whatever a user writes, the loader answers with a Config or a ConfigError, never a crash."""

import dataclasses

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dist_train.config import Config, ConfigError, flatten, load_config

REAL_KEYS = sorted(flatten(Config()))
SECTIONS = sorted({k.split(".")[0] for k in REAL_KEYS})

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["radam", "sgd", "hybrid", "increase_batch_cosine", "inf",
                                                           "1e-3", "[1, 2]", "{}"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)
keys = st.one_of(st.sampled_from(REAL_KEYS), st.sampled_from(SECTIONS),
                 st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.", min_size=1, max_size=20))


def _yaml_value(v):
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(keys, values), max_size=4))
def test_any_overrides_give_a_config_or_a_config_error(pairs):
    overrides = [f"{k}={_yaml_value(v)}" for k, v in pairs]
    try:
        cfg = load_config(None, overrides)
    except ConfigError as err:
        assert str(err)  # a message for the user, never empty
    else:
        assert isinstance(cfg, Config) and dataclasses.is_dataclass(cfg)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.one_of(st.sampled_from(SECTIONS), st.text(max_size=8)),
                       st.one_of(values, st.dictionaries(st.sampled_from([k.split(".", 1)[1] for k in REAL_KEYS]),
                                                         values, max_size=4)), max_size=4))
def test_any_yaml_file_gives_a_config_or_a_config_error(tmp_path_factory, tree):
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    try:
        load_config(path)
    except ConfigError as err:
        assert str(err)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=80))
def test_arbitrary_text_files_and_override_strings_never_crash(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_text(text)
    for call in (lambda: load_config(path), lambda: load_config(None, [text])):
        try:
            call()
        except ConfigError:
            pass
