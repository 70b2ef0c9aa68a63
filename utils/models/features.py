"""What a model computes inside: penultimate features and feature maps, without editing its code.

- `penultimate_features`: what the last linear layer sees (metrice.py --tsne); `features_and_logits`
  gives the logits of the same pass too (the out-of-distribution scores). timm models give
  them through `forward_features` + `forward_head(pre_logits=True)`; other models (torchvision,
  model/ ones without forward_head) through a forward hook on the input of their last nn.Linear,
  the classifier that utils.models.registry.create_model puts in place.
- `feature_taps` + `FeatureRecorder`: the feature maps at strides 4, 8, 16 and 32 of any timm or
  torchvision CNN, taken with forward hooks (distillation, utils.train.distill).

Grad-CAM finds its target layer in utils.explain.cam.
"""
from __future__ import annotations

import inspect
import threading
from typing import Any

import torch
from torch import nn

from utils.core.log import UserError


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
    return features_and_logits(model, x)[0]


@torch.inference_mode()
def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The penultimate features and the logits of one forward pass (the out-of-distribution scores
    of utils.infer.ood need both): timm models run their trunk once and their head twice (with and
    without pre_logits); other models are hooked at the input of their last nn.Linear (safe to call
    from several threads at once: each call keeps the input its own thread's pass gave).

    Args:
        model: the classifier (eval mode).
        x: a normalised float batch (N, C, H, W) on the model's device.

    Returns:
        ((N, D) features, (N, C) logits), float32 on the CPU.
    """
    if _has_pre_logits_head(model):
        trunk = model.forward_features(x)
        feats, logits = model.forward_head(trunk, pre_logits=True), model.forward_head(trunk)
        return feats.flatten(1).float().cpu(), logits.float().cpu()
    seen: list[torch.Tensor] = []
    caller = threading.get_ident()  # a hook sees every thread's forward pass (predict.py's streams): keep this one's

    def keep(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if threading.get_ident() == caller:
            seen.append(inputs[0])

    handle = last_linear(model).register_forward_hook(keep)
    try:
        logits = model(x)
    finally:
        handle.remove()
    return seen[-1].flatten(1).float().cpu(), logits.float().cpu()


# ------------------------------------------------------------------------------ feature taps
def feature_taps(model: nn.Module, in_chans: int = 3, strides: tuple[int, ...] = (4, 8, 16, 32),
                 probe_size: int = 224) -> dict[int, str]:
    """Names of the modules whose outputs are a model's feature maps at the given strides.

    Works for any timm or torchvision CNN without editing its code: one probe forward pass records
    every module's output; for each stride, among the modules whose output is a 4-D map of
    probe_size/stride pixels, the shallowest (a stage rather than a layer inside one) that runs
    last is taken.

    timm models declare their stages (`feature_info`), which is used when present.

    Returns:
        {stride: module name} for the strides found.
    """
    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and info and all("reduction" in f and "module" in f for f in info):
        modules = dict(model.named_modules())
        declared = {f["reduction"]: f["module"] for f in info if f["module"] in modules}  # last per stride
        return {s: declared[s] for s in strides if s in declared}
    records: list[tuple[str, tuple[int, ...]]] = []
    hooks = []
    for name, module in model.named_modules():
        if name:
            hooks.append(module.register_forward_hook(
                lambda mod, inp, out, name=name: records.append((name, tuple(out.shape))) if isinstance(out, torch.Tensor) else None))
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(1, in_chans, probe_size, probe_size, device=device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    taps: dict[int, str] = {}
    for stride in strides:
        side = probe_size // stride
        found = [(i, name) for i, (name, shape) in enumerate(records) if len(shape) == 4 and shape[2] == side and shape[3] == side]
        if found:
            depth = min(name.count(".") for _, name in found)
            taps[stride] = [name for _, name in found if name.count(".") == depth][-1]
    return taps


class FeatureRecorder:
    """Keeps the outputs of named modules from the last forward pass (forward hooks).

    Args:
        model: the model.
        names: module names, in the order `features()` returns them.
    """

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        modules = dict(model.named_modules())
        self.names = names
        self.outputs: dict[str, torch.Tensor] = {}
        self.hooks = [modules[n].register_forward_hook(lambda mod, inp, out, n=n: self._keep(n, out)) for n in names]

    def _keep(self, name: str, out: Any) -> None:
        # some blocks (DPN) return a tuple of maps that the next block concatenates
        self.outputs[name] = torch.cat(out, dim=1) if isinstance(out, (tuple, list)) else out

    def features(self) -> list[torch.Tensor]:
        feats = [self.outputs[n] for n in self.names]
        self.outputs = {}
        return feats

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
