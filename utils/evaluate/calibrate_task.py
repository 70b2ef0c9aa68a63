"""metrice.py --task calibrate: refit what a trained run fits on its validation split at the end of
training, and rewrite its best.pt (atomically; the weights are the same bytes).

    python metrice.py --save_path runs/exp --task calibrate                  # the run's val split
    python metrice.py --save_path runs/exp --task calibrate --val_path DIR   # other labelled images
    result = calibrate_task(args)            # each model of --save_path (a --kfold run: each of its folds)

Each model goes through REFIT_STEPS in order; a step reads the model (MemberRefit: its checkpoint,
its PyTorch backend, the validation images, the metadata so far), prints what it did and returns
the new ModelMeta for the next step; best.pt is rewritten once, after the last. The temperature
(utils.infer.calibration) is the first step; the out-of-distribution statistics, fitted on the
calibrated probabilities, go after it. Only PyTorch checkpoints: an exported file is refused (export
it again from the refitted best.pt), and so are several runs at once.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from utils.core.checkpoint import load_checkpoint
from utils.core.config import args_to_dict
from utils.core.log import UserError, progress
from utils.core.options import Options
from utils.core.run import Run, RunFolder
from utils.core.schema import ModelMeta
from utils.data.imageset import report_skipped
from utils.data.sources import scan_split, source_options
from utils.data.transforms_np import run_with_tta
from utils.deploy.formats import FORMATS
from utils.evaluate.split import stored_temperature
from utils.evaluate.tasks import MODEL_TASK_HINT, output_folder, reports, split_path, update_results
from utils.infer.backends import kfold_members, load_backend, model_device
from utils.infer.calibration import (CALIBRATION_BINS, calibration_scores, fit_temperature, fit_text, logits_of,
                                     reliability, temperature_text)
from utils.infer.ensemble import InputPlan
from utils.infer.loader import prediction_loader
from utils.infer.ood import STATS_KEY, fit_model_ood

LOGGER = logging.getLogger("metrice")


def check_calibrate_args(args: Any) -> None:
    """--task calibrate: one PyTorch checkpoint (a run folder, a --kfold run, or a best.pt).

    Raises:
        UserError: an exported model, or several runs.
    """
    if args.task != "calibrate":
        return
    if args.model_type != "torch":
        raise UserError(f"--task calibrate rewrites the temperature stored in a PyTorch checkpoint, and {args.save_path[0]} "
                        f"is a {args.model_type} model: pass its run folder (--save_path RUN) or its best.pt, then export "
                        "it again with export.py")
    if len(args.save_path) > 1:
        raise UserError(f"--task calibrate refits one run at a time, not {len(args.save_path)}: pass one --save_path "
                        "(a --kfold run: each of its folds is refit)")


@dataclass
class MemberRefit:
    """One model being refit: what each step of REFIT_STEPS reads.

    Attributes:
        checkpoint: its best.pt (or the checkpoint file given).
        backend: its PyTorch backend (utils.deploy.pytorch.Backend), the checkpoint's weights.
        samples: the validation images, (path, target) encoded for the model's task.
        meta: the model's metadata so far (the stored one, then each step's).
        out: the output folder (<run>/calibrate, calibrate2 ...).
        args: metrice.py's options (--test_tta, --batch_size, --workers).
        extra: what the steps add to the checkpoint besides its metadata (Checkpoint.extra: the
            out-of-distribution statistics).
    """

    checkpoint: Path
    backend: Any
    samples: list[tuple[str, Any]]
    meta: ModelMeta
    out: Run
    args: Options
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.args.batch_size or max(1, int(self.backend.checkpoint.args.get("batch_size") or 32))


def split_logits(member: MemberRefit) -> tuple[np.ndarray, np.ndarray]:
    """The model's logits on the validation images and their targets (images that fail to decode are
    reported and left out). With --test_tta: the logits of the ten crops' mean probabilities.

    Raises:
        UserError: no image decoded.
    """
    backend, task = member.backend, member.meta.task_type
    plan = InputPlan([member.meta.preprocess], member.args.test_tta)
    loader = prediction_loader([p for p, _ in member.samples], plan, member.batch_size, member.args.workers)
    keep: list[int] = []
    logits: list[np.ndarray] = []
    failed: list[tuple[str, str]] = []
    for batch in progress(loader, desc="calibrate", leave=False):
        failed.extend((member.samples[i][0], reason) for i, reason in batch["failed"])
        if batch["indices"]:
            keep.extend(batch["indices"])
            images = batch["inputs"][0]
            out = (logits_of(run_with_tta(lambda x: task.probabilities(backend(x)), images), task) if images.ndim == 5
                   else backend(images))
            logits.append(np.asarray(out, dtype=np.float64))
    report_skipped(failed, "val images that failed to decode (left out of the fit)")
    if not keep:
        raise UserError(f"--task calibrate: no image of the val split could be decoded for {member.checkpoint}")
    return np.concatenate(logits), task.target_array([member.samples[i][1] for i in keep], member.meta.num_classes)


def refit_temperature(member: MemberRefit) -> ModelMeta:
    """Step 1: the temperature that minimises the NLL of the validation images (Guo et al., ICML 2017);
    prints it with ECE/NLL/Brier at temperature 1 -> at the new one (and at the old one, if any), writes
    calibration.png and results.json's calibration section."""
    task, meta = member.meta.task_type, member.meta
    logits, targets = split_logits(member)
    fit = fit_temperature(logits, targets, task)
    before_probs, after_probs = task.probabilities(logits), task.probabilities(logits, fit.stored)
    before, after = calibration_scores(targets, before_probs, task), calibration_scores(targets, after_probs, task)
    print(fit_text(fit, before, after, meta.class_names), flush=True)
    section: dict[str, Any] = {"temperature": stored_temperature(dataclasses.replace(meta, temperature=fit.stored)),
                               "previous_temperature": stored_temperature(meta), "calibrated": fit.stored is not None,
                               "images": fit.images, "bins": CALIBRATION_BINS}
    for key in ("ece", "nll", "brier"):
        section[f"{key}_before"], section[f"{key}_after"] = before[key], after[key]
    if meta.temperature is not None:
        previous = calibration_scores(targets, task.probabilities(logits, meta.temperature), task)
        section |= {f"{key}_previous": value for key, value in previous.items()}
        print(f"the stored temperature was {temperature_text(meta.temperature, meta.class_names)} (ECE {previous['ece']:.4f}, "
              f"NLL {previous['nll']:.4f} with it)", flush=True)
    curves = {"before": reliability(targets, before_probs, task), "after": reliability(targets, after_probs, task)}
    reports().write_calibration(member.out, curves, section, f"{member.checkpoint}, val")
    update_results(member.out.path, calibration=section)
    return dataclasses.replace(meta, temperature=fit.stored)


