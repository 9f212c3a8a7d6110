"""The training loop: torch only, so it runs where optuna and mlflow are not installed.

Design, after airbench: the dataset lives on the training device as uint8 and is augmented there per
batch; precision and memory layout are chosen once (bf16 autocast and channels_last on CUDA, float32
on CPU, same code path); the timer measures exactly what is reported, with device synchronisation.

Time accounting is fair to the baseline: ``time_s`` is training time plus the evaluations a method
*needs* (every check's validation pass for WUS on ``val_acc``; for every run the final evaluation).
Evaluations made only to draw learning curves are timed but not charged, and an untimed warm-up covers
every step mode and the evaluation pass. One ledger (:class:`_Ledger`) keeps these accounts, and per
*step kind* (``"full"``, ``"skip:last:1"``, named by the methods) the steps made and their FLOPs, counted
by ``torch.utils.flop_counter`` around the real step the first time a kind occurs.

Beside the wall time, with ``relative_to`` (a baseline config) the run prices its work: the ledger's
counts per step kind and of charged evaluation samples, each kind priced at the end of the run by short
interleaved measurements against the baseline's own step (:mod:`wus_tune.timing`, on copies of the
training state taken just before each kind's first step). ``relative_time`` is the run's cost in units of
one full-length baseline run on this device, now.

``fit`` knows no method by name: every method, WUS included, acts through the hooks of
:class:`wus_tune.methods.Method` (the contract is that module's docstring).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wus_tune.compile_step import ModeCompiled
from wus_tune.config import TrainConfig
from wus_tune.errors import ConfigError, TrainingDiverged
from wus_tune.layers import param_groups
from wus_tune.methods import Method, RunInfo, StepContext, build_methods, registry
from wus_tune.run_state import ProbeRecord, RecordingPlan, RunState, origin_of, snapshot_path
from wus_tune.schedules import lr_multiplier
from wus_tune.timing import (
    BASELINE_EVAL, BASELINE_STEP, EVAL, TimingOptions, Workload, costs_of, measure_interleaved, relative_time, run_seconds,
)  # fmt: skip

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
    time_s: float  # the time objective: train_time_s + required_eval_time_s
    uncharged_time_s: float  # measurement overhead left out of time_s (FLOP counting on a kind's first step)
    compile_time_s: float  # the untimed warm-up with compile on (every step mode's graphs); 0 eagerly; not in time_s
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
    # The ledger's work and its prices (wus_tune.timing): units per kind ("step:full", "step:skip:last:1",
    # "eval" samples of charged evaluations), seconds per unit measured at the end of the run; relative_time
    # = this run / one full-length baseline run at those prices (None without relative_to).
    work_counts: dict[str, float] = field(default_factory=dict)
    unit_costs: dict[str, dict[str, float]] = field(default_factory=dict)  # kind -> seconds, low, high, rounds
    relative_time: float | None = None
    reference_time_s: float | None = None  # one full-length baseline run at the measured prices
    modelled_time_s: float | None = None  # this run's counted work at the measured prices (compare time_s)
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


class _Timer:
    """Wall time with device synchronisation, so queued GPU work is counted where it belongs."""

    def __init__(self, device: torch.device) -> None:
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


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
    ``relative_to``: the baseline config to price the run's work in (``relative_time``, :mod:`wus_tune.timing`,
    measured as ``timing`` says); ``on_step(step)`` after every step, inside the timed part (tests inject
    slowdowns there). ``recording``: where to record the signals (the probe points) and which points to snapshot;
    ``resume_from``: go on from such a snapshot (:mod:`wus_tune.run_state`), its records passed to
    ``on_epoch`` first. Raises :class:`~wus_tune.errors.TrainingDiverged` when the loss stops being finite,
    and :class:`~wus_tune.errors.UsageError` subclasses for bad input.
    """
    # ---- set-up: data, model, methods, optimizer, warm-up ----
    from wus_tune.provenance import record_sources

    config = record_sources(config, model=model, data=data)  # objects handed over: say where they came from
    config.validate()
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    given_model = model  # what the baseline's pricing copy is built from, too
    run, data, loaders, model = _prepare(config, device, model=model, data=data)
    model, methods, optimizer, owner = _with_methods(model, config, run)
    checks = _Checks(methods, run, loaders.val is not None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    train_model, eval_flops_per_sample, compile_time = _compile_and_warm_up(model, optimizer, loaders, autocast,
                                                                            methods, config, device, progress)  # fmt: skip
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.optim.label_smoothing)
    peak_lrs = [group["lr"] for group in optimizer.param_groups]  # the schedule scales each group's own peak
    ledger = _Ledger(_Timer(device), eval_flops_per_sample * loaders.val_size, loaders.val_size)

    def validate(charged: bool) -> tuple[float, float]:
        return ledger.evaluate(lambda: _evaluate(train_model, loaders.val, autocast), charged=charged)

    # ---- probe points and snapshots; resuming from one ----
    records: list[EpochRecord] = []
    specimens: dict[str, Any] = {}  # step kind -> copy of the training state before its first step, to price it
    step = 0
    recording = recording.resolved(run.steps_per_epoch, config.epochs) if recording is not None else None
    recorder = _Recorder(recording, run, ledger)
    start_epoch, start_batch, resumed_from, partial = 0, 0, None, None
    if resume_from is not None:
        records, step, start_epoch, start_batch, partial, resumed_from = _resume_from(
            resume_from, model, optimizer, methods, loaders, ledger, recorder, device, on_epoch)

    def snapshot(epoch: int, batch: int, sums: _EpochSums | None, loader_rng: torch.Tensor) -> None:
        _snapshot(recorder, recording, config, model, optimizer, methods, ledger, records, device,
                  step=step, epoch=epoch, batch=batch, sums=sums, loader_rng=loader_rng)  # fmt: skip

    # ---- epochs ----
    for epoch in range(start_epoch, config.epochs):
        model.train()
        loader_rng = _data_order(loaders.train)  # this epoch's data order, for a mid-epoch snapshot
        ledger.start_epoch()
        sums = _EpochSums(device)
        skip_batches = 0
        if partial is not None:  # resumed inside this epoch
            ledger.resume_epoch(partial[0])
            sums.restore(partial[1])
            skip_batches, partial = start_batch, None
        for batch_index, (x, y) in enumerate(loaders.train):
            if batch_index < skip_batches:  # drawn for the data order and the augmentation RNG; the snapshot's run trained it
                continue
            _set_learning_rates(optimizer, peak_lrs, lr_multiplier(config.schedule, step, run.total_steps),
                                methods, run)
            kind = "+".join(k for k in (m.step_kind() for m in methods) if k) or FULL_KIND
            ctx = StepContext(run=run, model=model, optimizer=optimizer, inputs=x, targets=y, step=step, epoch=epoch,
                              forward=_autocast_forward(train_model, autocast), loss_fn=loss_fn)
            if relative_to is not None and kind not in ledger.kinds:
                with ledger.check_time():  # untimed: not part of any step
                    specimens[kind] = copy.deepcopy((model, optimizer, methods, run))
            with ledger.step(kind) as counting:
                if counting:  # FLOPs follow autograd on the eager model, which a compiled graph hides
                    ctx.forward = _autocast_forward(model, autocast)
                loss, logits = _train_step(ctx, methods, owner)
            y = ctx.targets  # an owner training on other examples (a feature cache) sets them
            if on_step is not None:
                on_step(step)
            correct = (logits.detach().argmax(1) == y).sum()
            sums.add(loss, correct, len(y), kind)
            checks.add(correct, len(y))
            recorder.add(correct, len(y))
            step += 1
            if device.type != "cuda" and not torch.isfinite(loss):
                raise TrainingDiverged(f"loss is {loss.item()} at epoch {epoch + 1}, step {batch_index + 1}")
            with ledger.check_time():
                checks.after_step(step, validate)
                if recorder.due(step):
                    val = validate(False) if recorder.plan.val and loaders.val is not None else None
                    recorder.record(step, step / run.total_steps, val, sum(r.flops for r in records))
                    snapshot(epoch, batch_index + 1, sums, loader_rng)
            if progress and sys.stderr.isatty():
                _print_bar(epoch, config.epochs, batch_index + 1, run.steps_per_epoch)
        train_seconds = ledger.end_epoch()
        mean_loss = sums.mean_loss()
        if not math.isfinite(mean_loss):
            raise TrainingDiverged(f"training loss is {mean_loss} in epoch {epoch + 1}")

        epoch_val = _end_of_epoch_evaluation(epoch, step, config, checks, recorder, loaders, validate, records)
        extra: dict[str, float] = {}
        for method in methods:
            extra.update(method.end_epoch(model, run))
        record = sums.record(epoch, epoch_val, optimizer, run.steps_per_epoch, train_seconds, ledger, extra)
        records.append(record)
        if recorder.at_epoch_end():
            snapshot(epoch + 1, 0, None, _data_order(loaders.train))
        if progress:
            _print_epoch(record, config.epochs)
        if on_epoch is not None:
            on_epoch(record)

    # ---- final evaluation, pricing ----
    test_acc = None
    if loaders.test is not None:
        _, test_acc = ledger.evaluate(lambda: _evaluate(train_model, loaders.test, autocast), charged=False)
    result = _result(config, records, ledger, run, model, test_acc, device, compile_time)
    result.work_counts = ledger.work_counts()
    if relative_to is not None:
        _attach_prices(result, relative_to, specimens, data=data, loaders=loaders, device=device, autocast=autocast,
                       loss_fn=loss_fn, model=model, given_model=given_model, options=timing or TimingOptions())  # fmt: skip
    result.probes, result.resumed_from = recorder.records, resumed_from
    return result


