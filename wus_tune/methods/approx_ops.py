"""Approximate tensor operations: compute Linear/Conv2d products on a sample of column-row pairs.

Adelman, Levy, Hakimi, Silberstein, "Faster Neural Network Training with Approximate Tensor
Operations", NeurIPS 2021 (https://arxiv.org/abs/1805.08079).

The maths. A matrix product is a sum of outer products over the shared dimension,
``A B = sum_{i=1..n} A[:, i] B[i, :]``. Keep ``k`` of the ``n`` column-row pairs, chosen by the score
``s_i = ||A[:, i]|| * ||B[i, :]||`` (the pairs that can contribute most):

* ``topk``: the ``k`` largest scores, no rescaling (deterministic, biased, lowest variance);
* ``crs`` (column-row sampling): ``k`` draws with replacement, ``P(i) = p_i = s_i / sum(s)``; every draw
  of pair ``i`` is scaled by ``1 / (k p_i)``, repeated draws are summed, so pair ``i`` enters with
  weight ``count_i / (k p_i)``; unbiased: ``E[estimate] = A B``;
* ``bernoulli`` (Bernoulli-CRS): keep pair ``i`` independently with ``p_i = min(1, k s_i / sum(s))`` and
  scale it by ``1 / p_i``; unbiased, and the expected number of kept pairs is at most ``k``.

For ``nn.Linear`` (``y = x W^T + b``) the pairs are the input features: ``s_i = ||x[..., i]|| * ||W[:, i]||``
(the first norm over the batch). For ``nn.Conv2d`` they are the input channels (a convolution is a sum of
per-input-channel convolutions): ``s_c = ||x[:, c]|| * ||W[:, c]||`` (norms over batch and space, and over
output channels and the kernel window). The product is then computed on ``x`` and ``W`` gathered
(``index_select``) along the input dimension, so the forward product and both backward products
(input gradient, weight gradient) really shrink from ``n`` to about ``k``; weight columns that were not
sampled get a zero gradient for that step.

``k = min(n, max(minimal_k, floor(sample_ratio * n)))`` rounded up to a multiple of
``min(round_to, n)`` (tensor-core / SIMD friendly widths) and capped at ``n``; when ``k == n`` the exact
product is computed. Only the training forward is approximated: a module in ``eval()`` mode computes the
exact product, bit for bit the same as ``nn.Linear`` / ``nn.Conv2d``. The first and the last Linear/Conv
layers of a model stay exact (as in the paper: they are small and sensitive).

Use it in your own loop::

    from wus_tune.methods.approx_ops import apply_approx_ops, recalibrate_batchnorm
    apply_approx_ops(model, sample_ratio=0.5, sampler="topk")   # swaps the layers' class in place
    ...train as usual; model.eval() computes exact products...
    recalibrate_batchnorm(model, recent_batches)                # before evaluating a BatchNorm model

or with the trainer: ``methods: {approx_ops: {sample_ratio: 0.5, sampler: topk}}``. Pitfall: BatchNorm
running statistics collected on approximated activations do not fit the exact evaluation network (the
error compounds over layers); the Method re-estimates them with exact products at each epoch's end.
See docs/methods/approx_ops.md for measured step times: on CPU at width 0.25 it saves ~10 % of a step at
ratio 0.3-0.5; on a GPU it is slower.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wus_tune.layers import weighted_layers
from wus_tune.methods import Method, RunInfo, StepContext, register
from wus_tune.methods.study import MethodStudy

__all__ = [
    "SAMPLERS",
    "num_pairs",
    "select_pairs",
    "approx_linear",
    "approx_conv2d",
    "apply_approx_ops",
    "remove_approx_ops",
    "exact_products",
    "recalibrate_batchnorm",
    "ApproxLinear",
    "ApproxConv2d",
    "ApproxOps",
]

SAMPLERS = ("topk", "crs", "bernoulli")


# ---- pure functions ----------------------------------------------------------------------------


def num_pairs(n: int, *, sample_ratio: float, minimal_k: int = 1, round_to: int = 8) -> int:
    """How many of ``n`` column-row pairs to keep.

    ``k = min(n, max(minimal_k, floor(sample_ratio * n)))``, rounded up to a multiple of
    ``min(round_to, n)``, capped at ``n``.

    >>> num_pairs(64, sample_ratio=0.3), num_pairs(64, sample_ratio=0.3, round_to=1), num_pairs(3, sample_ratio=0.5)
    (24, 19, 3)
    """
    k = min(n, max(minimal_k, int(math.floor(sample_ratio * n))))
    step = max(1, min(round_to, n))
    k = -(-k // step) * step
    return min(n, k)


def select_pairs(
    scores: torch.Tensor, k: int, sampler: str = "topk", generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Choose column-row pairs from their scores ``s_i = ||A[:, i]|| ||B[i, :]||``.

    Returns ``(indices, scale)``: ``indices`` is a sorted 1-D int64 tensor of distinct pairs, ``scale`` the
    factor each kept pair is multiplied by (float32, same length), or ``None`` when no rescaling is needed
    (``topk``, and every sampler when ``k >= n``, which keeps all pairs: the exact product).

    * ``topk``: the ``k`` largest scores;
    * ``crs``: ``k`` draws with replacement with ``p_i = s_i / sum(s)``; ``scale_i = count_i / (k p_i)``;
    * ``bernoulli``: independent draws with ``p_i = min(1, k s_i / sum(s))``; ``scale_i = 1 / p_i``.

    Scores must be non-negative; if they are all zero the samplers draw uniformly. ``generator`` must live
    on the device of ``scores``. ``crs`` and ``bernoulli`` return a data-dependent number of pairs (a host
    synchronisation on GPU); ``topk`` returns exactly ``k``.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores: expected a 1-D tensor, got shape {tuple(scores.shape)}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: unknown value {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    n = scores.numel()
    if k < 1:
        raise ValueError(f"k: expected at least 1, got {k}")
    device = scores.device
    if k >= n:
        return torch.arange(n, device=device), None
    if sampler == "topk":
        idx = torch.topk(scores, k, sorted=False).indices
        return idx.sort().values, None

    s = scores.detach().float().clamp_min(0)
    total = s.sum()
    # All-zero scores (the product is zero anyway): fall back to uniform, without a host sync.
    prob = torch.where(total > 0, s / total.clamp_min(torch.finfo(torch.float32).tiny), torch.full_like(s, 1.0 / n))
    if sampler == "crs":
        draws = torch.multinomial(prob, k, replacement=True, generator=generator)
        counts = torch.bincount(draws, minlength=n)
        idx = counts.nonzero().squeeze(1)
        scale = counts[idx].float() / (k * prob[idx])
        return idx, scale
    # bernoulli
    p_keep = (k * prob).clamp(max=1.0)
    keep = torch.rand(n, generator=generator, device=device) < p_keep
    idx = keep.nonzero().squeeze(1)
    return idx, 1.0 / p_keep[idx]


def _gather(
    x: torch.Tensor, weight: torch.Tensor, x_dim: int, idx: torch.Tensor, scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` and ``weight`` restricted to the pairs ``idx`` (weight dim 1), the scale folded into the weight."""
    if idx.numel() == 0:
        # Nothing drawn (Bernoulli): the estimate of the product is exactly zero. Keep one pair scaled by 0
        # so the output has the right shape and dtype (a Conv2d with 0 input channels would not).
        idx = idx.new_zeros(1)
        scale = torch.zeros(1, device=weight.device)
    if x.dim() == 4 and x_dim == 1 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        # Gather along the innermost (channel) dimension and keep the channels_last layout that the
        # convolution kernels were tuned for; a plain index_select would return an NCHW tensor.
        xs = x.permute(0, 2, 3, 1).index_select(3, idx).permute(0, 3, 1, 2)
    else:
        xs = x.index_select(x_dim, idx)
    ws = weight.index_select(1, idx)
    if scale is not None:
        shape = [1] * weight.dim()
        shape[1] = -1
        ws = ws * scale.to(ws.dtype).view(shape)  # the weight is the smaller tensor (conv) or comparable
    return xs, ws


