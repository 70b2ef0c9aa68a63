"""NCNN (Tencent's runtime for phones and ARM boards): converted by pnnx from the PyTorch model,
run by ncnn's Python binding on numpy.

    files = export(ctx)                                    # best.ncnn.param + best.ncnn.bin (+ best.ncnn.param.json)
    backend = Backend(Path("best.ncnn.param"), Device("cpu"))   # uint8 batch -> float32 logits, no torch needed

The weights are stored in float32 (pnnx's default is float16) and the runtime's float16 and
bfloat16 storage and arithmetic are switched off, so the file computes what PyTorch computes; a
phone app may switch them on for speed. The .param file has no place for metadata: it lives in the
JSON beside it. The model takes one image at a time (ncnn's Mat is C x H x W): a batch is run
image by image.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from utils.core.device import Device, compute_threads
from utils.core.log import UserError
from utils.deploy.context import ExportContext, quiet_native
from utils.deploy.runtime import NumpyBackend, import_runtime, read_export_info

LOGGER = logging.getLogger(__name__)


def export(ctx: ExportContext) -> list[tuple[Path, str]]:
    """best.ncnn.param + best.ncnn.bin through pnnx, float32 weights, traced at batch 1 on the CPU."""
    import pnnx
    import torch

    file = ctx.file(".ncnn.param", "fp32")
    weights = file.with_suffix(".bin")
    work = ctx.temp_dir / "pnnx"  # pnnx writes its own graph, TorchScript and Python files: not kept
    work.mkdir(exist_ok=True)
    c, s = ctx.meta.image_channel, ctx.meta.image_size
    example = torch.zeros(1, c, s, s)
    names = {f"pnnx{k}": str(work / f"model{suffix}") for k, suffix in
             (("param", ".pnnx.param"), ("bin", ".pnnx.bin"), ("py", "_pnnx.py"), ("onnx", ".pnnx.onnx"))}
    with quiet_native(ctx.options.verbose):
        pnnx.export(ctx.model_cpu, str(work / "model.pt"), (example,), ncnnparam=str(file), ncnnbin=str(weights),
                    ncnnpy=str(work / "model_ncnn.py"), fp16=False, device="cpu", **names)
    if not (file.is_file() and weights.is_file()):
        raise RuntimeError(f"pnnx wrote no {file.name}/{weights.name} (rerun with --verbose for its log)")
    info = ctx.describe("ncnn", file, "fp32", False, {"ncnn": {"input": "in0", "output": "out0", "weights": weights.name,
                                                               "storage": "float32"}})
    info["input"]["shape"] = [1, c, s, s]
    info["input"]["name"], info["output"]["name"] = "in0", "out0"
    ctx.write_info(file, info)
    shutil.rmtree(work, ignore_errors=True)
    return [(file, "fp32")]


class Backend(NumpyBackend):
    """An NCNN model (.param + .bin) on the CPU, one image at a time, in float32.

    Args:
        file: the .param file (the .bin beside it, same stem).
        device: only the CPU is used; a CUDA device is reported and ignored.
        half: refused by the format table.
    """

    model_type = "ncnn"

    def __init__(self, file: Path, device: Any, half: bool = False) -> None:
        ncnn = import_runtime("ncnn", "ncnn")
        if device.type != "cpu":
            LOGGER.warning("NCNN runs %s on the CPU here", file.name)
        weights = Path(file).with_suffix(".bin")
        if not weights.is_file():
            raise UserError(f"{file}: its weights {weights.name} are missing beside it: copy the .bin with the .param")
        super().__init__(file, read_export_info(file), ())  # the .param holds no input shape
        net = ncnn.Net()
        for name in ("use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic", "use_bf16_storage"):
            setattr(net.opt, name, False)  # float32 throughout: what PyTorch computes
        net.opt.num_threads = compute_threads()
        if net.load_param(str(file)) != 0 or net.load_model(str(weights)) != 0:
            raise UserError(f"{file} cannot be loaded by ncnn (a .param/.bin pair that pnnx wrote is expected)")
        self.net, self.ncnn = net, ncnn
        self.input_name, self.output_name = net.input_names()[0], net.output_names()[0]
        self.device = Device("cpu")

    def _forward(self, x: np.ndarray) -> np.ndarray:
        outs = []
        for image in x.astype(np.float32, copy=False):
            extractor = self.net.create_extractor()
            extractor.input(self.input_name, self.ncnn.Mat(np.ascontiguousarray(image)))
            status, out = extractor.extract(self.output_name)
            if status != 0:
                raise RuntimeError(f"ncnn could not run {self.file.name} (status {status})")
            outs.append(np.array(out, dtype=np.float32).reshape(-1))
        return np.stack(outs)
