"""One compiled graph per training mode: a model's forward (and, through AOTAutograd, its backward),
compiled once for each set of parameters that trains.

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

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

__all__ = ["ModeCompiled", "dynamo_graph_count"]


def dynamo_graph_count() -> int:
    """Graphs Dynamo has compiled in this process so far (all callers, for tests and benchmarks).

    The one place wus_tune reads Dynamo's private counters; :attr:`ModeCompiled.compilations` is the
    public count of one wrapper.
    """
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class ModeCompiled(nn.Module):
    """``ModeCompiled(model)(x)``: the model's forward, compiled once per training mode.

    Use it where the model would be called (training and evaluation: ``.train()``/``.eval()`` reach the
    wrapped model, and evaluation under ``no_grad`` is one more graph). A mode's first call compiles its
    forward, its first backward the backward graph: run every mode once, untimed, before timing training
    (``wus_tune.fit``'s warm-up does, and reports that time as ``compile_time_s``, not as training time).

    Args:
        model: the model; its parameters' ``requires_grad`` decides the mode at each call.
        cuda_graphs: compile with ``mode="reduce-overhead"`` (CUDA graphs, one per mode). CUDA only;
            not yet measured.
        backend: the ``torch.compile`` backend (``"aot_eager"`` traces the same per-mode graphs without
            generating code: fast, for tests).
    """

    def __init__(self, model: nn.Module, *, cuda_graphs: bool = False, backend: str = "inductor") -> None:
        super().__init__()
        self.model = model
        self.cuda_graphs = cuda_graphs
        self.backend = backend
        self._graphs: dict[tuple[bool, bool, tuple[str, ...]], Callable[..., Any]] = {}

    @property
    def compilations(self) -> int:
        """Modes compiled so far (training modes, plus evaluation if it ran)."""
        return len(self._graphs)

    def _functional_forward(self, trainable: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor],
                            buffers: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, (trainable, frozen, buffers), (x,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trainable: dict[str, torch.Tensor] = {}
        frozen: dict[str, torch.Tensor] = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                trainable[name] = p
            else:
                frozen[name] = p.detach()
        key = (self.model.training, torch.is_grad_enabled(), tuple(frozen))
        graph = self._graphs.get(key)
        if graph is None:
            graph = torch.compile(self._functional_forward, backend=self.backend,
                                  mode="reduce-overhead" if self.cuda_graphs else None)
            self._graphs[key] = graph
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous call's outputs may be overwritten now
        return graph(trainable, frozen, dict(self.model.named_buffers()), x)
