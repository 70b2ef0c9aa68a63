"""Run a trained model behind one call, whatever format it is in.

    backend = load_backend("runs/exp")                  # best.pt of a run folder
    probs = predict_probs(backend, images)              # uint8 (N, C, H, W) or TenCrop (N, 10, C, H, W)

A backend takes uint8 image batches preprocessed by `preprocess_images` (or by the dataset
transforms built from `backend.meta["preprocess"]`), normalises them itself, and returns float32
logits on the CPU. `backend.meta` carries what the model needs: class names, preprocessing,
image size and channels. Prediction is a function of (backend, images), so a server can call it.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from utils.checkpoint import load_checkpoint, model_from_checkpoint
from utils.data import Normalize, eval_transform, run_with_tta, tta_transform
from utils.log import UserError

LOGGER = logging.getLogger(__name__)

MODEL_TYPES = ("torch",)


def checkpoint_meta(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The model description every backend exposes as `.meta` (plain data)."""
    return {
        "model_name": ckpt["model_name"],
        "num_classes": int(ckpt["num_classes"]),
        "class_names": list(ckpt["class_names"]),
        "image_size": int(ckpt["image_size"]),
        "image_channel": int(ckpt["image_channel"]),
        "preprocess": dict(ckpt["preprocess"]),
    }


class TorchBackend:
    """A checkpoint of this toolkit (best.pt / last.pt) run by PyTorch.

    Args:
        ckpt: the loaded checkpoint dict.
        device: where to run.
        half: float16 weights and inputs (CUDA only).
    """

    model_type = "torch"

    def __init__(self, ckpt: dict[str, Any], device: torch.device, half: bool = False) -> None:
        if half and device.type != "cuda":
            raise UserError("--half needs a CUDA device (float16 inference on a CPU is slow and inexact): drop --half or pass --device 0")
        self.meta = checkpoint_meta(ckpt)
        self.device = device
        self.half = half
        self.model = model_from_checkpoint(ckpt).to(device)
        if half:
            self.model.half()
        spec = self.meta["preprocess"]
        self.normalize = Normalize(spec["mean"], spec["std"]).to(device)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalize(images.to(self.device, non_blocking=True))
        if self.half:
            x = x.half()
        return self.model(x).float().cpu()


def resolve_weights(path: str | Path, model_type: str = "torch") -> Path:
    """A run folder -> its model file for model_type (best.pt for torch); a file -> itself."""
    path = Path(path)
    if path.is_dir():
        if model_type == "torch":
            candidate = path / "best.pt"
            if not candidate.is_file():
                raise UserError(f"no best.pt in {path}: is it a run folder of main.py? (pass the folder --save_path named when training)")
            return candidate
        raise UserError(f"--model_type {model_type} is not available; choose one of {', '.join(MODEL_TYPES)}")
    if not path.exists():
        raise UserError(f"model not found: {path}")
    return path


def load_backend(path: str | Path, model_type: str = "torch", device: torch.device | str = "cpu", half: bool = False) -> TorchBackend:
    """Load a model to run.

    Args:
        path: a run folder or a model file.
        model_type: the format (torch).
        device: where to run.
        half: float16 inference (CUDA only).

    Returns:
        A callable backend: uint8 batch -> float32 logits (CPU), with `.meta`.
    """
    if model_type not in MODEL_TYPES:
        raise UserError(f"unknown --model_type '{model_type}'; choose one of {', '.join(MODEL_TYPES)}")
    file = resolve_weights(path, model_type)
    device = torch.device(device) if isinstance(device, str) else device
    return TorchBackend(load_checkpoint(file, what="model"), device, half)


def image_transform(meta: dict[str, Any], tta: bool = False) -> Any:
    """PIL image -> uint8 tensor as the model expects it ((10, C, H, W) with TenCrop TTA)."""
    return tta_transform(meta["preprocess"]) if tta else eval_transform(meta["preprocess"])


def preprocess_images(meta: dict[str, Any], images: Sequence[Image.Image], tta: bool = False) -> torch.Tensor:
    """Loaded PIL images (already in the model's mode, see utils.data.load_image) -> a uint8 batch."""
    transform = image_transform(meta, tta)
    return torch.stack([transform(img) for img in images])


def predict_probs(backend: Any, images: torch.Tensor) -> torch.Tensor:
    """Class probabilities (N, num_classes) for a uint8 batch; TenCrop batches are averaged over
    the crops' probabilities."""
    return run_with_tta(lambda x: backend(x).softmax(dim=1), images)
