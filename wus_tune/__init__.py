"""wus_tune: find the training configuration that reaches the accuracy you need in the least time.

The public API. The trainer and the WUS controller need only torch; the study (``wus_tune.study``),
the Pareto analysis (``wus_tune.pareto``) and production hand-off (``wus_tune.production``) import
optuna and mlflow when used.
"""

from __future__ import annotations

from wus_tune.config import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
)
from wus_tune.errors import ConfigError, DataError, TrainingDiverged, UsageError
from wus_tune.methods import Method, RunInfo, StepContext, StepCost
from wus_tune.trainer import EpochRecord, TrainResult, fit
from wus_tune.methods.wus import WUSConfig, WUSController, accuracy_variation, param_groups, should_skip

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataConfig",
    "DataError",
    "EpochRecord",
    "Method",
    "ModelConfig",
    "OptimConfig",
    "RunInfo",
    "ScheduleConfig",
    "StepContext",
    "StepCost",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "UsageError",
    "WUSConfig",
    "WUSController",
    "accuracy_variation",
    "fit",
    "param_groups",
    "should_skip",
]
