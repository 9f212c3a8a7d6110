"""Bad input, everywhere a user types it: every option of ``wus_tune.study``, ``wus_tune.pareto`` and
``wus_tune.train``, and every spec key. Each is one line on stderr (``error: ...``) and exit status 2,
with nothing written to any store; inside a study, a trial that cannot run (out of memory, a raise)
is a failed trial with its reason and the study goes on. In-process and fast (a few seconds), apart
from one tiny study."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch

from wus_tune._cli import run_main
from wus_tune._study.objective import is_out_of_memory, one_line
from wus_tune._study.spec import StudySpec
from wus_tune.errors import UsageError
from wus_tune.pareto import main as pareto_main
from wus_tune.study import main as study_main
from wus_tune.study import run_study
from wus_tune.train import main as train_main

TINY = {"model": {"name": "mlp", "width": 0.25}, "data": {"name": "digits"}, "epochs": 1, "device": "cpu"}
BASE = ["--model", "mlp", "--dataset", "digits", "--epochs", "1", "--device", "cpu", "--tracking-uri", "none"]


@pytest.fixture
def workdir(study_dir):
    tmp_path = study_dir
    (tmp_path / "afile").write_text("x")
    (tmp_path / "corrupt.tar.gz").write_bytes(b"\x1f\x8b not really gzip")
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    return tmp_path


def cli(main, argv, capsys):
    try:
        code = run_main(main, argv)
    except SystemExit as e:  # argparse
        code = e.code
    captured = capsys.readouterr()
    return code, captured.err


def assert_one_line(code, err, message):
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert "Traceback" not in err


def nothing_written(root: Path) -> None:
    assert not (root / "mlruns").exists()
    assert not list(root.glob("studies/*.db")) and not list(root.glob("studies/*.journal"))


STUDY_CASES = [
    # wrong types
    (["--epochs", "x"], "argument --epochs: invalid int value"),
    (["--n-trials", "many"], "invalid int value"),
    (["--timeout", "soon"], "invalid float value"),
    (["--constraint-delta", "x"], "invalid float value"),
    (["--workers", "two"], "invalid int value"),
    (["--set", "model.width=abc"], "model.width: expected a number"),
    (["--set", "noequals"], "expected KEY=VALUE"),
    # out of range
    (["--n-trials", "0"], "n_trials: expected an integer >= 1"),
    (["--epochs", "0"], "epochs: 0 is out of range"),
    (["--timeout", "-5"], "timeout: must be positive"),
    (["--timeout", "nan"], "timeout: expected a finite number"),
    (["--seed", "-1"], "seed: expected an integer >= 0"),
    (["--constraint-delta", "inf"], "constraint_delta: expected a finite number"),
    (["--set", "data.subset=5"], "data.subset: 5 is out of range"),
    (["--max-trials", "0"], "max_trials: expected an integer >= 1"),
    (["--heartbeat-interval", "0"], "heartbeat_interval: expected an integer >= 1"),
    (["--grace-period", "10"], "grace_period: must exceed heartbeat_interval"),
    (["--max-retry", "-1"], "max_retry: expected an integer >= 0"),
    (["--reconnect-timeout", "-1"], "reconnect_timeout: expected seconds >= 0"),
    (["--workers", "0"], "--workers: expected an integer >= 1"),
    (["--devices", "cpu", "--workers-per-device", "0"], "--workers-per-device: expected an integer >= 1"),
    (["--gpus-per-trial", "0.25"], "gpus_per_trial: needs ray (e.g. --ray auto)"),
    (["--ray", "local", "--cpus-per-trial", "-1"], "cpus_per_trial: expected a number >= 0"),
    (["--ray", "local", "--gpus-per-trial", "1.5"], "gpus_per_trial: a fraction must be below 1"),
    (["--ray", "local", "--cpus-per-trial", "0"], "cpus_per_trial: 0 needs gpus_per_trial > 0"),
    (["--ray", "local", "--devices", "cpu"], "--ray places trials itself"),
    (["--ray", " "], "ray: expected auto, local or a cluster address"),
    (["--ray", "nohostport"], "--ray nohostport: expected auto, local or HOST:PORT"),
    # unknown names
    (["--model", "vgg99"], "model.name: unknown value 'vgg99'"),
    (["--dataset", "mnist"], "data.name: unknown value 'mnist'"),
    (["--device", "tpu"], "device: expected auto, cpu, cuda or cuda:N"),
    (["--sampler", "cmaes"], "unknown sampler 'cmaes'"),
    (["--objectives", "accuracy,speed"], "unknown objective 'speed'"),
    (["--select", "best"], "selection rule 'best'"),
    (["--set", "methods.wus.treshold=0.1"], "methods.wus.treshold: unknown argument"),
    (["--devices", "x"], "'x' is not a GPU index"),
    (["--devices", "cpu,0"], "either cpu or GPU indices"),
    (["--workers-per-device", "2"], "--workers-per-device needs --devices"),
    (["--study-name", " "], "--study-name: expected a name"),
    (["--no-such-option"], "unrecognized arguments: --no-such-option"),
    # files and data
    (["--spec", "missing.yaml"], "missing.yaml: cannot read config file"),
    (["--spec", "bad.yaml"], "bad.yaml: not valid YAML"),
    (["--spec", "list.yaml"], "expected a mapping at the top level"),
    (["--dataset", "imagefolder", "--data-dir", "corrupt.tar.gz"], "corrupt.tar.gz: cannot read the archive"),
    (["--dataset", "cifar10", "--data-dir", "no/such/dir"], "'no/such/dir' does not exist"),
    # stores and output directories
    (["--storage", "foo://bar"], "cannot open the Optuna storage"),
    (["--storage", "sqlite:///nodir/x.db"], "directory 'nodir' does not exist"),
    (["--storage", "journal:///nodir/x.journal"], "directory 'nodir' does not exist"),
    (["--storage", "postgresql://me:pw-9x@127.0.0.1:1/db"], "me:***@127.0.0.1:1/db: cannot open the Optuna storage"),
    (["--storage", "mysql+pymysql://root:pw-9x@127.0.0.1:1/db"], "root:***@127.0.0.1:1/db: cannot open the Optuna storage"),
    (["--tracking-uri", "http://u:pw-9x@127.0.0.1:1"], "u:***@127.0.0.1:1: MLflow server not reachable"),
    (["--tracking-uri", "postgresql://u:pw-9x@127.0.0.1:1/x"], "database not reachable"),
    (["--tracking-uri", "./mlruns"], "no longer accepts the plain file store"),
    (["--tracking-uri", "sqlite:///afile/mlflow.db"], "'afile' is not a directory"),
    (["--storage", "sqlite:///afile/x.db"], "directory 'afile' does not exist"),
]


@pytest.mark.parametrize("argv, message", STUDY_CASES, ids=[" ".join(a) for a, _ in STUDY_CASES])
def test_study_cli(workdir, capsys, argv, message):
    code, err = cli(study_main, BASE + argv, capsys)
    assert_one_line(code, err, message)
    assert "pw-9x" not in err
    nothing_written(workdir)


def test_study_unwritable_report_directory(workdir, capsys):
    """MLflow off: the report goes to studies/<name>/; ``studies`` being a file is found before anything runs."""
    (workdir / "studies").write_text("not a directory")
    code, err = cli(study_main, BASE + ["--storage", f"sqlite:///{workdir}/x.db"], capsys)
    assert_one_line(code, err, "'studies' is not a directory")
    assert not (workdir / "x.db").exists()


def test_devices_without_gpus(workdir, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, err = cli(study_main, BASE + ["--devices", "0,1"], capsys)
    assert_one_line(code, err, "GPU 0 does not exist (this machine has no CUDA GPU); on CPU use --devices cpu --workers N")


# ---- every spec key ------------------------------------------------------------------------------------

WRONG = {
    "name": 5, "description": 3, "train": [1], "objectives": 7, "methods": "wus,x", "edge_of_chaos": 5, "sampler": 1,
    "sampler_options": [1], "seed": "zero", "n_trials": 2.5, "timeout": "soon", "storage": 5, "tracking_uri": 5,
    "constraint_delta": "x", "baseline_fractions": 0.5, "enqueue_defaults": "yes", "enqueue": {"a": 1},
    "default_search_space": "no", "search_space": [1], "select": 5, "accuracy_margin": "x", "cost_factor": "x",
    "max_trials": "x", "heartbeat_interval": 0.5, "grace_period": "x", "max_retry": "x", "reconnect_timeout": "x",
    "ray": 5, "gpus_per_trial": "x", "cpus_per_trial": "x",
    "confirm": "yes", "baseline_repeats": 1.5, "seeds": "three",
    "reuse": 5, "pruner": "sometimes", "pruner_options": [1],
}  # fmt: skip
OUT_OF_RANGE = {
    "seed": -1, "n_trials": 0, "timeout": 0, "constraint_delta": float("nan"), "baseline_fractions": [0.0],
    "accuracy_margin": -1, "cost_factor": 0.5, "max_trials": 0, "heartbeat_interval": 0, "grace_period": 0,
    "max_retry": -1, "reconnect_timeout": -1.0, "objectives": "accuracy", "select": "fastest-within:x",
    "gpus_per_trial": -0.5, "cpus_per_trial": float("inf"),
    "confirm": -1, "baseline_repeats": 0, "seeds": {"min": 3, "max": 2},
    "reuse": {"max_checkpoints": -1},
}  # fmt: skip


def test_every_spec_key_is_covered():
    import dataclasses

    from wus_tune._study.catalog import declarations

    sections = {name for name, d in declarations().items() if d.SPEC_SECTION is not None}  # edge_of_chaos
    keys = {f.name for f in dataclasses.fields(StudySpec) if not f.metadata.get("internal")} | sections
    assert keys == set(WRONG), sorted(keys ^ set(WRONG))


@pytest.mark.parametrize("key, value", list(WRONG.items()) + list(OUT_OF_RANGE.items()), ids=lambda v: str(v))
def test_bad_spec_values_name_the_key(key, value):
    with pytest.raises(UsageError) as e:
        StudySpec.from_dict({"train": TINY, key: value}, source="s.yaml").resolve()
    text = str(e.value)
    assert text.startswith("s.yaml: ") and "\n" not in text
    assert key in text or (key == "select" and "selection rule" in text) or (key == "train" and "config" in text), text


def test_inverted_and_unknown_search_space(capsys):
    for space, message in [
        ({"methods.wus.threshold": {"low": 0.1, "high": 0.01}}, "inverted range"),
        ({"methods.wus.window": {"low": 4, "high": 1}}, "inverted range"),
        ({"epochs": {"low": 0, "high": 3}}, "search_space.epochs: value 0 is not a valid config"),
        ({"methods.wus.warmup": {"low": 0, "high": 2, "log": True}}, "log range needs low > 0"),
        ({"schedule.name": {"choices": ["cosine", "warp"]}}, "value 'warp' is not a valid config"),
        ({"no.such.key": {"low": 1, "high": 2}}, "no.such.key"),
    ]:
        with pytest.raises(UsageError, match=message):
            StudySpec.from_dict({"train": TINY, "search_space": space}, source="s.yaml").resolve()


# ---- pareto and train CLIs -----------------------------------------------------------------------------


@pytest.fixture
def finished_study(workdir):
    run_study(StudySpec.from_dict({"name": "tiny", "train": TINY, "baseline_fractions": []}), n_trials=1,
              tracking_uri="none", echo=None)  # fmt: skip
    return "tiny"


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "the following arguments are required: --study"),
        (["--study", "nope"], "no such file"),
        (["--study", "tiny", "--bogus"], "unrecognized arguments: --bogus"),
        (["--study", "tiny", "--select", "best"], "selection rule 'best'"),
        (["--study", "tiny", "--select", "most-accurate-under:-1"], "most-accurate-under"),
        (["--study", "other", "--storage", "sqlite:///studies/tiny.db"], "study 'other' not found"),
        (["--study", "tiny", "--storage", "postgresql://u:pw-9x@127.0.0.1:1/d"], "u:***@127.0.0.1:1/d: cannot open"),
        (["--study", "tiny", "--storage", "journal:///none.journal"], "no such file"),
        (["--study", "tiny", "--out", "afile/best.yaml"], "--out afile/best.yaml: cannot write there"),
    ],
)
def test_pareto_cli(finished_study, capsys, argv, message):
    code, err = cli(pareto_main, argv, capsys)
    assert_one_line(code, err, message)
    assert "pw-9x" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "abc"], "epochs: expected an integer"),
        (["--lr", "-1"], "optim.lr: -1.0 is out of range"),
        (["--batch-size", "0"], "optim.batch_size: 0 is out of range"),
        (["--width", "100"], "model.width: 100.0 is out of range"),
        (["--optim.name", "foo"], "optim.name: unknown value 'foo'"),
        (["--schedule", "bogus"], "schedule.name: unknown value 'bogus'"),
        (["--methods.wus.bias_scope", "last:0"], "methods.wus.bias_scope"),
        (["--methods.warp.x", "1"], "methods.warp: unknown method"),
        (["--methods.approx_ops", "1"], "methods.approx_ops: expected a mapping"),
        (["--config", "afile"], "expected a mapping at the top level"),
        (["--config", "bad.yaml"], "not valid YAML"),
        (["--dataset", "imagefolder", "--data-dir", "corrupt.tar.gz", "--device", "cpu"], "cannot read the archive"),
        (["--dataset", "digits", "--device", "cpu", "--out", "afile"], "--out afile: cannot write there"),
        (["--dataset", "digits", "--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
    ],
)
def test_train_cli(workdir, capsys, argv, message):
    code, err = cli(train_main, argv, capsys)
    assert_one_line(code, err, message)


MISSING_DEVICE = ["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", f"cuda:{torch.cuda.device_count()}"]


@pytest.mark.parametrize("out", [[], ["--out", "new/deeper/run"]])
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset", "digits", *MISSING_DEVICE], "device"),  # refused before training
        (["--dataset", "imagefolder", "--data-dir", "corrupt.tar.gz", "--device", "cpu"], "cannot read the archive"),
    ],
)
def test_train_cli_bad_input_writes_nothing(workdir, capsys, argv, message, out):
    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    code, err = cli(train_main, ["--model", "mlp", "--epochs", "1", *argv, *out], capsys)
    assert_one_line(code, err, message)
    assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before  # no runs/, no --out folders


def test_a_cuda_device_the_machine_lacks_is_refused(monkeypatch):
    from wus_tune.trainer import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a one-GPU machine, on any machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UsageError, match=r"'cuda:7' requested but this machine has 1 CUDA device"):
        resolve_device("cuda:7")
    assert resolve_device("cuda:0") == torch.device("cuda:0") and resolve_device("cuda") == torch.device("cuda")


# ---- inside a study: a trial that cannot run fails with its reason; the study goes on ------------------


def test_out_of_memory_is_a_clear_reason():
    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB (GPU 0; 79.1 GiB total)")
    assert is_out_of_memory(cuda)
    assert one_line(cuda).startswith("out of memory: the model or batch does not fit on the device")
    assert "Tried to allocate 40.00 GiB" in one_line(cuda)
    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
    assert one_line(cpu).startswith("out of memory")
    assert not is_out_of_memory(ValueError("shape mismatch"))


def test_a_trial_that_runs_out_of_memory_fails_and_the_study_goes_on(workdir):
    """The objective meets ``torch.OutOfMemoryError`` from inside ``fit`` (here raised by the wrapper for
    the one enqueued wide model; ``test_real_cuda_oom`` makes the allocator raise it on a GPU)."""
    from wus_tune.trainer import fit

    def fit_or_oom(config, **kw):
        if config.model.width == 16:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 812.00 GiB")
        return fit(config, **kw)

    spec = StudySpec.from_dict({"name": "oom", "train": TINY, "baseline_fractions": [], "enqueue": [{"model.width": 16.0}]})
    lines = []
    outcome = run_study(spec, n_trials=3, tracking_uri="none", fit=fit_or_oom, echo=lines.append)
    states = {c.number: c.state for c in outcome.analysis.candidates}
    assert states == {0: "COMPLETE", 1: "COMPLETE", 2: "FAIL"} and outcome.status == "FINISHED"
    reason = outcome.analysis.by_number(2).attrs["fail_reason"]
    assert reason.startswith("out of memory: the model or batch does not fit") and "812.00 GiB" in reason
    assert any("trial   2 FAIL" in line and "out of memory" in line for line in lines)


def test_a_trial_that_raises_fails_with_its_reason(workdir):
    def broken(config, **kw):
        raise ValueError("mat1 and mat2 shapes cannot be multiplied (8x64 and 32x10)")

    spec = StudySpec.from_dict({"name": "raises", "train": TINY, "baseline_fractions": []})
    outcome = run_study(spec, n_trials=2, tracking_uri="none", fit=broken, echo=None)
    assert [c.state for c in outcome.analysis.candidates] == ["FAIL", "FAIL"]
    assert outcome.analysis.by_number(0).attrs["fail_reason"].startswith("ValueError: mat1 and mat2 shapes")
    study = optuna.load_study(study_name="raises", storage="sqlite:///studies/raises.db")
    assert len(study.trials) == 2


@pytest.mark.gpu
def test_real_cuda_oom(workdir):
    """On a GPU: the CUDA allocator itself raises; the trial fails with that reason, the next one runs."""
    from wus_tune.trainer import fit

    def fit_huge_first(config, **kw):
        if config.model.width == 16:
            torch.empty(1 << 44, dtype=torch.uint8, device="cuda")  # 16 TiB: a real allocation failure
        return fit(config, **kw)

    spec = StudySpec.from_dict({"name": "oom-gpu", "train": {**TINY, "device": "cuda"}, "baseline_fractions": [],
                                "enqueue": [{"model.width": 16.0}]})  # fmt: skip
    outcome = run_study(spec, n_trials=3, tracking_uri="none", fit=fit_huge_first, echo=None)
    assert [c.state for c in outcome.analysis.candidates] == ["COMPLETE", "COMPLETE", "FAIL"]
    assert outcome.analysis.by_number(2).attrs["fail_reason"].startswith("out of memory")


def test_ray_is_optional(workdir, capsys, monkeypatch):
    """The base install does not need Ray: nothing imports it unless ``--ray`` is given, and then its
    absence is one line and exit 2."""
    import subprocess
    import sys

    code = "import sys, wus_tune.study, wus_tune._study.ray_backend; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent).returncode == 0
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where it is not installed
    code, err = cli(study_main, BASE + ["--ray", "local"], capsys)
    assert_one_line(code, err, "--ray: Ray is not installed; pip install 'wus_tune[ray]'")
    nothing_written(workdir)
