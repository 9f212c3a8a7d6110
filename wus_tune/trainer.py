"""The training loop: torch only, so it runs where optuna and mlflow are not installed.

Design, after airbench: the dataset lives on the training device as uint8 and is augmented there per
batch; precision and memory layout are chosen once (bf16 autocast and channels_last on CUDA, float32
on CPU, same code path); the timer measures exactly what is reported, with device synchronisation.

What a run is charged (``time_s``, wall seconds): its training steps, the evaluations it *needs* (every
check's validation pass for WUS on ``val_acc``; for every run the final evaluation), its methods' work
outside a step (checks, ``end_epoch``) and its compilation. Evaluations made only to draw learning curves,
snapshots and FLOP counting are timed but not charged, and an untimed warm-up covers every step mode and
the evaluation pass. One ledger (:class:`wus_tune.ledger.Ledger`) keeps these accounts and, per *step
kind* (``"full"``, ``"skip:last:1"``, named by the methods), the steps made, their FLOPs and their work
seconds. With ``relative_to`` (a baseline config) the run's work is priced after training
(:mod:`wus_tune.pricing`): ``relative_time`` is the run's cost in units of one full-length baseline run
on this device, now.

An epoch draws every training sample, or the subset a method chooses (``Method.epoch_samples``: dynamic
data pruning); the learning-rate schedule follows the epochs, so a shorter epoch covers the same stretch of
it (for full epochs that is exactly the step-based schedule), and each step's samples' positions in the
split reach the methods (``StepContext.indices``).

``fit`` reads top to bottom: set up, resume (when forked from a snapshot), one epoch after another, the
result, the pricing. It knows no method by name: every method, WUS included, acts through the hooks of
:class:`wus_tune.methods.Method` (the contract is that module's docstring).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wus_tune.clock import WorkClock
from wus_tune.compile_step import ModeCompiled
from wus_tune.config import TrainConfig
from wus_tune.errors import ConfigError, TrainingDiverged
from wus_tune.ledger import Ledger, is_one_off
from wus_tune.methods import Method, RunInfo, StepContext
from wus_tune.run_state import ProbeRecord, RecordingPlan, RunState, origin_of, snapshot_path
from wus_tune.schedules import lr_multiplier
from wus_tune.step import (attach_methods, autocast_forward, evaluate, forward_eval, sample_chooser, set_learning_rates,
                            train_step)
from wus_tune.timing import TimingOptions

__all__ = ["fit", "TrainResult", "EpochRecord", "resolve_device", "FULL_KIND"]

FULL_KIND = "full"  # the kind of an ordinary step: no method named it (each names its own kinds, step_kind())



@dataclass
class EpochRecord:
    epoch: int  # 1-based
    train_loss: float
    train_acc: float
    val_loss: float | None  # None when the epoch was not evaluated
    val_acc: float | None
    lr: float  # peak-group learning rate at the epoch's last step
    steps: int
    steps_by_kind: dict[str, int]  # the epoch's steps per step kind ({"full": 9, "skip:all": 3})
    train_time_s: float
    eval_time_s: float
    flops: float  # training FLOPs executed in the epoch (forward + backward)
    extra: dict[str, float] = field(default_factory=dict)  # method metrics, e.g. "wus/skip_windows"


@dataclass
class TrainResult:
    config: dict[str, Any]
    epochs: list[EpochRecord]
    val_acc: float
    val_loss: float
    test_acc: float | None
    best_val_acc: float
    train_time_s: float  # optimizer steps only
    eval_time_s: float  # every evaluation made
    required_eval_time_s: float  # the evaluations the method needed (final + WUS checks on val_acc)
    hook_time_s: float  # the methods' work outside a step: checks, end_epoch
    compile_time_s: float  # compiling every step mode's graphs (compile: true); 0 eagerly
    time_s: float  # the time objective: train_time_s + required_eval_time_s + hook_time_s + compile_time_s
    uncharged_time_s: float  # measurement overhead left out of time_s (FLOP counting on a kind's first step)
    total_steps: int
    changed_steps: int  # steps of a kind a method named (not the ordinary full step): skipped, approximated, ...
    changed_step_fraction: float  # changed_steps / total_steps
    flops_per_step: float  # one step of the first step's kind (the ordinary step) at the configured batch size
    train_flops: float
    baseline_train_flops: float  # the same number of steps, each of the first step's kind
    flops_fraction: float  # train_flops / baseline_train_flops
    cost_flops: float  # the cost objective: train_flops + FLOPs of the required evaluations
    step_kinds: dict[str, dict[str, float]]  # per step kind ("full", "skip:last:1"): steps and flops_per_step
    num_params: int
    device: str
    torch_version: str
    # The ledger's work and its prices (wus_tune.pricing): units per kind ("step:full", "step:skip:last:1",
    # "eval" samples of charged evaluations), seconds per unit measured at the end of the run; relative_time
    # = this run / one full-length baseline run at those prices (None without relative_to).
    work_counts: dict[str, float] = field(default_factory=dict)
    work_seconds: dict[str, dict[str, float]] = field(default_factory=dict)  # measured: kind -> units, seconds
    unit_costs: dict[str, dict[str, float]] = field(default_factory=dict)  # kind -> seconds, low, high, rounds
    relative_time: float | None = None
    reference_time_s: float | None = None  # one full-length baseline run at the measured prices
    modelled_time_s: float | None = None  # this run's work at the measured prices (compare time_s)
    coverage: float | None = None  # share of the run's measured work its prices explain (wus_tune.pricing)
    unpriced: dict[str, float] = field(default_factory=dict)  # kinds that took longer in the run than priced
    timing_overhead_s: float = 0.0  # the pricing itself (not charged)
    probes: list[ProbeRecord] = field(default_factory=list)  # the signals at each probe point (fit's ``recording``)
    resumed_from: dict[str, Any] | None = None  # point, step, epoch of the RunState the run went on from
    model: nn.Module | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "model"}
        data["epochs"] = [asdict(e) for e in self.epochs]
        return data

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, default=_json_default) + "\n")
        return path




def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but CUDA is not available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ConfigError(f"device: {name!r} requested but this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    return device


def fit(
    config: TrainConfig,
    *,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    progress: bool = False,
    relative_to: TrainConfig | None = None,
    timing: TimingOptions | None = None,
    on_step: Callable[[int], None] | None = None,
    model: nn.Module | Callable[..., nn.Module] | None = None,
    data: Any = None,
    recording: RecordingPlan | None = None,
    resume_from: RunState | str | Path | None = None,
) -> TrainResult:
    """Train one model as ``config`` says and return its measurements.

    ``model``: an ``nn.Module`` (a copy is trained) or a factory ``f(input_shape, num_classes)``; ``data``:
    ``(x, y)`` tensors or a mapping of splits (:func:`wus_tune.data.load_dataset`); ``result.config`` records
    where they came from. ``on_epoch(record)`` after each epoch (a study may stop the run by raising).
    ``relative_to``: the baseline config to price the run's work in after training (``relative_time``,
    :mod:`wus_tune.pricing`, measured as ``timing`` says); ``on_step(step)`` after every step, inside the
    epoch's wall time (tests inject slowdowns there). ``recording``: where to record the signals (the probe
    points) and which points to snapshot; ``resume_from``: go on from such a snapshot
    (:mod:`wus_tune.run_state`), its records passed to ``on_epoch`` first. Raises
    :class:`~wus_tune.errors.TrainingDiverged` when the loss stops being finite, and
    :class:`~wus_tune.errors.UsageError` subclasses for bad input.
    """
    from wus_tune.provenance import record_sources

    config = record_sources(config, model=model, data=data)  # objects handed over: say where they came from
    config.validate()
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    t = _set_up(config, device, model=model, data=data, recording=recording, progress=progress,
                keep_specimens=relative_to is not None)  # fmt: skip
    try:
        records: list[EpochRecord] = []
        at, resumed_from = _Position(), None
        if resume_from is not None:
            records, at, resumed_from = _resume(t, resume_from)
            for record in records if on_epoch is not None else ():
                on_epoch(record)
        for epoch in range(at.epoch, config.epochs):
            record = _train_epoch(t, epoch, at, records, on_step=on_step, progress=progress)
            records.append(record)
            if t.recorder.at_epoch_end():
                _snapshot(t, records, step=at.step, epoch=epoch + 1, batch=0, sums=None, loader_rng=_data_order(t.loaders.train))
            if progress:
                _print_epoch(record, config.epochs)
            if on_epoch is not None:
                on_epoch(record)
        result = _result(t, records)
        result.probes, result.resumed_from = t.recorder.records, resumed_from
        if relative_to is not None:
            _price(result, t, relative_to, timing)
        return result
    finally:  # a streamed loader's workers stop here, not inside a later run's timed work
        for loader in (t.loaders.train, t.loaders.val, t.loaders.test):
            if loader is not None:
                loader.close()


# ---- one run's set-up ------------------------------------------------------------------------------


@dataclass
class _Loaders:
    train: Any
    val: Any  # None when data.val_fraction == 0
    test: Any  # None when the dataset has no test split
    val_size: int


@dataclass
class _Training:
    """Everything one run trains with, set up once by :func:`_set_up`."""

    config: TrainConfig
    device: torch.device
    run: RunInfo
    data: Any
    loaders: _Loaders
    model: nn.Module
    train_model: nn.Module  # the model, or its per-mode compiled wrapper
    methods: list[Method]
    optimizer: torch.optim.Optimizer
    owner: Method | None  # the method that owns the step, if any
    chooser: Method | None  # the method that chooses each epoch's training samples, if any
    autocast: Any
    loss_fn: Any
    peak_lrs: list[float]  # the schedule scales each parameter group's own peak
    ledger: Ledger
    checks: _Checks
    recorder: _Recorder
    recording: RecordingPlan | None
    given_model: Any  # what the run was handed: the baseline's pricing copy is built from it too
    keep_specimens: bool  # copy the state before each kind's first step, to price it afterwards
    baseline_compile_s: float = 0.0  # compiling the modes a compiled baseline has too (full step, evaluation)
    specimens: dict[str, Any] = field(default_factory=dict)

    def validate(self, charged: bool) -> tuple[float, float]:
        return self.ledger.evaluate(lambda: evaluate(self.train_model, self.loaders.val, self.autocast), charged=charged)


@dataclass
class _Position:
    """Where training stands: steps done, the epoch in progress and its batches done (a mid-epoch snapshot),
    and that epoch's partial accounts when resumed inside it."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    partial: tuple[dict[str, Any], dict[str, Any]] | None = None


