"""Evaluate a trained run: metrics, reports, plots, mistakes, t-SNE, speed, ensembles.

    python metrice.py --save_path runs/exp --task test                   # best.pt on the run's test split
    python metrice.py --save_path runs/exp --task val --visual --tsne    # + correct/incorrect CSVs, gallery, t-SNE
    python metrice.py --save_path runs/exp --task fps                    # images/second at batch 1 and the run's batch
    python metrice.py --save_path runs/exp runs/exp2 --ensemble vote     # an ensemble, side by side with its members
    python metrice.py --weight runs/exp/export/best_int8.onnx            # any model file (onnx/openvino/ncnn/tflite: no torch needed)
    python metrice.py --save_path runs/exp --task features --classical svm,knn   # classifiers on the CNN's features
    python metrice.py --save_path runs/cv --task label_issues            # mislabeled images (a main.py --kfold run: all)
    python metrice.py --save_path runs/exp --task calibrate              # refit best.pt's temperature on the val split
    python metrice.py --save_path runs/exp --task test --ood_path unknown/   # AUROC of the unknown-image scores

Data paths, image size, preprocessing and class names come from the run (best.pt); flags
override them. Everything goes into <first run>/<task>/, a new folder per call (test, test2 ...);
--task features writes <run>/features/ (utils.evaluate.classical) and --task label_issues
<run>/label_issues/ (utils.evaluate.label_report), each replaced by each call; --task calibrate
rewrites best.pt's temperature (utils.evaluate.calibrate_task). --task val and test report the
calibration before (temperature 1) and after (the stored temperature), and write results.json.
The library behind it: utils.evaluate.split (predict and score a split, speed), utils.evaluate.reports (what
is written), utils.infer.ensemble (the models). torch is imported only for the formats that need it
and for --tsne: onnx, openvino, ncnn and tflite models are evaluated without PyTorch. An exported
model whose run's best.pt is found is compared with it where PyTorch is installed (top-1 agreement,
accuracy change: utils.evaluate.versus_torch).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Sequence

from utils.core.config import ArgumentParser, args_to_dict, data_root_paths, group_flags
from utils.core.device import default_workers, share_cpu
from utils.core.log import UserError, script_main, settle_heap
from utils.core.names import CLASSICAL
from utils.core.options import Options
from utils.core.run import Run, RunFolder, check_model_paths
from utils.core.schema import MAX_IMAGE_SIZE
from utils.data.imageset import read_label_file, report_skipped
from utils.data.sources import scan_split, source_options
from utils.deploy.formats import MODEL_TYPES
from utils.evaluate.calibrate_task import calibrate_task, check_calibrate_args
from utils.evaluate.html_report import write_html_report
from utils.evaluate.label_report import label_issues_run, label_issues_task
from utils.evaluate.ood_report import report_ood
from utils.evaluate.split import predict_split, score_calibration, score_split
from utils.evaluate.versus_torch import compare_with_checkpoint
from utils.evaluate.tasks import (MODEL_TASK_HINT, check_features_args, output_folder, reports, run_features, split_shown,
                                  run_speed, split_path, update_results)
from utils.infer.backends import (
    kfold_members,
    model_device,
    models_from_flags,
    results_folder,
)
from utils.infer.ensemble import (
    Ensemble,
    add_ensemble_flags,
    ensemble_method,
    load_ensemble,
)
from utils.infer.ood import OodScorer

LOGGER = logging.getLogger("metrice")

TASKS = ("train", "val", "test", "fps", "features", "label_issues", "calibrate")


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Evaluate a run of main.py (pytorch-classifier's metrice.py flags).")
    p = parser.add_argument
    p("--save_path", nargs="+", default=None,
      help="run folder(s), default runs/exp; several = an ensemble (same classes)")
    p("--weight", nargs="+", default=None, help="model file(s) instead of --save_path: a checkpoint or any exported "
      "file (export/best_int8.onnx ...); the format comes from the suffix")
    p("--task", default="test", choices=TASKS, help="split to evaluate, fps to measure speed, features: penultimate "
      "features of train/val/test and --classical classifiers fit on them, label_issues: probably mislabeled images "
      "(a --kfold run's training images, else val and test), or calibrate: refit the run's temperature on its val split "
      "(or --val_path) and rewrite best.pt (default test)")
    p("--data", default=None, metavar="ROOT", help="dataset root holding train/, val/, test/ (and label.txt): the default of "
      "the split paths below; those given win")
    p("--train_path", default=None, help="train split (default: the run's)")
    p("--val_path", default=None, help="val split (default: the run's; --task calibrate fits on it)")
    p("--test_path", default=None, help="test split (default: the run's)")
    p("--label_path", default=None, help="class names to show, one per line (default: the run's class names)")
    p("--list_sep", default=None, help="separator of a text list given as a split (default: the run's, else any whitespace)")
    p("--image_column", default=None, help="an hf:PATH split's image column (default: the run's, else image)")
    p("--label_column", default=None, help="an hf:PATH split's label column (default: the run's, else label)")
    p("--image_size", type=int, default=None, help="input size in pixels (default: the run's)")
    p("--batch_size", type=int, default=None, help="images per batch (default: the run's; fps: 1 and the run's)")
    p("--workers", type=int, default=default_workers(),
      help="data loader processes, 0 = main process (default: none on 1-2 CPUs, else CPUs - 2, at most 4)")
    p("--device", default="", help="'' (GPU if any, the default), cpu, a GPU index such as 0, or mps (Apple silicon)")
    p("--model_type", default=None, choices=list(MODEL_TYPES),
      help="which model file of the run to evaluate (default torch: best.pt; with --weight: the file's suffix)")
    p("--half", action="store_true", help="float16 inference (CUDA only)")
    p("--test_tta", action="store_true", help="TenCrop test-time augmentation (probabilities averaged)")
    p("--visual", action="store_true", help="correct.csv, incorrect.csv and a gallery of the most confident mistakes")
    p("--tsne", action="store_true", help="t-SNE of the penultimate features (torch models)")
    add_ensemble_flags(parser)
    p("--classical", default=None, help=f"--task features: comma-separated classifiers to fit on the features, "
      f"from {','.join(CLASSICAL)} (default: all)")
    p("--ood_path", default=None, help="--task val/test: a folder of images of no trained class (sub-folders and labels "
      "ignored): AUROC and FPR at 95%% TPR of each unknown-image score, in = the split's images")
    p("--write_fixed_list", action="store_true", help="--task label_issues: also write label_issues/fixed_<split>.csv, "
      "each checked image with the suggested label for the flagged ones (a list main.py trains on)")
    return group_flags(parser, "metrice")


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """Parse and check the options."""
    args = get_args_parser().parse_args(argv)
    for dest, path in data_root_paths(args.data).items() if args.data else ():  # a label.txt only where there is one
        if getattr(args, dest) is None and (dest != "label_path" or Path(path).is_file()):
            setattr(args, dest, path)
    args.oof_run = label_issues_run(args.task, args.save_path, args.weight, args.write_fixed_list)  # as given: not expanded
    args.save_path, args.model_type = models_from_flags(args.save_path, args.weight, args.model_type)
    for name in ("image_size", "batch_size"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name} must be a positive number, got {value}")
    if (args.image_size or 0) > MAX_IMAGE_SIZE:
        raise UserError(f"--image_size must be at most {MAX_IMAGE_SIZE} pixels, got {args.image_size}")
    if args.workers < 0:
        raise UserError(f"--workers must be 0 or more, got {args.workers}")
    args.ensemble = ensemble_method(args.ensemble, args.ensemble_weights, len(kfold_members(args.save_path)))
    if args.tsne and args.model_type != "torch":
        raise UserError("--tsne reads the penultimate features inside the network: it needs --model_type torch")
    check_features_args(args)
    check_calibrate_args(args)
    if args.ood_path is not None and args.task not in ("val", "test"):
        raise UserError(f"--ood_path compares the images of a split with it: use --task val or test, not {args.task}")
    if args.ood_path is not None and not Path(args.ood_path).exists():  # before the split is predicted
        raise UserError(f"--ood_path {args.ood_path}: no such folder; pass a folder of images of no trained class")
    return Options.of(args)


def load_models(args: Options) -> tuple[Ensemble, list[str], Any]:
    """The ensemble of --save_path, the class names to show (--label_path), and the device."""
    device = model_device(args.device, args.model_type)
    share_cpu(device, args.workers)
    for path in kfold_members(args.save_path):
        if args.model_type == "torch":
            RunFolder.checkpoint(path)  # a folder without best.pt: one line naming the flag and the runs there
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


def main(args: Options) -> dict[str, Any]:
    """Evaluate (or time) the models in --save_path; returns the output folder and the metrics."""
    check_model_paths(args.save_path, "--weight" if args.weight else "--save_path")  # one line, before the models load
    if args.task == "label_issues":  # a --kfold run's oof.csv, else val and test predicted (utils.evaluate.label_report)
        return label_issues_task(args, load_models)
    results_folder(args.save_path, args.task, "--weight" if args.weight else "--save_path")  # writable, before any work
    report = reports()
    if args.task == "calibrate":  # refit and rewrite best.pt (utils.evaluate.calibrate_task)
        return calibrate_task(args)
    ensemble, class_names, device = load_models(args)
    settle_heap()
    if args.task == "fps":
        return run_speed(args, ensemble, device)
    if args.task == "features":
        return run_features(args, ensemble, class_names, device)
    first = ensemble.members[0]
    scorer = OodScorer(ensemble) if args.ood_path else None  # a multilabel model is refused here, before any file
    run_args = dict(first.run_args)
    folder = split_path(args, run_args)
    image_set = scan_split(folder, class_names=ensemble.class_names, what=f"{args.task} set",
                           reading=source_options(args, run_args)).as_task(ensemble.meta.task_type, MODEL_TASK_HINT)
    shown = split_shown(args, run_args, folder)  # a URL split: the URL, and the cache folder it was copied into
    report_skipped(image_set.skipped, f"{args.task} set {shown}")
    batch_size = args.batch_size or max(1, int(run_args.get("batch_size") or 32))

    out = Run(output_folder(args.save_path[0], args.task))
    out.write_yaml(RunFolder.ARGS, args_to_dict(args) | {"split": shown, "images": len(image_set.samples),
                                                      "class_names": class_names, "members": [m.name for m in ensemble.members],
                                                      "ensemble_weights": ensemble.weights})
    print(f"evaluating {', '.join(m.name for m in ensemble.members)} ({args.model_type}) on {args.task} set {shown} "
          f"({len(image_set.samples)} images, {len(class_names)} classes), device {device}"
          + (", TenCrop TTA" if args.test_tta else ""), flush=True)
    if ensemble.describe():
        print(ensemble.describe(), flush=True)
    split = predict_split(ensemble, image_set.samples, batch_size, args.workers, args.test_tta, device, args.tsne, args.task,
                          scorer)
    results = score_split(ensemble, split, class_names)
    name = next(iter(results))
    report.print_overall(results)
    versus = compare_with_checkpoint(ensemble, split, args.model_type, batch_size, args.workers, args.test_tta, args.device)
    meta, task = ensemble.meta, ensemble.meta.task_type
    if task.multilabel:  # no confusion matrix: per-class AP and F1 at the stored thresholds
        per_class = report.write_multilabel_reports(out, split, task.thresholds(meta.num_classes, meta.thresholds), class_names,
                                                    results)
    else:
        per_class = report.write_reports(out, split.targets, split.probs, class_names, results, f"{name}, {args.task}")
    report.print_per_class(per_class, f"per class: {name}, {args.task}")
    calibration, curves = score_calibration(ensemble, split)  # before (temperature 1) and after (the stored one)
    report.print_calibration(calibration)
    report.write_calibration(out, curves, calibration, f"{name}, {args.task}")
    update_results(out.path, metrics=results, per_class=per_class, calibration=calibration,
                   **({"versus_pytorch": versus} if versus else {}))
    visual = None
    if (args.visual or args.tsne) and task.multilabel:
        LOGGER.warning("--visual and --tsne show one class per image: not for a multilabel model (predictions.csv has "
                       "each image's labels)")
    elif args.visual:
        visual = report.write_visual(out, split, class_names, first.spec)
        print(f"--visual: {visual[0]} correct, {visual[1]} incorrect", flush=True)
    if args.tsne and not task.multilabel:
        report.write_tsne(out, split, class_names, first.name)
    ood = None if scorer is None else report_ood(out, ensemble, scorer, split, args.ood_path, batch_size, args.workers,
                                                 args.test_tta, device)
    write_html_report(out, ensemble, split, class_names, run_args, args_to_dict(args) | {"split": shown})  # report.html
    print(f"results: {out.path}", flush=True)
    return {"output": out.path, "metrics": results, "per_class": per_class, "visual": visual, "calibration": calibration,
            "ood": ood}


if __name__ == "__main__":
    script_main(main, parse_args)
