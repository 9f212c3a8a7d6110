"""The plug-in methods in the study: the ``method`` choice and each method's knobs, the effective-ratio
parametrisation, the edge-of-chaos guideline's enqueued trials and narrowed decay range, the sparsity /
params objective, and small end-to-end studies on digits (about 20 s in all on 2 cores)."""

from __future__ import annotations

import math

import optuna
import pytest
import yaml

from wus_tune._cli import run_main
from wus_tune._study.catalog import declarations
from wus_tune._study.space import METHOD_KEY, RATIO_KEY, apply_values, method_parts, param_from_dict
from wus_tune._study.spec import StudySpec, parse_objectives
from wus_tune.config import TrainConfig
from wus_tune.errors import ConfigError, UsageError
from wus_tune.methods import build_methods
from wus_tune.methods.edge_of_chaos import balancing_weight_decay, effective_ratio, narrowed_weight_decay_range
from wus_tune.pareto import objective_values
from wus_tune.study import initial_trials, run_study
from wus_tune.study import main as study_main

optuna.logging.set_verbosity(optuna.logging.WARNING)

TINY = {"model": {"name": "mlp", "width": 0.25, "depth": 3}, "data": {"name": "digits"}, "epochs": 2, "device": "cpu"}
TWO_LAYER = {**TINY, "model": {"name": "mlp", "width": 0.25, "depth": 2}}  # for gauss_newton
ALL = ["none", "wus", "approx_ops", "approx_ops+wus", "lp_sphere", "lp_sphere+wus", "edge_of_chaos", "edge_of_chaos+wus"]
GN = ["none", "wus", "lp_sphere", "gauss_newton", "edge_of_chaos"]


def spec(**kw):
    return StudySpec.from_dict({"train": TINY, **kw}, source="test.yaml")


def test_method_names_parse():
    assert method_parts("none") == () and method_parts("approx_ops+wus") == ("approx_ops", "wus")
    for bad in ("fast", "gauss_newton+wus", "approx_ops+lp_sphere", "wus+wus", "", 3):
        with pytest.raises(ConfigError):
            method_parts(bad)


@pytest.mark.parametrize("ratio, methods, train", [(False, ALL, TINY), (True, ALL, TINY), (True, GN, TWO_LAYER)])
def test_space_samples_valid_configs_for_each_method(ratio, methods, train):
    eoc = {"edge_of_chaos": {"effective_ratio": ratio, "log_j": False}}  # J only where the method is chosen
    s = spec(methods=methods, train=train, **eoc).resolve()
    space, base = s.space, s.base
    assert space.keys()[0] == METHOD_KEY and space[METHOD_KEY].choices == tuple(methods)
    assert (RATIO_KEY in space) == ratio and ("optim.lr" in space) == (not ratio)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for choice in methods:
        parts = method_parts(choice)
        for _ in range(6):
            trial = study.ask()
            values = space.sample(trial, fixed={METHOD_KEY: choice})
            config = apply_values(base, values)  # TrainConfig.replace: validated
            TrainConfig.from_dict(config.to_dict())  # and it round-trips
            build_methods(config.methods)
            assert list(config.methods) == list(parts)  # the chosen methods, in the choice's order
            for name in ("wus", "approx_ops", "lp_sphere", "gauss_newton"):  # a method's knobs only with it
                knobs = {k for k in trial.params if k.startswith(f"methods.{name}.")}
                assert bool(knobs) == (name in parts), (choice, trial.params)
            optim_knobs = {"optim.momentum", "optim.batch_size", "optim.weight_decay"} & set(trial.params)
            assert bool(optim_knobs) == ("edge_of_chaos" in parts)
            if "edge_of_chaos" not in parts:
                assert config.optim == base.optim
            study.tell(trial, 0.0)


