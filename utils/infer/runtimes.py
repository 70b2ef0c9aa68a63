"""Exported models on numpy, without torch: the ONNX (onnxruntime) and OpenVINO backends, and the
metadata every exported file carries.

    backend = OnnxBackend(Path("runs/exp/export/best.onnx"), Device("cpu"))
    logits = backend(images)        # uint8 (N, C, H, W) numpy -> float32 (N, num_classes) numpy

Normally reached through utils.infer.backends.load_backend, which also loads the torch formats. A
backend normalises the uint8 batch itself (utils.data.transforms_np.normalize, the same float32 steps
as training) and returns float32 logits; given a torch tensor (export.py's parity check) it returns
a torch tensor. The metadata (ONNX metadata_props, OpenVINO rt_info, or the JSON export.py writes
beside every file) gives the class names and the preprocessing. This module imports neither torch
nor the runtimes at the top: a deployment machine needs numpy, Pillow and the one runtime.
"""
from __future__ import annotations

import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from utils.core.device import Device, compute_threads
from utils.core.log import UserError
from utils.core.schema import ModelMeta
from utils.data.transforms_np import normalize

LOGGER = logging.getLogger(__name__)

# Key of the metadata every exported file carries (ONNX metadata_props, OpenVINO rt_info).
EXPORT_INFO_KEY = "pytorch_classifier_ng"
# Install hints for the runtimes (a deployment machine installs only the one it uses).
RUNTIME_PACKAGES = {"onnxruntime": "onnxruntime (or onnxruntime-gpu)", "openvino": "openvino", "tensorrt": "tensorrt"}


def export_info_path(file: str | Path) -> Path:
    """The JSON export.py writes beside an exported file: best.onnx -> best.onnx.json."""
    file = Path(file)
    return file.with_name(file.name + ".json")


def read_export_info(file: str | Path, embedded: str | bytes | None = None) -> dict[str, Any]:
    """An exported model's metadata: embedded in the file if given, else the JSON beside it.

    Args:
        file: the exported model file.
        embedded: the metadata read from inside the file (a JSON string), if the format has a place for it.

    Returns:
        The metadata dict.
    """
    file = Path(file)
    text, source = embedded, f"{file} (embedded metadata)"
    if not text:
        beside = export_info_path(file)
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
    return info


def import_runtime(module: str, model_type: str) -> Any:
    """Import a runtime package, or one clear line saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise UserError(f"--model_type {model_type} needs the {module} package ({err}): "
                        f"pip install {RUNTIME_PACKAGES.get(module, module)}") from None


def fixed_batch(dim: Any) -> int | None:
    """A batch dimension as an int when it is fixed, None when dynamic (a name, -1, 0 or None)."""
    return int(dim) if isinstance(dim, (int, np.integer)) and int(dim) > 0 else None


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


class ExportedBackend:
    """What the ONNX and OpenVINO backends share: metadata, normalisation, fixed-batch handling.

    Subclasses set `self.batch` (None when the model takes any batch size) and implement
    `_forward` (a normalised float32 batch of exactly `batch` images when the batch is fixed ->
    float32 logits).
    """

    model_type = ""

    def __init__(self, file: Path, info: dict[str, Any]) -> None:
        self.file = Path(file)
        self.info = info
        self.meta: ModelMeta = ModelMeta.from_dict(info, f"{file} (its metadata)")
        self.batch: int | None = None

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


class OnnxBackend(ExportedBackend):
    """An ONNX model run by onnxruntime: the CUDA provider on a CUDA device when onnxruntime-gpu
    is installed, else the CPU.

    Args:
        file: the .onnx file.
        device: a torch.device or utils.core.device.Device (cpu or cuda).
    """

    model_type = "onnx"

    def __init__(self, file: Path, device: Any) -> None:
        ort = import_runtime("onnxruntime", "onnx")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: its warnings are about graph rewrites, not the user's model
        options.intra_op_num_threads = compute_threads()  # one thread setting (OMP_NUM_THREADS) for every backend
        providers: list[Any] = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
            else:
                LOGGER.warning("onnxruntime has no CUDA provider here (install onnxruntime-gpu): running %s on the CPU", file.name)
        try:
            self.session = ort.InferenceSession(str(file), sess_options=options, providers=providers)
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types for bad files
            raise UserError(f"{file} cannot be loaded by onnxruntime ({str(err).splitlines()[0][:200]})") from None
        embedded = self.session.get_modelmeta().custom_metadata_map.get(EXPORT_INFO_KEY)
        super().__init__(file, read_export_info(file, embedded))
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        self.batch = fixed_batch(inp.shape[0])
        self.providers = self.session.get_providers()
        self.device = device

    def _forward(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x.astype(self.input_dtype, copy=False)})[0]


class OpenVINOBackend(ExportedBackend):
    """An OpenVINO IR model (.xml + .bin) on the CPU, compiled with float32 inference precision
    (OpenVINO would otherwise pick bfloat16 on CPUs that have it, which changes the outputs).

    Args:
        file: the .xml file (the .bin beside it).
        device: only the CPU is used; a CUDA device is reported and ignored.
    """

    model_type = "openvino"

    def __init__(self, file: Path, device: Any) -> None:
        ov = import_runtime("openvino", "openvino")
        if device.type != "cpu":
            LOGGER.warning("OpenVINO runs %s on the CPU (it does not use CUDA devices)", file.name)
        core = ov.Core()
        try:
            model = core.read_model(str(file))
        except Exception as err:  # noqa: BLE001 - openvino raises RuntimeError for bad/missing files
            raise UserError(f"{file} cannot be read by OpenVINO ({str(err).splitlines()[0][:200]})") from None
        path = [EXPORT_INFO_KEY, "export_info"]
        embedded = model.get_rt_info(path).astype(str) if model.has_rt_info(path) else None
        super().__init__(file, read_export_info(file, embedded))
        batch_dim = model.inputs[0].get_partial_shape()[0]
        self.batch = fixed_batch(batch_dim.get_length() if batch_dim.is_static else None)
        self.compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                          "INFERENCE_NUM_THREADS": compute_threads()})
        self.request = self.compiled.create_infer_request()
        self.output = self.compiled.output(0)
        self.device = Device("cpu")

    def _forward(self, x: np.ndarray) -> np.ndarray:
        return np.array(self.request.infer({0: x})[self.output], dtype=np.float32)  # a copy: the request reuses its buffer