def refit_ood(member: MemberRefit) -> ModelMeta:
    """Step 2 (multiclass): what predict.py --reject needs, as main.py fits it at the end of training
    (utils.infer.ood.fit_model_ood): the Mahalanobis statistics of the run's training split, and each
    score's threshold keeping --reject_tpr (the stored share, else the run's) of the validation images
    known, on the probabilities at the temperature step 1 fitted. Writes results.json's ood_fit section."""
    meta = member.meta
    if meta.task_type.multilabel:
        print("unknown images: not fitted (--reject is for multiclass models)", flush=True)
        return meta
    run_args = dict(member.backend.checkpoint.args)
    folder = split_path(member.args.replace(task="train"), run_args)
    train = scan_split(folder, class_names=meta.class_names, what="train set",
                       reading=source_options(member.args, run_args)).as_task(meta.task_type, MODEL_TASK_HINT)
    report_skipped(train.skipped, f"train set {folder}")
    tpr = meta.ood.tpr if meta.ood is not None else float(run_args.get("reject_tpr") or 0.95)
    backend = member.backend
    spec, stats, line = fit_model_ood(backend.model, meta, train.samples, member.samples, tpr, member.batch_size,
                                      member.args.workers, backend.device)
    print(f"unknown images (--reject): {line}", flush=True)
    member.extra[STATS_KEY] = stats.to_extra()
    update_results(member.out.path, ood_fit={"train_images": len(train.samples), "val_images": len(member.samples)}
                   | spec.to_dict())
    return dataclasses.replace(meta, ood=spec)