def _with_methods(model: nn.Module, config: TrainConfig, run: RunInfo) -> tuple[nn.Module, list[Method], Any, Any]:
    """The config's methods set up on the model, the optimizer (built by a method or the config), and
    the method that owns the step (None: the trainer's own step)."""
    methods = build_methods(config)
    for method in methods:
        model = method.setup(model, run)
    optimizer = _make_optimizer(model, config, methods, run)
    for method in methods:
        method.attach(model, optimizer, run)
    return model, methods, optimizer, _step_owner(methods)


def _end_of_epoch_evaluation(epoch: int, step: int, config: TrainConfig, checks: _Checks, recorder: _Recorder,
                             loaders: _Loaders, validate: Callable[[bool], tuple[float, float]],
                             records: list[EpochRecord]) -> tuple[float, float] | None:  # fmt: skip
    """The epoch's validation (loss, acc): a method's check, or the curve's pass, or the final one (the
    only one every run is charged for); None when the epoch is not evaluated."""
    recorder.mark()
    epoch_val = checks.end_epoch((epoch + 1) / config.epochs, validate)
    last_epoch = epoch == config.epochs - 1
    wants_val = config.eval_every_epoch or last_epoch or recorder.wants_epoch_val()
    if epoch_val is None and loaders.val is not None and wants_val:
        epoch_val = validate(charged=last_epoch)  # every run needs its final evaluation
    if recorder.at_epoch_end():
        recorder.record(step, (epoch + 1) / config.epochs, epoch_val, sum(r.flops for r in records))
    return epoch_val