def _set_up(config: TrainConfig, device: torch.device, *, model: Any, data: Any, recording: RecordingPlan | None,
            progress: bool, keep_specimens: bool) -> _Training:  # fmt: skip
    """Data, loaders, model, methods, optimizer, compilation and the untimed warm-up."""
    given_model = model
    run, data, loaders, model = _prepare(config, device, model=model, data=data)
    model, methods, optimizer, owner = attach_methods(model, config, run)
    ledger = Ledger(device, 0.0, loaders.val_size, workers=bool(data.streamed) and data.num_workers > 0)
    checks = _Checks(methods, run, loaders.val is not None, ledger)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    train_model = _maybe_compile(model, config, device)
    eval_flops_per_sample, baseline_compile = _compile_and_warm_up(train_model, model, optimizer, loaders, autocast,
                                                                   methods, ledger, progress)  # fmt: skip
    ledger.flops_per_validation = eval_flops_per_sample * loaders.val_size
    recording = recording.resolved(run.steps_per_epoch, config.epochs) if recording is not None else None
    return _Training(
        config=config, device=device, run=run, data=data, loaders=loaders, model=model, train_model=train_model,
        methods=methods, optimizer=optimizer, owner=owner, chooser=sample_chooser(methods), autocast=autocast,
        loss_fn=nn.CrossEntropyLoss(label_smoothing=config.optim.label_smoothing),
        peak_lrs=[group["lr"] for group in optimizer.param_groups], ledger=ledger, checks=checks,
        recorder=_Recorder(recording, run, ledger), recording=recording, given_model=given_model,
        keep_specimens=keep_specimens, baseline_compile_s=baseline_compile,
    )  # fmt: skip


