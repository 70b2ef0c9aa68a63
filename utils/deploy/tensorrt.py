"""TensorRT: an engine built from the ONNX file on the GPU that will run it (TensorRT 8.6 or newer).

    files = export(ctx)                                   # best.engine (+ best.engine.json), on a CUDA device
    backend = Backend(Path("best.engine"), torch.device("cuda:0"))

float32 engines are built without TF32, so they match PyTorch's float32 outputs; --half builds an
FP16 engine. A dynamic engine takes batches of 1 to --batch_size (MAX_BATCH without it). An
engine runs only with the TensorRT version and GPU model it was built on.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from utils.core.log import UserError
from utils.core.schema import ModelMeta
from utils.data.transforms import Normalize
from utils.deploy.context import INPUT_NAME, ExportContext
from utils.deploy.onnx import onnx_file_for
from utils.deploy.runtime import export_meta, fixed_dim, import_runtime, read_export_info, torch_input, torch_output

MAX_BATCH = 32  # largest batch of a dynamic engine when --batch_size is not given


def export(ctx: ExportContext) -> list[tuple[Path, str]]:
    """A TensorRT engine built from the ONNX file (TensorRT 8.6+ Python API); FP16 with --half."""
    import tensorrt as trt

    opts = ctx.options
    onnx_file = onnx_file_for(ctx, half=opts.half)
    file = ctx.file(".engine")
    logger = trt.Logger(trt.Logger.VERBOSE if opts.verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:  # explicit batch is the only mode from TensorRT 10 on
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_file)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_file.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace * (1 << 30)))
    if opts.half:
        config.set_flag(trt.BuilderFlag.FP16)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)
    c, s = ctx.meta.image_channel, ctx.meta.image_size
    max_batch = opts.batch_size or MAX_BATCH
    if opts.is_dynamic:
        profile = builder.create_optimization_profile()
        profile.set_shape(INPUT_NAME, (1, c, s, s), (max(1, max_batch // 2), c, s, s), (max_batch, c, s, s))
        config.add_optimization_profile(profile)
    with torch.cuda.device(ctx.device):
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT could not build the engine (rerun with --verbose for its log)")
    with open(file, "wb") as fh:
        fh.write(serialized)
    info = ctx.describe("tensorrt", file, ctx.precision, opts.is_dynamic,
                        {"opset": opts.opset, "max_batch": max_batch if opts.is_dynamic else opts.batch,
                         "tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(ctx.device)})
    ctx.write_info(file, info)
    return [(file, ctx.precision)]


class Backend:
    """A serialized TensorRT engine, run on a CUDA device with torch tensors as the I/O buffers.

    Args:
        file: the .engine file (metadata in the JSON beside it).
        device: a CUDA device.
        half: refused by the format table (an FP16 engine is built with export.py --half).
    """

    model_type = "tensorrt"

    def __init__(self, file: Path, device: torch.device, half: bool = False) -> None:
        if device.type != "cuda" or not torch.cuda.is_available():
            raise UserError(f"{file} is a TensorRT engine: it runs only on a CUDA GPU (pass --device 0)")
        trt = import_runtime("tensorrt", "tensorrt")
        self.file = Path(file)
        self.info, source = read_export_info(file)
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
        shape = tuple(self.engine.get_tensor_shape(self.input_name))  # -1 where the engine takes any size
        self.meta: ModelMeta = export_meta(self.info, source, shape)
        self.batch = fixed_dim(shape[0])
        # the most images one call takes: the fixed batch, or the optimization profile's largest
        self.max_batch = self.batch or int(self.engine.get_tensor_profile_shape(self.input_name, 0)[2][0])
        spec = self.meta.preprocess
        self.normalize = Normalize(spec.mean, spec.std).to(device)

    @torch.inference_mode()
    def __call__(self, images: Any) -> Any:
        x = self.normalize(torch_input(images, self.device))
        outs = []
        for start in range(0, x.shape[0], self.max_batch):
            chunk = x[start:start + self.max_batch]
            n = chunk.shape[0]
            if self.batch is not None and n < self.batch:  # a fixed-batch engine: pad the last chunk with zeros
                chunk = torch.cat([chunk, chunk.new_zeros((self.batch - n, *chunk.shape[1:]))])
            outs.append(self._forward(chunk)[:n])
        return torch_output(torch.cat(outs), images)

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
