"""Relative time: what a run cost, in units of one full-length baseline run on this device, now.

``fit`` records what a run did (:class:`wus_tune.ledger.Ledger`: steps per kind, evaluated samples, one-off
work, each with its measured work seconds); this module, called after training (``fit(...,
relative_to=baseline)``), turns that record into ``relative_time``.

Why not simply divide wall times: wall time measures the machine as much as the run (a trial that ran while
another job shared the cores looks slow; workers on different GPU models count seconds of different sizes).
So each *recurring* kind of work is priced by a short measurement at the end of the run, in its own
process, interleaved with the same measurement of the baseline's step (:func:`wus_tune.timing.measure_interleaved`),
and each *one-off* piece of work is charged at its measured seconds::

    price_k              seconds per unit of kind k, measured now, paired with the baseline's step
    run(work)            = sum_k count_k * price_k + one_off_seconds
    relative_time        = run(this run) / run(the baseline config)

Recurring kinds are priced on the **real data path**: a unit of a step kind fetches the next batch from a
loader built like the run's (device-resident with its augmentation, or a streamed Dataset read by its
DataLoader workers) and runs the step the run ran (the methods' hooks, an owner's own step) on a copy of the
training state taken just before that kind's first step, with the loop's bookkeeping after it; a unit of
evaluation is an evaluated sample of the run's own validation loader. The baseline's step and evaluation
run on its own model, optimizer and data. One-off work -- a step that builds something (a ``...build``
kind: WUS's frozen-prefix cache), the methods' ``end_epoch`` and checks, compilation -- is charged at its
in-run work seconds: on a CPU's work clock a descheduled process is not charged for the wait, and a
method's single-threaded Python work (a hook) costs what it costs under any load. Every interval, in the
run and in the probes, is charged ``min(CPU seconds, wall seconds)`` (:mod:`wus_tune.clock`). (Scaling
one-off work by the run's pace against its probes was tried: under a busy loop on the other core, two torch
threads' spinning slowed the steps 2-3x in CPU time while a hook's Python did not slow at all, so the
scaled hook was charged a third of its cost.) The baseline pays its own compilation
(the run's compile of the modes the baseline has too: its ordinary step and the evaluation) when it compiles.

A compiled run's graphs cannot be copied into a probe, so a run with ``compile: true`` prices its kinds at
their in-run seconds per unit, and the baseline's step and evaluation at the run's own ordinary step and
evaluation when they do the same work (else by an eager probe).

``coverage``: the share of the run's measured work that its prices explain at the run's pace (1.0 when every
kind cost in the run what its price says; lower when some kind took longer in the run than its probe, e.g.
waits for data a steady-state probe does not see). The study prints a line for a trial under 0.9.
Not covered, on either side: set-up before the first step (loading data, building the model, a method's
``setup``); on a CPU, time spent waiting for something other than a core (a disk), which the work clock
does not see (``wus_tune.clock``). docs/study.md has the measurements behind these choices.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from wus_tune.clock import children_cpu_seconds
from wus_tune.config import TrainConfig
from wus_tune.ledger import EVAL, is_one_off
from wus_tune.methods import Method, RunInfo, StepContext, registry
from wus_tune.step import attach_methods, autocast_forward, evaluate_batch, step_owner, train_step
from wus_tune.timing import BASELINE_EVAL, BASELINE_STEP, Measurement, TimingOptions, Workload, measure_interleaved

__all__ = ["Pricing", "RunWork", "coverage_line", "modelled_seconds", "price_run"]

COVERAGE_LINE = 0.90  # under this share of explained work, the study says which work is unpriced
STREAMED_BURST_S = 0.2  # a burst reading data through worker processes: long against their 10 ms CPU-time ticks


@dataclass
class RunWork:
    """What a finished run hands to pricing: its configuration and data, its counts and measured seconds
    (``Ledger.work_counts`` / ``work_seconds``), and a copy of the training state taken before each recurring
    step kind's first step (``specimens``: kind -> (model, optimizer, methods, RunInfo))."""

    config: TrainConfig
    device: torch.device
    data: Any  # the wus_tune.data.Dataset the run trained on
    counts: dict[str, float]
    seconds: dict[str, dict[str, float]]
    specimens: dict[str, tuple[nn.Module, torch.optim.Optimizer, list[Method], RunInfo]]
    loss_fn: Any
    autocast: Any
    eval_model: nn.Module  # the trained model, for the evaluation's price
    given_model: Any = None  # the model object or factory the run was handed, for the baseline's copy
    baseline_compile_s: float = 0.0  # the run's compile of the modes a compiled baseline has too


