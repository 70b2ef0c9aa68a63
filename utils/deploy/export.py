"""Export a trained checkpoint in the formats of the table (utils.deploy.formats), and check every
file against PyTorch.

    results = export_checkpoint("runs/exp/best.pt", ExportOptions(formats=["onnx", "openvino"]))

Before export the model is put in its deploy form (utils.deploy.deploy_form). Each format's own
module writes its files (utils.deploy.onnx.export ...) into a staging folder beside their place;
each file is then run through its format's runtime on real images of the run and compared with the
trained model (utils.deploy.parity), its JSON records the result, and the files are renamed into
place together: a reader never sees half a file, and an export killed midway leaves the earlier
files as they were.
"""
from __future__ import annotations

import copy
import datetime
import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from prettytable import PrettyTable

from utils.core.checkpoint import load_checkpoint
from utils.core.device import select_device
from utils.core.files import check_writable, remove_stale_temps, temp_prefix
from utils.core.log import UserError
from utils.core.run import RunFolder
from utils.core.schema import FORMAT, Checkpoint
from utils.data.sources import scan_split, source_options, split_exists
from utils.data.stream import is_stream_url
from utils.data.transforms import Normalize
from utils.deploy.context import ExportContext, ExportOptions, load_batch, write_json
from utils.deploy.deploy_form import deploy_model, probs_of
from utils.deploy.formats import FORMATS, ModelFormat, get_format, info_path
from utils.deploy.onnx import MAX_OPSET
from utils.deploy.parity import (INT8_WARN_AGREEMENT, PARITY_TOLERANCE, check_parity,  # noqa: F401  (tests tighten it)
                                 describe_tolerance)
from utils.models.weights import model_from_checkpoint

LOGGER = logging.getLogger(__name__)


# ------------------------------------------------------------------------------- images
def _split_candidates(ckpt: Checkpoint, override: str, keys: Sequence[str]) -> list[tuple[str, str]]:
    if override:
        return [("given", override)]
    args = ckpt.args
    return [(k.removesuffix("_path"), str(args[k])) for k in keys if args.get(k)]


def load_split_images(ckpt: Checkpoint, override: str, keys: Sequence[str], limit: int
                      ) -> tuple[list[tuple[str, int]], str]:
    """Up to `limit` image samples, spread evenly over the first split folder that exists.

    Args:
        ckpt: the checkpoint (its args name the run's splits).
        override: a folder given on the command line ('' = use the run's).
        keys: the run's split options to try in order (val_path, test_path, train_path).
        limit: most samples.

    Returns:
        (samples, description such as '64 val images from dataset/val'); no samples when no folder exists.

    Raises:
        UserError: the calibration images (keys: train_path only) would come from a streamed training URL,
            which is not copied whole for a few images; the parity check passes over one instead.
    """
    for split, folder in _split_candidates(ckpt, override, keys):
        if is_stream_url(folder) and (split == "train" or keys == ("train_path",)):
            if len(keys) > 1:
                continue
            raise UserError(f"{folder}: the training split is streamed from a URL, which export does not copy whole for "
                            f"{limit} calibration images: pass --train_path with local training images (a folder, or "
                            "a shard or two copied here: a .tar file or a folder of them)")
        if not split_exists(folder):
            if split == "given":
                raise UserError(f"image folder not found: {folder}")
            continue
        image_set = scan_split(folder, class_names=ckpt.meta.class_names, what=f"{split} set",
                               reading=source_options(None, ckpt.args))
        samples = image_set.samples
        if len(samples) > limit:
            pick = np.linspace(0, len(samples) - 1, limit).round().astype(int)
            samples = [samples[i] for i in pick]
        name = "" if split == "given" else f"{split} "
        return samples, f"{len(samples)} {name}images from {folder}"
    return [], ""


