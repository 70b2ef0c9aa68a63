"""Evaluate a trained run: metrics, reports, plots, mistakes, t-SNE, speed, ensembles.

    python metrice.py --save_path runs/exp --task test                   # best.pt on the run's test split
    python metrice.py --save_path runs/exp --task val --visual --tsne    # + correct/incorrect CSVs, gallery, t-SNE
    python metrice.py --save_path runs/exp --task fps                    # images/second at batch 1 and the run's batch
    python metrice.py --save_path runs/exp runs/exp2 --ensemble vote     # an ensemble, side by side with its members

Data paths, image size, preprocessing and class names come from the run (best.pt); flags
override them. Everything goes into <first run>/<task>/, a new folder per call (test, test2 ...).
The library behind it: utils.evaluation (predict and score a split, speed), utils.reports (what
is written), utils.ensemble (the models).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from utils.backends import MODEL_TYPES
from utils.checkpoint import Run, increment_path
from utils.config import ArgumentParser, args_to_dict, finite_float
from utils.device import default_workers, select_device, share_cpu
from utils.ensemble import ENSEMBLE_METHODS, Ensemble, load_ensemble
from utils.evaluation import measure_speed, predict_split, score_split
from utils.images import read_label_file, report_skipped, scan_split
from utils.log import UserError, run_cli
from utils.reports import print_overall, print_per_class, write_reports, write_speed, write_tsne, write_visual
from utils.speed import device_name

LOGGER = logging.getLogger("metrice")

TASKS = ("train", "val", "test", "fps")


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Evaluate a run of main.py (pytorch-classifier's metrice.py flags).")
    p = parser.add_argument
    p("--save_path", nargs="+", default=["runs/exp"],
      help="run folder(s); several = an ensemble (same classes)")
    p("--task", default="test", choices=TASKS, help="split to evaluate, or fps to measure speed (default test)")
    p("--train_path", default=None, help="train split (default: the run's)")
    p("--val_path", default=None, help="val split (default: the run's)")
    p("--test_path", default=None, help="test split (default: the run's)")
    p("--label_path", default=None, help="class names to show, one per line (default: the run's class names)")
    p("--image_size", type=int, default=None, help="input size in pixels (default: the run's)")
    p("--batch_size", type=int, default=None, help="images per batch (default: the run's; fps: 1 and the run's)")
    p("--workers", type=int, default=default_workers(),
      help="data loader processes, 0 = main process (default: none on 1-2 CPUs, else CPUs - 2, at most 4)")
    p("--device", default="", help="'' (GPU if any, the default), cpu, or a GPU index such as 0")
    p("--model_type", default="torch", choices=list(MODEL_TYPES),
      help="which model file of the run to evaluate (default torch: best.pt)")
    p("--half", action="store_true", help="float16 inference (CUDA only)")
    p("--test_tta", action="store_true", help="TenCrop test-time augmentation (probabilities averaged)")
    p("--visual", action="store_true", help="correct.csv, incorrect.csv and a gallery of the most confident mistakes")
    p("--tsne", action="store_true", help="t-SNE of the penultimate features (torch models)")
    p("--ensemble", default=None, choices=list(ENSEMBLE_METHODS),  # None: mean, or weighted with weights
      help="how several runs are combined (default mean; weighted with --ensemble_weights)")
    p("--ensemble_weights", type=finite_float, nargs="+", default=None,
      help="one weight per run for --ensemble weighted (default: each run's best validation accuracy)")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the options."""
    args = get_args_parser().parse_args(argv)
    for name in ("image_size", "batch_size"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name} must be a positive number, got {value}")
    if args.workers < 0:
        raise UserError(f"--workers must be 0 or more, got {args.workers}")
    if args.ensemble_weights is not None:
        if args.ensemble not in (None, "weighted"):
            raise UserError(f"--ensemble_weights go with --ensemble weighted, not --ensemble {args.ensemble}")
        args.ensemble = "weighted"
        if len(args.ensemble_weights) != len(args.save_path):
            raise UserError(f"--ensemble_weights: {len(args.ensemble_weights)} weight(s) for {len(args.save_path)} run(s); "
                            "give one per --save_path")
    args.ensemble = args.ensemble or "mean"
    if args.tsne and args.model_type != "torch":
        raise UserError("--tsne reads the penultimate features inside the network: it needs --model_type torch")
    return args


def split_path(args: argparse.Namespace, run_args: dict[str, Any]) -> Path:
    """The folder of --task: the flag, else the run's own path for that split."""
    key = f"{args.task}_path"
    given = getattr(args, key)
    value = given if given is not None else run_args.get(key)
    if not value:
        raise UserError(f"--task {args.task}: the run has no {key}; pass --{key} DIR")
    path = Path(value)
    if not path.is_dir():
        origin = f"--{key}" if given is not None else f"the run's {key}"
        raise UserError(f"--task {args.task}: the {args.task} folder {path} ({origin}) does not exist or is not a folder; "
                        f"pass --{key} DIR")
    return path