@dataclass
class Pricing:
    """The outcome: prices per kind, the two runs' modelled seconds and their ratio."""

    relative_time: float
    run_s: float  # this run at the prices measured now
    reference_s: float  # the baseline config's run at the same prices
    pace: float  # rho: measured / priced seconds of the run's main recurring kind
    coverage: float
    unpriced: dict[str, float] = field(default_factory=dict)  # kind -> its measured / explained seconds, when over 1.1
    prices: dict[str, dict[str, float]] = field(default_factory=dict)  # kind -> Measurement.to_dict()
    one_off_s: float = 0.0  # the run's one-off work, at its measured work seconds
    overhead_s: float = 0.0  # the pricing itself (wall seconds, charged to nothing)


def price_run(work: RunWork, reference: TrainConfig, options: TimingOptions | None = None) -> Pricing:
    """Price ``work`` against a full-length run of ``reference`` (see the module docstring)."""
    start = time.perf_counter()
    options = options or TimingOptions()
    config, counts = work.config, work.counts
    same_net = _same_network(config, reference)
    same_data = _same_data(config, reference)
    ref_data = work.data if same_data else _load(reference)
    batch = min(config.optim.batch_size, work.data.size("train"))
    ref_batch = min(reference.optim.batch_size, ref_data.size("train"))
    same_step = same_net and same_data and _same_optimizer_work(config, reference) and batch == ref_batch
    aliases = {"step:full": BASELINE_STEP} if same_step else {}
    if same_net and same_data:
        aliases[EVAL] = BASELINE_EVAL
    reference_counts = {BASELINE_STEP: float(_steps_per_epoch(ref_data, ref_batch) * reference.epochs)}
    if ref_data.size("val"):
        reference_counts[BASELINE_EVAL] = float(ref_data.size("val"))  # its final evaluation

    if config.compile:
        prices, measurements = _in_run_prices(work, reference, aliases, ref_data, options)
    else:
        measurements = _measure(work, reference, aliases, ref_data, options)
        prices = {kind: m.seconds for kind, m in measurements.items()}
    prices.update({kind: prices[same] for kind, same in aliases.items() if same in prices})

    pace, coverage, unpriced = _pace_and_coverage(work.seconds, prices)
    recurring = {k: n for k, n in counts.items() if n and not is_one_off(k.removeprefix("step:"))}
    for kind in recurring.keys() - prices.keys():  # made only before a fork point: no copy of its state to probe
        measured = work.seconds.get(kind)
        if not measured or not measured["units"]:
            raise ValueError(f"no price for work of kind {kind!r} (counted {recurring[kind]:g}) and no measurement of it")
        prices[kind] = measured["seconds"] / measured["units"] / pace
    one_off = sum(s["seconds"] for k, s in work.seconds.items() if k.startswith("one-off:"))
    run_s = modelled_seconds(recurring, prices, one_off)
    reference_s = modelled_seconds(reference_counts, prices, work.baseline_compile_s if reference.compile else 0.0)
    if not reference_s > 0:
        raise ValueError(f"the baseline run costs {reference_s!r} s at these prices; it must be positive")
    return Pricing(
        relative_time=run_s / reference_s, run_s=run_s, reference_s=reference_s, pace=pace, coverage=coverage,
        unpriced=unpriced, prices={k: m.to_dict() for k, m in measurements.items()}, one_off_s=one_off,
        overhead_s=time.perf_counter() - start,
    )  # fmt: skip


def modelled_seconds(counts: Mapping[str, float], prices: Mapping[str, float], one_off_s: float = 0.0) -> float:
    """``sum_k counts[k] * prices[k] + one_off_s``: a run's seconds at these prices (work not done needs no price)."""
    total = one_off_s
    for kind, n in counts.items():
        if not n:
            continue
        if kind not in prices:
            raise ValueError(f"no measured price for work of kind {kind!r} (counted {n:g})")
        total += n * prices[kind]
    return total


