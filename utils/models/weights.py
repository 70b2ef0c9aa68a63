"""Weights into models: the model a checkpoint describes, matching tensors of a --weight file, and
plain state_dicts with the layers' own metadata.

    model = model_from_checkpoint(load_checkpoint("runs/exp/best.pt"))   # float32, eval mode
    loaded, skipped = load_weights(model, "other_run/best.pt")           # what fits; the rest reported
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from utils.core.checkpoint import float_weights
from utils.core.log import UserError
from utils.core.schema import Checkpoint


def model_from_checkpoint(ckpt: Checkpoint) -> nn.Module:
    """Rebuild the model a checkpoint describes and load its weights (float32, eval mode).

    Raises:
        UserError: the weights do not fit the architecture the checkpoint names.
    """
    from utils.models.registry import create_model
    from utils.models.weights import load_module_state

    meta = ckpt.meta
    model = create_model(meta.model_name, meta.num_classes, meta.image_channel)
    try:
        load_module_state(model, float_weights(ckpt.model))
    except (RuntimeError, ValueError) as err:
        raise UserError(f"the weights of this checkpoint do not fit {meta.model_name} with {meta.num_classes} classes "
                        f"({str(err).splitlines()[0][:160]}): was the file edited or assembled by hand?") from None
    return model.eval()


# ----------------------------------------------------------------------------------- weights
def extract_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The model weights inside a loaded file: our checkpoint, {'state_dict': ...}, or a state_dict."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                return obj[key]
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise UserError("the weight file holds no state_dict (expected a checkpoint of this toolkit or a plain state_dict)")


def load_weights(model: nn.Module, path: str | Path) -> tuple[list[str], list[str]]:
    """Load matching tensors from a weight file; skip the rest (a different head, say).

    Args:
        model: the model to fill.
        path: a .pt/.pth (loaded with weights_only=True) or .safetensors file.

    Returns:
        (loaded keys, skipped descriptions).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--weight file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure here means 'not a weight file we can read safely'
        raise UserError(f"cannot read --weight {path} as a safe weights file: {str(err).splitlines()[0]}") from None
    state = extract_state_dict(obj)
    own = model.state_dict()
    matched, skipped = {}, []
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key not in own:
            skipped.append(f"{key} (not in {type(model).__name__})")
        elif own[key].shape != value.shape:
            skipped.append(f"{key} (shape {tuple(value.shape)} vs model {tuple(own[key].shape)})")
        else:
            matched[key] = value.to(own[key].dtype)
    if not matched:
        raise UserError(f"--weight {path}: none of its {len(state)} tensors fit this model (a checkpoint of another architecture?)")
    load_module_state(model, matched, strict=False)
    return list(matched), skipped


def load_module_state(module: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> Any:
    """module.load_state_dict(state) for a plain dict of tensors, as checkpoints store them: the
    module's own per-layer metadata (state-dict versions) goes along, since some layers refuse
    weights without it (torchvision's MNASNet).

    Returns:
        What load_state_dict returns (missing and unexpected keys).
    """
    target = module.state_dict()
    state = OrderedDict(state)
    state._metadata = getattr(target, "_metadata", None)  # type: ignore[attr-defined]
    return module.load_state_dict(state, strict=strict)
