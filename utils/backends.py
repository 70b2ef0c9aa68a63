"""Run a trained model behind one call, whatever format it is in.

    backend = load_backend("runs/exp")                          # best.pt of a run folder
    backend = load_backend("runs/exp", model_type="onnx")       # runs/exp/export/best.onnx (export.py)
    backend = load_backend("model.onnx", model_type="onnx")     # a file; its metadata says the rest
    probs = predict_probs(backend, images)              # uint8 (N, C, H, W) or TenCrop (N, 10, C, H, W)

A backend takes uint8 image batches preprocessed by `preprocess_images` (or by the dataset
transforms built from `backend.meta.preprocess`), normalises them itself, and returns float32
logits on the CPU. `backend.meta` is the model's utils.schema.ModelMeta: class names,
preprocessing, image size and channels. Prediction is a function of (backend, images), so a
server can call it.

Formats (MODEL_TYPES): torch (a checkpoint of this toolkit), torchscript, onnx (onnxruntime),
tensorrt (a serialized engine, CUDA) and openvino (IR .xml/.bin, CPU). Exported models take the
normalised float batch ((pixel / 255 - mean) / std, N x C x H x W) and return logits; their
metadata (ONNX metadata_props, TorchScript extra file, OpenVINO rt_info, or the JSON export.py
writes beside every file) gives the class names and preprocessing. Only the torch backend needs
timm and the model code; the others import their runtime lazily, so a deployment machine needs
torch, torchvision, pillow, numpy, pyyaml and the one runtime.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from utils.checkpoint import load_checkpoint, model_from_checkpoint
from utils.data import Normalize, image_transform, run_with_tta
from utils.log import UserError
from utils.names import MODEL_TYPES
from utils.schema import Checkpoint, ModelMeta

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
# Key of the metadata every exported file carries (ONNX metadata_props, OpenVINO rt_info).
EXPORT_INFO_KEY = "pytorch_classifier_ng"
# Install hints for the runtimes (a deployment machine installs only the one it uses).
RUNTIME_PACKAGES = {"onnxruntime": "onnxruntime (or onnxruntime-gpu)", "openvino": "openvino", "tensorrt": "tensorrt"}


class TorchBackend:
    """A checkpoint of this toolkit (best.pt / last.pt) run by PyTorch.

    Args:
        ckpt: the loaded checkpoint.
        device: where to run.
        half: float16 weights and inputs (CUDA only).
    """

    model_type = "torch"

    def __init__(self, ckpt: Checkpoint, device: torch.device, half: bool = False) -> None:
        if half and device.type != "cuda":
            raise UserError("--half needs a CUDA device (float16 inference on a CPU is slow and inexact): drop --half or pass --device 0")
        self.meta: ModelMeta = ckpt.meta
        self.checkpoint = ckpt
        self.device = device
        self.half = half
        self.model = model_from_checkpoint(ckpt).to(device)
        if half:
            self.model.half()
        spec = self.meta.preprocess
        self.normalize = Normalize(spec.mean, spec.std).to(device)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalize(images.to(self.device, non_blocking=True))
        if self.half:
            x = x.half()
        return self.model(x).float().cpu()


# ------------------------------------------------------------------------ exported models
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


def _import_runtime(module: str, model_type: str) -> Any:
    """Import a runtime package, or one clear line saying what to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise UserError(f"--model_type {model_type} needs the {module} package ({err}): "
                        f"pip install {RUNTIME_PACKAGES.get(module, module)}") from None


