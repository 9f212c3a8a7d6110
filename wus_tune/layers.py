"""Walking a model's layers: the one set of rules every method (WUS included) uses.

* **Order** is registration order (``model.named_modules()``), which is forward order for the models in
  :mod:`wus_tune.models` and for most ``nn.Sequential`` stacks; nested modules are walked depth-first.
* **Each parameter once**: a parameter shared by two modules (tied embeddings, a reused block) belongs
  to the first module that registers it.
* **Normalisation layers** (BatchNorm, GroupNorm, LayerNorm, ...) join the layer registered before them:
  a BatchNorm after a bias-less convolution is that convolution's scale and shift. A norm layer with no
  layer before it is a layer of its own.
* **Frozen parameters** (``requires_grad=False`` set by the user) are listed like any other; whoever
  toggles ``requires_grad`` decides what to do with them (WUS leaves them alone).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = [
    "Layer", "NORM_TYPES", "parameterised_layers", "weighted_layers", "norm_parameter_ids", "is_shift", "param_groups",
]

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


@dataclass(frozen=True)
class Layer:
    """One parameterised layer: its module path, its module, and its parameters (a following norm layer's
    included) as ``(qualified name, parameter)``."""

    name: str
    module: nn.Module
    params: tuple[tuple[str, nn.Parameter], ...]


def _qualified(module_name: str, param_name: str) -> str:
    return f"{module_name}.{param_name}" if module_name else param_name


def parameterised_layers(model: nn.Module) -> list[Layer]:
    """The modules that own parameters directly, in registration order, norm layers merged into the layer
    before them, every parameter counted once (see the module docstring)."""
    seen: set[int] = set()
    layers: list[Layer] = []
    for module_name, module in model.named_modules():
        own = []
        for param_name, p in module.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                own.append((_qualified(module_name, param_name), p))
        if not own:
            continue
        if isinstance(module, NORM_TYPES) and layers:
            last = layers[-1]
            layers[-1] = Layer(last.name, last.module, last.params + tuple(own))
        else:
            layers.append(Layer(module_name, module, tuple(own)))
    return layers


def weighted_layers(model: nn.Module, *, transposed: bool = True) -> list[tuple[str, nn.Module]]:
    """Linear and convolution modules with a weight tensor, in registration order; a module whose weight
    an earlier module already owns (tied weights) is left out. ``transposed=False`` leaves out transposed
    convolutions, whose weight is stored (in, out, ...) rather than (out, fan_in...)."""
    seen: set[int] = set()
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            continue
        weight = getattr(module, "weight", None)
        if weight is None:
            continue
        if not transposed and isinstance(module, nn.modules.conv._ConvNd) and module.transposed:
            continue
        if id(weight) in seen:
            continue
        seen.add(id(weight))
        out.append((name, module))
    return out


def norm_parameter_ids(model: nn.Module) -> set[int]:
    """``id`` of every parameter owned by a normalisation layer."""
    return {id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}


def is_shift(name: str) -> bool:
    """A bias (``bias`` or ``<module>.bias``): the parameters WUS keeps training in skip windows."""
    return name == "bias" or name.endswith(".bias")


def param_groups(model: nn.Module, *, weight_decay: float, bias_weight_decay: float = 0.0) -> list[dict]:
    """Two optimizer groups: weights (with decay), then biases and normalisation parameters.

    WUS+LR scales the learning rate of the second group inside skip windows, so biases need a group
    of their own: pass these groups to your optimizer.
    """
    norm_params = norm_parameter_ids(model)
    weights, shifts = [], []
    for name, p in model.named_parameters():
        (shifts if is_shift(name) or id(p) in norm_params else weights).append(p)
    return [
        {"params": weights, "weight_decay": weight_decay, "name": "weights"},
        {"params": shifts, "weight_decay": bias_weight_decay, "name": "biases"},
    ]