def test_ratio_reparametrisation_yields_the_asked_ratio():
    s = spec(methods=["edge_of_chaos"], edge_of_chaos={}).resolve()
    base = s.base
    for g, m, b in [(3e-4, 0.5, 32), (4e-3, 0.9, 128), (3e-2, 0.95, 256)]:
        config = apply_values(base, {METHOD_KEY: "edge_of_chaos", RATIO_KEY: g, "optim.momentum": m, "optim.batch_size": b})
        assert math.isclose(effective_ratio(config.optim.lr, config.optim.momentum, config.optim.batch_size), g, rel_tol=1e-9)
    # sampled: every edge_of_chaos trial's lr gives back its sampled ratio
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(20):
        trial = study.ask()
        values = s.space.sample(trial)
        o = apply_values(base, values).optim
        assert math.isclose(effective_ratio(o.lr, o.momentum, o.batch_size), values[RATIO_KEY], rel_tol=1e-9)
        study.tell(trial, 0.0)
    # the base recipe's ratio gives back its learning rate exactly
    g0 = effective_ratio(base.optim.lr, base.optim.momentum, base.optim.batch_size)
    assert apply_values(base, {RATIO_KEY: g0}).optim.lr == base.optim.lr
    with pytest.raises(ConfigError, match="optim.ratio"):
        apply_values(base, {RATIO_KEY: -1.0})


def test_method_default_trials_follow_the_baselines():
    s = spec(methods=["wus", "approx_ops", "lp_sphere+wus"], baseline_fractions=[0.5]).resolve()
    trials = initial_trials(s)
    roles = [r for r, _ in trials]
    assert roles == ["baseline", "wus-default", "baseline-frontier"] + ["method-default"] * 2
    assert trials[0][1][METHOD_KEY] == "none" and trials[1][1][METHOD_KEY] == "wus"
    defaults = {v[METHOD_KEY]: v for r, v in trials if r == "method-default"}
    known = declarations()
    assert defaults["approx_ops"]["methods.approx_ops.sample_ratio"] == known["approx_ops"].DEFAULT_TRIAL["sample_ratio"]
    assert defaults["lp_sphere+wus"]["methods.wus.variant"] == "wus"
    assert defaults["lp_sphere+wus"]["methods.wus.threshold"] == 0.01  # WUS's default, the base config having none
    for values in defaults.values():
        apply_values(s.base, values)
    gn = spec(methods=["gauss_newton"], train=TWO_LAYER).resolve()  # one method: its default runs second
    (role, values), = [t for t in initial_trials(gn) if t[0].endswith("-default")]
    assert role == "gauss_newton-default"
    assert apply_values(gn.base, values).methods["gauss_newton"]["step_size"] == known["gauss_newton"].DEFAULT_TRIAL["step_size"]
    base_cfg = apply_values(s.base, trials[0][1])
    assert base_cfg.methods == {}
    # without wus among the methods: no WUS knob and no WUS default; the first method's default runs second
    s = spec(methods=["approx_ops", "lp_sphere"]).resolve()
    assert not any(k.startswith("methods.wus.") for k in s.space.keys())
    assert [r for r, _ in initial_trials(s)][:3] == ["baseline", "approx_ops-default", "baseline-frontier"]


def test_knob_ranges_are_overridable_and_documented():
    s = spec(methods=["approx_ops"], search_space={"methods.approx_ops.sample_ratio": {"low": 0.4, "high": 0.6}}).resolve()
    p = s.space["methods.approx_ops.sample_ratio"]
    assert (p.low, p.high) == (0.4, 0.6) and p.when == {METHOD_KEY: ("approx_ops",)}  # merged, still conditional
    for name, declared in declarations().items():
        for key, raw in declared.search_space().items():
            p = param_from_dict(key, raw)
            assert p.doc and p.validate() is p, (name, key)


