"""The dataset and the model of a config, checked against each other before anything trains."""

from __future__ import annotations

from typing import Any

# Modules, not their functions: each call looks up wus_tune.data.load_dataset and wus_tune.models.build_model
# anew, so a test (or a user) that replaces one of them is heard.
import wus_tune.data as data_module
import wus_tune.models as models_module

__all__ = ["prepare"]


def prepare(config: Any, *, model: Any = None, data: Any = None, device: Any = "cpu") -> tuple[data_module.Dataset, Any]:
    """The dataset and the model of ``config`` (or the objects given), checked against each other: the
    model's logits for two training inputs must be ``(2, num_classes)``. Everything the trainer and the
    study's pre-flight need; every failure is one UsageError line."""
    dataset = data_module.load_dataset(config.data, data=data)
    net = models_module.build_model(config.model, dataset.input_shape, dataset.num_classes, model=model)
    at = next(net.parameters()).device  # a model handed over on its device is checked there
    sample = dataset.loader("train", batch_size=2, drop_last=False).batches(dataset.sample(2)).to(at)
    key = "model.factory" if (model is not None or config.model.factory) else "model"
    models_module.check_output(net, sample, dataset.num_classes, key)
    return dataset, net.to(device)
