"""Export a trained run for deployment: TorchScript, ONNX (float32 / float16 / int8), OpenVINO, TensorRT,
a safetensors folder in timm's Hugging Face Hub layout, or for phones and edge boards NCNN, TFLite
(LiteRT) and Core ML (the formats of utils.deploy.formats).

    python export.py --save_path runs/exp --export onnx                  # runs/exp/export/best.onnx (+ .json)
    python export.py --save_path runs/exp --export torchscript onnx openvino --simplify
    python export.py --save_path runs/exp --export onnx --int8           # also best_int8.onnx, calibrated on train images
    python export.py --save_path runs/exp --export tensorrt --half --device 0   # on the GPU that will run it
    python export.py --save_path runs/exp --export safetensors --push_to_hub user/flowers   # runs/exp/export/best_hub/
    python export.py --save_path runs/exp --export ncnn tflite coreml --int8   # phones: .ncnn.param/.bin, .tflite
                                                                          # (+ _fp16, _int8), .mlpackage (+ _fp16)

Image size, channels, classes and preprocessing come from the run's best.pt. Every exported file
is compared with PyTorch on up to 64 images of the run's val split; a file past the tolerance is
kept, flagged in its JSON, and the command exits non-zero. `python export.py --list_formats`
prints the format table.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from utils.core.config import ArgumentParser, finite_float, group_flags
from utils.core.log import UserError, script_main
from utils.core.names import DEFAULT_OPSET
from utils.core.options import Options
from utils.core.run import RunFolder, check_model_paths
from utils.deploy.formats import EXPORT_FLAGS, FORMATS, format_of

# PyTorch and the exporters are imported in main(): `--help` answers at once.


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Export a trained run (its best.pt) to TorchScript, ONNX, OpenVINO, TensorRT, a "
                            "Hub folder, NCNN, TFLite or Core ML.")
    p = parser.add_argument
    p("--save_path", default="runs/exp", help="run folder of main.py (its best.pt is exported), or a checkpoint file")
    p("--export", nargs="+", default=["onnx"], choices=list(EXPORT_FLAGS), metavar="FORMAT",
      help=f"one or more of: {', '.join(EXPORT_FLAGS)} ({FORMATS['safetensors'].flag}: a Hub folder timm loads, "
           f"<stem>{FORMATS['safetensors'].suffix}/); --list_formats shows the table")
    p("--push_to_hub", default="", metavar="REPO", help="upload the safetensors folder to this Hugging Face Hub repo "
      "(implies --export safetensors; token from HF_TOKEN or `hf auth login`)")
    p("--dynamic", action="store_true", help="any batch size (the default unless --batch_size is given)")
    p("--batch_size", type=int, default=None, help="trace batch; without --dynamic the model takes only this batch")
    p("--simplify", action="store_true", help="simplify the ONNX graph with onnxslim")
    p("--half", action="store_true", help="float16 model (CUDA GPU only)")
    p("--int8", action="store_true", help="also write an int8 model of the formats that quantize: "
      f"{', '.join(f.flag for f in FORMATS.values() if f.int8)} (static quantization, calibrated on training images)")
    p("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset")
    p("--workspace", type=finite_float, default=4.0, help="TensorRT builder workspace (GiB)")
    p("--device", default="", help="'' (GPU if any), cpu, a GPU index such as 0, or mps (Apple silicon)")
    p("--verbose", action="store_true", help="the exporters' own logs and warnings, full tracebacks on failure")
    p("--val_path", default="", help="images for the parity check (default: the run's val, else test, else train split)")
    p("--train_path", default="", help="calibration images for --int8 (default: the run's train split)")
    p("--parity_images", type=int, default=64, help="images the parity check runs")
    p("--calibration_images", type=int, default=300, help="training images that calibrate --int8")
    p("--output_path", default="", help="where the files go (default: <run>/export)")
    p("--image_size", type=int, default=None, help="pytorch-classifier's flag: the size comes from the run; must match if given")
    p("--image_channel", type=int, default=None, help="pytorch-classifier's flag: the channels come from the run; must match if given")
    p("--list_formats", action="store_true", help="print the export formats and exit")
    return group_flags(parser, "export")


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """Parse and validate the options (no config file: an export's options are its own)."""
    args = get_args_parser().parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch_size must be positive, got {args.batch_size}")
    if args.parity_images < 1:
        raise UserError(f"--parity_images must be positive, got {args.parity_images}")
    if args.calibration_images < 1:
        raise UserError(f"--calibration_images must be positive, got {args.calibration_images}")
    if args.workspace <= 0:
        raise UserError(f"--workspace must be positive, got {args.workspace}")
    args.export = list(dict.fromkeys(args.export))  # each format once, in the order given
    if args.push_to_hub and "safetensors" not in args.export:
        args.export.append("safetensors")  # --push_to_hub uploads the Hub folder: export it first
    return Options.of(args)


def main(args: Options) -> list[dict[str, Any]]:
    """Export; returns one export info dict per file written (see utils.deploy.export)."""
    if not args.list_formats:
        check_model_paths([args.save_path], "--save_path")  # one line, before the exporters load
    from utils.deploy.export import ExportOptions, export_checkpoint
    from utils.deploy.formats import formats_table

    if args.list_formats:
        print(formats_table())
        return []
    weights = RunFolder.checkpoint(args.save_path)
    found = format_of(weights)
    if found is not None and found.flag != "torch":
        raise UserError(f"--save_path {weights} is a model in the {found.name} format: export.py exports a checkpoint of "
                        "main.py; pass the run folder or its best.pt")
    if args.image_size is not None or args.image_channel is not None:
        from utils.core.checkpoint import load_checkpoint

        meta = load_checkpoint(weights).meta
        for flag in ("image_size", "image_channel"):
            given = getattr(args, flag)
            if given is not None and given != getattr(meta, flag):
                raise UserError(f"--{flag} {given} differs from the run's ({getattr(meta, flag)}): the model is exported with the "
                                f"{flag.replace('_', ' ')} it was trained with; drop --{flag}")
    options = ExportOptions(
        formats=args.export, device=args.device, batch_size=args.batch_size, dynamic=args.dynamic, half=args.half,
        int8=args.int8, simplify=args.simplify, opset=args.opset, workspace=args.workspace, verbose=args.verbose,
        val_path=args.val_path, train_path=args.train_path, parity_images=args.parity_images,
        calibration_images=args.calibration_images, output_dir=args.output_path,
    )
    results = export_checkpoint(weights, options)
    if args.push_to_hub:
        from utils.deploy.hub import push_to_hub

        push_to_hub(Path(next(r["path"] for r in results if r["model_type"] == "safetensors")), args.push_to_hub)
    return results


if __name__ == "__main__":
    script_main(main, parse_args)
