"""Study specs, the search space and the enqueued trials: everything that needs no training."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from wus_tune._study.space import SearchSpace, apply_values, flat_config
from wus_tune._study.spec import StudySpec, make_sampler, parse_objectives
from wus_tune._study.storage import default_storage, mask_url
from wus_tune.config import TrainConfig
from wus_tune.errors import UsageError
from wus_tune.methods.wus.study import WUSStudy
from wus_tune.study import initial_trials

STUDIES = Path(__file__).resolve().parent.parent / "studies"
TINY = {"model": {"name": "mlp", "width": 0.25}, "data": {"name": "digits"}, "epochs": 4, "device": "cpu"}


def spec(**kw):
    return StudySpec.from_dict({"train": TINY, **kw}, source="test.yaml")


def test_defaults_resolve():
    s = spec().resolve()
    assert s.name == "mlp-digits"
    assert s.objectives == ("accuracy", "relative_time") and s.directions == ["maximize", "minimize"]
    assert s.storage == default_storage("mlp-digits") == "sqlite:///studies/mlp-digits.db"
    assert s.methods == ("wus",) and s.space.only_method == "wus"  # WUS says compared_by_default
    assert s.space.keys() == list(WUSStudy.search_space())
    assert str(s.select) == "fastest-within:1"


@pytest.mark.parametrize("path", sorted(STUDIES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_specs_are_valid(path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    s = StudySpec.load(path).resolve()
    assert s.name == path.stem
    assert len(initial_trials(s)) >= 3


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"objectives": "accuracy,speed"}, "unknown objective 'speed'"),
        ({"objectives": "time,accuracy"}, "accuracy then one or two of relative_time"),
        ({"sampler": "cmaes"}, "unknown sampler 'cmaes'"),
        ({"train": {**TINY, "model": {"name": "vgg99"}}}, "model.name: unknown value 'vgg99'"),
        ({"trials": 3}, "trials: unknown key"),
        ({"train": {**TINY, "methods": {"wus": {"treshold": 0.1}}}}, "methods.wus.treshold: unknown argument"),
        ({"train": {**TINY, "wus": {"treshold": 0.1}}}, "methods.wus.treshold: unknown argument"),  # version 1's spelling
        ({"search_space": {"methods.wus.threshold": {"low": 0.1, "high": 0.01}}}, "inverted range"),
        ({"search_space": {"methods.wus.threshold": {"low": 0.01, "hi": 0.1}}}, "wus.threshold.hi: unknown field"),
        ({"search_space": {"methods.wus.threshold": {"low": 0.01, "high": 2.0}}}, r"value 2.0 is not a valid config"),
        ({"search_space": {"methods.wus.nope": {"low": 1, "high": 2}}}, "methods.wus.nope"),
        ({"search_space": {"methods.wus.threshold": {"low": 0, "high": 0.1, "log": True}}}, "log range needs low > 0"),
        ({"search_space": {"methods.wus.variant": {"choices": ["wus", "fast"]}}}, "wus.variant: value 'fast' is not a valid config"),
        ({"search_space": {"epochs": {"low": 2}}}, "give 'choices', or 'low' and 'high'"),
        ({"sampler_options": {"n_startup": 3}}, "sampler_options"),
        ({"select": "best"}, "selection rule 'best'"),
        ({"baseline_fractions": [0.5, 1.5]}, r"baseline_fractions\[1\]"),
        ({"n_trials": 0}, "n_trials"),
        ({"enqueue": [{"methods.wus.thresh": 0.1}]}, r"enqueue\[0\]"),
    ],
)
def test_bad_specs_name_the_problem(raw, match):
    with pytest.raises(UsageError, match=match) as e:
        spec(**raw).resolve() if "train" not in raw else StudySpec.from_dict(raw, "test.yaml").resolve()
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("test.yaml: ")


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("train: [1, 2\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        StudySpec.load(p)


def test_objectives_parsing():
    assert parse_objectives("accuracy, cost") == ("accuracy", "cost")
    assert parse_objectives(["accuracy", "time", "cost"]) == ("accuracy", "time", "cost")
    with pytest.raises(UsageError):
        parse_objectives("accuracy,accuracy")


def test_space_overrides_merge_add_remove():
    space = SearchSpace.build({
        "methods.wus.threshold": {"low": 0.002, "high": 0.03},        # merge: stays float, log
        "methods.wus.lr_decay": None,                                  # remove
        "schedule.name": {"choices": ["step", "cosine"]},      # add categorical
        "epochs": {"low": 2, "high": 4},                       # add int
        "methods.wus.signal": {"choices": ["val_acc", "train_acc"]},   # a methods.wus.* knob: WUS-only
    })  # fmt: skip
    t = space["methods.wus.threshold"]
    assert (t.type, t.low, t.high, t.log) == ("float", 0.002, 0.03, True)
    assert "methods.wus.lr_decay" not in space
    assert space["epochs"].type == "int" and space["schedule.name"].type == "categorical"
    assert space["methods.wus.signal"].active({"method": "wus"}) and not space["methods.wus.signal"].active({"method": "none"})
    assert space["schedule.name"].when == {}


def test_apply_values_methods_and_list_items():
    base = TrainConfig.from_dict(TINY)
    cfg = apply_values(base, {"method": "wus", "methods.wus.variant": "wus", "methods.wus.threshold": 0.02,
                              "methods.wus.schedule_window[1]": 0.6})  # fmt: skip
    assert cfg.methods == {"wus": {"variant": "wus", "threshold": 0.02, "schedule_window": [0.0, 0.6]}}
    plain = apply_values(base, {"method": "none", "methods.wus.threshold": 0.02, "epochs": 2})
    assert plain.methods == {} and plain.epochs == 2  # the knobs of a method the trial does not run go


def test_the_variant_is_a_knob_of_wus_and_labels_a_trial_by_what_it_changes():
    """WUS+LR is the knob ``methods.wus.variant``: ``wus`` leaves the LR-coupling knobs out, ``wus+lr`` applies
    them; a trial's label (its ``variant`` attribute) says ``wus+lr`` only where they change something."""
    from wus_tune._study.catalog import default_methods, trial_label

    assert default_methods() == ["wus"]
    base = TrainConfig.from_dict(TINY)
    for entry, label in (({}, "wus"), ({"lr_decay": 0.5}, "wus+lr"), ({"variant": "wus", "lr_decay": 0.5}, "wus"),
                         ({"variant": "wus+lr"}, "wus"), ({"variant": "wus+lr", "bias_lr_factor": 2.0}, "wus+lr")):  # fmt: skip
        config = base.replace({"methods.wus": entry})
        assert trial_label("wus", config) == label, entry
        assert config.methods["wus"] == entry  # the config keeps what was given
    assert trial_label("none", base) == "none"
    roles = [role for role, _ in initial_trials(spec().resolve())]
    assert roles[:2] == ["baseline", "wus-default"]