# ------------------------------------------------------------------------------- metadata
def _versions(*packages: str) -> dict[str, str]:
    out = {}
    for name in ("torch", *packages):
        try:
            out[name] = importlib.import_module(name).__version__
        except (ImportError, AttributeError):
            pass
    return out


def is_our_export(file: Path) -> bool:
    """Whether `file` was written by export.py: its JSON beside carries our format tag (a Hub folder
    of an earlier version: its config.json does)."""
    for source, key in ((info_path(file), None), (file / "config.json", "pytorch_classifier")):
        try:
            info = json.loads(source.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        info = info.get(key) if key and isinstance(info, dict) else info
        if isinstance(info, dict) and info.get("format") == FORMAT:
            return True
    return False


# ------------------------------------------------------------------------------ checks
def check_request(opts: ExportOptions, ckpt: Checkpoint) -> torch.device:
    """Refuse what cannot work before doing any work: unknown formats, a format that cannot hold
    this model, missing packages, --half or a GPU-only format without a CUDA GPU, --int8 without a
    format that quantizes.

    Returns:
        The export device.
    """
    formats = [get_format(f) for f in opts.formats]
    for fmt in formats:
        if not fmt.exportable:
            raise UserError(f"--export {fmt.flag}: a {fmt.name} is what main.py writes, not an export format; choose from "
                            f"{', '.join(f.flag for f in FORMATS.values() if f.exportable)}")
    if opts.batch_size is not None and opts.batch_size < 1:
        raise UserError(f"--batch_size must be positive, got {opts.batch_size}")
    if not 7 <= opts.opset <= MAX_OPSET:
        raise UserError(f"--opset {opts.opset} is not supported: use 7 to {MAX_OPSET}")
    if opts.parity_images < 1 or opts.calibration_images < 1:
        raise UserError("--parity_images and --calibration_images must be positive")
    quantizing = [f.flag for f in FORMATS.values() if f.int8]
    if opts.int8 and not any(f.int8 for f in formats):
        raise UserError(f"--int8 quantizes {' or '.join(quantizing)} models: add one to --export (e.g. --export "
                        f"{quantizing[0]} --int8)")
    if opts.int8 and opts.half:
        raise UserError("--int8 and --half exclude each other: choose one precision")
    device = select_device(opts.device)
    for fmt in formats:
        if not fmt.cpu and device.type != "cuda":
            why = "this machine has none" if not torch.cuda.is_available() else f"--device {opts.device} is not one"
            raise UserError(f"--export {fmt.flag} needs a CUDA GPU, and {why}: export onnx or openvino here, and build the "
                            f"{fmt.name} model on the GPU machine that will run it (python export.py --export {fmt.flag} "
                            "--device 0)")
        why_not = fmt.refusal(ckpt.meta)
        if why_not:
            raise UserError(why_not)
    if opts.half and device.type != "cuda":
        raise UserError("--half exports float16 models and needs a CUDA GPU (float16 on a CPU is slow and inexact): "
                        "drop --half, or pass --device 0 on a GPU machine")
    needed = {p for f in formats for p in f.export_packages}
    needed |= {"onnxslim"} if opts.simplify and "onnx" in opts.formats else set()
    missing = sorted(p for p in needed if importlib.util.find_spec(p) is None)
    if missing:
        raise UserError(f"--export {' '.join(opts.formats)} needs {', '.join(missing)}: pip install {' '.join(missing)}")
    if opts.simplify and "onnx" not in opts.formats:
        LOGGER.warning("--simplify applies to ONNX only; ignored for %s", ", ".join(opts.formats))
    return device


def output_names(fmt: ModelFormat, stem: str, opts: ExportOptions) -> list[str]:
    """The names of the files export.py writes for `fmt` with these options."""
    precisions = ["fp32", "fp16"] if fmt.fp16_beside else [opts.precision if fmt.fp16 else "fp32"]
    names = [fmt.file_name(stem, p) for p in precisions]
    if opts.int8 and fmt.int8:
        names.append(fmt.file_name(stem, "int8"))
    return names


def check_targets(out_dir: Path, stem: str, opts: ExportOptions) -> None:
    """Refuse to overwrite a file in `out_dir` that export.py did not write.

    Raises:
        UserError: naming the file and what to do.
    """
    for fmt in map(get_format, opts.formats):
        for name in output_names(fmt, stem, opts):
            for part in fmt.files_of(out_dir / name):
                if part.exists() and not is_our_export(out_dir / name):
                    raise UserError(f"{part} exists and was not written by export.py: export.py only replaces its own "
                                    "files; move it away or pass another --output_path")
            folder = out_dir / name
            others = sorted(p.name for p in folder.iterdir() if p.name not in fmt.folder_files()) if folder.is_dir() else []
            if others:
                raise UserError(f"{folder} holds files export.py did not write ({', '.join(others[:5])}): it replaces the "
                                "whole folder, so move them away (or pass another --output_path)")


# ------------------------------------------------------------------------------ export
def parity_images(ckpt: Checkpoint, opts: ExportOptions) -> tuple[torch.Tensor, str]:
    """The uint8 images the parity check runs: up to --parity_images of the run's val split (else
    test, else train, or --val_path), or seeded random images when no folder is found.

    Returns:
        (images (N, C, H, W), a description for messages and the JSON).
    """
    spec = ckpt.meta.preprocess
    samples, described = load_split_images(ckpt, opts.val_path, ("val_path", "test_path", "train_path"), opts.parity_images)
    images = load_batch(samples, spec) if samples else torch.empty(0)
    if len(images):
        return images, described
    LOGGER.warning("no val/test/train images found (pass --val_path FOLDER): the parity check uses %d random images",
                   opts.parity_images)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (opts.parity_images, spec.channels, spec.crop, spec.crop), generator=gen, dtype=torch.uint8)
    return images, f"{opts.parity_images} random images (no image folder found)"


