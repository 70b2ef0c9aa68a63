"""What the formats' runtimes share: the metadata every exported file carries, importing a runtime
package, and the batch handling of a runtime that works on numpy.

    info, source = read_export_info(Path("best.onnx"), embedded)  # the model's ModelMeta keys and how it was exported
    meta = export_meta(info, source, input_shape)                 # checked: bounds, and the model's own input shape
    runtime = import_runtime("onnxruntime", "onnx")               # or one line saying what to install

A runtime takes uint8 image batches (numpy or torch), normalises them itself, and returns float32
logits on the CPU: numpy for a numpy batch, a tensor for a tensor batch. torch is not imported here:
the numpy runtimes (ONNX, OpenVINO) run on a machine without it.
"""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from utils.core.device import Device
from utils.core.log import UserError
from utils.core.schema import ModelMeta, PreprocessSpec
from utils.data.transforms_np import normalize
from utils.deploy.formats import FORMATS, info_path

# Key of the metadata every exported file carries (ONNX metadata_props, OpenVINO rt_info).
EXPORT_INFO_KEY = "pytorch_classifier_ng"


def read_export_info(file: str | Path, embedded: str | bytes | None = None) -> tuple[dict[str, Any], str]:
    """An exported model's metadata: embedded in the file if given, else the JSON beside it.

    Args:
        file: the exported model file.
        embedded: the metadata read from inside the file (a JSON string), if the format has a place for it.

    Returns:
        (the metadata dict, where it was read: '<file> (embedded metadata)' or the JSON's path), the
        second for messages that name the file and the field.
    """
    file = Path(file)
    text, source = embedded, f"{file} (embedded metadata)"
    if not text:
        beside = info_path(file)
        if not beside.is_file():
            raise UserError(f"{file} carries no metadata and {beside.name} is missing beside it: "
                            "export the model with export.py, or copy its .json along with it")
        text, source = beside.read_text(encoding="utf-8"), str(beside)
    try:
        info = json.loads(text)
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{source}: the model metadata is not valid JSON ({err})") from None
    if not isinstance(info, dict):
        raise UserError(f"{source}: the model metadata is not a JSON object")
    return info, source


def fixed_dim(dim: Any) -> int | None:
    """A dimension of a model's input as an int when it is fixed, None when dynamic (a name, -1, 0 or None)."""
    return int(dim) if isinstance(dim, (int, np.integer)) and not isinstance(dim, bool) and int(dim) > 0 else None


def input_mismatch(spec: PreprocessSpec, shape: Sequence[Any] | None) -> str | None:
    """What of a preprocessing the model's own input cannot take, or None when it fits.

    Args:
        spec: the preprocessing the metadata (or a flag) asks for.
        shape: the model's input shape (N, C, H, W) as its runtime reports it; a dim that is not a
            positive int is dynamic and fits anything; None or another rank: nothing is known.

    Returns:
        e.g. "'channels' is 1 but the model's input has 3 channels (input shape [batch, 3, 32, 32])".
    """
    if shape is None or len(shape) != 4:
        return None
    _, channels, height, width = (fixed_dim(d) for d in shape)
    shown = "[" + ", ".join(str(d) if fixed_dim(d) else str(d or "?") for d in shape) + "]"
    if channels is not None and channels != spec.channels:
        return f"'channels' is {spec.channels} but the model's input has {channels} channels (input shape {shown})"
    if any(d is not None and d != spec.crop for d in (height, width)):
        return (f"'crop' is {spec.crop} but the model's input is {height or spec.crop}x{width or spec.crop} pixels "
                f"(input shape {shown})")
    return None


