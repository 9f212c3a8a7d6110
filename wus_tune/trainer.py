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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wus_tune.compile_step import ModeCompiled
from wus_tune.config import TrainConfig
from wus_tune.errors import ConfigError, TrainingDiverged
from wus_tune.frozen_prefix import PrefixCacheSession, split_frozen_prefix
from wus_tune.methods import Method, MethodContext, build_methods
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
    compile_time_s: float  # compiling every training mode (untimed warm-up), not part of time_s; 0 eagerly
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
) -> TrainResult:
    """Train one model as ``config`` says and return its measurements.

    ``on_epoch`` is called after each epoch (a study logs it and may stop the run by raising).
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
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.optim.label_smoothing)
    train_model: nn.Module = model
    if config.compile:
        if config.compile_mode == "reduce-overhead" and not cuda:
            raise ConfigError("compile_mode: reduce-overhead (CUDA graphs) needs a CUDA device")
        # one graph per training mode, chosen by which parameters require grad (wus_tune.compile_step)
        train_model = ModeCompiled(model, cuda_graphs=config.compile_mode == "reduce-overhead")

    def step_loss(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast:
            logits = train_model(x)
        return loss_fn(logits.float(), y), logits

    cache_session = None
    flops_cached = flops_prefix_per_image = 0.0
    if controller and wus_cfg.cache_frozen_prefix:
        cache_session = PrefixCacheSession(model, max_bytes=int(wus_cfg.cache_max_mb * 2**20), batch_size=batch_size,
                                           seed=config.seed, autocast_dtype=torch.bfloat16 if cuda else None)
        flops_cached, flops_prefix_per_image = _cached_step_flops(model, sample_x, sample_y, frozen_in_skip)

    timer = _Timer(device)
    warm_start = timer.now()
    _warm_up(step_loss, sample_x, sample_y, model, optimizer, frozen_in_skip)
    compile_time = timer.now() - warm_start if config.compile else 0.0
    if progress and isinstance(train_model, ModeCompiled):
        print(f"compiled {train_model.compilations} training mode(s) in {compile_time:.1f}s "
              "(not counted as training time)", flush=True)
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

    def check(progress: float) -> tuple[float | None, float | None]:
        """One WUS check. Returns the validation (loss, acc) if it evaluated, to reuse for the curves."""
        nonlocal eval_time, required_eval_time, eval_flops_required, window_correct, window_seen
        assert controller is not None
        if wus_cfg.signal == "val_acc" and val_loader is not None:
            v_loss, v_acc, seconds = evaluate(val_loader)
            eval_time += seconds
            required_eval_time += seconds
            eval_flops_required += flops_eval_per_sample * len(data.val_y)
            controller.observe(v_acc, progress)
            return v_loss, v_acc
        controller.observe(float(window_correct) / max(1, window_seen), progress)
        window_correct = torch.zeros((), device=device)
        window_seen = 0
        return None, None

    for epoch in range(config.epochs):
        ctx.epoch = epoch
        model.train()
        epoch_loss = torch.zeros((), device=device)
        epoch_correct = torch.zeros((), device=device)
        epoch_seen = 0
        epoch_skipped = 0
        epoch_cached = 0
        epoch_cache_flops = 0.0
        epoch_eval_time = 0.0  # WUS checks inside the epoch, taken out of its training time
        eval_time_before = eval_time
        epoch_val: tuple[float | None, float | None] = (None, None)
        start = timer.now()
        for batch_index, (x, y) in enumerate(train_loader):
            ctx.step = step
            schedule = lr_multiplier(config.schedule, step, total_steps)
            for i, group in enumerate(optimizer.param_groups):
                group["lr"] = peak_lrs[i] * schedule * (controller.lr_factor(i) if controller else 1.0)
            skipping = bool(controller and controller.skipping)
            cached = False
            if cache_session is not None:
                if skipping:
                    if not cache_session.in_period:
                        n_train = len(train_loader.y)
                        cached = cache_session.begin(train_loader.batches_in_order(eval_batch), n_train)
                        epoch_cache_flops += flops_prefix_per_image * n_train if cached else 0.0
                    cached = cache_session.active
                elif cache_session.in_period:
                    cache_session.end()
            if cached:
                loss, logits, y = cache_session.step_loss(loss_fn)
            else:
                loss, logits = step_loss(x, y)
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
            epoch_skipped += skipping
            epoch_cached += cached
            step += 1
            if not cuda and not torch.isfinite(loss):
                raise TrainingDiverged(f"loss is {loss.item()} at epoch {epoch + 1}, step {batch_index + 1}")
            if controller and wus_cfg.check_every and step % wus_cfg.check_every == 0:
                before = timer.now()
                check(step / total_steps)
                epoch_eval_time += timer.now() - before
            if progress and sys.stderr.isatty():
                _print_bar(epoch, config.epochs, batch_index + 1, steps_per_epoch)
        train_seconds = timer.now() - start - epoch_eval_time
        train_time += train_seconds
        mean_loss = float(epoch_loss) / max(1, epoch_seen)
        if not math.isfinite(mean_loss):
            raise TrainingDiverged(f"training loss is {mean_loss} in epoch {epoch + 1}")

        if controller and wus_cfg.check_every == 0:
            epoch_val = check((epoch + 1) / config.epochs)
        last_epoch = epoch == config.epochs - 1
        if epoch_val[0] is None and val_loader is not None and (config.eval_every_epoch or last_epoch):
            v_loss, v_acc, seconds = evaluate(val_loader)
            eval_time += seconds
            if last_epoch:  # every run needs its final evaluation
                required_eval_time += seconds
                eval_flops_required += flops_eval_per_sample * len(data.val_y)
            epoch_val = (v_loss, v_acc)

        extra: dict[str, float] = {}
        if controller:
            extra.update(controller.metrics())
        if cache_session is not None:
            extra.update({"wus/cached_steps": float(epoch_cached), "wus/cache_builds": float(cache_session.builds),
                          "wus/cache_fallbacks": float(cache_session.fallbacks),
                          "wus/cache_peak_mb": cache_session.peak_bytes / 2**20})
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
            flops=((steps_per_epoch - epoch_skipped) * flops_full + (epoch_skipped - epoch_cached) * flops_skip
                   + epoch_cached * flops_cached + epoch_cache_flops),
            extra=extra,
        )
        skipped_steps += epoch_skipped
        records.append(record)
        if progress:
            _print_epoch(record, config.epochs)
        if on_epoch is not None:
            on_epoch(record)

    if cache_session is not None:
        cache_session.end()
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
        compile_time_s=compile_time,
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


def _cached_step_flops(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                       frozen: list[nn.Parameter]) -> tuple[float, float]:
    """FLOPs of one step of the top on cached features, and of the frozen prefix's forward per image."""
    for p in frozen:
        p.requires_grad_(False)
    try:
        split = split_frozen_prefix(model)
        if split is None:
            return 0.0, 0.0
        prefix, top = split
        with torch.no_grad():
            features = copy.deepcopy(prefix).float().eval()(x.float())
        return _step_flops(top, features, y, frozen=[]), _forward_flops(prefix, x) / len(x)
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _warm_up(step_loss: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
             x: torch.Tensor, y: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer,
             frozen_in_skip: list[nn.Parameter]) -> None:
    """Run a few untimed forward/backward passes (full and skip mode) so autotuning and compilation (one
    graph per mode) are not charged to the first epoch; parameters and buffers are restored afterwards."""
    saved = copy.deepcopy(model.state_dict())
    for frozen in ([], frozen_in_skip) if frozen_in_skip else ([],):
        for p in frozen:
            p.requires_grad_(False)
        for _ in range(2):
            loss, _ = step_loss(x, y)
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
