"""Penultimate features of a classifier: what its last linear layer sees (metrice.py --tsne).

timm models give them through `forward_features` + `forward_head(pre_logits=True)`; other models
(torchvision, model/ ones without forward_head) through a forward hook on the input of their last
nn.Linear, which is the classifier that utils.registry.create_model puts in place.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from utils.log import UserError


def _has_pre_logits_head(model: nn.Module) -> bool:
    head = getattr(model, "forward_head", None)
    if not callable(head) or not callable(getattr(model, "forward_features", None)):
        return False
    try:
        return "pre_logits" in inspect.signature(head).parameters
    except (TypeError, ValueError):
        return False


def last_linear(model: nn.Module) -> nn.Linear:
    """The last nn.Linear registered in the model (the classifier of torchvision models).

    Raises:
        UserError: the model has no Linear layer.
    """
    found = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            found = module
    if found is None:
        raise UserError(f"cannot find the classifier (a Linear layer) of {type(model).__name__} to take its features from")
    return found


@torch.inference_mode()
def penultimate_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The features a classifier's last layer receives, one row per image.

    Args:
        model: the classifier (eval mode).
        x: a normalised float batch (N, C, H, W) on the model's device.

    Returns:
        (N, D) float32 features on the CPU.
    """
    if _has_pre_logits_head(model):
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        return feats.flatten(1).float().cpu()
    seen: list[torch.Tensor] = []
    handle = last_linear(model).register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    try:
        model(x)
    finally:
        handle.remove()
    return seen[-1].flatten(1).float().cpu()
