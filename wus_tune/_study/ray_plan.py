"""What a study asks of a Ray cluster (``--ray ADDRESS``, ``--gpus-per-trial``, ``--cpus-per-trial``): the
spec keys checked and turned into a :class:`RayPlan`, without importing Ray. The cluster itself is
:mod:`wus_tune._study.ray_backend`'s."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from wus_tune.errors import UsageError, check_number


class RayKeys(Protocol):
    """The spec keys read here (a :class:`~wus_tune._study.spec.StudySpec` has them)."""

    ray: str | None
    gpus_per_trial: float | None
    cpus_per_trial: float | None


def check_settings(spec: RayKeys) -> None:
    """Validate the spec keys ``ray``, ``gpus_per_trial``, ``cpus_per_trial`` (no Ray import)."""
    if spec.ray is not None and (not isinstance(spec.ray, str) or not spec.ray.strip()):
        raise UsageError(f"ray: expected auto, local or a cluster address such as 10.0.0.1:6379, got {spec.ray!r}")
    if spec.ray is not None and spec.ray.strip() not in ("auto", "local"):
        host, _, port = spec.ray.strip().removeprefix("ray://").rpartition(":")
        if not host or not port.isdigit():
            raise UsageError(f"--ray {spec.ray}: expected auto, local or HOST:PORT (e.g. 10.0.0.1:6379)")
    for key, low in (("gpus_per_trial", 0.0), ("cpus_per_trial", 0.0)):
        value = getattr(spec, key)
        if value is None:
            continue
        check_number(key, value, minimum=low)
        if spec.ray is None:
            raise UsageError(f"{key}: needs ray (e.g. --ray auto); without Ray use --devices / --workers")
        if value > 1 and value != int(value):
            raise UsageError(f"{key}: a fraction must be below 1 (a trial shares one device), got {value:g}")
    if spec.cpus_per_trial == 0 and not spec.gpus_per_trial:
        raise UsageError("cpus_per_trial: 0 needs gpus_per_trial > 0 (a trial must ask Ray for something)")


@dataclass(frozen=True)
class RayPlan:
    """What the driver asks Ray for: the cluster, each trial's resources, how many trials at once."""

    address: str
    gpus_per_trial: float
    cpus_per_trial: float
    slots: int | None  # trials at once (--workers); None: as many as the cluster fits

    @property
    def train_device(self) -> str:
        return "cuda" if self.gpus_per_trial > 0 else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES per task

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus_per_trial))

    def label(self) -> str:
        return f"ray {self.address}: {self.cpus_per_trial:g} CPU + {self.gpus_per_trial:g} GPU per trial"


def plan(spec: RayKeys, *, devices: str | None, workers: int | None, workers_per_device: int | None) -> RayPlan:
    """The Ray plan of a spec whose ``ray`` key is set; ``--devices`` / ``--workers-per-device`` are for
    local workers and are refused here; ``--workers N`` caps the trials that run at once."""
    if devices is not None or workers_per_device is not None:
        raise UsageError("--ray places trials itself: use --gpus-per-trial / --cpus-per-trial, not --devices / --workers-per-device")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise UsageError(f"--workers: expected an integer >= 1, got {workers!r}")
    check_settings(spec)
    return RayPlan(
        address=spec.ray.strip(),
        gpus_per_trial=float(spec.gpus_per_trial or 0.0),
        cpus_per_trial=float(1.0 if spec.cpus_per_trial is None else spec.cpus_per_trial),
        slots=workers,
    )
