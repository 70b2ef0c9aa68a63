"""Optimizers from timm's factory (create_optimizer_v2), with weight decay only where it belongs.

    optimizer = build_optimizer(model, "lion", lr=1e-3, weight_decay=0.05, momentum=0.9, layer_decay=0.75)

--optimizer takes pytorch-classifier's names (SGD, AdamW, RMSProp: the same torch optimizers and
settings as before) and every timm name (timm.optim.list_optimizers(): lion, lamb, adamp, sgdp ...),
in any case. No weight decay goes to biases, normalisation layers and other 1-D tensors, nor to what
the model's no_weight_decay() names (a ViT's cls_token and pos_embed). --layer_decay scales each
layer's learning rate (timm's param_groups_layer_decay; the schedule applies the scales).
torch's SGD, Adam and AdamW take their fused step (one kernel over all tensors) wherever the
parameters allow it: torch would pick a loop over the tensors on the CPU.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from utils.core.log import UserError
from utils.core.names import OPTIMIZERS, TIMM_OPTIMIZERS, lookup

# pytorch-classifier's names -> timm's name and the settings that keep them what they were
CLASSIC: dict[str, tuple[str, dict[str, Any]]] = {
    "SGD": ("sgd", {}),                   # Nesterov momentum (plain SGD when --momentum 0)
    "AdamW": ("adamw", {}),
    "RMSProp": ("rmsprop", {"alpha": 0.99}),  # torch's default smoothing (timm's rmsprop defaults to 0.9)
}
assert set(CLASSIC) == set(OPTIMIZERS)


def timm_optimizer(name: str, momentum: float) -> tuple[str, dict[str, Any]]:
    """timm's name and extra keyword arguments for --optimizer `name` (any case).

    Raises:
        UserError: an unknown name, or one that cannot run in this process (CUDA-only bitsandbytes
            and APEX optimizers without a GPU, second-order ones that need a Hessian).
    """
    import timm.optim

    found = lookup(name, OPTIMIZERS + TIMM_OPTIMIZERS)
    if found is None:
        raise UserError(f"unknown --optimizer '{name}'; choose {', '.join(OPTIMIZERS)} or a timm optimizer "
                        f"({', '.join(TIMM_OPTIMIZERS)})")
    timm_name, settings = CLASSIC.get(found, (found, {}))
    extra = dict(settings)  # the caller adds to it
    if timm_name == "sgd" and momentum == 0:
        timm_name = "momentum"  # Nesterov needs momentum: plain SGD, as pytorch-classifier's SGD with momentum 0
    try:
        info = timm.optim.get_optimizer_info(timm_name)
    except ValueError:
        raise UserError(f"--optimizer {found}: this timm ({timm.__version__}) does not have it; "
                        "pip install -U timm") from None
    if info.second_order:
        raise UserError(f"--optimizer {found} is a second-order optimizer (it needs the Hessian), which this trainer "
                        "does not compute; choose another")
    if isinstance(info.opt_class, str) and not torch.cuda.is_available():
        package = info.opt_class.split(".")[0]
        raise UserError(f"--optimizer {found} is {package}'s CUDA optimizer and this machine has no CUDA GPU; "
                        f"choose its plain form (e.g. {found.removeprefix('bnb').removeprefix('fused').replace('8bit', '')})")
    return timm_name, extra


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """What the model says takes no weight decay (timm's no_weight_decay(): position embeddings, tokens ...)."""
    fn = getattr(model, "no_weight_decay", None)
    return set(fn()) if callable(fn) else set()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups, as before: the weights with decay; then biases, norm scales, other 1-D tensors and
    the model's no_weight_decay() tensors without."""
    from timm.optim import param_groups_weight_decay

    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_weight_decay_names(model))
    return sorted(groups, key=lambda g: g["weight_decay"] == 0)  # decay first: last.pt files of before resume