class ExportedBackend:
    """What the exported-model backends share: metadata, normalisation, fixed-batch handling.

    Subclasses set `self.batch` (None when the model takes any batch size) and `self.device`
    (where inputs go), and implement `_forward` (a normalised float32 batch on that device, of
    exactly `batch` images when the batch is fixed -> logits).
    """

    model_type = ""

    def __init__(self, file: Path, info: dict[str, Any]) -> None:
        self.file = Path(file)
        self.info = info
        self.meta: ModelMeta = ModelMeta.from_dict(info, f"{file} (its metadata)")
        spec = self.meta.preprocess
        self.normalize = Normalize(spec.mean, spec.std)
        self.batch: int | None = None
        self.device = torch.device("cpu")  # where the input batch is best handed over

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalize(images.to(self.device))
        if self.batch is None or x.shape[0] == self.batch:
            return self._forward(x).float().cpu()
        # A fixed-batch model (exported with --batch_size and without --dynamic): run full
        # chunks, padding the last one with zeros.
        outs = []
        for start in range(0, x.shape[0], self.batch):
            chunk = x[start:start + self.batch]
            n = chunk.shape[0]
            if n < self.batch:
                chunk = torch.cat([chunk, chunk.new_zeros((self.batch - n, *chunk.shape[1:]))])
            outs.append(self._forward(chunk).float().cpu()[:n])
        return torch.cat(outs)


def _fixed_batch(dim: Any) -> int | None:
    """A batch dimension as an int when it is fixed, None when dynamic (a name, -1, 0 or None)."""
    return int(dim) if isinstance(dim, (int, np.integer)) and int(dim) > 0 else None


class TorchScriptBackend(ExportedBackend):
    """A TorchScript file written by export.py, run by PyTorch (any device).

    Args:
        file: the .torchscript file.
        device: where to run.
        half: float16 weights and inputs (CUDA only).
    """

    model_type = "torchscript"

    def __init__(self, file: Path, device: torch.device, half: bool = False) -> None:
        import warnings

        extra = {"meta.json": ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated but still the portable format
            try:
                module = torch.jit.load(str(file), map_location=device, _extra_files=extra)
            except Exception as err:  # noqa: BLE001 - a corrupt file or not TorchScript
                raise UserError(f"{file} cannot be loaded as TorchScript ({str(err).splitlines()[0][:160]})") from None
        super().__init__(file, read_export_info(file, extra["meta.json"]))
        exported_half = bool(self.info.get("half"))
        half = half or exported_half
        if half and device.type != "cuda":
            raise UserError(f"{file} runs in float16{' (exported with --half)' if exported_half else ''}: "
                            "that needs a CUDA device (pass --device 0), or export again without --half")
        self.device = device
        self.half = half
        self.model = module.half() if half else module.float()
        self.model.eval()
        self.normalize = self.normalize.to(device)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalize(images.to(self.device, non_blocking=True))
        return self.model(x.half() if self.half else x).float().cpu()


class OnnxBackend(ExportedBackend):
    """An ONNX model run by onnxruntime: the CUDA provider on a CUDA device when onnxruntime-gpu
    is installed, else the CPU.

    Args:
        file: the .onnx file.
        device: cpu or cuda.
    """

    model_type = "onnx"

    def __init__(self, file: Path, device: torch.device) -> None:
        ort = _import_runtime("onnxruntime", "onnx")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: its warnings are about graph rewrites, not the user's model
        options.intra_op_num_threads = torch.get_num_threads()  # one thread setting (OMP_NUM_THREADS) for every backend
        available = ort.get_available_providers()
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" in available:
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
        self.batch = _fixed_batch(inp.shape[0])
        self.providers = self.session.get_providers()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.numpy().astype(self.input_dtype, copy=False)})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32))


class OpenVINOBackend(ExportedBackend):
    """An OpenVINO IR model (.xml + .bin) on the CPU, compiled with float32 inference precision
    (OpenVINO would otherwise pick bfloat16 on CPUs that have it, which changes the outputs).

    Args:
        file: the .xml file (the .bin beside it).
        device: only the CPU is used; a CUDA device is reported and ignored.
    """

    model_type = "openvino"

    def __init__(self, file: Path, device: torch.device) -> None:
        ov = _import_runtime("openvino", "openvino")
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
        self.batch = _fixed_batch(batch_dim.get_length() if batch_dim.is_static else None)
        self.compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                          "INFERENCE_NUM_THREADS": torch.get_num_threads()})
        self.request = self.compiled.create_infer_request()
        self.output = self.compiled.output(0)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.request.infer({0: x.numpy()})[self.output]
        return torch.from_numpy(np.array(out, dtype=np.float32))