def _compile_and_warm_up(model: nn.Module, optimizer: torch.optim.Optimizer, loaders: _Loaders, autocast: Any,
                         methods: list[Method], config: TrainConfig, device: torch.device,
                         progress: bool) -> tuple[Any, float, float]:  # fmt: skip
    """The model to train (compiled per mode when asked), the evaluation FLOPs per sample, and the
    compile time: the untimed warm-up when compiling, reported apart from the training time."""
    train_model = _maybe_compile(model, config, device)
    warm_timer = _Timer(device)  # synchronises, so queued GPU work of the warm-up is counted in it
    warm_start = warm_timer.now()
    eval_flops_per_sample = _warm_up(train_model, model, optimizer, loaders, autocast, methods)
    compile_time = warm_timer.now() - warm_start if isinstance(train_model, ModeCompiled) else 0.0
    if progress and compile_time:
        print(f"compiled {train_model.compilations} graphs (training modes and evaluation) in {compile_time:.1f}s, "
              "not counted as training time", flush=True)
    return train_model, eval_flops_per_sample, compile_time


def _resume_from(resume_from: RunState | str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 methods: list[Method], loaders: _Loaders, ledger: _Ledger, recorder: _Recorder, device: torch.device,
                 on_epoch: Callable[[EpochRecord], None] | None) -> tuple[Any, ...]:  # fmt: skip
    """Take up a snapshot: (records, step, epoch, batch, partial epoch, what was resumed); the snapshot's
    epoch records go to ``on_epoch`` first."""
    state = resume_from if isinstance(resume_from, RunState) else RunState.load(resume_from)
    records, step, start_epoch, start_batch, partial = _resume(state, model, optimizer, methods, loaders, ledger,
                                                               recorder, device)  # fmt: skip
    resumed_from = {"point": state.point, "step": state.step, "epoch": state.epoch, "batch": state.batch,
                    "train_time_s": ledger.train_time, "required_eval_time_s": ledger.required_eval_time}  # fmt: skip
    for record in records if on_epoch is not None else ():
        on_epoch(record)
    return records, step, start_epoch, start_batch, partial, resumed_from


