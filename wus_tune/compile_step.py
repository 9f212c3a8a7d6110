"""One compiled graph per training mode: the forward + loss of a model, compiled once for each set of
parameters that trains.

Why not ``torch.compile(model)``: a compiled graph is traced for the parameters that require a gradient
*when it is traced*; whether Dynamo re-traces when a parameter's ``requires_grad`` flips afterwards has
varied between versions (torch 2.11 on an H100 did not: skip epochs cost as much as full ones,
docs/benchmarks.md; torch 2.14 on the CPU does guard on it). When it does not, a skip step runs the full
step's graph, weight-gradient products included, and WUS saves nothing.

So the mode is made part of the call's *structure*. Each call passes the parameters that train in one
dict and the frozen ones, detached, in another, through :func:`torch.func.functional_call`. Dynamo guards
on the dicts' keys, so every mode (full step, each skip scope) gets a graph of its own, traced with only
its trainable parameters needing gradients: a skip graph computes no weight gradients and its backward
stops where eager's does. Switching modes is a guard check, not a recompilation. The mode is read from
``requires_grad`` at each call, so whatever freezes parameters (the WUS controller, a user's own code)
switches the graph without knowing about it.

Chosen over separate ``torch.compile(model)`` wrappers flipped by a controller because it needs no
cooperation from the freezer and cannot silently reuse a stale graph: the trainable set *is* the key.

``cuda_graphs=True`` compiles with ``mode="reduce-overhead"`` (one CUDA graph per mode, for fixed shapes);
it is implemented but not yet measured on a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

__all__ = ["ModeCompiledLoss", "dynamo_graph_count"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def dynamo_graph_count() -> int:
    """Graphs Dynamo has compiled in this process so far (all callers, for tests and benchmarks).

    The one place wus_tune reads Dynamo's private counters; :attr:`ModeCompiledLoss.compilations` is the
    public count of one helper.
    """
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class ModeCompiledLoss:
    """``loss, logits = step_loss(x, y)``: the model's forward and loss, compiled once per training mode.

    Call ``loss.backward()`` and the optimizer as usual. A mode's first call compiles it (and its first
    backward compiles the backward graph): run every mode once, untimed, before timing training
    (``wus_tune.fit`` does, and reports that warm-up as compile time, apart from training time).

    Args:
        model: the model; its parameters' ``requires_grad`` decides the mode at each call.
        loss_fn: ``loss_fn(logits, targets)``; the logits are cast to float32 first.
        autocast_dtype: run the forward under ``torch.autocast`` with this dtype (``None``: no autocast).
        cuda_graphs: compile with ``mode="reduce-overhead"`` (CUDA graphs). CUDA only.
        backend: the ``torch.compile`` backend (``"aot_eager"`` traces the same per-mode graphs without
            generating code: fast, for tests).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, *, autocast_dtype: torch.dtype | None = None,
                 cuda_graphs: bool = False, backend: str = "inductor") -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.autocast_dtype = autocast_dtype
        self.cuda_graphs = cuda_graphs
        self.backend = backend
        self._graphs: dict[tuple[str, ...], Callable[..., Any]] = {}
        self._device_type = next(model.parameters()).device.type

    @property
    def compilations(self) -> int:
        """Modes compiled so far (one graph each)."""
        return len(self._graphs)

    @property
    def modes(self) -> list[tuple[str, ...]]:
        """The frozen-parameter names of each compiled mode, in the order they were first seen."""
        return list(self._graphs)

    def _forward_loss(self, trainable: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor],
                      buffers: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        autocast = (torch.autocast(self._device_type, dtype=self.autocast_dtype) if self.autocast_dtype
                    else contextlib.nullcontext())
        with autocast:
            logits = functional_call(self.model, (trainable, frozen, buffers), (x,))
        return self.loss_fn(logits.float(), y), logits

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        trainable: dict[str, torch.Tensor] = {}
        frozen: dict[str, torch.Tensor] = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                trainable[name] = p
            else:
                frozen[name] = p.detach()
        key = tuple(frozen)
        graph = self._graphs.get(key)
        if graph is None:
            graph = torch.compile(self._forward_loss, backend=self.backend,
                                  mode="reduce-overhead" if self.cuda_graphs else None)
            self._graphs[key] = graph
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs may be overwritten now
        return graph(trainable, frozen, dict(self.model.named_buffers()), x, y)
