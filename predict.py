"""Predict images with a trained run, and explain the predictions with Grad-CAM.

    python predict.py --source img/ --save_path runs/exp                   # a folder (recursive)
    python predict.py --source cat.jpg --save_path runs/exp --save_images  # one image, drawn with its label
    python predict.py --source 'img/**/*.png' --save_path runs/exp runs/exp2 --ensemble vote
    python predict.py --source img/ --save_path runs/exp --cam_visual --cam_type GradCAMPlusPlus
    python predict.py --source img/ --weight runs/exp/export/best_int8.onnx       # any model file, no torch needed
    python predict.py --source img/ --save_path runs/exp --feature_maps --classical svm  # stage grids; svm on features
    python predict.py --source img/ --save_path runs/exp --reject          # images of no trained class named unknown

Everything goes into a new folder runs/exp/predict/exp (then exp2 ...): predictions.csv (one row
per image), skipped.csv (files that are not images or cannot be decoded, with the reason),
images/ (with --save_images), cam/ (with --cam_visual) and feature_maps/ (with --feature_maps).
Results are streamed to disk batch by batch, so a folder of any size runs in flat memory; on a CPU
two batches are predicted at once, each on half the cores (--streams: utils/infer/streams.py). torch is
imported only for the formats that need it and for --cam_visual/--feature_maps/--classical: onnx
and openvino models run on a machine without PyTorch (requirements/runtime.txt).
"""
from __future__ import annotations

import argparse
import copy
import difflib
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Sequence

from prettytable import PrettyTable

from utils.core.config import ArgumentParser, finite_float, group_flags
from utils.core.device import default_workers, share_cpu
from utils.core.log import StopFlag, Stopped, UserError, progress, script_main, settle_heap
from utils.core.names import CLASSICAL
from utils.core.options import Options
from utils.core.run import RunFolder, check_model_paths, increment_path
from utils.core.schema import OOD_SCORES
from utils.deploy.formats import MODEL_TYPES
from utils.explain.cam import CAM_TYPES
from utils.infer.backends import kfold_members, model_device, models_from_flags, results_folder
from utils.infer.ensemble import Ensemble, InputPlan, add_ensemble_flags, ensemble_method, load_ensemble
from utils.infer.loader import prediction_loader
from utils.infer.ood import Rejector, check_reject_flags, predict_maybe_rejecting
from utils.infer.rows import (SAVE_OPTIONS, BoundedWriter, PredictionWriter, label_text, output_name, prediction_rows,
                              save_annotated)
from utils.infer.sources import Source, find_images, relative_name
from utils.infer.streams import StreamedBatches, describe_streams, stream_count

