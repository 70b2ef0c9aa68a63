"""Probing a model: one forward pass with a hook on every sub-module, recording what each outputs.
Both explanations find their layers with it: utils.explain.cam (the layer a CAM explains) and
utils.explain.feature_maps (the stages --feature_maps draws).

    records, logits = probe(model, lambda: model(zero_input(model, 224, 3)))
    [(r.name, r.shape) for r in records]        # [("conv1", (1, 64, 112, 112)), ...] in finishing order

torch is imported when a model is probed, not with this module: predict.py and serve.py import
the CAM names without it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class Record:
    """One module's output in a probe: its name in model.named_modules(), the module, the tensor."""

    name: str
    module: nn.Module
    output: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        """The output's shape (batch first)."""
        return tuple(self.output.shape)


def probe(model: nn.Module, run: Callable[[], Any]) -> tuple[list[Record], Any]:
    """Run `run()` without gradients, with a forward hook on every sub-module of `model`.

    Args:
        model: the model whose modules are recorded (the model itself, named '', is not).
        run: the forward pass, e.g. lambda: model(x) or lambda: model.forward_features(x).

    Returns:
        (a Record per tensor output, in the order the modules finish -- a module called twice is
        recorded twice, a container after its children; what run() returned).
    """
    import torch

    records: list[Record] = []

    def hook(name: str) -> Callable[..., None]:
        def keep(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):  # tuples, dicts and None say nothing about a layer's map
                records.append(Record(name, module, output))
        return keep

    handles = [module.register_forward_hook(hook(name)) for name, module in model.named_modules() if name]
    try:
        with torch.no_grad():
            result = run()
    finally:
        for handle in handles:
            handle.remove()
    return records, result


def zero_input(model: nn.Module, image_size: int, channels: int) -> torch.Tensor:
    """A black (1, channels, image_size, image_size) input on the model's device, in its dtype.

    Args:
        model: the model to probe.
        image_size: its square input size.
        channels: its input channels.

    Returns:
        The zero tensor.
    """
    import torch

    param = next(model.parameters())
    return torch.zeros(1, channels, image_size, image_size, device=param.device, dtype=param.dtype)
