"""metrice.py's tasks beyond scoring one split, and what every task shares: the split's folder (the
flag, else the run's own), the results folder, the report module once its
packages are known to be there, --task fps and --task features.

    folder = split_path(args, run_args)          # --test_path, else the run's test_path (checked)
    out = Run(output_folder(args.save_path[0], "test"))
    report = reports()                           # utils.evaluate.reports, or one line naming what to install
    update_results(out.path, metrics={...})      # results.json: a section added or replaced, the others kept
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from utils.core.config import args_to_dict
from utils.core.files import atomic_write_text
from utils.core.log import UserError
from utils.core.names import CLASSICAL
from utils.core.options import Options
from utils.core.run import Run, RunFolder, increment_path
from utils.data.imageset import report_skipped
from utils.data.sources import scan_split, source_options, split_exists
from utils.data.stream import is_stream_url, local_split
from utils.evaluate.split import measure_speed
from utils.infer.backends import kfold_members, results_home
from utils.infer.ensemble import Ensemble
from utils.infer.speed import device_name

LOGGER = logging.getLogger("metrice")

# What utils.evaluate.reports draws and computes with (module -> package); a deployment machine may lack them.
REPORT_PACKAGES = {"matplotlib": "matplotlib", "sklearn": "scikit-learn", "pycm": "pycm"}
# What to do when a split's labels do not fit the model's task (utils.data.imageset.ImageSet.as_task).
MODEL_TASK_HINT = "evaluate it with a model of that task, or pass a split with one label per image"


def reports() -> Any:
    """utils.evaluate.reports, once the packages of its tables and figures are known to be there."""
    missing = [package for module, package in REPORT_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise UserError(f"metrice.py's reports need {', '.join(missing)}: pip install {' '.join(missing)}")
    import utils.evaluate.reports

    return utils.evaluate.reports


def check_features_args(args: argparse.Namespace) -> None:
    """--task features and --classical: one PyTorch model at its own size; names from CLASSICAL."""
    if args.classical is not None and args.task != "features":
        raise UserError(f"--classical goes with --task features, not --task {args.task}")
    if args.task != "features":
        return
    names = [n.strip() for n in (args.classical or ",".join(CLASSICAL)).split(",") if n.strip()]
    unknown = [n for n in names if n not in CLASSICAL]
    if unknown or not names:
        raise UserError(f"--classical {args.classical}: unknown {', '.join(unknown) or 'empty list'}; "
                        f"choose from {','.join(CLASSICAL)}")
    args.classical = list(dict.fromkeys(names))
    if args.model_type != "torch" or len(kfold_members(args.save_path)) > 1:
        raise UserError("--task features reads the penultimate features inside the network: pass one --save_path "
                        "(one fold of a --kfold run: RUN/foldN) with --model_type torch")
    if args.image_size is not None:
        raise UserError("--task features uses the model's own --image_size (predict.py --classical computes the same features)")


def split_path(args: Options, run_args: dict[str, Any]) -> Path:
    """The folder of --task: the flag, else the run's own path for that split."""
    key = f"{args.task}_path"
    given = getattr(args, key)
    value = given if given is not None else run_args.get(key)
    if not value:
        raise UserError(f"--task {args.task}: the run has no {key}; pass --{key} DIR")
    if is_stream_url(value):  # copied once into the cache, read as local shards
        return Path(local_split(value))
    path = Path(value)
    if not split_exists(value):
        origin = f"--{key}" if given is not None else f"the run's {key}"
        raise UserError(f"--task {args.task}: the {args.task} folder {path} ({origin}) does not exist; "
                        f"pass --{key} DIR (or a list file)")
    return path


def split_shown(args: Options, run_args: dict[str, Any], folder: Path) -> str:
    """The --task split as messages and args.yaml name it: a URL as given, with the cache folder it was copied
    into (`URL (copied into FOLDER)`); anything else, its path."""
    key = f"{args.task}_path"
    value = getattr(args, key) if getattr(args, key) is not None else run_args.get(key)
    return f"{value} (copied into {folder})" if value and is_stream_url(value) else str(folder)


def output_folder(first: str, task: str) -> Path:
    """<run>/<task> (incremented: test, test2 ...) beside the first model."""
    return increment_path(results_home(first) / task)


def run_speed(args: Options, ensemble: Ensemble, device: Any) -> dict[str, Any]:
    """--task fps: images/second of each model at batch 1 and its run's batch size (or --batch_size)."""
    for flag in ("visual", "tsne"):
        if getattr(args, flag):
            LOGGER.warning("--%s does nothing with --task fps", flag)
    out = Run(output_folder(args.save_path[0], "fps"))
    out.write_yaml(RunFolder.ARGS, args_to_dict(args) | {"class_names": list(ensemble.class_names)})
    sizes = {m.name: [args.batch_size] if args.batch_size else
             sorted({1, int(m.run_args.get("batch_size") or 1)}) for m in ensemble.members}
    rows = measure_speed(ensemble, sizes, args.test_tta)
    title = (f"speed: {args.model_type} on {device_name(device)}{', float16' if args.half else ''}"
             f"{', TenCrop TTA' if args.test_tta else ''}")
    reports().write_speed(out, rows, title, {"device": device_name(device), "half": args.half, "test_tta": args.test_tta})
    print(f"results: {out.path}", flush=True)
    return {"output": out.path, "speed": rows}


def run_features(args: Options, ensemble: Ensemble, class_names: list[str], device: Any) -> dict[str, Any]:
    """--task features: features of train (and val) and test, classical classifiers fit on train, test metrics."""
    from utils.evaluate.classical import run_feature_task

    if ensemble.meta.task_type.multilabel:
        raise UserError("--task features fits classifiers that pick one class per image: not for a multilabel model")
    run_args = ensemble.members[0].run_args  # its args.yaml: the data paths of the run
    samples, folders = {}, {}
    for split in ("train", "val", "test"):
        if split == "val" and not (args.val_path or run_args.get("val_path")):
            continue  # a run without a val split: train and test are enough
        folders[split] = split_path(args.replace(task=split), run_args)
        image_set = scan_split(folders[split], class_names=ensemble.class_names, what=f"{split} set",
                               reading=source_options(args, run_args)).as_task(ensemble.meta.task_type, MODEL_TASK_HINT)
        report_skipped(image_set.skipped, f"{split} set {folders[split]}")
        samples[split] = image_set.samples
    for flag in ("visual", "tsne"):
        if getattr(args, flag):
            LOGGER.warning("--%s does nothing with --task features", flag)
    print(f"features of {ensemble.members[0].name} on " + ", ".join(f"{s} ({len(v)} images)" for s, v in samples.items())
          + f"; classifiers: {', '.join(args.classical)}", flush=True)
    batch_size = args.batch_size or max(1, int(run_args.get("batch_size") or 32))
    result = run_feature_task(ensemble, class_names, samples, args.classical, batch_size, args.workers, args.test_tta, device,
                              {"args": args_to_dict(args), "folders": {s: str(f) for s, f in folders.items()}})
    print(f"results: {result['output']}", flush=True)
    return result


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as JSON numbers and lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def update_results(folder: str | Path, **sections: Any) -> Path:
    """Add or replace sections of <folder>/results.json (RunFolder.RESULTS), keeping the others: every
    metric metrice.py prints, machine-readable (metrics, calibration, ood ...).

    Returns:
        The file.
    """
    path = Path(folder) / RunFolder.RESULTS
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = {}
    data = (data if isinstance(data, dict) else {}) | sections
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=_plain) + "\n")
    return path