def _snapshot(recorder: _Recorder, recording: RecordingPlan | None, config: TrainConfig, model: nn.Module,
              optimizer: torch.optim.Optimizer, methods: list[Method], ledger: _Ledger, records: list[EpochRecord],
              device: torch.device, *, step: int, epoch: int, batch: int, sums: _EpochSums | None,
              loader_rng: torch.Tensor) -> None:  # fmt: skip
    """Save the run's state at this probe point when the plan keeps it (:mod:`wus_tune.run_state`).
    A streamed dataset has no data order to restore (``loader_rng`` None): nothing is saved, so trials
    that would fork from this run train from scratch."""
    if not recorder.saves_now() or loader_rng is None:
        return
    RunState(
        point=len(recorder.records), step=step, epoch=epoch, batch=batch,
        model={k: v.detach().clone() for k, v in model.state_dict().items()},
        optimizer=copy.deepcopy(optimizer.state_dict()), torch_rng=torch.get_rng_state(),
        cuda_rng=torch.cuda.get_rng_state_all() if device.type == "cuda" else None, loader_rng=loader_rng.clone(),
        counters=ledger.snapshot(mid_epoch=sums is not None), epoch_partial=sums.state() if sums else {},
        records=[asdict(r) for r in records], probes=[asdict(p) for p in recorder.records], config=config.to_dict(),
        method_states={m.name: st for m in methods if (st := m.state_dict()) is not None},
        origin=origin_of(config.to_dict()),
    ).save(snapshot_path(recording.save_dir, len(recorder.records)))  # fmt: skip


def _data_order(loader: Any) -> torch.Tensor | None:
    """The state of a device-resident loader's shuffling generator; None for a streamed Dataset."""
    generator = getattr(loader, "generator", None)
    return generator.get_state() if generator is not None else None


def _attach_prices(result: TrainResult, reference: TrainConfig, specimens: dict[str, Any], **kwargs: Any) -> None:
    """Price the run's work against ``reference`` (wus_tune.timing) and write the relative-time fields."""
    start = time.perf_counter()
    prices = _price_work(reference, specimens, **kwargs)
    specimens.clear()
    result.unit_costs = {k: m.to_dict() for k, m in prices["measurements"].items()}
    result.relative_time = relative_time(result.work_counts, prices["costs"], prices["baseline_counts"])
    result.reference_time_s = run_seconds(prices["baseline_counts"], prices["costs"])
    result.modelled_time_s = run_seconds(result.work_counts, prices["costs"])
    result.timing_overhead_s = time.perf_counter() - start


# ---- set-up helpers ------------------------------------------------------------------------------


@dataclass
class _Loaders:
    train: Any
    val: Any  # None when data.val_fraction == 0
    test: Any  # None when the dataset has no test split
    val_size: int


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


def _make_optimizer(model: nn.Module, config: TrainConfig, methods: list[Method], run: RunInfo) -> torch.optim.Optimizer:
    built = [(m, opt) for m in methods if (opt := m.make_optimizer(model, run)) is not None]
    if len(built) > 1:
        raise ConfigError(f"methods: {built[0][0].name} and {built[1][0].name} both build the optimizer; "
                          "combine at most one of them")
    if built:
        return built[0][1]
    opt = config.optim
    groups = param_groups(model, weight_decay=opt.weight_decay, bias_weight_decay=opt.bias_weight_decay)
    groups = [g for g in groups if g["params"]]
    if opt.name == "adamw":
        return torch.optim.AdamW(groups, lr=opt.lr)
    return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, nesterov=opt.nesterov)


def _step_owner(methods: list[Method]) -> Method | None:
    owners = [m for m in methods if m.owns_step()]
    if len(owners) > 1:
        raise ConfigError(f"methods: {owners[0].name} and {owners[1].name} both own the training step; "
                          "combine at most one of them")
    return owners[0] if owners else None


def _maybe_compile(model: nn.Module, config: TrainConfig, device: torch.device) -> nn.Module:
    """The model compiled with one graph per training mode (which parameters require grad), so a method
    that freezes weights (WUS) gets a cheaper graph in its frozen steps; CPU (inductor) and CUDA."""
    if not config.compile:
        return model
    cuda_graphs = config.compile_mode == "reduce-overhead"
    if cuda_graphs and device.type != "cuda":
        raise ConfigError("compile_mode: reduce-overhead (CUDA graphs) needs a CUDA device")
    return ModeCompiled(model, cuda_graphs=cuda_graphs)


