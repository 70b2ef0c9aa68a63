"""The model formats: one table, read by export.py, by every script's --model_type, by the backends
that run a model file, and by the README's table.

    fmt = FORMATS["onnx"]
    fmt.file_name("best", "int8")          # best_int8.onnx
    backend = fmt.load(path, device)       # the format's runtime (utils.deploy.onnx.Backend)
    files = fmt.export(ctx)                # the format's exporter (utils.deploy.onnx.export)
    format_of(Path("model.xml")).flag      # openvino

A format is one entry here and one module (`module`) that holds both its exporter, `export(ctx) ->
list of (file, precision)`, and its runtime, `Backend(file, device, half)`: a callable from a uint8
batch to float32 logits with `.meta` (utils.core.schema.ModelMeta) and `.model_type`. The modules
are imported only when a format is used, so this table imports nothing heavy: `--help` and a
deployment machine without PyTorch read it.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from utils.core.log import UserError

PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class ModelFormat:
    """One row of the format table.

    Attributes:
        flag: the --export and --model_type value.
        name: how messages call it.
        suffix: what ends the file (or folder) export.py writes: best.onnx, best_hub.
        module: the module with `export(ctx)` and `Backend`.
        read_suffixes: file suffixes that identify the format when a model file is given.
        cpu / gpu: where it runs.
        export_packages: import names the exporter needs (besides torch).
        runtime_packages: pip packages a machine needs to run it (empty: PyTorch alone).
        torch_runtime: runs through PyTorch (a torch.device; no torch-free deployment).
        half: --half at run time (float16 on a CUDA device) for a float32 file.
        fp16: export.py --half writes a float16 file of this format (else its file stays float32).
        int8: export.py --int8 writes a quantized file of this format too.
        parity_on_export_device: its parity check runs where it was exported (TensorRT, TorchScript),
            else on the CPU, where float32 arithmetic is exact.
        companions: files that travel with it (OpenVINO's .bin).
        exportable: export.py writes it (a checkpoint is what main.py writes).
        folder: it is a folder, not a file.
        fp16_beside: every export also writes a float16 file beside the float32 one, on any device
            (float16 weights for phones: TFLite, Core ML); --half is not needed for it.
    """

    flag: str
    name: str
    suffix: str
    module: str
    read_suffixes: tuple[str, ...]
    cpu: bool = True
    gpu: bool = True
    export_packages: tuple[str, ...] = ()
    runtime_packages: tuple[str, ...] = ()
    torch_runtime: bool = False
    half: bool = False
    fp16: bool = True
    int8: bool = False
    parity_on_export_device: bool = False
    companions: tuple[str, ...] = ()
    exportable: bool = True
    folder: bool = False
    fp16_beside: bool = False

    def file_name(self, stem: str, precision: str = "fp32") -> str:
        """What export.py calls its file: best.onnx, best_fp16.onnx, best_int8.onnx, best_hub."""
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}")
        return f"{stem}{'' if precision == 'fp32' else '_' + precision}{self.suffix}"

    def precisions(self) -> list[str]:
        """The precisions export.py writes this format in: fp32, fp16 (--half), int8 (--int8)."""
        return ["fp32"] + (["fp16"] if self.fp16 else []) + (["int8"] if self.int8 else [])

    def run_files(self, stem: str = "best") -> list[str]:
        """The files of this format a run folder may hold, in the order they are preferred
        (float32, then float16, then int8)."""
        return [self.file_name(stem, p) for p in self.precisions()]

    def files_of(self, path: Path) -> list[Path]:
        """An exported model's files: itself (and its companions), then the JSON export.py writes beside it."""
        return [path, *(path.with_suffix(s) for s in self.companions), info_path(path)]

    def _module(self) -> Any:
        return importlib.import_module(self.module)

    def exporter(self) -> Callable[..., list[tuple[Path, str]]]:
        """`export(ctx)` of the format's module."""
        return self._module().export

    def folder_files(self) -> tuple[str, ...]:
        """A folder format's own files (FOLDER_FILES of its module): what export.py may replace in it."""
        return tuple(getattr(self._module(), "FOLDER_FILES", ())) if self.folder else ()

    def refusal(self, meta: Any) -> str | None:
        """Why this format cannot hold the model `meta` describes (None when it can): the module's
        optional `refusal(meta)`, asked before any work."""
        check = getattr(self._module(), "refusal", None)
        return check(meta) if check is not None else None

    def unavailable(self) -> str | None:
        """Why this format's runtime cannot run on this machine (None when it can): the module's
        optional `unavailable()` (Core ML predicts on macOS only). The parity check reports it as not checked."""
        check = getattr(self._module(), "unavailable", None)
        return check() if check is not None else None

    def load(self, file: str | Path, device: Any, half: bool = False) -> Any:
        """The format's runtime for `file` on `device` (a torch.device for a torch runtime, else a
        utils.core.device.Device)."""
        if half and not self.half:
            raise UserError(f"--half applies to {', '.join(f.flag for f in FORMATS.values() if f.half)} models; a "
                            f"{self.flag} model keeps the precision it was exported with (python export.py --half makes "
                            "a float16 one)")
        if half and getattr(device, "type", str(device).split(":")[0]) != "cuda":
            raise UserError("--half needs a CUDA device (float16 inference on a CPU is slow and inexact): drop --half or "
                            "pass --device 0")
        return self._module().Backend(Path(file), device, half)


FORMATS: dict[str, ModelFormat] = {f.flag: f for f in (  # in export order: ONNX before the formats built from it
    ModelFormat("torch", "PyTorch checkpoint", ".pt", "utils.deploy.pytorch", (".pt", ".pth"), torch_runtime=True,
                half=True, parity_on_export_device=True, exportable=False),
    ModelFormat("torchscript", "TorchScript", ".torchscript", "utils.deploy.torchscript", (".torchscript",),
                torch_runtime=True, half=True, parity_on_export_device=True),
    ModelFormat("onnx", "ONNX", ".onnx", "utils.deploy.onnx", (".onnx",), export_packages=("onnx", "onnxruntime"),
                runtime_packages=("onnxruntime",), int8=True),
    ModelFormat("openvino", "OpenVINO", ".xml", "utils.deploy.openvino", (".xml",), gpu=False,
                export_packages=("onnx", "openvino"), runtime_packages=("openvino",), companions=(".bin",)),
    ModelFormat("tensorrt", "TensorRT", ".engine", "utils.deploy.tensorrt", (".engine", ".plan", ".trt"), cpu=False,
                export_packages=("onnx", "tensorrt"), runtime_packages=("tensorrt",), torch_runtime=True,
                parity_on_export_device=True),
    ModelFormat("safetensors", "Hub folder (timm)", "_hub", "utils.deploy.hub", (), export_packages=("safetensors",),
                torch_runtime=True, fp16=False, folder=True),
    # phones and edge boards: built from the PyTorch model directly (pnnx, litert-torch, coremltools)
    ModelFormat("ncnn", "NCNN (pnnx)", ".ncnn.param", "utils.deploy.ncnn", (".param",), gpu=False,
                export_packages=("pnnx", "ncnn"), runtime_packages=("ncnn",), fp16=False, companions=(".bin",)),
    ModelFormat("tflite", "TFLite (LiteRT)", ".tflite", "utils.deploy.tflite", (".tflite",), gpu=False,
                export_packages=("litert_torch", "ai_edge_quantizer", "ai_edge_litert"), runtime_packages=("ai-edge-litert",),
                int8=True, fp16_beside=True),
    ModelFormat("coreml", "Core ML (macOS, iOS)", ".mlpackage", "utils.deploy.coreml", (".mlpackage",), gpu=False,
                export_packages=("coremltools",), runtime_packages=("coremltools",), folder=True, fp16_beside=True),
)}
MODEL_TYPES = tuple(FORMATS)  # every --model_type
EXPORT_FLAGS = tuple(f.flag for f in FORMATS.values() if f.exportable)  # every --export
INFO_SUFFIX = ".json"  # what export.py writes beside every exported file: best.onnx -> best.onnx.json


def info_path(file: str | Path) -> Path:
    """The JSON export.py writes beside an exported file (or folder): best.onnx -> best.onnx.json."""
    file = Path(file)
    return file.with_name(file.name + INFO_SUFFIX)


def get_format(flag: str) -> ModelFormat:
    """The format of a --model_type / --export value.

    Raises:
        UserError: an unknown name, with the known ones.
    """
    if flag not in FORMATS:
        raise UserError(f"unknown model format '{flag}'; choose one of {', '.join(FORMATS)}")
    return FORMATS[flag]


def is_hub_folder(path: Path) -> bool:
    """Whether `path` is a folder export.py wrote in timm's Hub layout (its config.json and weights)."""
    return path.is_dir() and (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def is_model_folder(path: Path) -> bool:
    """Whether `path` is a folder that is one model (a Hub folder, a Core ML .mlpackage), not a run folder."""
    path = Path(path)
    return is_hub_folder(path) or (path.is_dir() and any(path.suffix.lower() in f.read_suffixes for f in FORMATS.values()
                                                         if f.folder))


def format_of(path: str | Path) -> ModelFormat | None:
    """The format of a model path by its suffix (a Hub folder by its files, a Core ML package by its
    suffix); None when nothing tells."""
    path = Path(path)
    if is_hub_folder(path):
        return FORMATS["safetensors"]
    suffix = path.suffix.lower()
    return next((f for f in FORMATS.values() if suffix in f.read_suffixes), None)


def formats_table(markdown: bool = False) -> str:
    """The table as a person reads it: export.py --list_formats, and the README's table (markdown)."""
    header = ["format", "--export / --model_type", "file", "CPU", "GPU", "export needs", "runs with"]
    rows = [[f.name, f.flag if f.exportable else f"{f.flag} (--model_type only)", f.file_name("best"),
             "yes" if f.cpu else "-", "yes" if f.gpu else "-", " ".join(("torch", *f.export_packages)) if f.exportable else "-",
             " ".join(f.runtime_packages) or "torch"] for f in FORMATS.values()]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(f"`{c}`" if i in (1, 2) else c for i, c in enumerate(r)) + " |"
                                  for r in rows])
    from prettytable import PrettyTable

    table = PrettyTable(header)
    table.add_rows(rows)
    table.align = "l"
    return str(table)