# What --task calibrate refits, in order; each step returns the metadata the next one starts from.
REFIT_STEPS: tuple[Callable[[MemberRefit], ModelMeta], ...] = (refit_temperature, refit_ood)


def stale_exports(run: Path) -> list[Path]:
    """The exported files of a run folder (export/ and beside best.pt): made from best.pt before it changed."""
    folder = RunFolder(run)
    return [where / name for fmt in FORMATS.values() if fmt.flag != "torch" for name in fmt.run_files(Path(RunFolder.BEST).stem)
            for where in (folder.export_dir, folder.path) if (where / name).exists()]


def member_refit(path: str, args: Options, device: Any) -> MemberRefit:
    """A model of --save_path loaded for refitting, with its validation images (--val_path, else its run's).

    Raises:
        UserError: no val split to fit on.
    """
    checkpoint = RunFolder.checkpoint(path)
    backend = load_backend(checkpoint, "torch", device)
    run_args, meta = dict(backend.checkpoint.args), backend.meta
    if not (args.val_path or run_args.get("val_path")):
        raise UserError(f"--task calibrate: {checkpoint} comes from a run without a val split to fit on: pass --val_path "
                        "DIR (labelled images the model was not trained on)")
    folder = split_path(args.replace(task="val"), run_args)
    image_set = scan_split(folder, class_names=meta.class_names, what="val set",
                           reading=source_options(args, run_args)).as_task(meta.task_type, MODEL_TASK_HINT)
    report_skipped(image_set.skipped, f"val set {folder}")
    out = Run(output_folder(str(checkpoint.parent), "calibrate"))
    out.write_yaml(RunFolder.ARGS, args_to_dict(args) | {"split": str(folder), "images": len(image_set.samples),
                                                        "checkpoint": str(checkpoint)})
    print(f"refitting {checkpoint} on the val set {folder} ({len(image_set.samples)} images)", flush=True)
    return MemberRefit(checkpoint, backend, image_set.samples, meta, out, args)


def calibrate_task(args: Options) -> dict[str, Any]:
    """--task calibrate: refit each model of --save_path (REFIT_STEPS) and rewrite its checkpoint.

    Returns:
        {"output": the first model's output folder, "models": {checkpoint: its new ModelMeta}}.
    """
    for flag in ("visual", "tsne"):
        if getattr(args, flag):
            LOGGER.warning("--%s does nothing with --task calibrate", flag)
    device = model_device(args.device, "torch")
    done: dict[str, ModelMeta] = {}
    outputs = []
    for path in kfold_members(args.save_path):
        member = member_refit(path, args, device)
        for step in REFIT_STEPS:
            member.meta = step(member)
        ckpt = load_checkpoint(member.checkpoint)  # as it is on disk: only the metadata changes
        ckpt.meta = member.meta
        ckpt.extra = {**ckpt.extra, **member.extra}
        Run(member.checkpoint.parent).save(member.checkpoint.name, ckpt)
        print(f"rewrote {member.checkpoint} (the weights unchanged); results: {member.out.path}", flush=True)
        stale = stale_exports(member.checkpoint.parent) if member.checkpoint.name == RunFolder.BEST else []
        if stale:
            flags = sorted({fmt.flag for fmt in FORMATS.values() for f in stale if f.name in fmt.run_files()})
            LOGGER.warning("files export.py made before still carry the old temperature and rejection: %s; export them again: "
                           "python export.py --save_path %s --export %s", ", ".join(map(str, stale)),
                           member.checkpoint.parent, " ".join(flags))
        done[str(member.checkpoint)] = member.meta
        outputs.append(member.out.path)
    for path in args.save_path:
        if Path(path).is_dir() and RunFolder(path).is_kfold and (Path(path) / RunFolder.OOF).is_file():
            LOGGER.warning("%s still holds the out-of-fold probabilities at the folds' earlier temperatures (what "
                           "--task label_issues reads)", Path(path) / RunFolder.OOF)
    return {"output": outputs[0], "models": done}