def test_sampling_is_conditional():
    space = SearchSpace.build()
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler("tpe", {}, seed=0))
    seen = {"wus": set(), "wus+lr": set()}
    for _ in range(12):
        trial = study.ask()
        values = space.sample(trial)
        seen[values["methods.wus.variant"]].update(values)
        study.tell(trial, [0.5, 1.0])
    assert "methods.wus.lr_decay" in seen["wus+lr"] and "methods.wus.lr_decay" not in seen["wus"]
    # Fixed values are not suggested and win over the space.
    trial = study.ask()
    values = space.sample(trial, fixed={"method": "none"})
    assert values == {"method": "none"} and trial.params == {}


def test_initial_trials_baseline_frontier():
    s = spec(baseline_fractions=[0.5, 0.75], search_space={"schedule.name": {"choices": ["cosine", "step"]}}).resolve()
    trials = initial_trials(s)
    roles = [r for r, _ in trials]
    assert roles[:2] == ["baseline", "wus-default"]
    base = trials[0][1]
    assert base["method"] == "none" and base["epochs"] == 4 and base["schedule.name"] == "cosine"
    wus = trials[1][1]
    assert wus["methods.wus.variant"] == "wus" and wus["methods.wus.threshold"] == 0.01 and "methods.wus.lr_decay" not in wus
    frontier = {(f["schedule.name"], f["epochs"]) for r, f in trials if r == "baseline-frontier"}
    assert frontier == {("cosine", 2), ("cosine", 3), ("step", 4), ("step", 3), ("step", 2)}
    params, overrides = s.space.split_fixed(base)
    assert params == {"schedule.name": "cosine"} and overrides["method"] == "none"


def test_mask_url():
    assert mask_url("postgresql://me:s3cret@db:5432/x") == "postgresql://me:***@db:5432/x"
    assert mask_url("mysql+pymysql://u:p@h/db") == "mysql+pymysql://u:***@h/db"
    assert mask_url("sqlite:///studies/a.db") == "sqlite:///studies/a.db"
    assert mask_url("http://host:5000") == "http://host:5000"


def test_flat_config_keys_are_dotted():
    flat = flat_config(TrainConfig().replace({"methods.wus": {"threshold": 0.01, "schedule_window": [0.0, 0.75]}}).to_dict())
    assert flat["methods.wus.threshold"] == 0.01 and flat["methods.wus.schedule_window"] == [0.0, 0.75]
    assert flat["model.kwargs"] == {}  # an empty mapping stays a value


def test_a_trial_seeded_sampler_draws_by_study_seed_and_trial_number():
    """Under --ray any worker process may ask any trial: its draws must depend on the study seed and the
    trial number only, not on the process that asks, what it asked before or what the trials returned."""
    from wus_tune._study.trial_seed import TrialSeededSampler

    def sampler(seed):
        return TrialSeededSampler(lambda s: make_sampler("tpe", {"n_startup_trials": 100}, seed=s), seed)

    def draws(seed, handles, values):
        storage = optuna.storages.InMemoryStorage()
        optuna.create_study(study_name="s", storage=storage, directions=["maximize", "minimize"])
        asking = [optuna.load_study(study_name="s", storage=storage, sampler=sampler(seed)) for _ in range(handles)]
        out = {}
        for k in range(8):
            study = asking[k % handles]  # the processes take turns
            trial = study.ask()
            out[trial.number] = (trial.suggest_float("lr", 1e-4, 1.0, log=True), trial.suggest_categorical("v", ["a", "b", "c"]))
            study.tell(trial, values(k))
        return out

    one = draws(3, 1, lambda k: (k / 10, 1.0))
    assert draws(3, 3, lambda k: (1 - k / 10, k)) == one  # three askers, another history: the same draws
    assert draws(4, 1, lambda k: (k / 10, 1.0)) != one
    assert len({v for v in one.values()}) == len(one)  # no two trials share a draw
