"""TorchScript: a traced model that runs with PyTorch alone (any device; C++ through libtorch).

    files = export(ctx)                                      # best.torchscript (+ best.torchscript.json)
    backend = Backend(Path("best.torchscript"), torch.device("cpu"))

The metadata rides inside the file (the extra file meta.json) and in the JSON beside it; the C++
program of deploy/cpp reads the same JSON.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from utils.core.log import UserError
from utils.core.schema import ModelMeta
from utils.data.transforms import Normalize
from utils.deploy.context import ExportContext, quiet
from utils.deploy.runtime import export_meta, read_export_info, torch_input, torch_output

META_FILE = "meta.json"  # the extra file inside the archive that carries the metadata


def export(ctx: ExportContext) -> list[tuple[Path, str]]:
    """TorchScript by torch.jit.trace; the metadata rides in the file as meta.json."""
    file = ctx.file(".torchscript")
    info = ctx.describe("torchscript", file, ctx.precision, True)
    with quiet(ctx.options.verbose):
        traced = torch.jit.trace(ctx.model, ctx.example(ctx.options.half, ctx.device), strict=False)
        torch.jit.save(traced, str(file), _extra_files={META_FILE: json.dumps(info, ensure_ascii=False)})
    ctx.write_info(file, info)
    return [(file, ctx.precision)]


class Backend:
    """A TorchScript file written by export.py, run by PyTorch (any device).

    Args:
        file: the .torchscript file.
        device: where to run.
        half: float16 weights and inputs (CUDA only).
    """

    model_type = "torchscript"

    def __init__(self, file: Path, device: torch.device, half: bool = False) -> None:
        extra = {META_FILE: ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated but still the portable format
            try:
                module = torch.jit.load(str(file), map_location=device, _extra_files=extra)
            except Exception as err:  # noqa: BLE001 - a corrupt file or not TorchScript
                raise UserError(f"{file} cannot be loaded as TorchScript ({str(err).splitlines()[0][:160]})") from None
        self.file = Path(file)
        self.info, source = read_export_info(file, extra[META_FILE])
        self.meta: ModelMeta = export_meta(self.info, source)  # a TorchScript module does not tell its input shape
        self.device = device
        self.half = half
        self.model = module.half() if half else module.float()
        self.model.eval()
        spec = self.meta.preprocess
        self.normalize = Normalize(spec.mean, spec.std).to(device)

    @torch.inference_mode()
    def __call__(self, images: Any) -> Any:
        x = self.normalize(torch_input(images, self.device))
        return torch_output(self.model(x.half() if self.half else x), images)