# ---- what is the baseline's work too -------------------------------------------------------------------


def _changing(methods: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``methods`` that change the network or its ordinary step (not ``plain_full_steps``)."""
    known = registry()
    return {name: params for name, params in methods.items() if not getattr(known.get(name), "plain_full_steps", False)}


def _same_network(config: TrainConfig, reference: TrainConfig) -> bool:
    return config.model == reference.model and _changing(config.methods) == _changing(reference.methods)


def _same_data(config: TrainConfig, reference: TrainConfig) -> bool:
    return config.data == reference.data


def _same_optimizer_work(config: TrainConfig, reference: TrainConfig) -> bool:
    """Whether a full step of ``config`` does the baseline's arithmetic: same optimizer and update terms
    (learning rates and decay values do not change the cost; momentum and decay on or off do)."""
    a, b = config.optim, reference.optim
    return (
        a.name == b.name and (a.momentum > 0) == (b.momentum > 0) and a.nesterov == b.nesterov
        and (a.weight_decay > 0) == (b.weight_decay > 0) and config.compile == reference.compile
    )  # fmt: skip


def _load(reference: TrainConfig) -> Any:
    from wus_tune.data import load_dataset

    return load_dataset(reference.data)


def _steps_per_epoch(data: Any, batch: int) -> int:
    n = data.size("train")
    return n // batch if n >= batch else 1


# ---- the measurement --------------------------------------------------------------------------------------


class _Batches:
    """Endless batches of a split from a loader built like the run's, for the probes: a new epoch whenever
    one runs out. A streamed loader keeps ``buffered`` batches ready in its workers; :meth:`drain` takes them
    (untimed, before a burst) so a timed burst sees the steady rate."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.streamed = hasattr(loader, "loader")  # a StreamLoader around a DataLoader
        workers = getattr(getattr(loader, "loader", None), "num_workers", 0) or 0
        self.buffered = workers * (getattr(loader.loader, "prefetch_factor", None) or 2) if self.streamed else 0
        self._it: Iterator[Any] = loader.indexed()

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, y, each sample's position in the split), as the run's loop draws them."""
        try:
            return next(self._it)
        except StopIteration:
            self._it = self.loader.indexed()
            return next(self._it)

    def drain(self) -> None:
        for _ in range(self.buffered):
            self.next()

    def close(self) -> None:
        """Stop the loader's workers now (:meth:`wus_tune.data.loaders.StreamLoader.close`)."""
        self._it.close()
        self.loader.close()


def _loader(data: Any, split: str, config: TrainConfig, device: torch.device, batch: int) -> Any:
    cuda = device.type == "cuda"
    if split == "train":
        return data.loader("train", batch_size=batch, device=device, augment=config.data.augment, seed=config.seed + 7919,
                           channels_last=cuda)  # fmt: skip
    return data.loader(split, batch_size=max(batch, 512), device=device, channels_last=cuda)


def _step_workload(net: nn.Module, opt: torch.optim.Optimizer, methods: list[Method], run: RunInfo,
                   batches: _Batches, loss_fn: Any, autocast: Any, sync: Callable[[], None] | None) -> Workload:  # fmt: skip
    """A unit: fetch the next batch, then the step the run made, on this copy of its state."""
    owner = step_owner(methods)
    net.train()
    sums = [torch.zeros((), device=run.device), torch.zeros((), device=run.device, dtype=torch.int64)]

    def one() -> float:
        x, y, index = batches.next()
        ctx = StepContext(run=run, model=net, optimizer=opt, inputs=x, targets=y, step=0, epoch=0,
                          forward=autocast_forward(net, autocast), loss_fn=loss_fn, indices=index)  # fmt: skip
        loss, logits = train_step(ctx, methods, owner)
        # What the run's loop does after every step (its loss and accuracy sums, the finiteness check on a
        # CPU) is in every run's wall time, so it is in the unit too: on digits' sub-millisecond steps it is
        # a tenth of the step (relative time read 10-20% high without it), against a real step nothing.
        sums[0] += loss.detach() * len(ctx.targets)
        sums[1] += (logits.detach().argmax(1) == ctx.targets).sum()
        if sync is None:
            bool(torch.isfinite(loss))
        return 1.0

    return Workload(run=one, prepare=batches.drain if batches.streamed else None, sync=sync,
                    min_units=2 * batches.buffered or 1, min_burst_s=STREAMED_BURST_S if batches.buffered else None)  # fmt: skip


def _eval_workload(net: nn.Module, batches: _Batches, autocast: Any, sync: Callable[[], None] | None) -> Workload:
    """A unit: the next batch of the validation split, forwarded in evaluation mode; counts its samples."""

    def one() -> float:
        x, y, _ = batches.next()
        was_training = net.training
        net.eval()
        evaluate_batch(net, x, y, autocast)
        net.train(was_training)
        return float(len(x))

    return Workload(run=one, prepare=batches.drain if batches.streamed else None, sync=sync,
                    min_units=2 * batches.buffered or 1, min_burst_s=STREAMED_BURST_S if batches.buffered else None)  # fmt: skip


def _baseline(work: RunWork, reference: TrainConfig, ref_data: Any) -> tuple[nn.Module, Any, list[Method], RunInfo, int]:
    """The baseline's model (built from its config, or the object / factory the run was handed), methods,
    optimizer and RunInfo, and its batch size."""
    from wus_tune.models import build_model

    device = work.device
    batch = min(reference.optim.batch_size, ref_data.size("train"))
    steps = _steps_per_epoch(ref_data, batch)
    run = RunInfo(config=reference, device=device, steps_per_epoch=steps, total_steps=steps * reference.epochs,
                  batch_size=batch)  # fmt: skip
    model = build_model(reference.model, ref_data.input_shape, ref_data.num_classes, model=work.given_model).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model, methods, optimizer, _ = attach_methods(model, reference, run)
    return model, optimizer, methods, run, batch


def _measure(work: RunWork, reference: TrainConfig, aliases: Mapping[str, str], ref_data: Any,
             options: TimingOptions) -> dict[str, Measurement]:  # fmt: skip
    """Interleaved bursts of every recurring kind of the run and of the baseline's step and evaluation."""
    device, config = work.device, work.config
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    batch = min(config.optim.batch_size, work.data.size("train"))
    ref_model, ref_opt, ref_methods, ref_run, ref_batch = _baseline(work, reference, ref_data)
    ref_loss = nn.CrossEntropyLoss(label_smoothing=reference.optim.label_smoothing)
    opened: list[_Batches] = []

    def batches_of(data: Any, split: str, cfg: TrainConfig, size: int) -> _Batches:
        opened.append(_Batches(_loader(data, split, cfg, device, size)))
        return opened[-1]

    try:
        ref_batches = batches_of(ref_data, "train", reference, ref_batch)
        workloads = {BASELINE_STEP: _step_workload(ref_model, ref_opt, ref_methods, ref_run, ref_batches, ref_loss,
                                                   work.autocast, sync)}  # fmt: skip
        same_batches = ref_data is work.data and batch == ref_batch and config.data.augment == reference.data.augment
        batches = ref_batches if same_batches else batches_of(work.data, "train", config, batch)
        for kind, (net, opt, methods, run) in work.specimens.items():
            if f"step:{kind}" not in aliases and not is_one_off(kind):
                workloads[f"step:{kind}"] = _step_workload(net, opt, methods, run, batches, work.loss_fn, work.autocast, sync)
        if ref_data.size("val"):
            workloads[BASELINE_EVAL] = _eval_workload(ref_model, batches_of(ref_data, "val", reference, ref_batch),
                                                      work.autocast, sync)  # fmt: skip
        if work.counts.get(EVAL) and EVAL not in aliases:
            workloads[EVAL] = _eval_workload(work.eval_model, batches_of(work.data, "val", config, batch), work.autocast, sync)
        # A CPU's bursts are timed in CPU time (a descheduled process is not charged for the wait), with the
        # data workers' when a loader streams, capped at their wall time (work on several cores at once costs
        # the time it took); CUDA's in wall time with synchronisation (wus_tune.clock).
        if device.type == "cuda":
            return measure_interleaved(workloads, options, paired_with=BASELINE_STEP, clock=time.perf_counter)
        if any(w.min_units > 1 for w in workloads.values()):  # streamed: with the workers' CPU
            clock = lambda: time.process_time() + children_cpu_seconds()  # noqa: E731
        else:
            clock = time.process_time
        return measure_interleaved(workloads, options, paired_with=BASELINE_STEP, clock=clock, wall=time.perf_counter)
    finally:
        for each in opened:
            each.close()


def _in_run_prices(work: RunWork, reference: TrainConfig, aliases: Mapping[str, str], ref_data: Any,
                   options: TimingOptions) -> tuple[dict[str, float], dict[str, Measurement]]:  # fmt: skip
    """A compiled run's prices: each kind at its in-run seconds per unit; the baseline's step and evaluation at
    the run's own when they are the same work (``aliases``), else by an eager probe of the baseline."""
    measurements = {k: Measurement(s["seconds"] / s["units"], s["seconds"] / s["units"], s["seconds"] / s["units"])
                    for k, s in work.seconds.items() if not k.startswith("one-off:") and k != "workers" and s["units"]}  # fmt: skip
    for kind, same in aliases.items():
        if kind in measurements:
            measurements[same] = measurements[kind]
    if BASELINE_STEP not in measurements or (ref_data.size("val") and BASELINE_EVAL not in measurements):
        eager = _measure(RunWork(**{**vars(work), "specimens": {}, "counts": {}}), reference, {}, ref_data, options)
        measurements = eager | measurements
    return {k: m.seconds for k, m in measurements.items()}, measurements


def _pace_and_coverage(seconds: Mapping[str, Mapping[str, float]],
                       prices: Mapping[str, float]) -> tuple[float, float, dict[str, float]]:  # fmt: skip
    """(rho, coverage, unpriced kinds) from the measured seconds of the recurring kinds against their prices.

    rho is the measured / priced ratio of the kind with the most measured seconds (the run's pace: above 1
    when the run went slower than the probes, e.g. under a load the probes' pairing cancels); a kind whose
    ratio exceeds rho by more than 10% did work in the run that its probe did not see."""
    ratios: dict[str, tuple[float, float]] = {}  # kind -> (measured, priced) seconds
    for kind, s in seconds.items():
        if kind in prices and s["units"] and prices[kind] > 0:
            ratios[kind] = (s["seconds"], s["units"] * prices[kind])
    workers = seconds.get("workers", {}).get("seconds", 0.0)
    if not ratios:
        return 1.0, 1.0, {}
    main = max(ratios, key=lambda k: ratios[k][0])
    step_kinds = [k for k in ratios if k.startswith("step:")]
    if workers and step_kinds:  # the data workers served the steps: spread over them by measured seconds
        total = sum(ratios[k][0] for k in step_kinds)
        ratios = {k: (m + (workers * m / total if k in step_kinds else 0.0), p) for k, (m, p) in ratios.items()}
    pace = ratios[main][0] / ratios[main][1]
    if not pace > 0:
        return 1.0, 1.0, {}
    measured = sum(m for m, _ in ratios.values())
    explained = sum(min(m, p * pace) for m, p in ratios.values())
    unpriced = {k: m / (p * pace) for k, (m, p) in ratios.items() if m > 1.1 * p * pace}
    return pace, explained / measured, unpriced


def coverage_line(number: int, pricing: Mapping[str, Any]) -> str | None:
    """The study's one line for a trial whose prices explain less than ``COVERAGE_LINE`` of its measured work."""
    coverage = pricing.get("coverage")
    if coverage is None or coverage >= COVERAGE_LINE:
        return None
    worst = sorted((pricing.get("unpriced") or {}).items(), key=lambda kv: -kv[1])
    what = ", ".join(f"{k} took {r:.1f}x its price" for k, r in worst) or "work outside the priced kinds"
    return (f"trial {number}: its prices explain {coverage:.0%} of its measured work ({what}): unpriced work in the "
            "run (waits for data the probes did not see), or load on the machine; its relative time is low by about that")
