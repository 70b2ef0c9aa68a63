"""A trained network in its deploy form: re-parameterisable blocks merged, batch norms folded into
the convolutions before them, each step kept only when the class probabilities do not change.

    model, report = deploy_model(trained, normalised_images)   # a copy; report: blocks merged, pairs folded, max |dp|

Re-parameterisable blocks (RepVGG, RepGhost, MobileOne ...) are merged by timm's
`reparameterize_model`; every BatchNorm that directly follows a convolution is then folded into it.
Every exported format (but the Hub folder, which timm rebuilds by name) is written from this form.
"""
from __future__ import annotations

import copy
from collections import Counter
from typing import Any, Callable, Sequence

import torch
from torch import nn

from utils.core.task import MULTICLASS, TaskType
from utils.deploy.parity import PARITY_TOLERANCE

# A step that moves any class probability further than a float32 export may is undone.
FOLD_TOLERANCE = PARITY_TOLERANCE["fp32"]["max_abs_diff"]


def _bn_replacement(bn: nn.Module) -> nn.Module:
    """What is left of a BatchNorm after folding it into the convolution before it: nothing, or the
    dropout + activation of timm's BatchNormAct2d."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    return nn.Sequential(bn.drop, bn.act)


def _foldable_bn(module: nn.Module) -> bool:
    if type(module) is nn.BatchNorm2d:
        return True
    try:
        from timm.layers import BatchNormAct2d
    except ImportError:
        return False
    return type(module) is BatchNormAct2d


def fuse_conv_bn(model: nn.Module, example: torch.Tensor) -> int:
    """Fold each BatchNorm that directly follows a convolution into it, in place (eval mode).

    Which BatchNorm follows which convolution is observed on one forward pass (hooks, no graph
    tracing): a pair is folded when the BatchNorm's input is exactly the convolution's output and
    each runs once. Plain nn.Conv2d only (weight-standardised and other special convolutions are
    left alone). The caller checks that the outputs did not change.

    Args:
        model: the model, in eval mode.
        example: an input batch.

    Returns:
        How many pairs were folded.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    produced: dict[int, str] = {}
    alive: list[torch.Tensor] = []  # keep outputs alive so no two tensors share an id during the pass
    calls: Counter = Counter()
    pairs: list[tuple[str | None, str]] = []
    hooks = []

    def conv_hook(name: str) -> Callable:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            calls[name] += 1
            if isinstance(output, torch.Tensor):
                produced[id(output)] = name
                alive.append(output)
        return hook

    def bn_hook(name: str) -> Callable:
        def hook(module: nn.Module, inputs: Any) -> None:
            calls[name] += 1
            pairs.append((produced.get(id(inputs[0])), name))
        return hook

    for name, module in model.named_modules():
        if type(module) is nn.Conv2d:
            hooks.append(module.register_forward_hook(conv_hook(name)))
        elif _foldable_bn(module):
            hooks.append(module.register_forward_pre_hook(bn_hook(name)))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
        alive.clear()
    fused = 0
    for conv_name, bn_name in pairs:
        if conv_name is None or calls[conv_name] != 1 or calls[bn_name] != 1:
            continue
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if bn.running_mean is None or bn.running_var is None:
            continue
        model.set_submodule(conv_name, fuse_conv_bn_eval(conv, bn))
        model.set_submodule(bn_name, _bn_replacement(bn))
        fused += 1
    return fused


def reparameterize(model: nn.Module) -> tuple[nn.Module, int]:
    """Switch re-parameterisable blocks (RepVGG, RepGhost, MobileOne, LeViT's fused layers ...) to
    their deploy form with timm's `reparameterize_model` (a copy).

    Returns:
        (the deploy model, how many blocks had a deploy form).
    """
    blocks = sum(1 for m in model.modules() if m is not model and any(
        callable(getattr(m, a, None)) for a in ("fuse", "reparameterize", "switch_to_deploy")))
    if not blocks:
        return model, 0
    from timm.utils.model import reparameterize_model

    return reparameterize_model(model).eval(), blocks


@torch.no_grad()
def probs_of(model: nn.Module, x: torch.Tensor, task: TaskType = MULTICLASS,
             temperature: Sequence[float] | None = None) -> torch.Tensor:
    """The class probabilities of `model` on a normalised batch, as the task reads its outputs (with
    the model's calibration temperature, when given)."""
    return task.probabilities(model(x), temperature)


def deploy_model(model: nn.Module, x: torch.Tensor, tolerance: float = FOLD_TOLERANCE) -> tuple[nn.Module, dict[str, Any]]:
    """The model in its deploy form (a copy): re-parameterised, then conv+bn folded, each step kept
    only when the class probabilities stay within `tolerance` of the original's on `x`.

    Args:
        model: the trained model (float32, CPU, eval mode).
        x: a normalised float batch (real images).
        tolerance: largest allowed probability difference.

    Returns:
        (deploy model, report: reparameterized, fused_conv_bn, max_abs_diff, notes).
    """
    ref = probs_of(model, x)
    report: dict[str, Any] = {"reparameterized": 0, "fused_conv_bn": 0, "max_abs_diff": 0.0, "notes": []}
    current = model
    try:
        rep, blocks = reparameterize(model)
    except Exception as err:  # noqa: BLE001 - a third-party block without a working deploy form
        rep, blocks = model, 0
        report["notes"].append(f"re-parameterisation failed ({type(err).__name__}: {err}); exported as trained")
    if blocks:
        diff = (probs_of(rep, x) - ref).abs().max().item()
        if diff <= tolerance:
            current, report["reparameterized"], report["max_abs_diff"] = rep, blocks, diff
        else:
            report["notes"].append(f"re-parameterisation changed the outputs (max |dp| {diff:.2e}); exported as trained")
    fused = copy.deepcopy(current)
    pairs = fuse_conv_bn(fused, x[:1])
    if pairs:
        diff = (probs_of(fused, x) - ref).abs().max().item()
        if diff <= tolerance:
            current, report["fused_conv_bn"], report["max_abs_diff"] = fused, pairs, diff
        else:
            report["notes"].append(f"conv+bn folding changed the outputs (max |dp| {diff:.2e}); left unfolded")
    for p in current.parameters():
        p.requires_grad_(False)
    return current.eval(), report