def _warm_up(train_model: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, loaders: _Loaders,
             autocast: Any, methods: list[Method]) -> float:
    """Run a few untimed passes so autotuning, compilation and allocator growth are charged to no run:
    forward/backward in every step mode the methods use (WUS: full and skip), and the evaluation forward
    at its batch size, so the first validation pass costs what the others do. Parameters and buffers are
    restored afterwards. Returns the evaluation's forward FLOPs per sample (counted on the eager model)."""
    from torch.utils.flop_counter import FlopCounterMode

    saved = copy.deepcopy(model.state_dict())
    x, y = next(iter(loaders.train))
    modes = [contextlib.nullcontext()] + [mode for m in methods for mode in m.warm_up_modes(model)]
    for mode in modes:
        with mode:
            for _ in range(2):
                with autocast:
                    loss = F.cross_entropy(train_model(x).float(), y)
                loss.backward()
    optimizer.zero_grad(set_to_none=True)
    if loaders.val is None:
        model.load_state_dict(saved)
        return 0.0
    val_x, _ = next(iter(loaders.val))
    for _ in range(2):
        _forward_eval(train_model, val_x, autocast)
    with FlopCounterMode(display=False) as counter:
        _forward_eval(model, val_x, autocast)
    model.load_state_dict(saved)
    return float(counter.get_total_flops()) / len(val_x)


@torch.no_grad()
def _forward_eval(model: nn.Module, x: torch.Tensor, autocast: Any) -> None:
    was_training = model.training
    model.eval()
    with autocast:
        model(x)
    model.train(was_training)


# ---- step helpers --------------------------------------------------------------------------------


def _set_learning_rates(optimizer: torch.optim.Optimizer, peak_lrs: list[float], schedule: float,
                        methods: list[Method], run: RunInfo) -> None:
    factors = [1.0] * len(peak_lrs)
    for method in methods:
        for i, f in enumerate(method.lr_factors(optimizer, run) or ()):
            factors[i] *= f
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = peak_lrs[i] * schedule * factors[i]


def _autocast_forward(model: nn.Module, autocast: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        with autocast:
            return model(x)

    return forward


def _train_step(ctx: StepContext, methods: list[Method], owner: Method | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step: the owner's, or forward, backward, ``optimizer.step()``; others' hooks around it."""
    others = [m for m in methods if m is not owner]
    if owner is None:
        ctx.logits = ctx.forward(ctx.inputs)
        ctx.loss = ctx.loss_fn(ctx.logits.float(), ctx.targets)
        ctx.loss.backward()
    for method in others:
        method.before_step(ctx)
    if owner is None:
        ctx.optimizer.step()
    else:
        cost = owner.train_step(ctx)
        ctx.loss, ctx.logits = cost.loss, cost.logits
    for method in others:
        method.after_step(ctx)
    ctx.optimizer.zero_grad(set_to_none=True)
    return ctx.loss, ctx.logits


class _Checks:
    """The methods' checks (:class:`~wus_tune.methods.CheckPlan`): when they fall due, on what signal."""

    def __init__(self, methods: list[Method], run: RunInfo, has_val: bool) -> None:
        self.plans = [(m, plan) for m in methods if (plan := m.check_plan(run)) is not None]
        self.run, self.has_val = run, has_val
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
                method.on_check({"val_loss": val[0], "val_acc": val[1]}, progress)
            else:
                window = self.windows[id(method)]
                method.on_check({"train_acc": float(window[0]) / max(1, window[1])}, progress)
                self.windows[id(method)] = [torch.zeros((), device=self.run.device), 0]
        return val


class _Recorder:
    """Records the probe points of a :class:`~wus_tune.run_state.RecordingPlan`: the signals there, with their cost."""

    def __init__(self, plan: RecordingPlan | None, run: RunInfo, ledger: _Ledger) -> None:
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
            train_flops=flops_before_epoch + self.ledger.epoch_flops,
        ))  # fmt: skip
        self.window = [torch.zeros((), device=self.run.device), 0]

    def saves_now(self) -> bool:
        return self.plan is not None and len(self.records) in self.plan.save_at