def test_guideline_trials_and_narrowed_decay():
    eoc = {"growth_rate": 20.0, "guideline": True, "narrow_weight_decay": True, "batch_sizes": [32, 128],
           "epochs_fractions": [0.5, 1.0]}  # fmt: skip
    s = spec(methods=["wus", "edge_of_chaos"], edge_of_chaos=eoc, train={**TINY, "epochs": 4}).resolve()
    n = s.sections["edge_of_chaos"].n_train
    assert n == 1797 - round(1797 * 0.1)
    low, high = narrowed_weight_decay_range(1e-3, growth_rate=20.0, n_train=n)
    wd = s.space["optim.weight_decay"]
    assert math.isclose(wd.low, low) and math.isclose(wd.high, high) and wd.log
    guide = [v for r, v in initial_trials(s) if r == "guideline"]
    g0 = effective_ratio(s.base.optim.lr, s.base.optim.momentum, s.base.optim.batch_size)
    assert len(guide) == 3 * 2 * 2  # ratios g0/3, g0, 3 g0 x batch sizes x epoch fractions
    assert {round(v[RATIO_KEY] / g0, 6) for v in guide} == {round(1 / 3, 6), 1.0, 3.0}
    assert {v["epochs"] for v in guide} == {2, 4}
    for v in guide:
        assert v[METHOD_KEY] == "edge_of_chaos"
        assert math.isclose(v["optim.weight_decay"], balancing_weight_decay(1.0, growth_rate=20.0, n_train=n))
        assert low <= v["optim.weight_decay"] <= high
        config = apply_values(s.base, v)
        assert math.isclose(effective_ratio(config.optim.lr, 0.9, config.optim.batch_size), v[RATIO_KEY], rel_tol=1e-9)
    # the guideline replaces edge of chaos's own default trial; J is logged in every trial
    assert not any(v.get(METHOD_KEY) == "edge_of_chaos" for r, v in initial_trials(s) if r == "method-default")
    assert "edge_of_chaos" in apply_values(s.base, initial_trials(s)[0][1]).methods


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"methods": ["wus", "fast"]}, r"methods\[1\]: unknown method 'fast'"),
        ({"methods": ["gauss_newton+wus"]}, "unsupported combination"),
        ({"methods": ["wus", "wus"]}, "twice"),
        ({"methods": []}, "non-empty"),
        ({"methods": ["gauss_newton"], "train": {**TINY, "model": {"name": "mlp", "depth": 3}}}, "two-layer mlp"),
        ({"methods": ["gauss_newton"], "train": {**TINY, "model": {"name": "vgg11"}}}, "two-layer mlp"),
        ({"methods": ["approx_ops"], "train": TWO_LAYER}, "nothing to approximate"),
        ({"edge_of_chaos": {}}, "add 'edge_of_chaos' to the spec's methods"),
        ({"methods": ["edge_of_chaos"], "edge_of_chaos": {"guideline": True}}, "growth_rate"),
        ({"methods": ["edge_of_chaos"], "edge_of_chaos": {"growth_rate": "soon"}}, "growth_rate"),
        ({"methods": ["edge_of_chaos"], "edge_of_chaos": {"j_range": [1.2, 0.8]}}, "j_range"),
        ({"methods": ["approx_ops"], "search_space": {"method": {"choices": ["wus"]}}}, "methods:"),
        ({"methods": ["approx_ops"], "search_space": {"methods.approx_ops.sample_ratio": {"low": 0.5, "high": 1.5}}},
         "not a valid config"),
        ({"objectives": "accuracy,sparsity"}, "accuracy then one or two of relative_time"),
    ],
)
def test_bad_method_specs_name_the_problem(raw, match):
    with pytest.raises(UsageError, match=match):
        spec(**raw).resolve()


@pytest.mark.parametrize("how", ["spec", "option"])
def test_bad_method_name_from_the_cli_is_exit_2(tmp_path, monkeypatch, capsys, how):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump({"train": TINY}))
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"train": TINY, "methods": ["wus", "approx_opps"]}))
    argv = ["--spec", "bad.yaml"] if how == "spec" else ["--spec", "ok.yaml", "--methods", "wus,approx_opps"]
    assert run_main(study_main, [*argv, "--tracking-uri", "none"]) == 2
    err = capsys.readouterr().err
    assert "methods[1]: unknown method 'approx_opps'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "studies").exists()  # nothing written


def test_objectives_with_sparsity_or_params():
    assert parse_objectives("accuracy,time,sparsity") == ("accuracy", "time", "sparsity")
    assert parse_objectives("accuracy,cost,params") == ("accuracy", "cost", "params")
    assert parse_objectives("accuracy,time,cost,sparsity")[-1] == "sparsity"
    for bad in ("accuracy,sparsity,time", "accuracy,time,sparsity,params", "sparsity,accuracy,time"):
        with pytest.raises(UsageError):
            parse_objectives(bad)

    class Epoch:
        def __init__(self, extra):
            self.extra = extra

    class Result:
        val_acc, time_s, cost_flops, num_params = 0.9, 2.0, 1e9, 1000
        epochs = [Epoch({})]

    dense = objective_values(Result(), ("accuracy", "time", "sparsity"))
    assert dense == {"accuracy": 0.9, "time": 2.0, "sparsity": 0.0}
    assert objective_values(Result(), ("accuracy", "cost", "params"))["params"] == 1000
    sparse = Result()
    sparse.epochs = [Epoch({}), Epoch({"lp_sphere/sparsity": 0.5, "lp_sphere/params_active": 600.0})]
    assert objective_values(sparse, ("accuracy", "time", "sparsity"))["sparsity"] == 0.5
    assert objective_values(sparse, ("accuracy", "time", "params"))["params"] == 600.0