def _linear_scores(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        dims = tuple(range(x.dim() - 1))
        xn = torch.linalg.vector_norm(x, dim=dims, dtype=torch.float32) if dims else x.float().abs()
        wn = torch.linalg.vector_norm(weight, dim=0, dtype=torch.float32)
        return xn * wn


def _channel_norms(t: torch.Tensor) -> torch.Tensor:
    """``||t[:, c]||`` over dims 0, 2, 3 of a 4-D tensor, in float32.

    Reduced along the contiguous dimension first: a single ``vector_norm(dim=(0, 2, 3))`` takes a slow
    strided path on CPU (about 50x slower for a (128, 32, 16, 16) activation).
    """
    if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.linalg.vector_norm(t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]), dim=0, dtype=torch.float32)
    inner = torch.linalg.vector_norm(t.flatten(2), dim=2, dtype=torch.float32)
    return torch.linalg.vector_norm(inner, dim=0)


def _conv_scores(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return _channel_norms(x) * _channel_norms(weight)


def _approx_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int, sampler: str,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, int]:
    n = weight.shape[1]
    if k >= n:
        return F.linear(x, weight, bias), n
    idx, scale = select_pairs(_linear_scores(x, weight), k, sampler, generator)
    xs, ws = _gather(x, weight, x.dim() - 1, idx, scale)
    return F.linear(xs, ws, bias), idx.numel()