LOGGER = logging.getLogger("predict")


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Predict images with a trained run; explain them with Grad-CAM.")
    p = parser.add_argument
    p("--source", required=True, help="an image, a folder of images (recursive), a quoted glob such as 'img/*.jpg', a list "
      "file or local tar shards (not URLs or hf: datasets)")
    p("--save_path", nargs="+", default=None,
      help="run folder (its best.pt) or model file; several = an ensemble of models of the same classes (default: runs/exp)")
    p("--weight", nargs="+", default=None, help="model file(s) instead of --save_path: a checkpoint or any exported "
      "file (export/best_int8.onnx ...); the format comes from the suffix")
    p("--model_type", default=None, choices=list(MODEL_TYPES),
      help="format of the model (default: torch; with --weight: the file's suffix)")
    p("--device", default="", help="'' (GPU if any), cpu, a GPU index such as 0, or mps (Apple silicon)")
    p("--half", action="store_true", help="float16 inference (CUDA only)")
    p("--batch_size", type=int, default=64, help="images per batch")
    p("--workers", type=int, default=default_workers(), help="image-loading processes (0 = main process; none on 1-2 CPUs)")
    p("--streams", type=int, default=0, help="batches predicted at once, the compute threads shared among them (0 = auto: "
      "2 on a CPU with 2+ threads for a PyTorch model without --cam_visual, --feature_maps or --classical)")
    p("--test_tta", action="store_true", help="TenCrop test-time augmentation (the 10 crops' probabilities averaged)")
    p("--conf_threshold", type=finite_float, default=0.5, help="a top-1 probability below this marks the row uncertain")
    p("--reject", action="store_true", help="name images of no trained class unknown (columns unknown, ood_score)")
    p("--ood_score", default=None, choices=list(OOD_SCORES), help="the score --reject uses (default: the model's)")
    add_ensemble_flags(parser)
    p("--save_images", action="store_true", help="save a copy of each image with its label and probability drawn")
    p("--cam_visual", action="store_true", help="save a class activation map per image (input | heatmap | label)")
    p("--cam_type", default="GradCAM", choices=list(CAM_TYPES), help="CAM method (the grad-cam package)")
    p("--cam_layer", default="", help="module to explain, a name from model.named_modules(); '' = the last feature stage")
    p("--cam_class", default="", help="class to explain for every image; '' = the predicted class")
    p("--feature_maps", type=int, nargs="?", const=8, default=0, metavar="K", help="grid of the K (8) strongest channels per stage")
    p("--classical", choices=list(CLASSICAL), help="predict with this classifier on the features (metrice.py --task features)")
    return group_flags(parser, "predict")


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """Parse and validate the options."""
    args = get_args_parser().parse_args(argv)
    args.save_path, args.model_type = models_from_flags(args.save_path, args.weight, args.model_type)
    if args.batch_size <= 0:
        raise UserError(f"--batch_size must be positive, got {args.batch_size}")
    for flag in ("workers", "streams"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag} must be 0 or more, got {getattr(args, flag)}")
    if not 0.0 <= args.conf_threshold <= 1.0:
        raise UserError(f"--conf_threshold must be in [0, 1], got {args.conf_threshold}")
    args.ensemble = ensemble_method(args.ensemble, args.ensemble_weights, len(kfold_members(args.save_path)))
    if args.cam_visual and args.model_type != "torch":
        raise UserError(f"--cam_visual needs gradients through the PyTorch model: use --model_type torch (got {args.model_type})")
    if args.cam_visual and len(args.save_path) > 1:
        raise UserError(f"--cam_visual explains one model; pass one --save_path (got {len(args.save_path)})")
    if args.feature_maps < 0:
        raise UserError(f"--feature_maps K must be 1 or more channels per stage, got {args.feature_maps}")
    if (args.feature_maps or args.classical) and (args.model_type != "torch" or len(args.save_path) > 1):
        raise UserError(f"--{'classical' if args.classical else 'feature_maps'} reads features inside the network: "
                        "pass one --save_path with --model_type torch")
    for flag in ("cam_layer", "cam_class"):
        if getattr(args, flag) and not args.cam_visual:
            raise UserError(f"--{flag} only applies with --cam_visual")
    check_reject_flags(args.reject, args.ood_score, f"--classical {args.classical}" if args.classical else "")
    return Options.of(args)


def save_panel(view: Any, cam: Any, lines: list[str], size: int, dest: Path) -> None:
    from utils.explain.cam import cam_panel

    dest.parent.mkdir(parents=True, exist_ok=True)
    cam_panel(view, cam, lines, size).save(dest, **SAVE_OPTIONS[".png"])


def prepare_cam(args: Options, backend: Any, class_names: list[str]) -> dict[str, Any]:
    """What --cam_visual needs: the model to explain, its layer, the class to explain, the view to draw."""
    from utils.data.transforms_np import image_transform
    from utils.explain.cam import find_cam_layer, import_grad_cam

    import_grad_cam()  # before the clock starts, and a clear line if it is missing
    spec = backend.meta.preprocess
    # with --half the map is computed on a float32 copy (float16 gradients lose small maps)
    model = copy.deepcopy(backend.model).float() if args.half else backend.model
    layer = find_cam_layer(model, spec.crop, spec.channels, args.cam_layer or None)
    explain = None
    if args.cam_class:
        if args.cam_class not in class_names:
            close = difflib.get_close_matches(args.cam_class, class_names, n=3, cutoff=0.5)
            raise UserError(f"--cam_class '{args.cam_class}' is not a class of the model"
                            + (f"; did you mean {', '.join(close)}?" if close else "")
                            + f" (classes: {', '.join(class_names[:20])}{' ...' if len(class_names) > 20 else ''})")
        explain = class_names.index(args.cam_class)
    return {
        "backend": backend, "model": model, "layer": layer, "explain": explain,
        "size": max(224, spec.crop), "channels": spec.channels,
        # with TTA the model sees ten crops: the CAM explains the centre view
        "view_transform": image_transform(spec) if args.test_tta else None,
    }