def _prepare(config: TrainConfig, device: torch.device, *, model: Any = None,
             data: Any = None) -> tuple[RunInfo, Any, _Loaders, nn.Module]:  # fmt: skip
    """Data, loaders and model: through :func:`wus_tune.prepare.prepare`, the one way models and data
    enter (a config's names and factories, or the objects given to :func:`fit`)."""
    from wus_tune.prepare import prepare

    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    data, model = prepare(config, model=model, data=data, device=device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    batch_size = min(config.optim.batch_size, data.size("train"))
    eval_batch = max(batch_size, 512)
    train = data.loader("train", batch_size=batch_size, device=device, augment=config.data.augment,
                        seed=config.seed, channels_last=cuda)
    val = data.loader("val", batch_size=eval_batch, device=device, channels_last=cuda) if data.size("val") else None
    test = data.loader("test", batch_size=eval_batch, device=device, channels_last=cuda) if data.has("test") else None
    run = RunInfo(config=config, device=device, steps_per_epoch=len(train), total_steps=len(train) * config.epochs,
                  batch_size=batch_size, train_loader=train)
    return run, data, _Loaders(train, val, test, data.size("val")), model


def _maybe_compile(model: nn.Module, config: TrainConfig, device: torch.device) -> nn.Module:
    """The model compiled with one graph per training mode (which parameters require grad), so a method
    that freezes weights (WUS) gets a cheaper graph in its frozen steps; CPU (inductor) and CUDA."""
    if not config.compile:
        return model
    cuda_graphs = config.compile_mode == "reduce-overhead"
    if cuda_graphs and device.type != "cuda":
        raise ConfigError("compile_mode: reduce-overhead (CUDA graphs) needs a CUDA device")
    return ModeCompiled(model, cuda_graphs=cuda_graphs)


def _compile_and_warm_up(train_model: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, loaders: _Loaders,
                         autocast: Any, methods: list[Method], ledger: Ledger, progress: bool) -> tuple[float, float]:  # fmt: skip
    """The warm-up (:func:`_warm_up`): untimed when eager; when compiling, its time is the compilation's, charged
    to the run. Returns the evaluation FLOPs per sample and the work seconds of compiling what a compiled
    baseline compiles too (the ordinary step and the evaluation)."""
    compiled = isinstance(train_model, ModeCompiled)
    wall, mark = ledger.timer.now(), ledger.clock.mark(helpers=True)
    eval_flops_per_sample, shared = _warm_up(train_model, model, optimizer, loaders, autocast, methods, ledger.clock)
    if not compiled:
        return eval_flops_per_sample, 0.0
    ledger.add_compile(ledger.timer.now() - wall, ledger.clock.since(mark))
    if progress:
        print(f"compiled {train_model.compilations} graphs (training modes and evaluation) in {ledger.compile_time:.1f}s, "
              "charged to the run", flush=True)  # fmt: skip
    return eval_flops_per_sample, shared


def _warm_up(train_model: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, loaders: _Loaders,
             autocast: Any, methods: list[Method], clock: WorkClock) -> tuple[float, float]:  # fmt: skip
    """Run a few passes so autotuning, compilation and allocator growth happen before anything is timed:
    forward/backward in every step mode the methods use (WUS: full and skip), and the evaluation forward at
    its batch size, so the first validation pass costs what the others do. Parameters and buffers are
    restored afterwards. Returns the evaluation's forward FLOPs per sample (counted on the eager model) and
    the work seconds (``clock``, compile workers included) of the ordinary mode's and the evaluation's passes."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    saved = copy.deepcopy(model.state_dict())
    x, y = next(iter(loaders.train))
    modes = [contextlib.nullcontext()] + [mode for m in methods for mode in m.warm_up_modes(model)]
    shared = 0.0
    for i, mode in enumerate(modes):
        start = clock.mark(helpers=True)
        with mode:
            for _ in range(2):
                with autocast:
                    loss = F.cross_entropy(train_model(x).float(), y)
                loss.backward()
        shared += clock.since(start) if i == 0 else 0.0
    optimizer.zero_grad(set_to_none=True)
    if loaders.val is None:
        model.load_state_dict(saved)
        return 0.0, shared
    val_x, _ = next(iter(loaders.val))
    start = clock.mark(helpers=True)
    for _ in range(2):
        forward_eval(train_model, val_x, autocast)
    shared += clock.since(start)
    with FlopCounterMode(display=False) as counter:
        forward_eval(model, val_x, autocast)
    model.load_state_dict(saved)
    return float(counter.get_total_flops()) / len(val_x), shared


# ---- the epochs ----------------------------------------------------------------------------------------


def _train_epoch(t: _Training, epoch: int, at: _Position, records: list[EpochRecord], *,
                 on_step: Callable[[int], None] | None, progress: bool) -> EpochRecord:  # fmt: skip
    """One epoch: its steps with their checks and probe points, then its evaluation and the methods' epoch end."""
    ledger, run = t.ledger, t.run
    t.model.train()
    if t.chooser is not None:  # the epoch's subset of the training set: the method's work, charged
        with ledger.charged_work("samples"):
            t.loaders.train.use_samples(t.chooser.epoch_samples(epoch, run))
    batches = len(t.loaders.train)
    loader_rng = _data_order(t.loaders.train)  # this epoch's data order, for a mid-epoch snapshot
    ledger.start_epoch()
    sums = _EpochSums(t.device)
    skip_batches = 0
    if at.partial is not None:  # resumed inside this epoch
        ledger.resume_epoch(at.partial[0])
        sums.restore(at.partial[1])
        skip_batches, at.partial = at.batch, None
    for batch_index, (x, y, index) in enumerate(t.loaders.train.indexed()):
        if batch_index < skip_batches:  # drawn for the data order and the augmentation RNG; the snapshot's run trained it
            continue
        # The schedule follows the epochs: an epoch of fewer batches (a subset) covers the same stretch of it,
        # and an epoch of the planned length gives at.step exactly.
        position = epoch * run.steps_per_epoch + batch_index * run.steps_per_epoch / batches
        loss, logits, y, kind = _step(t, x, y, index, at.step, epoch, position)
        if on_step is not None:
            on_step(at.step)
        correct = (logits.detach().argmax(1) == y).sum()
        sums.add(loss, correct, len(y), kind)
        t.checks.add(correct, len(y))
        t.recorder.add(correct, len(y))
        at.step += 1
        if t.device.type != "cuda" and not torch.isfinite(loss):
            raise TrainingDiverged(f"loss is {loss.item()} at epoch {epoch + 1}, step {batch_index + 1}")
        with ledger.check_time():
            t.checks.after_step(at.step, t.validate)
            if t.recorder.due(at.step):
                val = t.validate(False) if t.recorder.plan.val and t.loaders.val is not None else None
                t.recorder.record(at.step, at.step / run.total_steps, val, sum(r.flops for r in records))
                _snapshot(t, records, step=at.step, epoch=epoch, batch=batch_index + 1, sums=sums, loader_rng=loader_rng)
        if progress and sys.stderr.isatty():
            _print_bar(epoch, t.config.epochs, batch_index + 1, batches)
    train_seconds = ledger.end_epoch()
    mean_loss = sums.mean_loss()
    if not math.isfinite(mean_loss):
        raise TrainingDiverged(f"training loss is {mean_loss} in epoch {epoch + 1}")
    epoch_val = _end_of_epoch_evaluation(t, epoch, at.step, records)
    extra: dict[str, float] = {}
    for method in t.methods:
        with ledger.charged_work("hooks"):
            extra.update(method.end_epoch(t.model, run))
    return sums.record(epoch, epoch_val, t.optimizer, sum(sums.kinds.values()), train_seconds, ledger, extra)


def _step(t: _Training, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, step: int, epoch: int,
          position: float) -> tuple[Any, Any, Any, str]:  # fmt: skip
    """One training step of the kind the methods make now: (loss, logits, the targets trained on, kind).
    ``position``: where the step stands on the learning-rate schedule, in planned steps."""
    set_learning_rates(t.optimizer, t.peak_lrs, lr_multiplier(t.config.schedule, position, t.run.total_steps), t.methods,
                       t.run)  # fmt: skip
    kind = "+".join(k for k in (m.step_kind() for m in t.methods) if k) or FULL_KIND
    ctx = StepContext(run=t.run, model=t.model, optimizer=t.optimizer, inputs=x, targets=y, step=step, epoch=epoch,
                      forward=autocast_forward(t.train_model, t.autocast), loss_fn=t.loss_fn, indices=index)  # fmt: skip
    if t.keep_specimens and kind not in t.specimens and not is_one_off(kind):
        with t.ledger.check_time():  # not part of any step
            shared = {id(x): x for x in (t.data, *vars(t.loaders).values())}  # a copy trains on the same data
            t.specimens[kind] = copy.deepcopy((t.model, t.optimizer, t.methods, t.run), shared)
    with t.ledger.step(kind) as counting:
        if counting:  # FLOPs follow autograd on the eager model, which a compiled graph hides
            ctx.forward = autocast_forward(t.model, t.autocast)
        loss, logits = train_step(ctx, t.methods, t.owner)
    return loss, logits, ctx.targets, kind  # an owner training on other examples (a feature cache) sets targets


def _end_of_epoch_evaluation(t: _Training, epoch: int, step: int, records: list[EpochRecord]) -> tuple[float, float] | None:
    """The epoch's validation (loss, acc): a method's check, or the curve's pass, or the final one (the
    only one every run is charged for); None when the epoch is not evaluated."""
    config, recorder = t.config, t.recorder
    recorder.mark()
    epoch_val = t.checks.end_epoch((epoch + 1) / config.epochs, t.validate)
    last_epoch = epoch == config.epochs - 1
    wants_val = config.eval_every_epoch or last_epoch or recorder.wants_epoch_val()
    if epoch_val is None and t.loaders.val is not None and wants_val:
        epoch_val = t.validate(charged=last_epoch)  # every run needs its final evaluation
    if recorder.at_epoch_end():
        recorder.record(step, (epoch + 1) / config.epochs, epoch_val, sum(r.flops for r in records))
    return epoch_val


# ---- snapshots and resuming ----------------------------------------------------------------------------


def _snapshot(t: _Training, records: list[EpochRecord], *, step: int, epoch: int, batch: int,
              sums: _EpochSums | None, loader_rng: torch.Tensor | None) -> None:  # fmt: skip
    """Save the run's state at this probe point when the plan keeps it (:mod:`wus_tune.run_state`).
    A streamed dataset has no data order to restore (``loader_rng`` None): nothing is saved, so trials
    that would fork from this run train from scratch."""
    if not t.recorder.saves_now() or loader_rng is None:
        return
    config = t.config.to_dict()
    RunState(
        point=len(t.recorder.records), step=step, epoch=epoch, batch=batch,
        model={k: v.detach().clone() for k, v in t.model.state_dict().items()},
        optimizer=copy.deepcopy(t.optimizer.state_dict()), torch_rng=torch.get_rng_state(),
        cuda_rng=torch.cuda.get_rng_state_all() if t.device.type == "cuda" else None, loader_rng=loader_rng.clone(),
        counters=t.ledger.snapshot(mid_epoch=sums is not None), epoch_partial=sums.state() if sums else {},
        records=[asdict(r) for r in records], probes=[asdict(p) for p in t.recorder.records], config=config,
        method_states={m.name: st for m in t.methods if (st := m.state_dict()) is not None}, origin=origin_of(config),
    ).save(snapshot_path(t.recording.save_dir, len(t.recorder.records)))  # fmt: skip


def _data_order(loader: Any) -> torch.Tensor | None:
    """The state of a device-resident loader's shuffling generator; None for a streamed Dataset."""
    generator = getattr(loader, "generator", None)
    return generator.get_state() if generator is not None else None


def _resume(t: _Training, resume_from: RunState | str | Path) -> tuple[list[EpochRecord], _Position, dict[str, Any]]:
    """Put the run where a snapshot was taken: (its epoch records, the position, what was resumed)."""
    state = resume_from if isinstance(resume_from, RunState) else RunState.load(resume_from)
    t.model.load_state_dict(state.model)
    t.optimizer.load_state_dict(state.optimizer)
    torch.set_rng_state(state.torch_rng)
    if t.device.type == "cuda" and state.cuda_rng is not None:
        torch.cuda.set_rng_state_all(state.cuda_rng)
    generator = t.loaders.train.generator
    generator.set_state(state.loader_rng.to(generator.device))
    t.ledger.restore(state.counters)
    t.recorder.records = [ProbeRecord.from_dict(p) for p in state.probes]
    for method in t.methods:
        if method.name in state.method_states:
            method.load_state_dict(state.method_states[method.name])
    partial = (state.counters["epoch"], state.epoch_partial) if state.batch else None
    at = _Position(step=state.step, epoch=state.epoch, batch=state.batch, partial=partial)
    resumed_from = {"point": state.point, "step": state.step, "epoch": state.epoch, "batch": state.batch,
                    "train_time_s": t.ledger.train_time, "required_eval_time_s": t.ledger.required_eval_time}  # fmt: skip
    return [EpochRecord(**r) for r in state.records], at, resumed_from


# ---- the result and its price ----------------------------------------------------------------------------


def _result(t: _Training, records: list[EpochRecord]) -> TrainResult:
    ledger, run, model = t.ledger, t.run, t.model
    test_acc = None
    if t.loaders.test is not None:
        _, test_acc = ledger.evaluate(lambda: evaluate(t.train_model, t.loaders.test, t.autocast), charged=False)
    final = records[-1]
    if final.val_acc is None:  # val_fraction == 0: report training accuracy, say so in the curves
        val_loss, val_acc = final.train_loss, final.train_acc
    else:
        val_loss, val_acc = final.val_loss, final.val_acc
    kinds = list(ledger.kinds.items())
    flops_full = kinds[0][1].flops_per_step  # the first step's kind: the run's ordinary step
    train_flops = sum(r.flops for r in records)
    baseline_flops = run.total_steps * flops_full
    changed = sum(k.steps for name, k in kinds if name != FULL_KIND)
    val_accs = [r.val_acc for r in records if r.val_acc is not None]
    return TrainResult(
        config=t.config.to_dict(), epochs=records, val_acc=val_acc, val_loss=val_loss, test_acc=test_acc,
        best_val_acc=max(val_accs, default=val_acc), train_time_s=ledger.train_time, eval_time_s=ledger.eval_time,
        required_eval_time_s=ledger.required_eval_time, hook_time_s=ledger.hook_time, compile_time_s=ledger.compile_time,
        time_s=ledger.train_time + ledger.required_eval_time + ledger.hook_time + ledger.compile_time,
        uncharged_time_s=ledger.uncharged_time, total_steps=run.total_steps, changed_steps=changed,
        changed_step_fraction=changed / max(1, run.total_steps), flops_per_step=flops_full,
        train_flops=train_flops, baseline_train_flops=baseline_flops,
        flops_fraction=train_flops / baseline_flops if baseline_flops else 1.0,
        cost_flops=train_flops + ledger.required_eval_flops,
        step_kinds={name: {"steps": k.steps, "flops_per_step": k.flops_per_step} for name, k in kinds},
        num_params=sum(p.numel() for p in model.parameters()), device=str(t.device), torch_version=torch.__version__,
        work_counts=ledger.work_counts(), work_seconds=ledger.work_seconds(), model=model,
    )  # fmt: skip


def _price(result: TrainResult, t: _Training, reference: TrainConfig, timing: TimingOptions | None) -> None:
    """Price the run's work against ``reference`` (:mod:`wus_tune.pricing`) and write the relative-time fields."""
    from wus_tune.pricing import RunWork, price_run

    work = RunWork(config=t.config, device=t.device, data=t.data, counts=result.work_counts,
                   seconds=result.work_seconds, specimens=t.specimens, loss_fn=t.loss_fn, autocast=t.autocast,
                   eval_model=t.model, given_model=t.given_model, baseline_compile_s=t.baseline_compile_s)  # fmt: skip
    pricing = price_run(work, reference, timing)
    t.specimens.clear()
    result.relative_time, result.reference_time_s, result.modelled_time_s = pricing.relative_time, pricing.reference_s, pricing.run_s
    result.unit_costs, result.coverage, result.unpriced = pricing.prices, pricing.coverage, pricing.unpriced
    result.timing_overhead_s = pricing.overhead_s


# ---- what the loop keeps --------------------------------------------------------------------------------


class _Checks:
    """The methods' checks (:class:`~wus_tune.methods.CheckPlan`): when they fall due, on what signal."""

    def __init__(self, methods: list[Method], run: RunInfo, has_val: bool, ledger: Ledger) -> None:
        self.plans = [(m, plan) for m in methods if (plan := m.check_plan(run)) is not None]
        self.run, self.has_val, self.ledger = run, has_val, ledger
        # running training accuracy since each method's last check: the cheap signal
        self.windows = {id(m): [torch.zeros((), device=run.device), 0] for m, _ in self.plans}

    def add(self, correct: torch.Tensor, seen: int) -> None:
        for window in self.windows.values():
            window[0] += correct
            window[1] += seen

    def after_step(self, step: int, validate: Callable[[bool], tuple[float, float]]) -> None:
        due = [(m, p) for m, p in self.plans if p.every_steps and step % p.every_steps == 0]
        self._run(due, step / self.run.total_steps, validate)

    def end_epoch(self, progress: float, validate: Callable[[bool], tuple[float, float]]) -> tuple[float, float] | None:
        """The epoch-end checks; returns the validation (loss, acc) if one was made, for the curves."""
        return self._run([(m, p) for m, p in self.plans if not p.every_steps], progress, validate)

    def _run(self, due: list, progress: float, validate: Callable[[bool], tuple[float, float]]) -> tuple[float, float] | None:
        val = None
        for method, plan in due:
            if plan.signal == "val_acc" and self.has_val:
                val = val or validate(True)  # the method needs it: charged to the run
                metrics = {"val_loss": val[0], "val_acc": val[1]}
            else:
                window = self.windows[id(method)]
                metrics = {"train_acc": float(window[0]) / max(1, window[1])}
                self.windows[id(method)] = [torch.zeros((), device=self.run.device), 0]
            with self.ledger.charged_work("checks"):
                method.on_check(metrics, progress)
        return val


class _Recorder:
    """Records the probe points of a :class:`~wus_tune.run_state.RecordingPlan`: the signals there, with their cost."""

    def __init__(self, plan: RecordingPlan | None, run: RunInfo, ledger: Ledger) -> None:
        self.plan, self.run, self.ledger = plan, run, ledger
        self.records: list[ProbeRecord] = []
        self.window = [torch.zeros((), device=run.device), 0]  # running training accuracy since the last point
        self._eval_before = 0.0

    def add(self, correct: torch.Tensor, seen: int) -> None:
        if self.plan is not None:
            self.window[0] += correct
            self.window[1] += seen

    def mark(self) -> None:
        """Before a point's evaluation: its time is what the ledger's evaluation time grows by."""
        self._eval_before = self.ledger.eval_time

    def due(self, step: int) -> bool:
        if self.plan is not None and self.plan.every and step % self.plan.every == 0:
            self.mark()
            return True
        return False

    def at_epoch_end(self) -> bool:
        return self.plan is not None and self.plan.every == 0

    def wants_epoch_val(self) -> bool:
        return self.at_epoch_end() and self.plan.val

    def record(self, step: int, progress: float, val: tuple[float, float] | None, flops_before_epoch: float) -> None:
        """A point; ``val`` is its validation pass (the last one the ledger timed), if one was made."""
        evaluated = val is not None
        self.records.append(ProbeRecord(
            index=len(self.records) + 1, step=step, progress=progress, val_acc=val[1] if val else None,
            val_loss=val[0] if val else None, train_acc=float(self.window[0]) / max(1, self.window[1]),
            train_time_s=self.ledger.train_time + (self.ledger.epoch_elapsed() if self.plan.every else 0.0),
            eval_time_s=self.ledger.eval_time - self._eval_before if evaluated else 0.0,
            eval_flops=self.ledger.flops_per_validation if evaluated else 0.0,
            eval_work_s=self.ledger.last_eval_work_s if evaluated else 0.0,
            eval_samples=self.ledger.samples_per_validation if evaluated else 0,
            train_flops=flops_before_epoch + self.ledger.epoch_flops,
        ))  # fmt: skip
        self.window = [torch.zeros((), device=self.run.device), 0]

    def saves_now(self) -> bool:
        return self.plan is not None and len(self.records) in self.plan.save_at


class _EpochSums:
    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device)
        self.seen = 0
        self.kinds: dict[str, int] = {}

    def add(self, loss: torch.Tensor, correct: torch.Tensor, seen: int, kind: str) -> None:
        self.loss += loss.detach() * seen
        self.correct += correct
        self.seen += seen
        self.kinds[kind] = self.kinds.get(kind, 0) + 1

    def mean_loss(self) -> float:
        return float(self.loss) / max(1, self.seen)

    def state(self) -> dict[str, float]:
        return {"loss": float(self.loss), "correct": float(self.correct), "seen": self.seen, "kinds": dict(self.kinds)}

    def restore(self, state: dict[str, float]) -> None:
        self.loss += state["loss"]  # float32 -> float -> float32 is exact
        self.correct += state["correct"]
        self.seen, self.kinds = int(state["seen"]), {str(k): int(n) for k, n in state["kinds"].items()}

    def record(self, epoch: int, val: tuple[float, float] | None, optimizer: torch.optim.Optimizer, steps: int,
               train_seconds: float, ledger: Ledger, extra: dict[str, float]) -> EpochRecord:
        return EpochRecord(
            epoch=epoch + 1, train_loss=self.mean_loss(), train_acc=float(self.correct) / max(1, self.seen),
            val_loss=val[0] if val else None, val_acc=val[1] if val else None, lr=optimizer.param_groups[0]["lr"],
            steps=steps, steps_by_kind=dict(self.kinds), train_time_s=train_seconds,
            eval_time_s=ledger.epoch_eval_time, flops=ledger.epoch_flops, extra=extra,
        )



def _print_bar(epoch: int, epochs: int, done: int, total: int) -> None:
    width = 30
    filled = width * done // total
    sys.stderr.write(f"\repoch {epoch + 1}/{epochs} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    sys.stderr.flush()


def _print_epoch(r: EpochRecord, epochs: int) -> None:
    val = f"val {r.val_acc:6.2%} " if r.val_acc is not None else ""
    mode = "".join(f"{kind} {n}/{r.steps} " for kind, n in r.steps_by_kind.items() if kind != FULL_KIND)
    line = (f"epoch {r.epoch:>3}/{epochs}  loss {r.train_loss:.4f}  train {r.train_acc:6.2%}  {val}"
            f"lr {r.lr:.4g}  {mode}{r.train_time_s:.1f}s")
    if sys.stderr.isatty():
        sys.stderr.write("\r" + " " * 70 + "\r")
    print(line, flush=True)
