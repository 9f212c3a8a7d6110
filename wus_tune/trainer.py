"""The training loop: torch only, so it runs where optuna and mlflow are not installed.

Design, after airbench: the dataset lives on the training device as uint8 and is augmented there per
batch; precision and memory layout are chosen once (bf16 autocast and channels_last on CUDA, float32
on CPU, same code path); the timer measures exactly what is reported, with device synchronisation.

Time accounting is fair to the baseline: ``time_s`` is training time plus the evaluations a method
*needs* (every check's validation pass for WUS on ``val_acc``; for every run the final evaluation).
Evaluations made only to draw learning curves are timed but not charged.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wus_tune.config import TrainConfig
from wus_tune.errors import ConfigError, TrainingDiverged
from wus_tune.methods import Method, MethodContext, build_methods
from wus_tune.run_state import ProbeRecord, Probes, RunState, snapshot_path
from wus_tune.schedules import lr_multiplier
from wus_tune.wus import WUSController, param_groups, skip_frozen_parameters

__all__ = ["fit", "TrainResult", "EpochRecord", "resolve_device"]


@dataclass
class EpochRecord:
    epoch: int  # 1-based
    train_loss: float
    train_acc: float
    val_loss: float | None  # None when the epoch was not evaluated
    val_acc: float | None
    lr: float  # peak-group learning rate at the epoch's last step
    skipping: bool  # weight updates skipped for most of the epoch's steps
    skipped_steps: int
    steps: int
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
    total_steps: int
    skipped_steps: int
    skip_fraction: float
    flops_per_step: float  # one full training step at the configured batch size
    flops_per_skip_step: float
    train_flops: float
    baseline_train_flops: float  # the same steps, none skipped
    flops_fraction: float  # train_flops / baseline_train_flops
    cost_flops: float  # the cost objective: train_flops + FLOPs of the required evaluations
    num_params: int
    device: str
    torch_version: str
    probes: list[ProbeRecord] = field(default_factory=list)  # the signals at each probe point (fit's ``probes``)
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
    probes: Probes | None = None,
    resume_from: RunState | str | Path | None = None,
) -> TrainResult:
    """Train one model as ``config`` says and return its measurements.

    ``on_epoch`` is called after each epoch (a study logs it and may stop the run by raising).
    ``probes``: record the signals at these points (``TrainResult.probes``) and snapshot the run at some
    of them (:mod:`wus_tune.run_state`). ``resume_from``: go on from a snapshot (or its path) instead of
    training its prefix; the snapshot's records are passed to ``on_epoch`` first, its time and FLOPs
    counted as this run's.
    Raises :class:`~wus_tune.errors.TrainingDiverged` when the loss stops being finite, and
    :class:`~wus_tune.errors.UsageError` subclasses for bad input.
    """
    from wus_tune.data import load_dataset
    from wus_tune.models import build_model

    config.validate()
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    data = load_dataset(config.data)
    batch_size = min(config.optim.batch_size, len(data.train_y))
    eval_batch = max(batch_size, 512)
    train_loader = data.loader("train", batch_size=batch_size, device=device, augment=config.data.augment,
                               seed=config.seed, channels_last=cuda)
    val_loader = data.loader("val", batch_size=eval_batch, device=device, channels_last=cuda) if len(data.val_y) else None
    test_loader = (
        data.loader("test", batch_size=eval_batch, device=device, channels_last=cuda) if data.test_x is not None else None
    )

    model = build_model(config.model, data.input_shape, data.num_classes).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * config.epochs
    ctx = MethodContext(config=config, device=device, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    methods = build_methods(config.methods)
    for method in methods:
        model = method.apply_model(model, ctx)
    optimizer = _make_optimizer(model, config, methods, ctx)

    wus_cfg = config.wus
    checks_total = config.epochs if wus_cfg.check_every == 0 else total_steps // wus_cfg.check_every
    controller = (
        WUSController(model, optimizer, wus_cfg, total_checks=checks_total, manage_lr=False)
        if wus_cfg.enabled else None
    )

    sample_x, sample_y = next(iter(train_loader))
    frozen_in_skip = skip_frozen_parameters(model, wus_cfg) if controller else []
    flops_full = _step_flops(model, sample_x, sample_y, frozen=[])
    flops_skip = _step_flops(model, sample_x, sample_y, frozen=frozen_in_skip) if controller else flops_full
    flops_eval_per_sample = _forward_flops(model, sample_x) / len(sample_x)
    num_params = sum(p.numel() for p in model.parameters())

    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    )
    train_model = model
    if config.compile and cuda:
        if controller:
            # Measured on torch 2.11 (docs/benchmarks.md): the compiled graph does not re-specialise when
            # requires_grad flips, so skip steps still run the full backward and save no time.
            warnings.warn("compile with WUS: torch.compile keeps computing frozen weights' gradients, "
                          "so skip steps save no time; train eagerly to benefit from WUS", stacklevel=2)
        train_model = torch.compile(model)
    _warm_up(train_model, optimizer, sample_x, sample_y, autocast, frozen_in_skip)

    timer = _Timer(device)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.optim.label_smoothing)
    peak_lrs = [group["lr"] for group in optimizer.param_groups]  # the schedule scales each group's own peak

    def evaluate(loader: Any) -> tuple[float, float, float]:
        start = timer.now()
        loss, acc = _evaluate(train_model, loader, autocast)
        return loss, acc, timer.now() - start

    records: list[EpochRecord] = []
    train_time = eval_time = required_eval_time = 0.0
    eval_flops_required = 0.0
    skipped_steps = 0
    step = 0
    # running train accuracy since the last check: the cheap WUS signal
    window_correct = torch.zeros((), device=device)
    window_seen = 0
    probe_records: list[ProbeRecord] = []
    probe_correct = torch.zeros((), device=device)  # running train accuracy since the last probe point
    probe_seen = 0
    eval_flops_val = flops_eval_per_sample * len(data.val_y)

    start_epoch, start_batch, partial = 0, 0, {}
    resumed_from = None
    if resume_from is not None:
        state = resume_from if isinstance(resume_from, RunState) else RunState.load(resume_from)
        model.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
        torch.set_rng_state(state.torch_rng)
        if cuda and state.cuda_rng is not None:
            torch.cuda.set_rng_state_all(state.cuda_rng)
        train_loader.generator.set_state(state.loader_rng.to(train_loader.generator.device))
        c = state.counters
        train_time, eval_time = float(c["train_time_s"]), float(c["eval_time_s"])
        required_eval_time, eval_flops_required = float(c["required_eval_time_s"]), float(c["required_eval_flops"])
        skipped_steps, step = int(c["skipped_steps"]), state.step
        records = [EpochRecord(**r) for r in state.records]
        probe_records = [ProbeRecord.from_dict(p) for p in state.probes]
        start_epoch, start_batch, partial = state.epoch, state.batch, dict(state.epoch_partial)
        if controller and "wus" in state.method_states:
            controller.load_state_dict(state.method_states["wus"])
        resumed_from = {"point": state.point, "step": state.step, "epoch": state.epoch, "batch": state.batch,
                        "train_time_s": train_time, "required_eval_time_s": required_eval_time}  # fmt: skip
        if on_epoch is not None:
            for record in records:
                on_epoch(record)
    epoch_rng = train_loader.generator.get_state()  # the data order of the epoch in progress

    last_eval_s = 0.0  # the latest validation pass, for a probe point that shares it

    def evaluate_val() -> tuple[float, float]:
        nonlocal eval_time, last_eval_s
        v_loss, v_acc, last_eval_s = evaluate(val_loader)
        eval_time += last_eval_s
        return v_loss, v_acc

    def check(progress: float) -> tuple[float | None, float | None]:
        """One WUS check. Returns the validation (loss, acc) if it evaluated, to reuse for the curves."""
        nonlocal required_eval_time, eval_flops_required, window_correct, window_seen
        assert controller is not None
        if wus_cfg.signal == "val_acc" and val_loader is not None:
            v_loss, v_acc = evaluate_val()
            required_eval_time += last_eval_s
            eval_flops_required += eval_flops_val
            controller.observe(v_acc, progress)
            return v_loss, v_acc
        controller.observe(float(window_correct) / max(1, window_seen), progress)
        window_correct = torch.zeros((), device=device)
        window_seen = 0
        return None, None

    def probe(progress: float, val: tuple[float | None, float | None], train_so_far: float, flops_so_far: float) -> None:
        """Record one probe point; ``val`` is this point's validation pass if one was made."""
        nonlocal probe_correct, probe_seen
        evaluated = val[1] is not None
        probe_records.append(ProbeRecord(
            index=len(probe_records) + 1, step=step, progress=progress, val_acc=val[1], val_loss=val[0],
            train_acc=float(probe_correct) / max(1, probe_seen), train_time_s=train_so_far,
            eval_time_s=last_eval_s if evaluated else 0.0, eval_flops=eval_flops_val if evaluated else 0.0,
            train_flops=flops_so_far,
        ))  # fmt: skip
        probe_correct = torch.zeros((), device=device)
        probe_seen = 0

    def snapshot(epoch: int, batch: int, epoch_partial: dict[str, float], loader_rng: torch.Tensor) -> None:
        point = len(probe_records)
        if probes is None or point not in probes.save_at:
            return
        RunState(
            point=point, step=step, epoch=epoch, batch=batch,
            model={k: v.detach().clone() for k, v in model.state_dict().items()},
            optimizer=copy.deepcopy(optimizer.state_dict()), torch_rng=torch.get_rng_state(),
            cuda_rng=torch.cuda.get_rng_state_all() if cuda else None, loader_rng=loader_rng.clone(),
            counters={"train_time_s": train_time, "eval_time_s": eval_time, "required_eval_time_s": required_eval_time,
                      "required_eval_flops": eval_flops_required, "skipped_steps": skipped_steps},
            epoch_partial=epoch_partial, records=[asdict(r) for r in records],
            probes=[asdict(p) for p in probe_records], config=config.to_dict(),
        ).save(snapshot_path(probes.save_dir, point))  # fmt: skip

    for epoch in range(start_epoch, config.epochs):
        ctx.epoch = epoch
        model.train()
        epoch_loss = torch.zeros((), device=device)
        epoch_correct = torch.zeros((), device=device)
        epoch_seen = 0
        epoch_skipped = 0
        epoch_eval_time = 0.0  # WUS checks inside the epoch, taken out of its training time
        epoch_train_before = 0.0  # training time of this epoch before a resumed point
        eval_time_before = eval_time
        skip_batches = 0
        if epoch == start_epoch and start_batch:  # resumed in the middle of this epoch
            epoch_loss += partial["loss"]
            epoch_correct += partial["correct"]
            epoch_seen, epoch_skipped = int(partial["seen"]), int(partial["skipped"])
            epoch_train_before, eval_time_before = partial["train_time_s"], eval_time - partial["eval_time_s"]
            skip_batches = start_batch
        epoch_rng = train_loader.generator.get_state()
        epoch_val: tuple[float | None, float | None] = (None, None)
        start = timer.now()
        for batch_index, (x, y) in enumerate(train_loader):
            if batch_index < skip_batches:  # drawn for the data order and augmentation RNG, trained by the snapshot's run
                continue
            ctx.step = step
            schedule = lr_multiplier(config.schedule, step, total_steps)
            for i, group in enumerate(optimizer.param_groups):
                group["lr"] = peak_lrs[i] * schedule * (controller.lr_factor(i) if controller else 1.0)
            skipping = bool(controller and controller.skipping)
            with autocast:
                logits = train_model(x)
                loss = loss_fn(logits.float(), y)
            loss.backward()
            ctx.extra["inputs"], ctx.extra["targets"] = x, y
            for method in methods:
                method.before_step(model, optimizer, ctx)
            optimizer.step()
            for method in methods:
                method.after_step(model, optimizer, ctx)
            optimizer.zero_grad(set_to_none=True)

            correct = (logits.detach().argmax(1) == y).sum()
            epoch_loss += loss.detach() * len(y)
            epoch_correct += correct
            epoch_seen += len(y)
            window_correct += correct
            window_seen += len(y)
            probe_correct += correct
            probe_seen += len(y)
            epoch_skipped += skipping
            step += 1
            if not cuda and not torch.isfinite(loss):
                raise TrainingDiverged(f"loss is {loss.item()} at epoch {epoch + 1}, step {batch_index + 1}")
            if controller and wus_cfg.check_every and step % wus_cfg.check_every == 0:
                before = timer.now()
                check(step / total_steps)
                epoch_eval_time += timer.now() - before
            if probes is not None and probes.every and step % probes.every == 0:
                before = timer.now()
                point_val = evaluate_val() if probes.val and val_loader is not None else (None, None)
                done = batch_index + 1
                probe(step / total_steps, point_val, train_time + epoch_train_before + before - start - epoch_eval_time,
                      sum(r.flops for r in records) + (done - epoch_skipped) * flops_full + epoch_skipped * flops_skip)
                epoch_eval_time += timer.now() - before
                snapshot(epoch, done, {
                    "loss": float(epoch_loss), "correct": float(epoch_correct), "seen": epoch_seen,
                    "skipped": epoch_skipped, "train_time_s": epoch_train_before + timer.now() - start - epoch_eval_time,
                    "eval_time_s": eval_time - eval_time_before,
                }, epoch_rng)  # fmt: skip
            if progress and sys.stderr.isatty():
                _print_bar(epoch, config.epochs, batch_index + 1, steps_per_epoch)
        train_seconds = epoch_train_before + timer.now() - start - epoch_eval_time
        train_time += train_seconds
        mean_loss = float(epoch_loss) / max(1, epoch_seen)
        if not math.isfinite(mean_loss):
            raise TrainingDiverged(f"training loss is {mean_loss} in epoch {epoch + 1}")

        if controller and wus_cfg.check_every == 0:
            epoch_val = check((epoch + 1) / config.epochs)
        last_epoch = epoch == config.epochs - 1
        wants_val = config.eval_every_epoch or last_epoch or (probes is not None and probes.every == 0 and probes.val)
        if epoch_val[0] is None and val_loader is not None and wants_val:
            epoch_val = evaluate_val()
            if last_epoch:  # every run needs its final evaluation
                required_eval_time += last_eval_s
                eval_flops_required += eval_flops_val
        epoch_flops = (steps_per_epoch - epoch_skipped) * flops_full + epoch_skipped * flops_skip
        if probes is not None and probes.every == 0:
            probe((epoch + 1) / config.epochs, epoch_val, train_time, sum(r.flops for r in records) + epoch_flops)
        extra: dict[str, float] = {}
        if controller:
            extra.update(controller.metrics())
        for method in methods:
            extra.update(method.end_epoch(model, ctx))
        record = EpochRecord(
            epoch=epoch + 1,
            train_loss=mean_loss,
            train_acc=float(epoch_correct) / max(1, epoch_seen),
            val_loss=epoch_val[0],
            val_acc=epoch_val[1],
            lr=optimizer.param_groups[0]["lr"],
            skipping=epoch_skipped * 2 > steps_per_epoch,
            skipped_steps=epoch_skipped,
            steps=steps_per_epoch,
            train_time_s=train_seconds,
            eval_time_s=eval_time - eval_time_before,
            flops=epoch_flops,
            extra=extra,
        )
        skipped_steps += epoch_skipped
        records.append(record)
        if progress:
            _print_epoch(record, config.epochs)
        if probes is not None and probes.every == 0:
            snapshot(epoch + 1, 0, {}, train_loader.generator.get_state())
        if on_epoch is not None:
            on_epoch(record)

    final_val = records[-1]
    if val_loader is None:  # val_fraction == 0: report training accuracy, say so in the curves
        val_loss, val_acc = final_val.train_loss, final_val.train_acc
    else:
        val_loss, val_acc = final_val.val_loss, final_val.val_acc
    test_acc = None
    if test_loader is not None:
        _, test_acc, seconds = evaluate(test_loader)
        eval_time += seconds
    train_flops = sum(r.flops for r in records)
    baseline_flops = total_steps * flops_full
    val_accs = [r.val_acc for r in records if r.val_acc is not None]
    return TrainResult(
        config=config.to_dict(),
        epochs=records,
        val_acc=val_acc,
        val_loss=val_loss,
        test_acc=test_acc,
        best_val_acc=max(val_accs, default=val_acc),
        train_time_s=train_time,
        eval_time_s=eval_time,
        required_eval_time_s=required_eval_time,
        time_s=train_time + required_eval_time,
        total_steps=total_steps,
        skipped_steps=skipped_steps,
        skip_fraction=skipped_steps / max(1, total_steps),
        flops_per_step=flops_full,
        flops_per_skip_step=flops_skip,
        train_flops=train_flops,
        baseline_train_flops=baseline_flops,
        flops_fraction=train_flops / baseline_flops if baseline_flops else 1.0,
        cost_flops=train_flops + eval_flops_required,
        num_params=num_params,
        device=str(device),
        torch_version=torch.__version__,
        probes=probe_records,
        resumed_from=resumed_from,
        model=model,
    )