def _resume(state: RunState, model: nn.Module, optimizer: torch.optim.Optimizer, methods: list[Method],
            loaders: _Loaders, ledger: _Ledger, recorder: _Recorder, device: torch.device) -> tuple:
    """Put the run where ``state`` was taken. Returns (records, step, epoch, batch, partial epoch or None)."""
    model.load_state_dict(state.model)
    optimizer.load_state_dict(state.optimizer)
    torch.set_rng_state(state.torch_rng)
    if device.type == "cuda" and state.cuda_rng is not None:
        torch.cuda.set_rng_state_all(state.cuda_rng)
    loaders.train.generator.set_state(state.loader_rng.to(loaders.train.generator.device))
    ledger.restore(state.counters)
    recorder.records = [ProbeRecord.from_dict(p) for p in state.probes]
    for method in methods:
        if method.name in state.method_states:
            method.load_state_dict(state.method_states[method.name])
    partial = (state.counters["epoch"], state.epoch_partial) if state.batch else None
    return [EpochRecord(**r) for r in state.records], state.step, state.epoch, state.batch, partial


@dataclass
class _Kind:
    flops_per_step: float  # counted by torch.utils.flop_counter on the kind's first step
    steps: int = 0


class _Ledger:
    """The run's one account of time and FLOPs: training time (charged), the evaluations methods need
    (charged: time and FLOPs), the other evaluations and the FLOP counting (uncharged), and per step kind
    the number of steps and their FLOPs."""

    def __init__(self, timer: _Timer, flops_per_validation: float, samples_per_validation: int = 0) -> None:
        self.timer = timer
        self.flops_per_validation = flops_per_validation
        self.samples_per_validation = samples_per_validation
        self.charged_eval_samples = 0
        self.kinds: dict[str, _Kind] = {}
        self.train_time = self.eval_time = self.required_eval_time = self.uncharged_time = 0.0
        self.required_eval_flops = 0.0
        self._check_start: float | None = None

    def start_epoch(self) -> None:
        self.epoch_flops = 0.0
        self._eval_before = self.eval_time
        self._checks = self._counting = 0.0
        self._counted_steps = self._steps = 0
        self._start = self.timer.now()

    @contextlib.contextmanager
    def step(self, kind: str) -> Iterator[bool]:
        """Around one training step; yields whether its FLOPs are being counted (the first of its kind)."""
        from torch.utils.flop_counter import FlopCounterMode

        if kind not in self.kinds:
            start = self.timer.now()
            with FlopCounterMode(display=False) as counter:
                yield True
            self.kinds[kind] = _Kind(float(counter.get_total_flops()))
            self._counting += self.timer.now() - start
            self._counted_steps += 1
        else:
            yield False
        self.kinds[kind].steps += 1
        self.epoch_flops += self.kinds[kind].flops_per_step
        self._steps += 1

    @contextlib.contextmanager
    def check_time(self) -> Iterator[None]:
        start = self._check_start = self.timer.now()
        try:
            yield
        finally:
            self._checks += self.timer.now() - start
            self._check_start = None

    def epoch_elapsed(self) -> float:
        """Training time of the epoch so far (checks, including one in progress, left out)."""
        now = self._check_start if self._check_start is not None else self.timer.now()
        return now - self._start - self._checks

    def end_epoch(self) -> float:
        """Close the epoch's training time; a step slowed by FLOP counting is charged as an average step."""
        elapsed = self.timer.now() - self._start - self._checks
        plain_steps = self._steps - self._counted_steps
        charged = elapsed
        if self._counted_steps and plain_steps:
            per_step = (elapsed - self._counting) / plain_steps
            charged = elapsed - self._counting + self._counted_steps * per_step
        self.uncharged_time += elapsed - charged
        self.train_time += charged
        return charged

    def evaluate(self, run_eval: Callable[[], tuple[float, float]], *, charged: bool) -> tuple[float, float]:
        start = self.timer.now()
        result = run_eval()
        seconds = self.timer.now() - start
        self.eval_time += seconds
        if charged:
            self.required_eval_time += seconds
            self.required_eval_flops += self.flops_per_validation
            self.charged_eval_samples += self.samples_per_validation
        return result

    def work_counts(self) -> dict[str, float]:
        """Units of work per kind, as wus_tune.timing prices them: steps per step kind, charged eval samples."""
        counts: dict[str, float] = {f"step:{name}": float(k.steps) for name, k in self.kinds.items()}
        if self.charged_eval_samples:
            counts[EVAL] = float(self.charged_eval_samples)
        return counts

    @property
    def epoch_eval_time(self) -> float:
        return self.eval_time - self._eval_before

    def snapshot(self, *, mid_epoch: bool) -> dict[str, Any]:
        """The account so far, for a RunState; ``mid_epoch``: with the epoch in progress."""
        out: dict[str, Any] = {
            "train_time_s": self.train_time, "eval_time_s": self.eval_time, "required_eval_time_s": self.required_eval_time,
            "required_eval_flops": self.required_eval_flops, "uncharged_time_s": self.uncharged_time,
            "kinds": {name: {"flops_per_step": k.flops_per_step, "steps": k.steps} for name, k in self.kinds.items()},
        }  # fmt: skip
        if mid_epoch:
            out["epoch"] = {"elapsed_s": self.epoch_elapsed(), "flops": self.epoch_flops,
                            "eval_s": self.epoch_eval_time, "counting_s": self._counting,
                            "counted_steps": self._counted_steps, "steps": self._steps}  # fmt: skip
        return out

    def restore(self, state: dict[str, Any]) -> None:
        self.train_time, self.eval_time = float(state["train_time_s"]), float(state["eval_time_s"])
        self.required_eval_time = float(state["required_eval_time_s"])
        self.required_eval_flops = float(state["required_eval_flops"])
        self.uncharged_time = float(state["uncharged_time_s"])
        self.kinds = {name: _Kind(float(k["flops_per_step"]), int(k["steps"])) for name, k in state["kinds"].items()}

    def resume_epoch(self, epoch: dict[str, Any]) -> None:
        """After :meth:`start_epoch`: the epoch in progress when the snapshot was taken."""
        self._start -= float(epoch["elapsed_s"])
        self._eval_before -= float(epoch["eval_s"])
        self.epoch_flops = float(epoch["flops"])
        self._counting, self._counted_steps, self._steps = float(epoch["counting_s"]), int(epoch["counted_steps"]), int(epoch["steps"])


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
               train_seconds: float, ledger: _Ledger, extra: dict[str, float]) -> EpochRecord:
        return EpochRecord(
            epoch=epoch + 1, train_loss=self.mean_loss(), train_acc=float(self.correct) / max(1, self.seen),
            val_loss=val[0] if val else None, val_acc=val[1] if val else None, lr=optimizer.param_groups[0]["lr"],
            steps=steps, steps_by_kind=dict(self.kinds), train_time_s=train_seconds,
            eval_time_s=ledger.epoch_eval_time, flops=ledger.epoch_flops, extra=extra,
        )


