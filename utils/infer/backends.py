"""Run a trained model behind one call, whatever format it is in.

    backend = load_backend("runs/exp")                          # best.pt of a run folder
    backend = load_backend("runs/exp", model_type="onnx")       # runs/exp/export/best.onnx (export.py)
    backend = load_backend("export/best_int8.onnx")             # a file: its suffix says the format
    images = preprocess_images(backend.meta, pil_images)        # uint8 (N, C, H, W) numpy
    probs = predict_probs(backend, images)                      # (N, num_classes); TenCrop (N, 10, C, H, W) averaged

A backend takes uint8 image batches preprocessed by `preprocess_images` (utils.data.transforms_np, or
the dataset transforms of utils.data.transforms built from `backend.meta.preprocess`), normalises them itself,
and returns float32 logits on the CPU: numpy for a numpy batch, a tensor for a tensor batch.
`backend.meta` is the model's utils.core.schema.ModelMeta: class names, preprocessing, image size and
channels. Prediction is a function of (backend, images), so a server can call it.

Formats (MODEL_TYPES): torch (a checkpoint of this toolkit), torchscript, onnx (onnxruntime),
tensorrt (a serialized engine, CUDA) and openvino (IR .xml/.bin, CPU). Exported models take the
normalised float batch ((pixel / 255 - mean) / std, N x C x H x W) and return logits; their
metadata (ONNX metadata_props, TorchScript extra file, OpenVINO rt_info, or the JSON export.py
writes beside every file) gives the class names and preprocessing. This module imports no torch:
onnx and openvino run through utils.infer.runtimes on numpy (a deployment machine needs numpy, Pillow
and the runtime: requirements/runtime.txt); torch, torchscript and tensorrt through
utils.infer.torch_backends, imported when one is loaded. Only the torch format needs timm and the model code.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from utils.core.device import TORCH_MODEL_TYPES, Device, import_torch
from utils.core.log import UserError
from utils.core.names import MODEL_TYPES
from utils.core.schema import ModelMeta
from utils.data.transforms_np import image_transform, probabilities, run_with_tta
from utils.infer.runtimes import OnnxBackend, OpenVINOBackend

LOGGER = logging.getLogger(__name__)


# Where export.py puts a run's exported models, and their names by format (first found wins:
# the float32 file, then float16, then int8; pass a file path to choose another).
EXPORT_DIR = "export"
EXPORT_FILES: dict[str, tuple[str, ...]] = {
    "torchscript": ("best.torchscript", "best_fp16.torchscript"),
    "onnx": ("best.onnx", "best_fp16.onnx", "best_int8.onnx"),
    "tensorrt": ("best.engine", "best_fp16.engine"),
    "openvino": ("best.xml", "best_fp16.xml"),
}
# File suffixes that tell a model's format (for a clear error when --model_type does not fit).
SUFFIX_TYPES = {".pt": "torch", ".pth": "torch", ".torchscript": "torchscript", ".onnx": "onnx", ".engine": "tensorrt",
                ".plan": "tensorrt", ".trt": "tensorrt", ".xml": "openvino"}


def find_export(run: Path, model_type: str) -> Path:
    """The exported model of a run folder for model_type: <run>/export/best.<suffix> (or beside best.pt).

    Raises:
        UserError: none exported yet (with the export.py command that makes it).
    """
    for folder in (run / EXPORT_DIR, run):
        for name in EXPORT_FILES[model_type]:
            if (folder / name).is_file():
                if name != EXPORT_FILES[model_type][0]:
                    LOGGER.info("using %s", folder / name)
                return folder / name
    raise UserError(f"no {model_type} model in {run / EXPORT_DIR}: export it with "
                    f"python export.py --save_path {run} --export {model_type}")


def resolve_weights(path: str | Path, model_type: str = "torch") -> Path:
    """A run folder -> its model file for model_type (best.pt for torch, export/best.onnx for onnx ...);
    a file -> itself (after checking that its suffix fits model_type)."""
    path = Path(path)
    if model_type not in MODEL_TYPES:
        raise UserError(f"unknown --model_type '{model_type}'; choose one of {', '.join(MODEL_TYPES)}")
    if path.is_dir():
        if model_type == "torch":
            candidate = path / "best.pt"
            if not candidate.is_file():
                raise UserError(f"no best.pt in {path}: is it a run folder of main.py? (pass the folder --save_path named when training)")
            return candidate
        return find_export(path, model_type)
    if not path.exists():
        raise UserError(f"model not found: {path}")
    suffix_type = SUFFIX_TYPES.get(path.suffix.lower())
    if suffix_type and suffix_type != model_type and not (model_type == "torchscript" and suffix_type == "torch"):
        raise UserError(f"{path} looks like a {suffix_type} model ({path.suffix}) but --model_type is {model_type}: "
                        f"pass --model_type {suffix_type}")
    return path


def model_type_of(path: str | Path) -> str:
    """The format of a model path: a run folder is torch (its best.pt), a file tells by its suffix.

    Raises:
        UserError: a file whose suffix names no format.
    """
    path = Path(path)
    if path.is_dir():
        return "torch"
    suffix_type = SUFFIX_TYPES.get(path.suffix.lower())
    if suffix_type is None:
        if not path.exists():
            raise UserError(f"model not found: {path}")
        raise UserError(f"{path}: '{path.suffix or 'no suffix'}' names no model format; pass --model_type "
                        f"({', '.join(MODEL_TYPES)})")
    return suffix_type


def models_from_flags(save_path: Sequence[str] | None, weight: Sequence[str] | None,
                      model_type: str | None) -> tuple[list[str], str]:
    """The models of predict.py / metrice.py from --save_path, --weight and --model_type.

    Args:
        save_path: run folders (or model files), None when not given (default runs/exp).
        weight: model files: a checkpoint or any exported file (export/best_int8.onnx ...).
        model_type: the format; None: from the first --weight file's suffix, else torch.

    Returns:
        (the model paths, the model type).
    """
    if weight and save_path:
        raise UserError("pass either --save_path (run folders) or --weight (model files), not both")
    if not weight:
        return list(save_path or ["runs/exp"]), model_type or "torch"
    for file in weight:
        if Path(file).is_dir():
            raise UserError(f"--weight {file} is a folder: pass a model file (best.pt, export/best.onnx ...), "
                            "or the run folder with --save_path")
    return list(weight), model_type or model_type_of(weight[0])


def load_backend(path: str | Path, model_type: str | None = "torch", device: Any = "cpu", half: bool = False) -> Any:
    """Load a model to run.

    Args:
        path: a run folder or a model file.
        model_type: the format: torch, torchscript, onnx, tensorrt or openvino; None: from the
            file's suffix (model_type_of).
        device: where to run, a torch.device, a utils.core.device.Device or a string (OpenVINO always
            uses the CPU; TensorRT needs CUDA).
        half: float16 inference (CUDA only; torch and torchscript -- the other formats keep the
            precision they were exported with).

    Returns:
        A callable backend: uint8 batch -> float32 logits (CPU), with `.meta` and `.model_type`.
    """
    model_type = model_type or model_type_of(path)
    if model_type not in MODEL_TYPES:
        raise UserError(f"unknown --model_type '{model_type}'; choose one of {', '.join(MODEL_TYPES)}")
    file = resolve_weights(path, model_type)
    if model_type in TORCH_MODEL_TYPES:
        torch = import_torch(f"--model_type {model_type}")
        from utils.core.checkpoint import load_checkpoint
        from utils.infer.torch_backends import TensorRTBackend, TorchBackend, TorchScriptBackend

        device = torch.device(str(device))
        if model_type == "torch":
            return TorchBackend(load_checkpoint(file, what="model"), device, half)
        if model_type == "torchscript":
            return TorchScriptBackend(file, device, half)
    if half:
        raise UserError(f"--half applies to torch and torchscript models; a {model_type} model keeps the precision it was "
                        "exported with (python export.py --half makes a float16 one)")
    if model_type == "tensorrt":
        return TensorRTBackend(file, device)
    device = Device(*_parse_device(str(device)))
    if model_type == "onnx":
        return OnnxBackend(file, device)
    return OpenVINOBackend(file, device)


def _parse_device(text: str) -> tuple[str, int | None]:
    """'cpu', 'cuda', 'cuda:1' -> (type, index)."""
    kind, _, index = text.partition(":")
    return kind, int(index) if index.isdigit() else None


def preprocess_images(meta: ModelMeta, images: Sequence[Image.Image], tta: bool = False) -> np.ndarray:
    """Loaded PIL images (already in the model's mode, see utils.data.decode.load_image) -> a uint8 numpy
    batch (N, C, H, W), or (N, 10, C, H, W) with TenCrop."""
    transform = image_transform(meta.preprocess, tta)
    return np.stack([transform(img) for img in images])


def predict_probs(backend: Any, images: Any) -> Any:
    """Class probabilities (N, num_classes) for a uint8 batch, numpy or torch (the same kind comes
    back): a softmax, or a sigmoid per class for a multi-label model; TenCrop batches are averaged
    over the crops' probabilities."""
    multilabel = backend.meta.multilabel
    return run_with_tta(lambda x: probabilities(backend(x), multilabel), images)