def _make_optimizer(model: nn.Module, config: TrainConfig, methods: list[Method], ctx: MethodContext) -> torch.optim.Optimizer:
    for method in methods:
        optimizer = method.make_optimizer(model, ctx)
        if optimizer is not None:
            return optimizer
    opt = config.optim
    groups = param_groups(model, weight_decay=opt.weight_decay, bias_weight_decay=opt.bias_weight_decay)
    groups = [g for g in groups if g["params"]]
    if opt.name == "adamw":
        return torch.optim.AdamW(groups, lr=opt.lr)
    return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, nesterov=opt.nesterov)


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


def _step_flops(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, frozen: list[nn.Parameter]) -> float:
    """FLOPs of one forward + backward at this batch size, on a copy, with ``frozen`` not requiring grad.

    Counted by torch.utils.flop_counter, which follows autograd: a weight that needs no gradient costs
    no weight-gradient product, so this is the machine-independent price of a (skip) step.
    """
    from torch.utils.flop_counter import FlopCounterMode

    frozen_ids = {id(p) for p in frozen}
    names = [n for n, p in model.named_parameters() if id(p) in frozen_ids]
    clone = copy.deepcopy(model).float()
    for name, p in clone.named_parameters():
        if name in names:
            p.requires_grad_(False)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(clone(x.float()), y).backward()
    return float(counter.get_total_flops())