def _result(config: TrainConfig, records: list[EpochRecord], ledger: _Ledger, run: RunInfo, model: nn.Module,
            test_acc: float | None, device: torch.device, compile_time: float) -> TrainResult:
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
        config=config.to_dict(), epochs=records, val_acc=val_acc, val_loss=val_loss, test_acc=test_acc,
        best_val_acc=max(val_accs, default=val_acc), train_time_s=ledger.train_time, eval_time_s=ledger.eval_time,
        required_eval_time_s=ledger.required_eval_time, time_s=ledger.train_time + ledger.required_eval_time,
        uncharged_time_s=ledger.uncharged_time, compile_time_s=compile_time, total_steps=run.total_steps, changed_steps=changed,
        changed_step_fraction=changed / max(1, run.total_steps), flops_per_step=flops_full,
        train_flops=train_flops, baseline_train_flops=baseline_flops,
        flops_fraction=train_flops / baseline_flops if baseline_flops else 1.0,
        cost_flops=train_flops + ledger.required_eval_flops,
        step_kinds={name: {"steps": k.steps, "flops_per_step": k.flops_per_step} for name, k in kinds},
        num_params=sum(p.numel() for p in model.parameters()), device=str(device), torch_version=torch.__version__,
        model=model,
    )


def _same_optimizer_work(config: TrainConfig, reference: TrainConfig, n_train: int) -> bool:
    """Whether a full step of ``config`` does the baseline's arithmetic: same batch, optimizer and update
    terms (learning rates and decay values do not change the cost; momentum and decay on or off do)."""
    a, b = config.optim, reference.optim
    return (
        min(a.batch_size, n_train) == min(b.batch_size, n_train) and a.name == b.name
        and (a.momentum > 0) == (b.momentum > 0) and a.nesterov == b.nesterov
        and (a.weight_decay > 0) == (b.weight_decay > 0)
        and config.data.augment == reference.data.augment and config.compile == reference.compile
    )  # fmt: skip


def _changing(methods: dict[str, Any]) -> dict[str, Any]:
    """The entries of methods that change the network or its ordinary step (not ``plain_full_steps``)."""
    known = registry()
    return {name: params for name, params in methods.items() if not getattr(known.get(name), "plain_full_steps", False)}


