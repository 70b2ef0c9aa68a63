"""The backends that run through PyTorch: a checkpoint of this toolkit, TorchScript, TensorRT.

    backend = TorchBackend(load_checkpoint("runs/exp/best.pt"), torch.device("cpu"))
    logits = backend(images)      # uint8 (N, C, H, W), numpy or torch -> float32 logits of the same kind (CPU)

Reached through utils.infer.backends.load_backend (which imports this module only for these formats, so
onnx and openvino run without torch). Each backend normalises the uint8 batch itself on its device
(utils.data.transforms.Normalize) and returns float32 logits on the CPU: a numpy array for a numpy batch (the
prediction path of predict.py and metrice.py), a tensor for a tensor.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.core.log import UserError
from utils.core.schema import Checkpoint, ModelMeta
from utils.data.transforms import Normalize
from utils.infer.runtimes import fixed_batch, import_runtime, read_export_info
from utils.models.weights import model_from_checkpoint


def _output(logits: torch.Tensor, images: Any) -> Any:
    """CPU float32 logits as the caller's kind: a tensor for a tensor batch, else numpy."""
    logits = logits.float().cpu()
    return logits if isinstance(images, torch.Tensor) else logits.numpy()


def _input(images: Any, device: torch.device) -> torch.Tensor:
    """A uint8 batch (numpy or tensor) as a tensor on `device`."""
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    return x.to(device, non_blocking=True)


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
        if device.type == "cuda":  # batches of one size: let cuDNN time its algorithms once and keep the fastest
            torch.backends.cudnn.benchmark = True
        spec = self.meta.preprocess
        self.normalize = Normalize(spec.mean, spec.std).to(device)

    @torch.inference_mode()
    def __call__(self, images: Any) -> Any:
        x = self.normalize(_input(images, self.device))
        if self.half:
            x = x.half()
        return _output(self.model(x), images)


class TorchScriptBackend:
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
        self.file = Path(file)
        self.info = read_export_info(file, extra["meta.json"])
        self.meta: ModelMeta = ModelMeta.from_dict(self.info, f"{file} (its metadata)")
        exported_half = bool(self.info.get("half"))
        half = half or exported_half
        if half and device.type != "cuda":
            raise UserError(f"{file} runs in float16{' (exported with --half)' if exported_half else ''}: "
                            "that needs a CUDA device (pass --device 0), or export again without --half")
        self.device = device
        self.half = half
        self.model = module.half() if half else module.float()
        self.model.eval()
        spec = self.meta.preprocess
        self.normalize = Normalize(spec.mean, spec.std).to(device)

    @torch.inference_mode()
    def __call__(self, images: Any) -> Any:
        x = self.normalize(_input(images, self.device))
        return _output(self.model(x.half() if self.half else x), images)


class TensorRTBackend:
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
        trt = import_runtime("tensorrt", "tensorrt")
        self.file = Path(file)
        self.info = read_export_info(file)
        self.meta: ModelMeta = ModelMeta.from_dict(self.info, f"{file} (its metadata)")
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
        self.batch = fixed_batch(shape[0])
        # the most images one call takes: the fixed batch, or the optimization profile's largest
        self.max_batch = self.batch or int(self.engine.get_tensor_profile_shape(self.input_name, 0)[2][0])
        spec = self.meta.preprocess
        self.normalize = Normalize(spec.mean, spec.std).to(device)

    @torch.inference_mode()
    def __call__(self, images: Any) -> Any:
        x = self.normalize(_input(images, self.device))
        outs = []
        for start in range(0, x.shape[0], self.max_batch):
            chunk = x[start:start + self.max_batch]
            n = chunk.shape[0]
            if self.batch is not None and n < self.batch:  # a fixed-batch engine: pad the last chunk with zeros
                chunk = torch.cat([chunk, chunk.new_zeros((self.batch - n, *chunk.shape[1:]))])
            outs.append(self._forward(chunk)[:n])
        return _output(torch.cat(outs), images)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
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