def export_checkpoint(weights: str | Path, opts: ExportOptions) -> list[dict[str, Any]]:
    """Export a checkpoint of this toolkit in every format of `opts.formats`, checking each file
    against PyTorch.

    Args:
        weights: best.pt (or any checkpoint this toolkit wrote).
        opts: the options.

    Returns:
        One export info dict per file written (with its "parity" report).

    Raises:
        UserError: a request that cannot work, a failed export, or a parity failure (the files are
            kept and their JSON says "parity": {"ok": false}).
    """
    weights = Path(weights)
    out_dir = Path(opts.output_dir) if opts.output_dir else weights.parent / RunFolder.EXPORT_DIR
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--output_path {out_dir} is a file: pass a folder")
    check_writable(out_dir, "--output_path" if opts.output_dir else "--save_path",
                   fix="" if opts.output_dir else "pass --output_path FOLDER, a folder you can write to")
    ckpt = load_checkpoint(weights, what="checkpoint")
    device = check_request(opts, ckpt)
    meta = ckpt.meta
    check_targets(out_dir, weights.stem, opts)
    t0 = time.time()

    images, described = parity_images(ckpt, opts)
    calibration: tuple[list[tuple[str, Any]], str] = ([], "")
    if opts.int8:  # before any work: int8 without calibration images cannot be done
        calibration = load_split_images(ckpt, opts.train_path, ("train_path",), opts.calibration_images)
        if not calibration[0]:
            raise UserError("--int8 needs calibration images and the run's train split is not here: pass --train_path FOLDER")
    print(f"export {weights} ({meta.model_name}, {meta.num_classes} classes, {meta.image_channel}x{meta.image_size}x"
          f"{meta.image_size}, epoch {ckpt.epoch}) on {device}; parity on {described}", flush=True)

    trained, model_cpu, model, reference, deploy = prepare_models(ckpt, images, device, opts.half)
    tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    if device.type == "cuda":  # float32 checks against PyTorch's CPU result: no TF32 shortcuts
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    packages = sorted({p for f in opts.formats for p in FORMATS[f].export_packages})
    base_info = {
        "source": {"checkpoint": str(weights), "epoch": ckpt.epoch, "best": ckpt.best, "metrics": ckpt.metrics},
        "deploy": {k: deploy[k] for k in ("reparameterized", "fused_conv_bn")},
        "versions": _versions(*packages),
        "exported": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "parity_images": described,
    }
    results: list[dict[str, Any]] = []
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        # files are made in a staging folder beside their place and moved in whole (os.replace):
        # a reader never sees half a file, and two exports at once never read each other's
        remove_stale_temps(out_dir)
        with tempfile.TemporaryDirectory(prefix=temp_prefix("export"), dir=out_dir) as tmp:
            work = Path(tmp) / "work"  # intermediate files that are not kept
            work.mkdir()
            ctx = ExportContext(opts, device, model, model_cpu, trained, ckpt, base_info, Path(tmp), weights.stem, work,
                                calibration)
            _export_all(ctx, images, reference, out_dir, results)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    _print_summary(results, out_dir, time.time() - t0)
    failed = [r for r in results if r["parity"].get("ok") is False]
    if failed:
        names = ", ".join(f"{r['file']} (max |dp| {_fmt(r['parity'].get('max_abs_diff'))}, top-1 "
                          f"{_pct(r['parity'].get('top1_agreement'))}; allowed {describe_tolerance(r['parity']['tolerance'])})"
                          for r in failed)
        raise UserError(f"parity check failed for {names}: the file(s) are kept in {out_dir} and flagged "
                        "\"parity\": {\"ok\": false} in their JSON; do not deploy them")
    return results


