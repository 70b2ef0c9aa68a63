"""Cross-validation (main.py --kfold K): K models trained on K stratified folds of the training set
into one run folder, and every training image's out-of-fold class probabilities.

    folds = assign_folds(targets, class_names, k=5, seed=0)    # 1..K for each training image, in scan order
    summary = train_kfold(args, data, device, resume=False)    # main.py, after load_data and resolve_options

The run folder (its names: utils.core.run.RunFolder):

    RUN/args.yaml, label.txt   the run's options (with kfold) and its classes
    RUN/kfold.json             K, the seed, the training set (size, signature), each image's fold, the folds
                               finished with their metrics and, once all are, the best fold
    RUN/kfold_summary.csv      a row per fold (held-out, best val and test metrics), then mean and std rows
    RUN/results.json           its `kfold` section: each fold's results, their mean and std, the best fold
    RUN/oof.csv                every training image once, in training-set order: path,label,fold,<class>...
                               (utils.evaluate.oof; what metrice.py --task label_issues reads)
    RUN/fold1 ... foldK/       each a whole run folder (args.yaml, best.pt, last.pt, train.log ...) trained on
                               the other K-1 folds, with its own oof.csv: its held-out predictions

Why it is made so:
- The folds are sklearn's StratifiedKFold(shuffle=True, random_state=the run's seed) over the training
  set in scan order: each fold holds every class in the training set's proportion (the per-class
  counts of two folds differ by at most one) and the same seed and files give the same folds. A class
  with fewer images than folds cannot be in every fold: refused, naming it.
- Each fold's best.pt is chosen on the val split when there is one, as in any run. Without one, the
  held-out fold is the fold's validation set: its out-of-fold probabilities then also chose the epoch,
  a mild optimism that kfold.json and the log state.
- The mean/std is the whole training set's, computed once and shared by every fold: one preprocessing
  for the K models, which metrice.py and predict.py average as an ensemble.
- After a fold trains, its best.pt predicts its held-out images through the inference path
  (utils.evaluate.split.predict_split: no augmentation, the test-time transform, TenCrop with
  --test_tta), so oof.csv holds what that model gives at prediction time; the held-out metrics come
  from the trainer's own evaluation (the run's loss and --metrice, as validation computes them).
- Under torchrun every process trains every fold (the loop is collective, as training is); only the
  first process predicts the held-out images and writes files.
- --resume reads the folds from kfold.json (never recomputed), skips the finished folds, continues the
  unfinished one from its last.pt, and refuses a training set that changed since.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import yaml

from utils.core import distributed
from utils.core.checkpoint import load_checkpoint
from utils.core.config import args_to_dict
from utils.core.log import UserError, settle_heap
from utils.core.options import Options
from utils.core.run import Run, RunFolder, claimed_run
from utils.core.schema import Checkpoint
from utils.data.imageset import ImageSet
from utils.evaluate.oof import OofTable, read_oof, write_oof
from utils.evaluate.split import predict_split
from utils.evaluate.tasks import update_results
from utils.infer.ensemble import load_ensemble
from utils.train.saver import LOWER_IS_BETTER
from utils.train.setup import TrainData
from utils.train.trainer import Trainer, seed_everything

LOGGER = logging.getLogger(__name__)

VALIDATION_NOTES = {
    "val": "each fold's best.pt is chosen on the val split (--val_path), as in a run without --kfold",
    "held_out": "no val split: each fold's best.pt is chosen on its held-out fold, so the out-of-fold probabilities "
                "also chose the epoch (a mild optimism); pass --val_path for a choice independent of them",
}


# ------------------------------------------------------------------------------------ folds
def assign_folds(targets: Sequence[int], class_names: Sequence[str], k: int, seed: int) -> np.ndarray:
    """Stratified, seeded folds of a training set: sklearn's StratifiedKFold(n_splits=k, shuffle=True,
    random_state=seed) over the images in the order given.

    Args:
        targets: each image's class index (multiclass).
        class_names: the class names (for the error).
        k: the number of folds (2 or more).
        seed: the run's seed.

    Returns:
        (N,) int array: the fold (1..k) that holds each image out.

    Raises:
        UserError: a class with fewer images than folds (naming it and its count).
    """
    from sklearn.model_selection import StratifiedKFold

    targets = np.asarray(targets, dtype=np.int64)
    counts = np.bincount(targets, minlength=len(class_names))
    small = sorted((int(n), class_names[c]) for c, n in enumerate(counts) if 0 < n < k)
    if small:
        count, name = small[0]
        more = f" (and {len(small) - 1} more class(es) under {k})" if len(small) > 1 else ""
        fix = f"pass --kfold {count} or less" if count >= 2 else "add images to it"
        raise UserError(f"--kfold {k}: class '{name}' has {count} training image(s){more}, and stratified folds need at "
                        f"least {k} of each class: {fix}")
    folds = np.zeros(len(targets), dtype=np.int64)
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(targets)), targets), start=1):
        folds[held_out] = fold
    return folds


def best_fold(results: dict[int, dict[str, Any]], metric: str) -> dict[str, Any]:
    """The fold whose best.pt scored best on its held-out images: the highest --metrice (the lowest
    for loss); ties go to the lowest fold number.

    Args:
        results: fold -> its results (train_fold), each with "held_out" metrics.
        metric: the run's --metrice.

    Returns:
        {"fold", "metric", "value", "rule"}.
    """
    lower = metric in LOWER_IS_BETTER
    chosen: tuple[int, float] | None = None
    for fold in sorted(results):
        value = float(results[fold]["held_out"][metric])
        if chosen is None or (value < chosen[1] if lower else value > chosen[1]):
            chosen = (fold, value)
    assert chosen is not None, "no fold has finished"
    return {"fold": chosen[0], "metric": metric, "value": chosen[1],
            "rule": f"the {'lowest' if lower else 'highest'} of {len(results)} folds; ties go to the lowest fold"}


@dataclass
class KfoldPlan:
    """The folds of a --kfold run and how far it got: what kfold.json holds.

    Attributes:
        k, seed: the folds and the seed that made them.
        folds: the fold (1..k) holding out each training image, in scan order.
        paths: each training image's path, as the training split gives it.
        train_path, train_signature: the training set (its signature changes when a file does).
        validation: "val" (the val split chooses each best.pt) or "held_out" (the fold's own images do).
        metric: the run's --metrice.
        results: fold -> what train_fold returned, for the finished folds.
    """

    k: int
    seed: int
    folds: np.ndarray
    paths: list[str]
    train_path: str
    train_signature: str
    validation: str
    metric: str
    results: dict[int, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def create(cls, args: Options, data: TrainData) -> KfoldPlan:
        """New folds of the training set (assign_folds)."""
        folds = assign_folds(data.train_set.targets, data.class_names, int(args.kfold), int(args.random_seed))
        return cls(int(args.kfold), int(args.random_seed), folds, [p for p, _ in data.train_set.samples], str(args.train_path),
                   data.train_set.signature, "val" if data.val_set is not None else "held_out", str(args.metrice))

    @classmethod
    def read(cls, run: RunFolder, data: TrainData) -> KfoldPlan:
        """The folds kfold.json recorded, checked against the training set as it is now.

        Raises:
            UserError: an incomplete record; a training set or val split that changed since.
        """
        record = run.kfold_record()
        try:
            images = record["images"]
            plan = cls(int(record["k"]), int(record["seed"]), np.array([int(f) for _, f in images], dtype=np.int64),
                       [str(p) for p, _ in images], str(record["train_path"]), str(record.get("train_signature") or ""),
                       str(record["validation"]), str(record["metric"]),
                       {int(k): v for k, v in (record.get("folds") or {}).items()})
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{run / RunFolder.KFOLD}: an incomplete --kfold record ({type(err).__name__}: {err}); "
                            "start the cross-validation again in a new --save_path") from None
        now = [p for p, _ in data.train_set.samples]
        edited = plan.train_signature and data.train_set.signature and plan.train_signature != data.train_set.signature
        if now != plan.paths or edited:
            raise UserError(f"--resume: the training set {plan.train_path} changed since the --kfold run {run.path} started "
                            f"({len(plan.paths)} images then, {len(now)} now{', files edited' if edited else ''}): its folds no "
                            "longer fit; start a new cross-validation (without --resume)")
        if plan.validation != ("val" if data.val_set is not None else "held_out"):
            raise UserError(f"--resume: the --kfold run {run.path} was validated on "
                            f"{'the val split' if plan.validation == 'val' else 'its held-out folds'}, and the val split is "
                            f"{'gone' if plan.validation == 'val' else 'there now'}: restore it as it was, or start anew")
        return plan

    def held_out(self, fold: int) -> list[int]:
        """The indices of the training images fold `fold` holds out (in scan order)."""
        return np.flatnonzero(self.folds == fold).tolist()

    def trained_on(self, fold: int) -> list[int]:
        """The indices of the training images fold `fold` trains on: the other folds'."""
        return np.flatnonzero(self.folds != fold).tolist()

    def to_json(self) -> str:
        """kfold.json's text: the record, then one line per training image ([path, fold])."""
        record: dict[str, Any] = {
            "k": self.k, "seed": self.seed,
            "method": f"sklearn StratifiedKFold(n_splits={self.k}, shuffle=True, random_state={self.seed}) over the "
                      "training set in scan order",
            "train_path": self.train_path, "train_images": len(self.paths), "train_signature": self.train_signature,
            "validation": self.validation, "validation_note": VALIDATION_NOTES[self.validation], "metric": self.metric,
            "finished": sorted(self.results), "folds": {str(k): self.results[k] for k in sorted(self.results)},
        }
        if len(self.results) == self.k:
            record["best_fold"] = best_fold(self.results, self.metric)
        head = json.dumps(record, indent=2, ensure_ascii=False)[:-2]  # without the closing "\n}"
        rows = ",\n".join(f"    {json.dumps([p, int(f)], ensure_ascii=False)}" for p, f in zip(self.paths, self.folds))
        return f'{head},\n  "images": [\n{rows}\n  ]\n}}\n'


# ------------------------------------------------------------------------------------ training
def train_kfold(args: Options, data: TrainData, device: torch.device, resume: bool) -> dict[str, Any]:
    """main.py --kfold K: train (or, resumed, finish) every fold, then write oof.csv and the summary.

    Args:
        args: the run's resolved options (kfold, save_path: the run folder).
        data: the splits (load_data), the training set whole.
        device: where to train.
        resume: continue the --kfold run in args.save_path.

    Returns:
        {"run", "k", "folds": {fold: results}, "mean", "std" (per summary column), "best_fold", "oof"}.

    Raises:
        UserError: a multilabel run; a class with fewer images than folds; a resumed run whose data changed.
    """
    if data.task.multilabel:
        raise UserError("--kfold is for multiclass runs only: its folds are stratified by each image's one class and "
                        "oof.csv holds one label per image; train this multilabel set without --kfold")
    plan = None if resume else KfoldPlan.create(args, data)  # before the folder is claimed: a refusal leaves none
    with claimed_run(args.save_path, fresh=not resume) as run:
        plan = KfoldPlan.read(run, data) if plan is None else plan
        run.write_yaml(RunFolder.ARGS, args_to_dict(args) | {"save_path": str(run.path), "mean": list(data.spec.mean),
                                                             "std": list(data.spec.std)})
        run.write_lines(RunFolder.LABELS, data.class_names)
        run.write_text(RunFolder.KFOLD, plan.to_json())
    note = (f"--kfold {plan.k}: {len(plan.paths)} training images in {plan.k} stratified folds (seed {plan.seed}); "
            f"{VALIDATION_NOTES[plan.validation]}")
    if plan.validation == "held_out":  # the one case worth a warning: the choice of epoch saw the held-out images
        LOGGER.warning(note)
    else:
        print(note, flush=True)
    settle_heap()
    for fold in range(1, plan.k + 1):
        if fold in plan.results:
            print(f"fold {fold}/{plan.k}: finished before, kept ({run.fold(fold)})", flush=True)
            continue
        plan.results[fold] = train_fold(args, data, device, run, plan, fold)
        run.write_text(RunFolder.KFOLD, plan.to_json())
    return finish(run, plan, data.class_names)


def fold_resume_point(folder: Path, fold: int) -> Checkpoint | None:
    """The last.pt a fold continues from, None when it has none (it starts)."""
    last = RunFolder(folder).last
    if not last.is_file():
        return None
    ckpt = load_checkpoint(last, what=f"--resume: fold {fold}'s last checkpoint")
    if ckpt.kind != "last" or ckpt.train_state is None:
        raise UserError(f"{last} holds no training state ({ckpt.kind} checkpoint): fold {fold} cannot be resumed")
    return ckpt


def train_fold(args: Options, data: TrainData, device: torch.device, run: Run, plan: KfoldPlan, fold: int) -> dict[str, Any]:
    """Train one fold in run/fold<k> on the other folds' images (resuming its last.pt if it has one),
    then score best.pt on the held-out images, predict them (fold<k>/oof.csv) and test it.

    Returns:
        {"train_images", "held_out_images", "best": {epoch, metric, value}, "held_out": metrics, "test": metrics or None}.
    """
    held, trained = plan.held_out(fold), plan.trained_on(fold)
    held_out = data.train_set.subset(held)
    folder = run.fold(fold)
    resumed = fold_resume_point(folder, fold)
    print(f"\nfold {fold}/{plan.k}: trains on the other folds' {len(trained)} images and holds out {len(held)}; best.pt is "
          f"chosen on {'the val split' if plan.validation == 'val' else 'the held-out fold'}", flush=True)
    seed_everything(args.random_seed)  # each fold starts as a run of its own would: a resumed --kfold run trains it alike
    with claimed_run(folder, fresh=False) as fold_run:
        trainer = Trainer(args.replace(save_path=str(folder), fold=fold), data.fold(trained, held_out), fold_run, device,
                          resumed)
    try:
        best = trainer.fit()
        scores = trainer.score_best(held_out, "held-out")
        if fold_run.main:
            write_oof(folder / RunFolder.OOF, predict_held_out(folder, held_out, fold, args, device))
        distributed.any_true()  # the other processes wait for the first one's predictions
        test = trainer.test_best()
        trainer.write_results(best, test)  # the fold's results.json and results.png
    except BaseException as err:
        trainer.close_tracker()
        lost = distributed.lost_process_error(err, distributed.resume_command(run.path))
        if lost is not None:
            raise lost from None
        raise
    trainer.close_tracker(best | ({"test": test} if test is not None else {}))
    return {"train_images": len(trained), "held_out_images": len(held),
            "best": {"epoch": best["best_epoch"], "metric": best["best_metric"], "value": best["best_value"]},
            "held_out": scores, "test": test}


def predict_held_out(folder: Path, held_out: ImageSet, fold: int, args: Options, device: torch.device) -> OofTable:
    """A fold's best.pt on its held-out images, through the inference path (as predict.py and metrice.py
    would give them): the test-time transform, TenCrop with --test_tta."""
    ensemble = load_ensemble([folder], "torch", device)
    split = predict_split(ensemble, held_out.samples, args.batch_size, args.workers, args.test_tta, desc=f"fold {fold} held-out")
    paths = [split.path(row) for row in range(len(split.keep))]
    return OofTable(paths, split.targets, np.full(len(paths), fold), split.probs, list(held_out.class_names))


# ------------------------------------------------------------------------------------ results
def combine_oof(plan: KfoldPlan, tables: dict[int, OofTable]) -> OofTable:
    """The folds' held-out tables as one, its rows in training-set order. A fold's rows are matched
    in order to the images it holds out (a list file may name one file twice; an image that failed
    to decode has no row).

    Raises:
        UserError: a row that is not an image of its fold (a fold's oof.csv from another run).
    """
    order: list[int] = []
    for fold in sorted(tables):
        held, at = plan.held_out(fold), 0
        for path in tables[fold].paths:
            while at < len(held) and plan.paths[held[at]] != path:
                at += 1
            if at == len(held):
                raise UserError(f"fold{fold}/{RunFolder.OOF}: {path} is not an image fold {fold} holds out: this fold's "
                                "predictions are from another run; delete the fold's folder and resume")
            order.append(held[at])
            at += 1
    merged = OofTable.concat([tables[fold] for fold in sorted(tables)])
    rank = np.argsort(np.asarray(order), kind="stable")
    return OofTable([merged.paths[i] for i in rank], merged.labels[rank], merged.folds[rank], merged.probs[rank],
                    merged.class_names)


def summary_rows(plan: KfoldPlan) -> tuple[list[str], list[list[Any]]]:
    """kfold_summary.csv: a row per fold (its image counts, held-out acc and --metrice, best epoch and
    the val --metrice that chose it, test acc and --metrice when every fold has a test score), then
    the rows `mean` and `std` (the sample standard deviation, ddof=1, of the K folds' values).

    Returns:
        (the header, the rows).
    """
    metrics = list(dict.fromkeys(["acc", plan.metric]))
    results = [plan.results[fold] for fold in sorted(plan.results)]
    columns: dict[str, Any] = {"train_images": lambda r: r["train_images"], "held_out_images": lambda r: r["held_out_images"]}
    columns |= {f"held_out_{m}": (lambda r, m=m: r["held_out"][m]) for m in metrics}
    columns |= {"best_epoch": lambda r: r["best"]["epoch"], f"best_val_{plan.metric}": lambda r: r["best"]["value"]}
    if all(r.get("test") for r in results):
        columns |= {f"test_{m}": (lambda r, m=m: r["test"][m]) for m in metrics}
    rows = [[fold, *(get(r) for get in columns.values())] for fold, r in zip(sorted(plan.results), results)]
    values = np.array([[float(v) for v in row[1:]] for row in rows], dtype=np.float64)
    rows.append(["mean", *values.mean(axis=0).tolist()])
    rows.append(["std", *values.std(axis=0, ddof=1).tolist()])
    return ["fold", *columns], rows


def summary_table(header: list[str], rows: list[list[Any]]) -> str:
    """The summary as a person reads it: a row per column of kfold_summary.csv, a column per fold,
    then mean ± std."""
    from prettytable import PrettyTable

    folds, mean, std = rows[:-2], rows[-2], rows[-1]
    table = PrettyTable(["", *(f"fold{row[0]}" for row in folds), "mean ± std"])
    for col, name in enumerate(header[1:], start=1):
        digits = 1 if name.endswith(("images", "epoch")) else 4  # counts, or metrics
        table.add_row([name, *(f"{float(row[col]):.{digits if digits == 4 else 0}f}" for row in folds),
                       f"{mean[col]:.{digits}f} ± {std[col]:.{digits}f}"])
    table.align = "r"
    table.align[""] = "l"
    table.title = f"--kfold {len(folds)}: held-out, best val and test metrics of each fold"
    return table.get_string()


def finish(run: Run, plan: KfoldPlan, class_names: Sequence[str]) -> dict[str, Any]:
    """Every fold done: oof.csv (all folds' held-out predictions, in training-set order), the summary
    (kfold_summary.csv, printed) and the best fold."""
    if run.main:
        table = combine_oof(plan, {fold: read_oof(run.fold(fold) / RunFolder.OOF) for fold in range(1, plan.k + 1)})
        if table.class_names != list(class_names):
            raise UserError(f"the folds' {RunFolder.OOF} files name other classes than the run: start anew")
        write_oof(run / RunFolder.OOF, table)
    header, rows = summary_rows(plan)
    run.write_csv(RunFolder.KFOLD_SUMMARY, header, rows)
    print(summary_table(header, rows), flush=True)
    best = best_fold(plan.results, plan.metric)
    mean, std = dict(zip(header[1:], rows[-2][1:])), dict(zip(header[1:], rows[-1][1:]))
    if run.main:  # beside what metrice.py may add to this folder's results.json: the same file, its own section
        folds = {str(fold): result for fold, result in sorted(plan.results.items())}
        update_results(run.path, kfold={"k": plan.k, "metric": plan.metric, "folds": folds, "mean": mean, "std": std,
                                        "best_fold": best})
    print(f"best fold: fold{best['fold']} (held-out {best['metric']} {best['value']:.4f}, {best['rule']}): export.py and "
          f"serve.py use it for --save_path {run.path}; metrice.py and predict.py average all {plan.k} folds", flush=True)
    print(f"out-of-fold probabilities of the {len(plan.paths)} training images: {run / RunFolder.OOF}", flush=True)
    print(f"done: {run.path}", flush=True)
    return {"run": run.path, "k": plan.k, "folds": dict(plan.results), "mean": mean, "std": std, "best_fold": best,
            "oof": run / RunFolder.OOF}


def kfold_resume_source(path: Path, args: Options) -> tuple[dict[str, Any], Checkpoint | None]:
    """What main.py --resume continues a --kfold run from: the run's options (its args.yaml) and the
    checkpoint of one of its folds (the classes and mean/std the run trained with; None before any
    fold saved one).

    Args:
        path: --save_path.
        args: the command line's options (--kfold and --epoch, if given, must be the run's).

    Raises:
        UserError: --kfold on a run without it, or another --kfold or --epoch than the run's; an
            unreadable args.yaml; a run whose folds and results are all written (nothing to resume).
    """
    folder = RunFolder(path)
    if not folder.is_kfold:
        raise UserError(f"--kfold with --resume: {path} is not a --kfold run (no {RunFolder.KFOLD}); drop --kfold to resume "
                        "it as it was, or start the cross-validation without --resume")
    record = folder.kfold_record()
    try:
        saved = yaml.safe_load(folder.args_file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"{folder.args_file}: cannot read the run's options ({err}); the --kfold run cannot be resumed") from None
    if not isinstance(saved, dict):
        raise UserError(f"{folder.args_file}: not the options of a run; the --kfold run cannot be resumed")
    saved = {k: v for k, v in saved.items() if k not in ("mean", "std")}  # the preprocessing comes from the checkpoint
    for key in ("kfold", "epoch"):  # the folds, and the epochs every fold trains, stay the run's
        if key in args.get("explicit", ()) and args.get(key) != saved.get(key):
            raise UserError(f"--{key} {args.get(key)} with --resume: {path} is a --kfold run of --{key} {saved.get(key)}, "
                            f"which a resume keeps; drop --{key}")
    if (len(record.get("finished") or []) == record["k"] and (folder / RunFolder.OOF).is_file()
            and (folder / RunFolder.KFOLD_SUMMARY).is_file()):
        raise UserError(f"{path}: all {record['k']} folds of this --kfold run are finished ({RunFolder.KFOLD_SUMMARY}, "
                        f"{RunFolder.OOF}): nothing to resume")
    for fold in range(1, record["k"] + 1):
        for file in (RunFolder(folder.fold(fold)).last, RunFolder(folder.fold(fold)).best):
            if file.is_file():
                return saved, load_checkpoint(file, what=f"--resume: fold {fold}'s checkpoint")
    return saved, None