def _approx_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Any, padding: Any, dilation: Any,
    k: int, sampler: str, generator: torch.Generator | None,
) -> tuple[torch.Tensor, int]:
    n = weight.shape[1]
    if k >= n:
        return F.conv2d(x, weight, bias, stride, padding, dilation, 1), n
    if x.dim() != 4:
        raise ValueError(f"x: approx_conv2d expects a batched (N, C, H, W) input, got shape {tuple(x.shape)}")
    idx, scale = select_pairs(_conv_scores(x, weight), k, sampler, generator)
    xs, ws = _gather(x, weight, 1, idx, scale)
    return F.conv2d(xs, ws, bias, stride, padding, dilation, 1), idx.numel()


def _check_args(sample_ratio: Any, minimal_k: Any, sampler: Any, round_to: Any) -> None:
    if isinstance(sample_ratio, bool) or not isinstance(sample_ratio, (int, float)) or not 0 < sample_ratio <= 1:
        raise ValueError(f"sample_ratio: expected a number in (0, 1], got {sample_ratio!r}")
    if isinstance(minimal_k, bool) or not isinstance(minimal_k, int) or minimal_k < 1:
        raise ValueError(f"minimal_k: expected an integer >= 1, got {minimal_k!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: unknown value {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to: expected an integer >= 1, got {round_to!r}")


def approx_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    sample_ratio: float,
    minimal_k: int = 1,
    sampler: str = "topk",
    round_to: int = 8,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Approximate ``F.linear(x, weight, bias)`` on a sample of the ``n = in_features`` column-row pairs.

    ``x``: ``(*, n)``; ``weight``: ``(out, n)``. Pair ``i`` is input feature ``i``; its score is
    ``||x[..., i]|| * ||weight[:, i]||``. Differentiable; the backward products use the same sample.
    """
    _check_args(sample_ratio, minimal_k, sampler, round_to)
    k = num_pairs(weight.shape[1], sample_ratio=sample_ratio, minimal_k=minimal_k, round_to=round_to)
    return _approx_linear(x, weight, bias, k, sampler, generator)[0]


def approx_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
    *,
    sample_ratio: float,
    minimal_k: int = 1,
    sampler: str = "topk",
    round_to: int = 8,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Approximate ``F.conv2d(x, weight, bias, stride, padding, dilation)`` on a sample of input channels.

    ``x``: ``(N, C, H, W)``; ``weight``: ``(out, C, kh, kw)``. Pair ``c`` is input channel ``c``; its score is
    ``||x[:, c]|| * ||weight[:, c]||``. Only ``groups == 1`` is supported (a grouped convolution does not
    sum over all input channels).
    """
    if groups != 1:
        raise ValueError(f"groups: approx_conv2d supports only groups=1, got {groups}")
    _check_args(sample_ratio, minimal_k, sampler, round_to)
    k = num_pairs(weight.shape[1], sample_ratio=sample_ratio, minimal_k=minimal_k, round_to=round_to)
    return _approx_conv2d(x, weight, bias, stride, padding, dilation, k, sampler, generator)[0]


# ---- modules -----------------------------------------------------------------------------------


class _ApproxMixin:
    """State shared by ApproxLinear/ApproxConv2d; set by :func:`apply_approx_ops`."""

    approx_k: int
    approx_sampler: str
    approx_generator: torch.Generator | None
    approx_kept: int  # pairs kept, summed over training forwards since the last reset
    approx_seen: int  # pairs available, summed likewise

    def _setup_approx(self, k: int, sampler: str, generator: torch.Generator | None) -> None:
        self.approx_k = k
        self.approx_sampler = sampler
        self.approx_generator = generator
        self.approx_kept = 0
        self.approx_seen = 0