def prepare_models(ckpt: Checkpoint, images: torch.Tensor, device: torch.device, half: bool
                   ) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module, torch.Tensor, dict[str, Any]]:
    """The trained model, its deploy form (CPU float32, and on the export device in the export's
    precision), the trained model's probabilities on the parity images, and the deploy-form report."""
    meta = ckpt.meta
    trained = model_from_checkpoint(ckpt)
    x = Normalize(meta.preprocess.mean, meta.preprocess.std)(images)
    with torch.no_grad():
        reference = torch.cat([probs_of(trained, x[i:i + 64], meta.task_type, meta.temperature) for i in range(0, len(x), 64)])
    model_cpu, deploy = deploy_model(trained, x)
    for note in deploy["notes"]:
        LOGGER.warning("deploy form: %s", note)
    print(f"deploy form: {deploy['reparameterized']} block(s) re-parameterised, {deploy['fused_conv_bn']} conv+bn pair(s) "
          f"folded; max |dp| vs the trained model {deploy['max_abs_diff']:.1e}", flush=True)
    model = copy.deepcopy(model_cpu).to(device)
    return trained, model_cpu, model.half() if half else model, reference, deploy


def _export_all(ctx: ExportContext, images: torch.Tensor, reference: torch.Tensor, out_dir: Path,
                results: list[dict[str, Any]]) -> None:
    """Each format in table order (ONNX before the formats built from it), each file checked in the
    staging folder, then every file moved into `out_dir` at the end (a later format may be built
    from an earlier one's file)."""
    for fmt in [f for f in FORMATS.values() if f.flag in ctx.options.formats]:
        for file, precision in _run_exporter(fmt, ctx):
            results.append(_check_and_record(file, fmt, precision, images, reference, ctx.device, out_dir / file.name))
    for result in results:
        commit_export(get_format(result["model_type"]), ctx.out_dir / Path(result["path"]).name, out_dir)