class TensorRTBackend(ExportedBackend):
    """A serialized TensorRT engine (TensorRT 8.6 or newer), run on a CUDA device with torch
    tensors as the I/O buffers.

    Args:
        file: the .engine file (metadata in the JSON beside it).
        device: a CUDA device.
    """

    model_type = "tensorrt"

    def __init__(self, file: Path, device: torch.device) -> None:
        if device.type != "cuda" or not torch.cuda.is_available():
            raise UserError(f"{file} is a TensorRT engine: it runs only on a CUDA GPU (pass --device 0)")
        trt = _import_runtime("tensorrt", "tensorrt")
        super().__init__(file, read_export_info(file))
        self.device = device
        logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(device):
            self.engine = trt.Runtime(logger).deserialize_cuda_engine(file.read_bytes())
            if self.engine is None:
                raise UserError(f"{file} cannot be deserialized by this TensorRT ({trt.__version__}): an engine runs only "
                                "with the TensorRT version and GPU model it was built on; export it again on this machine")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.input_half = self.engine.get_tensor_dtype(self.input_name) == trt.DataType.HALF
        self.output_half = self.engine.get_tensor_dtype(self.output_name) == trt.DataType.HALF
        shape = tuple(self.engine.get_tensor_shape(self.input_name))
        self.batch = _fixed_batch(shape[0])
        if self.batch is None:  # dynamic: the optimization profile's largest batch
            self.max_batch = int(self.engine.get_tensor_profile_shape(self.input_name, 0)[2][0])
        self.normalize = self.normalize.to(device)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.batch is None and images.shape[0] > self.max_batch:
            return torch.cat([self(images[i:i + self.max_batch]) for i in range(0, images.shape[0], self.max_batch)])
        return super().__call__(images)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device).contiguous()
        x = x.half() if self.input_half else x
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        out_shape = tuple(self.context.get_tensor_shape(self.output_name))
        out = torch.empty(out_shape, dtype=torch.float16 if self.output_half else torch.float32, device=self.device)
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {self.file}")
        stream.synchronize()
        return out.float()


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


def load_backend(path: str | Path, model_type: str = "torch", device: torch.device | str = "cpu", half: bool = False) -> Any:
    """Load a model to run.

    Args:
        path: a run folder or a model file.
        model_type: the format: torch, torchscript, onnx, tensorrt or openvino.
        device: where to run (OpenVINO always uses the CPU; TensorRT needs CUDA).
        half: float16 inference (CUDA only; torch and torchscript -- the other formats keep the
            precision they were exported with).

    Returns:
        A callable backend: uint8 batch -> float32 logits (CPU), with `.meta` and `.model_type`.
    """
    if model_type not in MODEL_TYPES:
        raise UserError(f"unknown --model_type '{model_type}'; choose one of {', '.join(MODEL_TYPES)}")
    file = resolve_weights(path, model_type)
    device = torch.device(device) if isinstance(device, str) else device
    if model_type == "torch":
        return TorchBackend(load_checkpoint(file, what="model"), device, half)
    if model_type == "torchscript":
        return TorchScriptBackend(file, device, half)
    if half:
        raise UserError(f"--half applies to torch and torchscript models; a {model_type} model keeps the precision it was "
                        "exported with (python export.py --half makes a float16 one)")
    if model_type == "onnx":
        return OnnxBackend(file, device)
    if model_type == "openvino":
        return OpenVINOBackend(file, device)
    return TensorRTBackend(file, device)


def preprocess_images(meta: ModelMeta, images: Sequence[Image.Image], tta: bool = False) -> torch.Tensor:
    """Loaded PIL images (already in the model's mode, see utils.images.load_image) -> a uint8 batch."""
    transform = image_transform(meta.preprocess, tta)
    return torch.stack([transform(img) for img in images])


def predict_probs(backend: Any, images: torch.Tensor) -> torch.Tensor:
    """Class probabilities (N, num_classes) for a uint8 batch; TenCrop batches are averaged over
    the crops' probabilities."""
    return run_with_tta(lambda x: backend(x).softmax(dim=1), images)