def _forward_flops(model: nn.Module, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    clone = copy.deepcopy(model).float().eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        clone(x.float())
    return float(counter.get_total_flops())


def _warm_up(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
             autocast: Any, frozen_in_skip: list[nn.Parameter]) -> None:
    """Run a few untimed forward/backward passes (full and skip mode) so autotuning and compilation
    are not charged to the first epoch; the model's parameters and buffers are restored afterwards."""
    saved = copy.deepcopy(model.state_dict())
    for frozen in ([], frozen_in_skip) if frozen_in_skip else ([],):
        for p in frozen:
            p.requires_grad_(False)
        for _ in range(2):
            with autocast:
                loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
        for p in frozen:
            p.requires_grad_(True)
    optimizer.zero_grad(set_to_none=True)
    model.load_state_dict(saved)


def _print_bar(epoch: int, epochs: int, done: int, total: int) -> None:
    width = 30
    filled = width * done // total
    sys.stderr.write(f"\repoch {epoch + 1}/{epochs} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    sys.stderr.flush()


def _print_epoch(r: EpochRecord, epochs: int) -> None:
    val = f"val {r.val_acc:6.2%} " if r.val_acc is not None else ""
    mode = f"skip {r.skipped_steps}/{r.steps} " if r.skipped_steps else ""
    line = (f"epoch {r.epoch:>3}/{epochs}  loss {r.train_loss:.4f}  train {r.train_acc:6.2%}  {val}"
            f"lr {r.lr:.4g}  {mode}{r.train_time_s:.1f}s")
    if sys.stderr.isatty():
        sys.stderr.write("\r" + " " * 70 + "\r")
    print(line, flush=True)