def commit_export(fmt: ModelFormat, staged: Path, out_dir: Path) -> Path:
    """Move a staged export into `out_dir`, each file by an atomic rename; a folder replaces the
    earlier one (checked to hold only its own files) by renaming that one aside first, so the place
    is never empty of a whole folder for longer than two renames. Returns its new path."""
    for part in fmt.files_of(staged):
        target = out_dir / part.name
        old = None
        if part.is_dir() and target.is_dir():
            old = target.with_name(temp_prefix(target.name) + "replaced")  # removed by a later export if killed here
            os.replace(target, old)
        os.replace(part, target)
        if old is not None:
            shutil.rmtree(old)
    return out_dir / staged.name


def _run_exporter(fmt: ModelFormat, ctx: ExportContext) -> list[tuple[Path, str]]:
    started = time.time()
    files: list[tuple[Path, str]] = []
    _run_step(fmt.name, ctx.options.verbose, lambda: files.extend(fmt.exporter()(ctx)))
    LOGGER.info("%s: %s (%.1fs)", fmt.name, ", ".join(f.name for f, _ in files), time.time() - started)
    return files


def _check_and_record(file: Path, fmt: ModelFormat, precision: str, images: torch.Tensor, reference: torch.Tensor,
                      device: torch.device, final: Path) -> dict[str, Any]:
    """The parity check of a staged file, written into its JSON and printed as one line under the
    path it will have (`final`)."""
    json_file = info_path(file)
    info = json.loads(json_file.read_text(encoding="utf-8"))
    parity = check_parity(file, fmt, precision, images, reference, device)
    info["parity"] = parity
    write_json(json_file, info)
    if parity.get("ok") is None:
        LOGGER.warning("%s: parity not checked (%s)", final.name, parity["skipped"])
        verdict = "not checked"
    else:
        verdict = "ok" if parity["ok"] else "FAILED"
        print(f"{final}: parity vs PyTorch on {parity['images']} images: max |dp| {_fmt(parity['max_abs_diff'])}, "
              f"top-1 agreement {_pct(parity['top1_agreement'])} (allowed: {describe_tolerance(parity['tolerance'])}): {verdict}",
              flush=True)
        if precision == "int8" and parity["top1_agreement"] is not None and parity["top1_agreement"] < INT8_WARN_AGREEMENT:
            LOGGER.warning("%s: int8 agrees with PyTorch on %s of the images (under %s): measure its accuracy on the test "
                           "split before shipping it (python metrice.py --weight %s --task test)", final.name,
                           _pct(parity["top1_agreement"]), _pct(INT8_WARN_AGREEMENT), final)
    return info | {"path": str(final), "size_mb": _size_mb(file, fmt), "verdict": verdict}


def _run_step(what: str, verbose: bool, fn: Callable[[], Path]) -> Path:
    """Run an export step; a failure of the exporting library becomes one clear line."""
    try:
        return fn()
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - torch.onnx, onnx, openvino, tensorrt raise many types
        if verbose:
            raise
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        raise UserError(f"{what} export failed: {type(err).__name__}: {first} (rerun with --verbose for the details)") from None


def _size_mb(file: Path, fmt: ModelFormat) -> float:
    """The model's size on disk: its file and companions, or a folder's files."""
    parts = [p for p in fmt.files_of(file)[:-1] if p.exists()]  # not the JSON
    files = [f for p in parts for f in (p.rglob("*") if p.is_dir() else [p]) if f.is_file()]
    return sum(f.stat().st_size for f in files) / 1e6


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1e}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _print_summary(results: list[dict[str, Any]], out_dir: Path, seconds: float) -> None:
    table = PrettyTable(["format", "file", "MB", "precision", "batch", "max |dp|", "top-1 agree", "parity"])
    table.title = f"export: {out_dir} ({seconds:.1f}s)"
    for r in results:
        p = r["parity"]
        table.add_row([r["model_type"], r["file"], f"{r['size_mb']:.1f}", r["precision"],
                       "dynamic" if r["dynamic"] else r["batch_size"], _fmt(p.get("max_abs_diff")),
                       _pct(p.get("top1_agreement")), r["verdict"]])
    table.align = "l"
    print(table, flush=True)