# the classes whose fused step runs on the CPU and on CUDA (torch >= 2.4)
FUSED_CLASSES = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def wants_fused(timm_name: str, model: nn.Module) -> bool:
    """Whether timm's optimizer `timm_name` is one of torch's with a fused step that `model`'s
    parameters can take (floating point, on the CPU or a CUDA device).

    torch chooses the fused step only when asked; left to itself it loops over the tensors one by
    one on the CPU, which made AdamW a third of resnet18's training step at 32 px (60 ms of 180 ms;
    fused: 12 ms). The result is the same update up to float rounding.
    """
    import timm.optim

    if os.environ.get("NOFUSED") or timm.optim.get_optimizer_info(timm_name).opt_class not in FUSED_CLASSES:
        return False
    params = list(model.parameters())
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float,
                    layer_decay: float | None = None) -> torch.optim.Optimizer:
    """The optimizer named by --optimizer, through timm.optim.create_optimizer_v2.

    Args:
        model: whose parameters are optimised.
        name: SGD, AdamW, RMSProp or a timm optimizer name, in any case.
        lr: learning rate.
        weight_decay: decay of the weight tensors.
        momentum: momentum of the optimizers that have one.
        layer_decay: --layer_decay: each layer's lr scaled by layer_decay ** (its depth from the head), or None.

    Returns:
        The optimizer (param groups carry `lr_scale` with layer decay).
    """
    from timm.optim import create_optimizer_v2

    timm_name, extra = timm_optimizer(name, momentum)
    if wants_fused(timm_name, model):
        extra["fused"] = True
    if layer_decay is None:
        extra["param_group_fn"] = lambda m: param_groups(m, weight_decay)
    elif not callable(getattr(model, "group_matcher", None)):
        raise UserError(f"--layer_decay needs a timm model (one with group_matcher()); {type(model).__name__} has none: "
                        "drop --layer_decay or choose a timm model")
    try:
        return create_optimizer_v2(model, timm_name, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                   layer_decay=layer_decay, **extra)
    except ImportError as err:  # bitsandbytes, apex ... on a CUDA machine without them
        raise UserError(f"--optimizer {name} needs a package that is not installed: {err}") from None


def classifier_names(model: nn.Module) -> list[str]:
    """Parameter names of the classifier head (timm's get_classifier(), else the last nn.Linear)."""
    head = None
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
    if not isinstance(head, nn.Module) or not any(True for _ in head.parameters()):
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        head = linears[-1] if linears else None
    if head is None:
        raise UserError(f"cannot find the classifier head of {type(model).__name__} for --freeze")
    ids = {id(p) for p in head.parameters()}
    return [name for name, p in model.named_parameters() if id(p) in ids]


class HeadFreezer:
    """--freeze N: train only the classifier head for the first N epochs (-1: for all epochs).

    While frozen, the other parameters take no gradient and their batch-norm statistics stay fixed
    (those layers run in eval mode).
    """

    def __init__(self, model: nn.Module, epochs: int) -> None:
        self.model = model
        self.epochs = epochs
        self.head = set(classifier_names(model))
        self.frozen = False

    def is_frozen(self, epoch: int) -> bool:
        return self.epochs == -1 or epoch < self.epochs

    def start_epoch(self, epoch: int) -> bool:
        """Freeze or unfreeze for `epoch`; True if frozen."""
        self.frozen = self.is_frozen(epoch)
        for name, param in self.model.named_parameters():
            param.requires_grad_(not self.frozen or name in self.head)
        return self.frozen

    def train_mode(self, model: nn.Module) -> None:
        """Train mode, but batch norm outside the head in eval mode while frozen. `model` may be
        the model or a wrapper of it (DistributedDataParallel): the layers are the model's own."""
        model.train()
        if self.frozen:
            head_modules = {name.rsplit(".", 1)[0] for name in self.head}
            for name, module in self.model.named_modules():
                if isinstance(module, nn.modules.batchnorm._NormBase) and name not in head_modules:
                    module.eval()