def output_folder(first: str, task: str) -> Path:
    """<run>/<task> (incremented: test, test2 ...) beside the first model."""
    path = Path(first)
    return increment_path((path if path.is_dir() else path.parent) / task)


def load_models(args: argparse.Namespace) -> tuple[Ensemble, list[str], torch.device]:
    """The ensemble of --save_path, the class names to show (--label_path), and the device."""
    device = select_device(args.device)
    share_cpu(device, args.workers)
    for path in args.save_path:
        if Path(path).is_dir() and args.model_type == "torch" and not (Path(path) / "best.pt").is_file():
            raise UserError(f"no best.pt in {path}: is it a run folder of main.py? (pass the folder --save_path named when training)")
    ensemble = load_ensemble(args.save_path, args.model_type, device, args.half, args.ensemble, args.ensemble_weights,
                             args.image_size)
    class_names = list(ensemble.class_names)
    if args.label_path is not None:
        if not Path(args.label_path).is_file():
            raise UserError(f"--label_path {args.label_path} not found")
        class_names = read_label_file(args.label_path)
        if len(class_names) != len(ensemble.class_names):
            raise UserError(f"--label_path {args.label_path} lists {len(class_names)} names; the model has "
                            f"{len(ensemble.class_names)} classes")
    return ensemble, class_names, device


def run_speed(args: argparse.Namespace, ensemble: Ensemble, device: torch.device) -> dict[str, Any]:
    """--task fps: images/second of each model at batch 1 and its run's batch size (or --batch_size)."""
    for flag in ("visual", "tsne"):
        if getattr(args, flag):
            LOGGER.warning("--%s does nothing with --task fps", flag)
    out = Run(output_folder(args.save_path[0], "fps"))
    out.write_yaml("args.yaml", args_to_dict(args) | {"class_names": list(ensemble.class_names)})
    sizes = {m.name: [args.batch_size] if args.batch_size else
             sorted({1, int((m.checkpoint.args if m.checkpoint else {}).get("batch_size") or 1)}) for m in ensemble.members}
    rows = measure_speed(ensemble, sizes, args.test_tta)
    title = (f"speed: {args.model_type} on {device_name(device)}{', float16' if args.half else ''}"
             f"{', TenCrop TTA' if args.test_tta else ''}")
    write_speed(out, rows, title, {"device": device_name(device), "half": args.half, "test_tta": args.test_tta})
    print(f"results: {out.path}", flush=True)
    return {"output": out.path, "speed": rows}


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate (or time) the models in --save_path; returns the output folder and the metrics."""
    ensemble, class_names, device = load_models(args)
    if args.task == "fps":
        return run_speed(args, ensemble, device)
    first = ensemble.members[0]
    run_args = dict(first.checkpoint.args) if first.checkpoint is not None else {}
    folder = split_path(args, run_args)
    image_set = scan_split(folder, class_names=ensemble.class_names, what=f"{args.task} set")
    report_skipped(image_set.skipped, f"{args.task} set {folder}")
    batch_size = args.batch_size or max(1, int(run_args.get("batch_size") or 32))

    out = Run(output_folder(args.save_path[0], args.task))
    out.write_yaml("args.yaml", args_to_dict(args) | {"split": str(folder), "images": len(image_set.samples),
                                                      "class_names": class_names, "members": [m.name for m in ensemble.members],
                                                      "ensemble_weights": ensemble.weights})
    print(f"evaluating {', '.join(m.name for m in ensemble.members)} ({args.model_type}) on {args.task} set {folder} "
          f"({len(image_set.samples)} images, {len(class_names)} classes), device {device}"
          + (", TenCrop TTA" if args.test_tta else ""), flush=True)
    if ensemble.describe():
        print(ensemble.describe(), flush=True)
    split = predict_split(ensemble, image_set.samples, batch_size, args.workers, args.test_tta, device, args.tsne, args.task)
    results = score_split(ensemble, split, class_names)
    name = next(iter(results))
    print_overall(results)
    per_class = write_reports(out, split.targets, split.probs, class_names, results, f"{name}, {args.task}")
    print_per_class(per_class, f"per class: {name}, {args.task}")
    visual = None
    if args.visual:
        visual = write_visual(out, split, class_names, first.spec)
        print(f"--visual: {visual[0]} correct, {visual[1]} incorrect", flush=True)
    if args.tsne:
        write_tsne(out, split, class_names, first.name)
    print(f"results: {out.path}", flush=True)
    return {"output": out.path, "metrics": results, "per_class": per_class, "visual": visual}


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