def test_two_methods_three_objectives_end_to_end(study_dir):
    train = {**TINY, "methods": {"lp_sphere": {"prune_every": 4}}}  # the lp_sphere trials' fixed knobs
    s = StudySpec.from_dict({
        "name": "methods-e2e", "train": train, "methods": ["approx_ops", "lp_sphere"],
        "objectives": "accuracy,cost,sparsity", "baseline_fractions": [0.5], "tracking_uri": "none",
        "sampler_options": {"n_startup_trials": 2},
    }, source="test")  # fmt: skip
    n_initial = len(initial_trials(s.resolve()))
    assert n_initial == 4  # baseline, frontier, approx_ops and lp_sphere defaults
    outcome = run_study(s, n_trials=n_initial + 3, echo=None, report_dir=study_dir / "report")
    a = outcome.analysis
    assert len(a.complete) == n_initial + 3 and a.objectives == ("accuracy", "cost", "sparsity")
    assert a.front and a.hv_history and outcome.selected is not None
    by_role = {c.role: c for c in a.complete}
    assert by_role["baseline"].values[2] == 0.0 and not by_role["baseline"].uses_method  # dense, plain: the frontier
    lp = [c for c in a.complete if c.attrs.get("method") == "lp_sphere"]
    assert lp and all(c.values[2] > 0 for c in lp) and all(c.uses_method for c in lp)
    assert all(c.config["methods"].get("lp_sphere", {}).get("prune_every") == 4 for c in lp)
    assert all("lp_sphere" not in c.config["methods"] for c in a.complete if c.attrs.get("method") != "lp_sphere")
    csv = (study_dir / "report" / "trials.csv").read_text().splitlines()
    header = csv[0].split(",")
    assert header[:8] == ["trial", "state", "role", "variant", "feasible", "accuracy", "cost", "sparsity"]
    assert header[-1] == "method" and {row.split(",")[-1] for row in csv[1:]} == {"none", "approx_ops", "lp_sphere"}
    assert (study_dir / "report" / "pareto_front.png").stat().st_size > 0


def test_guideline_study_calibrates_enqueues_and_logs_j(study_dir):
    from mlflow import MlflowClient

    tracking = "sqlite:///mlruns/mlflow.db"
    s = StudySpec.from_dict({
        "name": "guideline-e2e", "train": {**TINY, "epochs": 2}, "methods": ["edge_of_chaos"],
        "baseline_fractions": [], "tracking_uri": tracking, "objectives": "accuracy,cost",
        "edge_of_chaos": {"growth_rate": "auto", "calibration_epochs": 3, "guideline": True, "ratios": [0.004]},
    }, source="test")  # fmt: skip
    lines: list[str] = []
    outcome = run_study(s, n_trials=2, echo=lines.append)
    assert any(line.startswith("edge_of_chaos: c = ") for line in lines)
    study = optuna.load_study(study_name="guideline-e2e", storage="sqlite:///studies/guideline-e2e.db")
    c = study.user_attrs["spec"]["edge_of_chaos"]["growth_rate"]
    assert isinstance(c, float) and c > 0
    roles = [t.user_attrs["role"] for t in study.trials]
    assert roles == ["baseline", "guideline", "tuned-plain"]  # the guideline trial's yardstick, waiting
    assert study.trials[2].state == optuna.trial.TrialState.WAITING
    guide = study.trials[1].user_attrs["config"]["optim"]
    n = 1797 - round(1797 * 0.1)
    assert math.isclose(guide["weight_decay"], c / (2 * n))
    assert math.isclose(guide["lr"] / ((1 - guide["momentum"]) * guide["batch_size"]), 0.004)
    # J reaches MLflow every epoch, for the baseline too (log_j)
    client = MlflowClient(tracking)
    for t in study.trials[:2]:  # the finished ones
        run_id = t.user_attrs["mlflow_run_id"]
        history = client.get_metric_history(run_id, "edge_of_chaos/J_mean")
        assert [m.step for m in history] == [1, 2]
        assert client.get_run(run_id).data.tags.get("wus_tune.method") == t.user_attrs["method"]
    assert outcome.status == "FINISHED"
