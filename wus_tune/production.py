"""From a study to a production model: load the chosen config, train it, log it, register it.

::

    from wus_tune.production import load_config, train_production

    config = load_config("runs:/<parent_run_id>/best_config.yaml")      # the study's exported choice
    # or: load_config("study:vgg11-cifar10", select="fastest-within:0.5")  # straight from the Optuna study
    # or: load_config("best.yaml")                                          # a file (wus_tune.pareto --out)
    run = train_production(config, epochs=None, register_as="vgg11-cifar10", alias="champion")
    print(run.weights_path, run.model_uri, run.model_version)

The weights are saved as ``model.pt`` = ``{"state_dict", "config"}`` (the format of
``python -m wus_tune.train``), beside ``config.yaml`` and ``result.json``; with MLflow on, the same files
are the run's artifacts and the model is also logged with ``mlflow.pytorch.log_model`` in the
``pt2`` (``torch.export``) serialization format, which loads without unpickling code. ``register_as``
registers that model and points ``alias`` at the new version.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wus_tune.errors import UsageError, one_line

if TYPE_CHECKING:
    from wus_tune.config import TrainConfig
    from wus_tune.trainer import TrainResult

__all__ = ["ProductionRun", "config_from_mlflow", "config_from_study", "load_config", "train_production"]

_MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:", "s3://", "gs://", "wasbs://", "dbfs:/", "http://", "https://")


def load_config(
    source: str | Path | TrainConfig,
    *,
    storage: str | None = None,
    select: str | None = None,
    tracking_uri: str | None = None,
) -> TrainConfig:
    """A TrainConfig from a file, an MLflow artifact URI (``runs:/<id>/best_config.yaml``) or a study
    (``study:<name>``, chosen by ``select``; see :func:`config_from_study`)."""
    from wus_tune.config import TrainConfig

    if isinstance(source, TrainConfig):
        return source
    text = str(source)
    if text.startswith("study:"):
        return config_from_study(text[len("study:") :], storage=storage, select=select)
    if text.startswith(_MLFLOW_SCHEMES):
        return config_from_mlflow(text, tracking_uri=tracking_uri)
    return TrainConfig.load(text)


def config_from_study(study_name: str, *, storage: str | None = None, select: str | None = None) -> TrainConfig:
    """The config of the trial that ``select`` picks (default: the study's own ``select`` rule)."""
    from wus_tune._study.candidates import export_config, load_analysis

    study, analysis = load_analysis(study_name, storage)
    rule = select or (study.user_attrs.get("spec") or {}).get("select") or "knee"
    return export_config(analysis.select(rule), None, study_name=study.study_name, rule=rule)


def config_from_mlflow(uri: str, *, tracking_uri: str | None = None) -> TrainConfig:
    """Download a config artifact (``runs:/<run_id>/best_config.yaml``) and load it."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    from wus_tune._study.storage import DEFAULT_TRACKING_URI, mask_url, tracking_url
    from wus_tune.config import TrainConfig

    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    with tempfile.TemporaryDirectory(prefix="wus_tune_cfg_") as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp, tracking_uri=tracking_url(tracking_uri))
        except (MlflowException, OSError) as e:
            raise UsageError(f"{uri}: cannot download from MLflow at {mask_url(tracking_uri)} ({one_line(e)})") from None
        if Path(path).is_dir():
            raise UsageError(f"{uri}: is a directory; name the config file, e.g. .../best_config.yaml")
        return TrainConfig.load(path)


@dataclass
class ProductionRun:
    config: TrainConfig
    result: TrainResult
    out_dir: Path
    weights_path: Path
    run_id: str | None = None
    model_uri: str | None = None  # the logged MLflow model (models:/m-... in MLflow 3)
    model_version: str | None = None  # registry version when register_as was given


def train_production(
    config: str | Path | TrainConfig,
    *,
    out_dir: str | Path | None = None,
    epochs: int | None = None,
    overrides: dict[str, Any] | None = None,
    tracking_uri: str | None = None,
    experiment: str = "wus_tune-production",
    run_name: str | None = None,
    log_model: bool = True,
    register_as: str | None = None,
    alias: str | None = None,
    progress: bool = True,
    model: Any = None,
    data: Any = None,
) -> ProductionRun:
    """Train ``config`` (anything :func:`load_config` takes) and keep the result.

    ``epochs``/``overrides`` adjust the config (e.g. the full data set: ``{"data.subset": None}``).
    ``model``/``data``: the objects a study was given in Python (its config then records
    ``"<python>:<name>"``), handed to :func:`wus_tune.fit` as they were to the study.
    ``tracking_uri="none"`` keeps MLflow out; otherwise the run goes to ``experiment`` with params,
    per-epoch metrics, final metrics and artifacts. ``register_as`` (with optional ``alias``) registers
    the logged model.
    """
    from wus_tune._study.storage import DEFAULT_TRACKING_URI
    from wus_tune.train import save_checkpoint
    from wus_tune.trainer import fit

    cfg = _adjusted(load_config(config, tracking_uri=tracking_uri), epochs=epochs, overrides=overrides)
    if alias and not register_as:
        raise UsageError("alias: needs register_as (a registered model name)")
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    use_mlflow = tracking_uri.lower() != "none"
    if not use_mlflow and register_as:
        raise UsageError("register_as: needs MLflow (tracking_uri is 'none')")
    out = _out_dir(cfg, out_dir)
    client = run = None
    if use_mlflow:
        client, run, tracking_uri = _start_run(cfg, tracking_uri, experiment=experiment, run_name=run_name)
    try:
        result = fit(cfg, on_epoch=run.log_epoch if run else None, progress=progress, model=model, data=data)
    except BaseException as e:
        if run is not None:
            run.fail(e)
        raise
    weights = save_checkpoint(out / "model.pt", result.model, cfg)
    result.save_json(out / "result.json")
    prod = ProductionRun(cfg, result, out, weights)
    if run is not None:
        _finish_run(prod, client, run, tracking_uri, log_model=log_model or bool(register_as), register_as=register_as,
                    alias=alias, data=data)  # fmt: skip
    return prod


def _adjusted(cfg: TrainConfig, *, epochs: int | None, overrides: dict[str, Any] | None) -> TrainConfig:
    """``cfg`` with ``overrides`` and ``epochs`` applied (itself when there are none)."""
    changes = dict(overrides or {})
    if epochs is not None:
        changes["epochs"] = epochs
    return cfg.replace(changes) if changes else cfg


def _out_dir(cfg: TrainConfig, out_dir: str | Path | None) -> Path:
    """The run's directory (default ``runs/production-<model>-<data>-<time>``), created, with ``config.yaml``."""
    out = Path(out_dir or f"runs/production-{cfg.model.name}-{cfg.data.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.yaml")
    except OSError as e:
        raise UsageError(f"out_dir {out}: cannot write there ({e.strerror or e})") from None
    return out


def _start_run(cfg: TrainConfig, tracking_uri: str, *, experiment: str, run_name: str | None) -> tuple[Any, Any, str]:
    """The MLflow client, the run (params and tags of ``cfg``) and the tracking URL it was opened with."""
    from mlflow import MlflowClient

    from wus_tune._study.space import flat_config
    from wus_tune._study.storage import check_tracking_uri, tracking_url
    from wus_tune._study.tracking import get_or_create_experiment, start_run

    check_tracking_uri(tracking_uri)
    # The study's URL rules: a plain postgresql:// or mysql:// URL gets the installed driver.
    tracking_uri = tracking_url(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = get_or_create_experiment(client, tracking_uri, experiment)
    params = {k: v for k, v in flat_config(cfg.to_dict()).items() if not k.startswith("meta")}
    tags = {"wus_tune.role": "production", "source_study": cfg.meta.get("study", ""),
            "source_trial": cfg.meta.get("trial", "")}  # fmt: skip
    run = start_run(client, experiment_id, run_name=run_name or f"{cfg.model.name}-{cfg.data.name}",
                    params=params, tags=tags)  # fmt: skip
    return client, run, tracking_uri


def _finish_run(prod: ProductionRun, client: Any, run: Any, tracking_uri: str, *, log_model: bool,
                register_as: str | None, alias: str | None, data: Any) -> None:  # fmt: skip
    """The run's files as artifacts, the model logged (and registered), the run finished."""
    result = prod.result
    prod.run_id = run.run_id
    client.log_artifacts(run.run_id, str(prod.out_dir))
    if log_model:
        prod.model_uri, prod.model_version = _log_model(client, tracking_uri, run.run_id, result, register_as, alias,
                                                        data=data)  # fmt: skip
    run.finish(result, {"accuracy": result.val_acc, "time": result.time_s, "cost": result.cost_flops})


def _log_model(client: Any, tracking_uri: str, run_id: str, result: TrainResult, register_as: str | None,
               alias: str | None, *, data: Any = None) -> tuple[str, str | None]:  # fmt: skip
    """``mlflow.pytorch.log_model`` (pt2 format) inside the run; register and alias it if asked."""
    import mlflow
    import mlflow.pytorch
    import torch

    from wus_tune.data import load_dataset
    from wus_tune.config import TrainConfig

    cfg = TrainConfig.from_dict(result.config)
    shape = load_dataset(cfg.data, data=data).input_shape  # the data the run was given, not reloaded from the config
    model = result.model.cpu().eval()
    example = torch.zeros((2, *shape), dtype=torch.float32)  # batch 2: a batch of 1 would be specialised
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)  # log_model is fluent-only: scope it to this call
    try:
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pytorch.log_model(
                model,
                name="model",
                serialization_format="pt2",  # torch.export: loads without unpickling arbitrary code
                input_example=example.numpy(),
                registered_model_name=register_as,
            )
    finally:
        mlflow.set_tracking_uri(previous)
    version = None
    if register_as:
        version = str(info.registered_model_version)
        if alias:
            client.set_registered_model_alias(register_as, alias, version)
    return info.model_uri, version