def _price_work(reference: TrainConfig, specimens: dict[str, Any], *, data: Any, loaders: _Loaders,
                device: torch.device, autocast: Any, loss_fn: Any, model: nn.Module, given_model: Any,
                options: TimingOptions) -> dict[str, Any]:
    """Price each kind of work this run did, interleaved with the baseline run's step and evaluation, on
    the copies of the training state taken before each kind's first step (wus_tune.timing)."""
    sync = _Timer(device).sync
    x, y = next(iter(loaders.train))
    workloads: dict[str, Workload] = {}
    # Work identical to the baseline's (same network, batch size and optimizer, no method but those whose full
    # step is a plain one: Method.plain_full_steps) is priced by the baseline's own workload: a plain run's
    # relative time is then exactly its share of the baseline's steps and evaluation.
    config = next(iter(specimens.values()))[3].config if specimens else reference
    same_net = config.model == reference.model and _changing(config.methods) == _changing(reference.methods)
    aliases = {"step:full": BASELINE_STEP} if same_net and _same_optimizer_work(config, reference, data.size("train")) else {}
    if same_net:
        aliases[EVAL] = BASELINE_EVAL

    def step_work(net: nn.Module, opt: torch.optim.Optimizer, meths: list[Method], run: RunInfo, inputs: torch.Tensor,
                   targets: torch.Tensor, loss: Any) -> Workload:
        owner = _step_owner(meths)
        net.train()

        def one() -> float:
            ctx = StepContext(run=run, model=net, optimizer=opt, inputs=inputs, targets=targets, step=0, epoch=0,
                              forward=_autocast_forward(net, autocast), loss_fn=loss)
            _train_step(ctx, meths, owner)
            return 1.0

        return Workload(run=one, sync=sync)

    for kind, (net, opt, meths, run) in specimens.items():
        if f"step:{kind}" not in aliases:
            workloads[f"step:{kind}"] = step_work(net, opt, meths, run, x, y, loss_fn)
    # The baseline's step: its own model, methods, optimizer and batch size, on the same data.
    ref_batch = min(reference.optim.batch_size, data.size("train"))
    ref_loader = data.loader("train", batch_size=ref_batch, device=device, augment=reference.data.augment,
                             seed=reference.seed, channels_last=device.type == "cuda")  # fmt: skip
    ref_run = RunInfo(config=reference, device=device, steps_per_epoch=len(ref_loader),
                      total_steps=len(ref_loader) * reference.epochs, batch_size=ref_batch)  # fmt: skip
    from wus_tune.models import build_model

    ref_model = build_model(reference.model, data.input_shape, data.num_classes, model=given_model).to(device)
    if device.type == "cuda":
        ref_model = ref_model.to(memory_format=torch.channels_last)
    ref_model, ref_methods, ref_opt, _ = _with_methods(ref_model, reference, ref_run)
    rx, ry = next(iter(ref_loader))
    ref_loss = nn.CrossEntropyLoss(label_smoothing=reference.optim.label_smoothing)
    workloads[BASELINE_STEP] = step_work(ref_model, ref_opt, ref_methods, ref_run, rx, ry, ref_loss)
    baseline_counts: dict[str, float] = {BASELINE_STEP: float(ref_run.total_steps)}
    if loaders.val is not None:
        vx, _ = next(iter(loaders.val))

        def eval_work(net: nn.Module) -> Workload:
            def one() -> float:
                _forward_eval(net, vx, autocast)
                return float(len(vx))

            return Workload(run=one, sync=sync)

        if EVAL not in aliases:
            workloads[EVAL] = eval_work(model)
        workloads[BASELINE_EVAL] = eval_work(ref_model)
        baseline_counts[BASELINE_EVAL] = float(loaders.val_size)  # its final evaluation
    # On a CPU the bursts are timed in process CPU time: a process descheduled by other work on the machine
    # is not charged for the wait (on CUDA, wall time with synchronisation: the work is the device's).
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    measurements = measure_interleaved(workloads, options, paired_with=BASELINE_STEP, clock=clock)
    costs = costs_of(measurements)
    costs.update({kind: costs[same] for kind, same in aliases.items() if same in costs})
    return {"measurements": measurements, "costs": costs, "baseline_counts": baseline_counts}


@torch.no_grad()
def _evaluate(model: nn.Module, loader: Any, autocast: Any) -> tuple[float, float]:
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=loader.device)
    correct = torch.zeros((), device=loader.device)
    seen = 0
    for x, y in loader:
        with autocast:
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
    model.train(was_training)
    return float(loss_sum) / max(1, seen), float(correct) / max(1, seen)


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