def export_meta(info: dict[str, Any], source: str, input_shape: Sequence[Any] | None = None) -> ModelMeta:
    """The ModelMeta of an exported file's metadata, checked field by field (utils.core.schema:
    bounds included) and against the model's own input shape where its runtime reports one.

    Args:
        info: the metadata (read_export_info).
        source: where it was read (named in the error line).
        input_shape: the model's input shape (N, C, H, W), None when the format does not tell.

    Raises:
        UserError: one line naming the file and the field, e.g. a crop or channels that the model cannot take.
    """
    meta = ModelMeta.from_dict(info, source)
    problem = input_mismatch(meta.preprocess, input_shape)
    if problem:
        raise UserError(f"{source}: {problem}: the metadata does not belong to this model (edited, or copied from "
                        "another export); export the model again with export.py")
    return meta


def import_runtime(module: str, model_type: str) -> Any:
    """Import a runtime package, or one clear line saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        packages = " ".join(FORMATS[model_type].runtime_packages) or module
        raise UserError(f"--model_type {model_type} needs the {module} package ({err}): pip install {packages}") from None


def is_torch(array: Any) -> bool:
    """Whether `array` is a torch tensor (checked without importing torch)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(array, torch.Tensor)


def as_numpy(array: Any) -> np.ndarray:
    """A numpy view of a numpy array or a (CPU or CUDA) torch tensor."""
    return array.detach().cpu().numpy() if is_torch(array) else np.asarray(array)


def like(out: np.ndarray, reference: Any) -> Any:
    """`out` as a torch tensor when `reference` is one, else as it is."""
    return sys.modules["torch"].from_numpy(out) if is_torch(reference) else out


def torch_input(images: Any, device: Any) -> Any:
    """A uint8 batch (numpy or tensor) as a tensor on `device` (for the runtimes that run through torch)."""
    import torch

    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    return x.to(device, non_blocking=True)


def torch_output(logits: Any, images: Any) -> Any:
    """CPU float32 logits as the caller's kind: a tensor for a tensor batch, else numpy."""
    logits = logits.float().cpu()
    return logits if is_torch(images) else logits.numpy()


class NumpyBackend:
    """What the numpy runtimes (ONNX Runtime, OpenVINO) share: metadata, normalisation, fixed-batch handling.

    Subclasses pass the metadata (read_export_info) and the model's input shape, and implement
    `_forward` (a normalised float32 batch of exactly `batch` images when the batch is fixed ->
    float32 logits). `batch` is None when the model takes any batch size.
    """

    model_type = ""

    def __init__(self, file: Path, info: tuple[dict[str, Any], str], input_shape: Sequence[Any]) -> None:
        self.file = Path(file)
        self.info = info[0]
        self.input_shape = tuple(input_shape)
        self.meta: ModelMeta = export_meta(info[0], info[1], self.input_shape)
        self.batch: int | None = fixed_dim(self.input_shape[0]) if self.input_shape else None

    def _forward(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, images: Any) -> Any:
        """uint8 (N, C, H, W) -> float32 logits (N, num_classes), numpy (torch in, torch out)."""
        spec = self.meta.preprocess
        x = normalize(as_numpy(images), spec.mean, spec.std)
        if self.batch is None or x.shape[0] == self.batch:
            return like(np.asarray(self._forward(x), dtype=np.float32), images)
        # A fixed-batch model (exported with --batch_size and without --dynamic): run full
        # chunks, padding the last one with zeros.
        outs = []
        for start in range(0, x.shape[0], self.batch):
            chunk = x[start:start + self.batch]
            n = chunk.shape[0]
            if n < self.batch:
                chunk = np.concatenate([chunk, np.zeros((self.batch - n, *chunk.shape[1:]), dtype=chunk.dtype)])
            outs.append(np.asarray(self._forward(chunk), dtype=np.float32)[:n])
        return like(np.concatenate(outs), images)


def runtime_device(torch_runtime: bool, device: Any) -> Any:
    """`device` (a torch.device, a utils.core.device.Device or a string: cpu, cuda, cuda:1) as the
    kind a runtime takes: a torch.device for one that runs through PyTorch, else a torch-free Device."""
    text = str(device)
    if torch_runtime:
        import torch

        return torch.device(text)
    kind, _, index = text.partition(":")
    return Device(kind, int(index) if index.isdigit() else None)