def explain_batch(args: Options, cam_setup: dict[str, Any], batch: dict[str, Any], plan: InputPlan,
                  probs: Any, rows: list[dict[str, Any]], rels: list[Path], class_names: list[str],
                  folder: Path, images_out: BoundedWriter) -> None:
    """--cam_visual: the class activation map of each image of a batch, saved as a panel."""
    import torch

    from utils.explain.cam import cam_maps

    backend = cam_setup["backend"]
    views = batch["views"] if batch["views"] is not None else batch["inputs"][plan.group_of[0]]
    targets = [cam_setup["explain"] if cam_setup["explain"] is not None else row.index for row in rows]
    try:
        x = backend.normalize(torch.from_numpy(views).to(backend.device))
        maps = cam_maps(cam_setup["model"], x, cam_setup["layer"], args.cam_type, targets, batch_size=args.batch_size)
    except RuntimeError as err:  # memory, autograd or shape trouble at this layer: say what to change
        hint = "lower --batch_size" if isinstance(err, torch.cuda.OutOfMemoryError) else "try another --cam_layer or --cam_type"
        raise UserError(f"{args.cam_type} failed on layer {cam_setup['layer'].name} "
                        f"({str(err).splitlines()[0][:200]}); {hint}") from None
    for n, (view, cam, row, target, rel) in enumerate(zip(views, maps, rows, targets, rels)):
        lines = [label_text(row), f"{args.cam_type} of {class_names[target]}"
                 + ("" if target == row.index else f" ({float(probs[n, target]):.2f})"),
                 f"layer {cam_setup['layer'].name}"]
        images_out.submit(save_panel, view, cam, lines, cam_setup["size"], folder / "cam" / output_name(rel, keep_formats=(".png",)))


