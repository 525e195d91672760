"""Property test: any params document either loads or fails with one ConfigError line."""

from __future__ import annotations

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amoc import config
from amoc.errors import ConfigError

KEYS = [
    "variant",
    "queue_size",
    "leverage",
    "seed",
    "data",
    "model",
    "pretrain",
    "probe",
    "evaluate",
    "runtime",
    "name",
    "epochs",
    "batch_size",
    "eps",
    "attack",
    "augment",
    "crop_scale",
    "milestones",
    "md5",
    "width",
    "curve_eps",
    "steps",
    "bogus",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["8/255", "ACA+", "aca_plus", "1/0", "cuda:0", "trades", ""]),
)
documents = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)),
    max_leaves=20,
)


def _one_line_or_config(raw):
    try:
        cfg = config.from_dict(raw)
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc)
        return None
    assert isinstance(cfg, config.Config)
    return cfg


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_any_document_loads_or_fails_cleanly(raw):
    _one_line_or_config(raw)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["variant", "queue_size", "leverage", "seed"]), scalars, max_size=4))
def test_top_level_knobs(raw):
    _one_line_or_config(raw)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_any_text_file(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("p") / "params.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        config.load(path)
    except ConfigError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=30), max_size=4))
def test_any_overrides(items):
    base = yaml.safe_load(open(config.__file__.replace("amoc/config.py", "params.yaml")))
    try:
        config.from_dict(config.apply_overrides(base, items))
    except ConfigError as exc:
        assert "\n" not in str(exc)


def test_self_referencing_and_deep_yaml(tmp_path):
    import pytest

    for name, text in (("rec.yaml", "a: &a [*a]\n"), ("deep.yaml", "a: " + "[" * 50000 + "]" * 50000 + "\n")):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ConfigError, match="nested too deeply or refers to itself"):
            config.load(path)
