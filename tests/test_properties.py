"""Property-based tests (hypothesis) of the two parsers a user feeds by hand: the config validator
(``TrainConfig.from_dict``) and the study spec parser (``StudySpec.from_dict(...).resolve()``).

For any input, either a valid object comes back, one that round-trips through its file format, or the
user's error: :class:`ConfigError` / :class:`UsageError` with a one-line message. Never another exception.
Inputs are valid documents with random keys replaced by random values (wrong types, NaN, infinities,
huge numbers, empty and odd strings, lists, mappings) and random unknown keys added.
"""

from __future__ import annotations

import copy
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wus_tune._study.spec import StudySpec
from wus_tune.config import TrainConfig
from wus_tune.errors import ConfigError, UsageError

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 0.5, 1e-9, 1e9, "", "all", "last:2", "last:0", "cosine", "step", "vgg11", "mlp", "digits",
                     "cpu", "cuda:0", "auto", "accuracy,time", "knee", "fastest-within:1", "wus", "tpe", "nsga2", "none"]),
    st.text(max_size=12),
)  # fmt: skip
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6,
)


def paths(doc, prefix=()):
    """Every key path of a nested mapping."""
    for k, v in doc.items():
        yield prefix + (k,)
        if isinstance(v, dict):
            yield from paths(v, prefix + (k,))


def mutate(draw, doc, extra_keys):
    doc = copy.deepcopy(doc)
    all_paths = list(paths(doc))
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from(all_paths))
        node = doc
        for k in path[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict):
            if draw(st.booleans()) and draw(st.booleans()):
                node.pop(path[-1], None)
            else:
                node[path[-1]] = draw(values)
    if draw(st.integers(0, 9)) == 0:
        doc[draw(st.sampled_from(extra_keys))] = draw(values)
    return doc


def one_line(e: Exception) -> None:
    assert str(e) and "\n" not in str(e), repr(e)


VALID_CONFIG = TrainConfig().replace({"model.name": "mlp", "data.name": "digits", "methods.wus": {},
                                      "methods.approx_ops.sample_ratio": 0.5}).to_dict()  # fmt: skip


@st.composite
def config_docs(draw):
    return mutate(draw, VALID_CONFIG, ["colour", "wus_", "Model", ""])


@SETTINGS
@given(config_docs())
def test_config_validator_accepts_or_explains(doc):
    try:
        config = TrainConfig.from_dict(doc)
    except ConfigError as e:
        one_line(e)
        return
    again = TrainConfig.from_dict(config.to_dict())
    assert again == config
    assert again.to_dict() == config.to_dict()


@pytest.mark.parametrize("fmt", ["yaml", "json"])
@SETTINGS
@given(doc=config_docs())
def test_valid_configs_round_trip_through_files(tmp_path_factory, fmt, doc):
    try:
        config = TrainConfig.from_dict(doc)
    except ConfigError:
        return
    if any(isinstance(v, float) and not math.isfinite(v) for v in _leaves(config.to_dict())):
        return  # JSON has no NaN/inf; YAML keeps them but they compare unequal (NaN != NaN)
    path = tmp_path_factory.mktemp("cfg") / f"c.{fmt}"
    assert TrainConfig.load(config.save(path)) == config


def _leaves(d):
    for v in d.values() if isinstance(d, dict) else d:
        if isinstance(v, (dict, list)):
            yield from _leaves(v)
        else:
            yield v


VALID_SPEC = {
    "name": "prop",
    "train": {"model": {"name": "mlp", "width": 0.25}, "data": {"name": "digits"}, "epochs": 4, "device": "cpu"},
    "objectives": "accuracy,time",
    "sampler": "tpe",
    "sampler_options": {"n_startup_trials": 3},
    "seed": 0,
    "n_trials": 5,
    "timeout": 60.0,
    "constraint_delta": 1.0,
    "baseline_fractions": [0.5, 0.75],
    "enqueue": [{"methods.wus.variant": "wus", "methods.wus.threshold": 0.02}],
    "search_space": {"methods.wus.threshold": {"low": 0.002, "high": 0.03}, "epochs": {"low": 2, "high": 4}},
    "select": "fastest-within:1.0",
    "max_trials": 10,
    "heartbeat_interval": 5,
    "grace_period": 20,
    "max_retry": 1,
    "reconnect_timeout": 30.0,
}


@st.composite
def spec_docs(draw):
    return mutate(draw, VALID_SPEC, ["trials", "devices", "Name", "search-space"])


@SETTINGS
@given(spec_docs())
def test_spec_parser_accepts_or_explains(doc):
    try:
        study = StudySpec.from_dict(doc, source="p.yaml").resolve()
    except UsageError as e:
        one_line(e)
        assert str(e).startswith("p.yaml: ")
        return
    assert study.name and study.objectives[0] == "accuracy"
    # A valid spec round-trips: its dict resolves to the same study.
    again = StudySpec.from_dict(StudySpec.from_dict(doc, source="p.yaml").to_dict(), source="p.yaml").resolve()
    assert (again.name, again.objectives, again.space.to_json(), again.base) == (study.name, study.objectives,
                                                                               study.space.to_json(), study.base)  # fmt: skip