def predict_files(args: Options, source: Source, ensemble: Ensemble, cam_setup: dict[str, Any],
                  folder: Path, rejector: Rejector | None) -> tuple[PredictionWriter, list[tuple[str, str]], float, int]:
    """Predict every file of `source` in batches, streaming the rows and drawings into `folder`;
    SIGTERM or Ctrl-C stops before the next batch, the folder marked incomplete (PredictionWriter.finish);
    with a `rejector` (--reject) each row says whether the image is unknown.

    Returns:
        (the closed writer, the first skipped files, seconds taken, the signal that stopped it or 0).
    """
    class_names = list(ensemble.class_names)
    plan = ensemble.plan(args.test_tta)
    loader = prediction_loader(source.files, plan, args.batch_size, args.workers, cam_setup.get("view_transform"),
                               cam_setup.get("channels", 3))
    files = loader.dataset.files
    meta = ensemble.meta
    task = meta.task_type
    writer = PredictionWriter(folder, class_names, task=task, total=len(files), reject=rejector is not None)
    images_out = BoundedWriter(limit=4 * args.batch_size, threads=max(1, min(4, (os.cpu_count() or 1) // 2)))
    first_skips: list[tuple[str, str]] = list(source.skipped[:20])
    writer.skip(source.skipped)
    folder_outputs = args.save_images or args.cam_visual or "feature_maps" in cam_setup  # files named after the source's
    t0, done, stop = time.perf_counter(), 0, StopFlag("finishing this batch, then stopping")
    batches = StreamedBatches(loader, lambda b: predict_maybe_rejecting(ensemble, rejector, b["inputs"], plan), args.streams)
    try:
        with stop, batches:
            for batch, result in progress(batches, total=len(loader), desc="predict", unit="batch", leave=False):
                if stop():  # a batch is written whole or not begun: the files from here on are left
                    break
                done += len(batch["indices"]) + len(batch["failed"])
                failed = [(files[i], reason) for i, reason in batch["failed"]]
                writer.skip(failed)
                first_skips += failed[: max(0, 20 - len(first_skips))]
                if not batch["indices"]:
                    continue
                paths = [files[i] for i in batch["indices"]]
                probs, ood = result
                rows = prediction_rows(paths, probs, class_names, task, args.conf_threshold, meta.thresholds, ood)
                writer.write(rows)
                rels = [relative_name(Path(p), source.root) for p in paths] if folder_outputs else []
                if args.save_images:
                    for row, rel in zip(rows, rels):
                        images_out.submit(save_annotated, row.path, label_text(row), folder / "images" / output_name(rel))
                if args.cam_visual:
                    explain_batch(args, cam_setup, batch, plan, probs, rows, rels, class_names, folder, images_out)
                if "feature_maps" in cam_setup:
                    cam_setup["feature_maps"].submit(batch["inputs"][plan.group_of[0]], rows, rels, folder / "feature_maps",
                                                     images_out.submit)
    finally:
        images_out.close()
    writer.finish(len(files), files[done:], signal.Signals(stop.signal).name if stop.signal else "")
    return writer, first_skips, time.perf_counter() - t0, stop.signal or 0


def predict_folder(args: Options) -> Path:
    """Run predict.py; returns the predict folder."""
    root = results_folder(args.save_path, RunFolder.PREDICT_DIR, "--weight" if args.weight else "--save_path")
    source = find_images(args.source)
    if not source.files:
        reasons = "; ".join(f"{p}: {r}" for p, r in source.skipped[:3])
        raise UserError(f"--source {args.source} holds no image files" + (f" ({reasons})" if reasons else ""))
    device = model_device(args.device, args.model_type)
    args = args.replace(streams=stream_count(args, device.type, share_cpu(device, args.workers)))
    ensemble = load_ensemble(args.save_path, args.model_type, device, args.half, args.ensemble, args.ensemble_weights)
    if args.classical:
        from utils.evaluate.classical import classical_ensemble
        ensemble = classical_ensemble(ensemble, args.save_path[0], args.classical, args.test_tta)
    rejector = Rejector(ensemble, args.ood_score) if args.reject else None
    for line in (ensemble.describe(), rejector.describe if rejector else "", describe_streams(args.streams)):
        if line:
            print(line, flush=True)
    cam_setup = prepare_cam(args, ensemble.members[0].backend, list(ensemble.class_names)) if args.cam_visual else {}
    if args.feature_maps:  # the stage grids ride with the CAM's set-up into predict_files
        from utils.explain.feature_maps import FeatureMapWriter
        cam_setup["feature_maps"] = FeatureMapWriter(ensemble.members[0].backend, args.feature_maps)
        print(f"feature maps: {cam_setup['feature_maps'].describe()}", flush=True)

    folder = increment_path(root / "exp")
    print(f"predict folder: {folder}", flush=True)
    if args.cam_visual:
        print(f"{args.cam_type} on layer {cam_setup['layer'].describe()}", flush=True)
    settle_heap()
    writer, first_skips, seconds, signum = predict_files(args, source, ensemble, cam_setup, folder, rejector)
    print_summary(writer, folder, source.root, first_skips, seconds, args)
    if writer.incomplete:  # stopped before the end: what was written, and how to finish
        LOGGER.warning(writer.incomplete)
        raise Stopped(signum)
    return folder


def print_summary(writer: PredictionWriter, folder: Path, root: Path, first_skips: list[tuple[str, str]],
                  seconds: float, args: Options) -> None:
    if writer.first_rows:
        table = PrettyTable(["path", "class", "prob", "2nd", "entropy", "uncertain"])
        table.title = f"first {len(writer.first_rows)} of {writer.rows} predictions"
        for row in writer.first_rows:
            second = f"{row.top[1][0]} {row.top[1][1]:.3f}" if len(row.top) > 1 else ""
            table.add_row([str(relative_name(Path(row.path), root)), row.shown_class, f"{row.prob:.3f}", second,
                           f"{row.entropy:.3f}", "yes" if row.uncertain else ""])
        table.align["path"] = "l"
        print(table, flush=True)
        counts = PrettyTable(["class", "images", "share", f"uncertain (<{args.conf_threshold:g})"])
        counts.title = "predicted classes"
        for name in writer.class_names:
            if writer.counts[name]:
                counts.add_row([name, writer.counts[name], f"{100 * writer.counts[name] / writer.rows:.1f}%", writer.uncertain[name]])
        print(counts, flush=True)
    if writer.skipped:
        LOGGER.warning("skipped %d file(s) (all listed in %s):", writer.skipped, writer.skipped_path)
        for path, reason in first_skips:
            LOGGER.warning("  %s: %s", path, reason)
        if writer.skipped > len(first_skips):
            LOGGER.warning("  ... and %d more", writer.skipped - len(first_skips))
    rate = writer.rows / seconds if seconds > 0 else 0.0
    print(f"{writer.rows} images predicted in {seconds:.1f}s ({rate:.1f} images/s), {writer.skipped} skipped", flush=True)
    extras = [p for p, on in (("images/", args.save_images), ("cam/", args.cam_visual), ("feature_maps/", args.feature_maps)) if on]
    print(f"results: {writer.predictions_path}, {writer.skipped_path.name}" + "".join(f", {e}" for e in extras), flush=True)


def main(args: Options) -> Path:
    check_model_paths(args.save_path, "--weight" if args.weight else "--save_path")  # one line, before the models load
    return predict_folder(args)


if __name__ == "__main__":
    script_main(main, parse_args)