class ApproxLinear(_ApproxMixin, nn.Linear):
    """``nn.Linear`` whose training forward samples input features; ``eval()`` is exact.

    Made by :func:`apply_approx_ops`, which changes the class of an existing ``nn.Linear`` in place, so the
    Parameters (and optimizer state, state_dict keys, hooks) are the same objects.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        n = self.in_features
        if not self.training or self.approx_k >= n:
            return super().forward(input)
        y, kept = _approx_linear(
            input, self.weight, self.bias, self.approx_k, self.approx_sampler, self.approx_generator
        )
        self.approx_kept += kept
        self.approx_seen += n
        return y


class ApproxConv2d(_ApproxMixin, nn.Conv2d):
    """``nn.Conv2d`` (groups=1, zero padding) whose training forward samples input channels; ``eval()`` is exact."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        n = self.in_channels
        if not self.training or self.approx_k >= n or input.dim() != 4:
            return super().forward(input)
        y, kept = _approx_conv2d(
            input, self.weight, self.bias, self.stride, self.padding, self.dilation,
            self.approx_k, self.approx_sampler, self.approx_generator,
        )
        self.approx_kept += kept
        self.approx_seen += n
        return y


def apply_approx_ops(
    model: nn.Module,
    *,
    sample_ratio: float = 0.5,
    minimal_k: int = 1,
    sampler: str = "topk",
    round_to: int = 8,
    keep_first_last: bool = True,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Make the eligible layers of ``model`` approximate their training forward; returns their names.

    Eligible: modules whose type is exactly ``nn.Linear``, or exactly ``nn.Conv2d`` with ``groups == 1``
    and ``padding_mode == "zeros"``, excluding (if ``keep_first_last``) the first and the last of all
    Linear/Conv layers in registration order, and layers where ``k`` would equal ``n`` anyway. The class of
    each module is changed in place to :class:`ApproxLinear` / :class:`ApproxConv2d`; parameters, buffers,
    state_dict keys and optimizer references are untouched. Calling it again re-configures the layers.
    """
    _check_args(sample_ratio, minimal_k, sampler, round_to)
    layers = weighted_layers(model)
    if keep_first_last:
        layers = layers[1:-1]
    names = []
    for name, m in layers:
        if type(m) in (nn.Linear, ApproxLinear):
            n, cls = m.in_features, ApproxLinear
        elif type(m) in (nn.Conv2d, ApproxConv2d) and m.groups == 1 and m.padding_mode == "zeros":
            n, cls = m.in_channels, ApproxConv2d
        else:
            continue
        k = num_pairs(n, sample_ratio=sample_ratio, minimal_k=minimal_k, round_to=round_to)
        if k >= n:
            continue
        m.__class__ = cls
        m._setup_approx(k, sampler, generator)
        names.append(name)
    return names


def remove_approx_ops(model: nn.Module) -> int:
    """Turn ApproxLinear/ApproxConv2d layers back into exact ``nn.Linear``/``nn.Conv2d``; returns the count."""
    count = 0
    for m in model.modules():
        if isinstance(m, (ApproxLinear, ApproxConv2d)):
            m.__class__ = nn.Linear if isinstance(m, ApproxLinear) else nn.Conv2d
            for attr in ("approx_k", "approx_sampler", "approx_generator", "approx_kept", "approx_seen"):
                m.__dict__.pop(attr, None)
            count += 1
    return count


@contextlib.contextmanager
def exact_products(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, approximated layers compute exact products even in training mode."""
    layers = [m for m in model.modules() if isinstance(m, (ApproxLinear, ApproxConv2d))]
    saved = [m.approx_k for m in layers]
    for m in layers:
        m.approx_k = 1 << 62
    try:
        yield model
    finally:
        for m, k in zip(layers, saved):
            m.approx_k = k


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Re-estimate BatchNorm running statistics from ``batches`` with exact products; returns the count used.

    Why: in training, a BatchNorm after an approximated layer normalises approximated activations (top-k
    drops energy, the random samplers add variance) and its running statistics follow them; evaluation
    computes exact products, so those statistics are wrong there, and the error compounds layer after
    layer (measured: a VGG-11 trained with top-k at ratio 0.5 went from 67 % train accuracy to 12 %
    validation accuracy without this). The running statistics are reset and recomputed as a plain average
    over the batches ("precise BN"), in training mode, with every approximated layer exact.
    """
    batches = list(batches)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or not batches:
        return 0
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    model.train()
    try:
        with exact_products(model):
            for x in batches:
                model(x)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return len(batches)


# ---- the Method ----------------------------------------------------------------------------------


@register
class ApproxOps(Method):
    """Approximate the training forward (and so backward) of the hidden Linear/Conv2d layers.

    Args:
        sample_ratio: fraction of column-row pairs (input features / channels) kept, in (0, 1].
        minimal_k: keep at least this many pairs per layer.
        sampler: ``"topk"`` (deterministic, fixed width, default), ``"crs"`` or ``"bernoulli"`` (unbiased).
        round_to: round ``k`` up to a multiple of this (never above the layer's width).
        bn_batches: at the end of every epoch (before the trainer evaluates), re-estimate the BatchNorm
            running statistics with exact products on this many of the most recent training batches
            (:func:`recalibrate_batchnorm`); 0 turns it off. It costs ``bn_batches`` forward passes per
            epoch, counted in the training time.
        until: fraction of training after which every layer computes exactly again (the approximation
            speeds up the early epochs; the last ones fine-tune the exact network), in (0, 1].

    Metrics: ``approx_ops/kept_fraction`` (pairs kept / pairs available over the epoch's training
    forwards) and ``approx_ops/layers`` (number of approximated layers).
    """

    name = "approx_ops"
    study = "wus_tune.methods.approx_ops:ApproxOpsStudy"

    def __init__(
        self, *, sample_ratio: float = 0.5, minimal_k: int = 1, sampler: str = "topk", round_to: int = 8,
        bn_batches: int = 4, until: float = 1.0,
    ) -> None:
        _check_args(sample_ratio, minimal_k, sampler, round_to)
        if isinstance(bn_batches, bool) or not isinstance(bn_batches, int) or bn_batches < 0:
            raise ValueError(f"bn_batches: expected an integer >= 0, got {bn_batches!r}")
        if isinstance(until, bool) or not isinstance(until, (int, float)) or not 0 < until <= 1:
            raise ValueError(f"until: expected a number in (0, 1], got {until!r}")
        super().__init__(
            sample_ratio=sample_ratio, minimal_k=minimal_k, sampler=sampler, round_to=round_to,
            bn_batches=bn_batches, until=until,
        )
        self.layer_names: list[str] = []
        self.steps = 0
        self._recent: list[torch.Tensor] = []

    def setup(self, model: nn.Module, run: RunInfo) -> nn.Module:
        p = self.params
        self.layer_names = apply_approx_ops(
            model, sample_ratio=p["sample_ratio"], minimal_k=p["minimal_k"], sampler=p["sampler"],
            round_to=p["round_to"],
        )
        return model

    def step_kind(self) -> str:
        return "approx" if self.layer_names else ""

    def after_step(self, step: StepContext) -> None:
        self.steps += 1
        if not self.layer_names:
            return
        model, run = step.model, step.run
        keep = self.params["bn_batches"]
        if keep:
            self._recent = (self._recent + [step.inputs.detach()])[-keep:]
        if self.params["until"] < 1 and run.total_steps > 0 and self.steps >= self.params["until"] * run.total_steps:
            # From here on every layer is exact; recalibrate BN once for the exact network.
            remove_approx_ops(model)
            self.layer_names = []
        elif not (run.steps_per_epoch > 0 and self.steps % run.steps_per_epoch == 0):
            return
        # The trainer evaluates right after an epoch's last step: calibrate then.
        if self._recent:
            recalibrate_batchnorm(model, self._recent)
        self._recent = []

    def end_epoch(self, model: nn.Module, run: RunInfo) -> dict[str, float]:
        kept = seen = 0
        layers = 0
        for m in model.modules():
            if isinstance(m, (ApproxLinear, ApproxConv2d)):
                kept += m.approx_kept
                seen += m.approx_seen
                m.approx_kept = m.approx_seen = 0
                layers += 1
        metrics = {"approx_ops/layers": float(layers)}
        if seen:
            metrics["approx_ops/kept_fraction"] = kept / seen
        return metrics


class ApproxOpsStudy(MethodStudy):
    """approx_ops in a study: its knobs, its default trial (the card's suggestions), the models it suits."""

    method = ApproxOps
    SEARCH_SPACE = {
        "methods.approx_ops.sample_ratio": {"type": "float", "low": 0.25, "high": 0.9,
                                            "doc": "fraction of column-row pairs kept"},
        "methods.approx_ops.sampler": {"type": "categorical", "choices": ["topk", "crs", "bernoulli"],
                                       "doc": "pair sampler"},
        "methods.approx_ops.minimal_k": {"type": "int", "low": 1, "high": 16, "log": True, "doc": "pairs kept at least"},
        "methods.approx_ops.until": {"type": "float", "low": 0.5, "high": 1.0,
                                     "doc": "exact products after this fraction of training"},
    }
    DEFAULT_TRIAL = {"sample_ratio": 0.5, "sampler": "topk", "until": 0.75}

    @classmethod
    def check_model(cls, model: Any, config: Any) -> str | None:
        if model.name == "mlp" and model.depth < 3:
            return (f"approx_ops keeps the first and last layers exact, so an mlp of depth {model.depth} has "
                    "nothing to approximate; use model.depth >= 3 (gauss_newton needs depth 2: compare it in its "
                    "own study)")
        return None
