"""metrice.py --task label_issues: which images of a run's data are probably mislabeled (confident
learning, utils.evaluate.label_issues), and the files that say so.

    python main.py --save_path runs/cv --kfold 5 ...                  # out-of-fold probabilities: runs/cv/oof.csv
    python metrice.py --save_path runs/cv --task label_issues --write_fixed_list

Where the probabilities come from: a --kfold run's oof.csv (every training image, each predicted by
the fold model that did not train on it); for any other run, its val and test splits predicted by
its best.pt (the same path as --task test), so only those images are checked and the training
images need a --kfold run. Both are out-of-sample, as confident learning needs.

Everything goes into <run>/label_issues/, replaced by each call (so label_issues/fixed_train.csv
stays where a command line names it):

    label_issues.csv    the flagged images only, most suspicious first: path,given,suggested,score,
                        suggested_probability,split,fold (score = the probability of the given label)
    label_issues.png    the first GALLERY_IMAGES suspects: image, given -> suggested, score
    label_issues.html   one self-contained page (thumbnails inline): the suspects with their top
                        probabilities, and the estimated noise
    per_class.csv       class,images,threshold,flagged,estimated_wrong,estimated_noise_rate
    joint.csv           the estimated joint Q[given][true] (sums to 1)
    noise_matrix.csv    P(given label | true label): each column of the joint divided by its total
    probabilities.csv   a run without --kfold: the probabilities used (oof.csv's format, fold 0)
    fixed_<split>.csv   --write_fixed_list: every checked image of the split, the flagged ones with
                        their suggested label; a list main.py reads (--train_path, --val_path ...)
    args.yaml           the options, where the probabilities came from, the counts
"""
from __future__ import annotations

import base64
import html
import importlib.util
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageOps
from prettytable import PrettyTable

from utils.core.config import args_to_dict
from utils.core.files import atomic_write_text
from utils.core.log import UserError
from utils.core.run import Run, RunFolder
from utils.core.task import MULTICLASS
from utils.data.containers import sample_exists
from utils.data.decode import load_image
from utils.data.imageset import report_skipped
from utils.data.lists import write_list
from utils.data.sources import SourceOptions, scan_split, source_options, split_exists
from utils.draw.figures import plot_gallery
from utils.evaluate.label_issues import LabelIssues, find_label_issues
from utils.evaluate.oof import OofTable, read_oof, write_oof
from utils.evaluate.split import predict_split
from utils.infer.backends import results_folder

LOGGER = logging.getLogger(__name__)

GALLERY_IMAGES = 32     # suspects drawn in label_issues.png
HTML_SUSPECTS = 300     # suspects shown (with thumbnails) in label_issues.html; label_issues.csv has them all
THUMBNAIL = 96          # pixels, the longer side of a thumbnail
TOP_CLASSES = 3         # probabilities shown per suspect in the page
ISSUE_COLUMNS = ["path", "given", "suggested", "score", "suggested_probability", "split", "fold"]
KFOLD_HINT = "python main.py --save_path RUN --kfold 5 ... (then metrice.py --save_path RUN --task label_issues)"
# The files of an earlier call that this one may not write again (the rest are always rewritten).
# What one call writes and another may not: removed before each call (only these names: a file of the
# user's in label_issues/, e.g. an edited copy of a fixed list under another name, is never touched).
OPTIONAL_FILES = ("probabilities.csv", "label_issues.png", "fixed_train.csv", "fixed_val.csv", "fixed_test.csv")


@dataclass
class CheckedImages:
    """The images checked, their given labels and out-of-sample probabilities (an OofTable), the
    split of each row (train for a --kfold run's rows; val, test), and where they came from."""

    table: OofTable
    splits: list[str]
    source: str
    kfold: bool


def label_issues_run(task: str, save_path: list[str] | None, weight: list[str] | None, write_fixed_list: bool) -> str | None:
    """Check the flags of --task label_issues; the --kfold run whose oof.csv it reads (None: predict val and test).

    Raises:
        UserError: --write_fixed_list with another task; a --kfold run among several --save_path.
    """
    if write_fixed_list and task != "label_issues":
        raise UserError(f"--write_fixed_list goes with --task label_issues, not --task {task}")
    if task != "label_issues" or weight or not save_path or not RunFolder(save_path[0]).is_kfold:
        return None
    if len(save_path) > 1:
        raise UserError(f"--task label_issues reads the out-of-fold probabilities of one --kfold run: pass "
                        f"--save_path {save_path[0]} alone")
    return save_path[0]


def kfold_images(run: str | Path) -> CheckedImages:
    """A --kfold run's oof.csv: every training image, out of fold.

    Raises:
        UserError: no oof.csv yet (the folds are unfinished), or an empty one.
    """
    path = RunFolder(run) / RunFolder.OOF
    if not path.is_file():
        raise UserError(f"--task label_issues: {run} is a --kfold run without {RunFolder.OOF}: its folds are unfinished; "
                        f"resume it with `python main.py --save_path {run} --resume`, then run this again")
    table = read_oof(path)
    if not table.paths:
        raise UserError(f"{path} holds no image: nothing to check")
    missing = [p for p in table.paths if not sample_exists(p)]
    if len(missing) == len(table.paths):  # relative paths, read from another folder than main.py ran in
        raise UserError(f"{path}: none of its images is found from here (the first: {missing[0]}); its paths are as "
                        "main.py was given them: run metrice.py from the folder main.py ran in")
    if missing:
        LOGGER.warning("%d image(s) of %s are gone (the first: %s): they are checked but cannot be shown",
                       len(missing), path, missing[0])
    return CheckedImages(table, ["train"] * len(table.paths), f"the out-of-fold probabilities of {path}", True)


def checked_splits(flags: dict[str, str | None], run_args: dict[str, Any]) -> dict[str, Path]:
    """The val and test splits to check: each flag, else the run's own path (one that is gone is skipped).

    Raises:
        UserError: a split named by a flag that does not exist; neither split to check.
    """
    splits = {}
    for split, given in flags.items():
        value = given if given is not None else run_args.get(f"{split}_path")
        if not value:
            continue
        if not split_exists(value):
            if given is not None:
                raise UserError(f"--{split}_path {value} does not exist")
            LOGGER.warning("the run's %s split %s is gone: not checked", split, value)
            continue
        splits[split] = Path(value)
    if not splits:
        raise UserError("--task label_issues: the run has neither a val nor a test split to check (pass --val_path or "
                        f"--test_path); to check its training images, train with --kfold: {KFOLD_HINT}")
    return splits


def predicted_images(ensemble: Any, class_names: list[str], splits: dict[str, Path], reading: SourceOptions,
                     batch_size: int, workers: int, tta: bool, device: Any) -> CheckedImages:
    """The val and test splits predicted by the run's model(s), as metrice.py --task val/test does.

    Raises:
        UserError: a multilabel model.
    """
    if ensemble.meta.task_type.multilabel:
        raise UserError("--task label_issues looks for images whose one label is wrong: not for a multilabel model "
                        "(metrice.py --task test writes each image's labels in predictions.csv)")
    tables, names = [], []
    for split, folder in splits.items():
        image_set = scan_split(folder, class_names=ensemble.class_names, what=f"{split} set", reading=reading)
        image_set = image_set.as_task(MULTICLASS, "check it with a multiclass list (one label per image)")
        report_skipped(image_set.skipped, f"{split} set {folder}")
        predicted = predict_split(ensemble, image_set.samples, batch_size, workers, tta, device, False, split)
        paths = [predicted.path(r) for r in range(len(predicted.keep))]
        tables.append(OofTable(paths, predicted.targets, np.zeros(len(paths)), predicted.probs, list(class_names)))
        names += [split] * len(paths)
    source = " and ".join(f"{s} ({f})" for s, f in splits.items()) + f" predicted by {', '.join(m.name for m in ensemble.members)}"
    return CheckedImages(OofTable.concat(tables), names, source, False)


def label_issues_task(args: Any, load_models: Callable[[Any], tuple[Any, list[str], Any]]) -> dict[str, Any]:
    """metrice.py --task label_issues: a --kfold run's oof.csv (args.oof_run), else the val and test
    splits of the run(s) predicted by the models `load_models(args)` returns; the report written.

    Returns:
        {"output", "checked", "issues", "noise_rate", "found": LabelIssues, "images": CheckedImages}.
    """
    for flag in ("visual", "tsne"):
        if args.get(flag):
            LOGGER.warning("--%s does nothing with --task label_issues (label_issues.png shows the suspects)", flag)
    info = args_to_dict(args)
    if args.oof_run:
        folder = results_folder([args.oof_run], RunFolder.LABEL_ISSUES_DIR, "--save_path")
        return report_label_issues(folder, kfold_images(args.oof_run), args.write_fixed_list, info)
    folder = results_folder(args.save_path, RunFolder.LABEL_ISSUES_DIR, "--weight" if args.weight else "--save_path")
    ensemble, class_names, device = load_models(args)
    run_args = ensemble.members[0].run_args
    splits = checked_splits({s: args.get(f"{s}_path") for s in ("val", "test")}, run_args)
    batch_size = args.batch_size or max(1, int(run_args.get("batch_size") or 32))
    images = predicted_images(ensemble, class_names, splits, source_options(args, run_args), batch_size, args.workers, args.test_tta, device)
    return report_label_issues(folder, images, args.write_fixed_list, info)


def report_label_issues(folder: Path, images: CheckedImages, write_fixed: bool, info: dict[str, Any]) -> dict[str, Any]:
    """Find the label issues of the checked images and write every file of the module docstring into `folder`."""
    table = images.table
    found = find_label_issues(table.labels, table.probs)
    out = Run(folder)
    for stale in OPTIONAL_FILES:  # an earlier call's, not this one's
        (folder / stale).unlink(missing_ok=True)
    names = table.class_names
    out.write_csv("label_issues.csv", ISSUE_COLUMNS, [
        [table.paths[r], names[table.labels[r]], names[s], f"{found.scores[r]:.6f}", f"{table.probs[r, s]:.6f}",
         images.splits[r], int(table.folds[r]) if images.kfold else ""] for r, s in zip(found.issues, found.suggested)])
    write_noise(out, found, table)
    if not images.kfold:
        write_oof(folder / "probabilities.csv", table)
    fixed = write_fixed_lists(folder, images, found) if write_fixed else []
    write_gallery(out, images, found)
    atomic_write_text(folder / "label_issues.html", issues_page(images, found))
    summary = {"source": images.source, "checked": len(table.paths), "issues": int(len(found.issues)),
               "estimated_noise_rate": round(found.noise_rate, 6), "fixed_lists": [str(p) for p in fixed]}
    out.write_yaml(RunFolder.ARGS, {"args": info, **summary})
    print_summary(images, found, folder, fixed)
    return {"output": folder, "checked": len(table.paths), "issues": len(found.issues), "noise_rate": found.noise_rate,
            "found": found, "images": images}


def write_noise(out: Run, found: LabelIssues, table: OofTable) -> None:
    """per_class.csv (each given class: images, threshold, flagged, estimated wrong), joint.csv (Q) and
    noise_matrix.csv (P(given | true): each column of Q over its total)."""
    flagged, wrong = found.issue_counts(table.labels), found.estimated_wrong
    out.write_csv("per_class.csv", ["class", "images", "threshold", "flagged", "estimated_wrong", "estimated_noise_rate"],
                  [[name, int(n), f"{t:.6f}", int(f), int(w), f"{w / n:.6f}" if n else ""] for name, n, t, f, w in
                   zip(table.class_names, found.given_counts, found.thresholds, flagged, wrong)])
    for name, matrix in (("joint.csv", found.joint), ("noise_matrix.csv", found.noise_matrix())):
        out.write_csv(name, ["given \\ true", *table.class_names],
                      [[c, *[f"{v:.6f}" for v in row]] for c, row in zip(table.class_names, matrix)])


def write_fixed_lists(folder: Path, images: CheckedImages, found: LabelIssues) -> list[Path]:
    """fixed_<split>.csv: every checked image of each split with its label, the suggested one for
    the flagged images; paths relative to the list (utils.data.lists.write_list), so main.py reads it as it is."""
    table = images.table
    labels = table.labels.copy()
    labels[found.issues] = found.suggested
    written = []
    for split in dict.fromkeys(images.splits):
        path = folder / f"fixed_{split}.csv"
        write_list(path, [(Path(table.paths[r]), [table.class_names[labels[r]]])
                          for r in range(len(labels)) if images.splits[r] == split], folder)
        written.append(path)
    return written


def thumbnail(path: str, size: int = THUMBNAIL) -> Image.Image | None:
    """A square RGB thumbnail of an image file (None when it cannot be read now)."""
    try:
        return ImageOps.pad(load_image(path), (size, size), color=(255, 255, 255))
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        LOGGER.warning("%s: cannot be shown (%s)", path, err)
        return None


def write_gallery(out: Run, images: CheckedImages, found: LabelIssues) -> None:
    """label_issues.png: the first GALLERY_IMAGES suspects, each titled with given -> suggested and its score."""
    if importlib.util.find_spec("matplotlib") is None:  # a deployment install (requirements/runtime.txt)
        LOGGER.warning("label_issues.png not drawn: it needs matplotlib (pip install matplotlib)")
        return
    table = images.table
    shown, titles = [], []
    for r, s in zip(found.issues[:GALLERY_IMAGES], found.suggested[:GALLERY_IMAGES]):
        thumb = thumbnail(table.paths[r])
        if thumb is not None:
            shown.append(np.asarray(thumb).transpose(2, 0, 1))
            titles.append(f"{Path(table.paths[r]).name[:22]}\n{table.class_names[table.labels[r]][:14]} -> "
                          f"{table.class_names[s][:14]}\nscore {found.scores[r]:.3f}")
    if shown:
        out.savefig(plot_gallery(shown, titles, f"the {len(shown)} most suspicious labels (given -> suggested, score = "
                                 "p(given))"), "label_issues.png")


def data_uri(image: Image.Image | None) -> str:
    """An image as a PNG data: URI (an empty string for None)."""
    if image is None:
        return ""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


PAGE_STYLE = ("body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em}"
              "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:middle}"
              "th{background:#f3f3f3}.given{color:#b00}.suggested{color:#070;font-weight:bold}"
              ".note{background:#fff6d6;padding:.5em 1em;border-left:4px solid #e0b000}td.num{text-align:right}")


def issues_page(images: CheckedImages, found: LabelIssues) -> str:
    """label_issues.html: the summary, the suspects (thumbnail, path, given, suggested, score, top
    probabilities) and the estimated noise (per class, and the joint); one file, no network."""
    table, esc = images.table, html.escape
    names = table.class_names
    n, k = len(table.paths), len(found.issues)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>label issues</title><style>{PAGE_STYLE}</style>"
             f"</head><body><h1>Label issues</h1><p id='summary'>{n} images checked ({esc(images.source)}): <b>{k}</b> "
             f"flagged as probably mislabeled ({k / max(n, 1):.1%}); estimated noise rate {found.noise_rate:.1%}.</p>"]
    if not images.kfold:
        parts.append(f"<p class='note' id='kfold-note'>Training images are not checked: they need out-of-fold "
                     f"probabilities, <code>{esc(KFOLD_HINT)}</code>.</p>")
    parts.append(f"<h2>Suspects</h2><p>Most suspicious first; score = the probability of the given label (lower = more "
                 f"suspicious).{f' The first {HTML_SUSPECTS} of {k}; label_issues.csv lists all.' if k > HTML_SUSPECTS else ''}"
                 "</p><table id='suspects'><thead><tr><th>#</th><th>image</th><th>path</th><th>split</th><th>given</th>"
                 "<th>suggested</th><th>score</th><th>top probabilities</th></tr></thead><tbody>")
    for rank, (r, s) in enumerate(zip(found.issues[:HTML_SUSPECTS], found.suggested[:HTML_SUSPECTS]), start=1):
        top = np.argsort(-table.probs[r], kind="stable")[:TOP_CLASSES]
        tops = "<br>".join(f"{esc(names[c])} {table.probs[r, c]:.3f}" for c in top)
        parts.append(f"<tr class='suspect'><td class='num'>{rank}</td><td><img alt='' src='{data_uri(thumbnail(table.paths[r]))}'>"
                     f"</td><td class='path'>{esc(table.paths[r])}</td><td>{esc(images.splits[r])}</td><td class='given'>"
                     f"{esc(names[table.labels[r]])}</td><td class='suggested'>{esc(names[s])}</td><td class='score num'>"
                     f"{found.scores[r]:.4f}</td><td class='top'>{tops}</td></tr>")
    parts.append("</tbody></table>")
    parts.append(noise_tables(found, table))
    parts.append("<p>Confident learning: Northcutt, Jiang &amp; Chuang, <i>Confident Learning: Estimating Uncertainty in "
                 "Dataset Labels</i>, JAIR 70 (2021).</p></body></html>\n")
    return "".join(parts)


def noise_tables(found: LabelIssues, table: OofTable) -> str:
    """The page's estimated noise: per given class (images, threshold, flagged, estimated wrong) and the joint."""
    esc, names = html.escape, table.class_names
    flagged, wrong = found.issue_counts(table.labels), found.estimated_wrong
    rows = "".join(f"<tr><td>{esc(name)}</td><td class='num'>{n}</td><td class='num'>{t:.4f}</td><td class='num'>{f}</td>"
                   f"<td class='num'>{w}</td></tr>" for name, n, t, f, w in
                   zip(names, found.given_counts, found.thresholds, flagged, wrong))
    joint = "".join(f"<tr><th>{esc(name)}</th>" + "".join(f"<td class='num'>{v:.4f}</td>" for v in row) + "</tr>"
                    for name, row in zip(names, found.joint))
    return ("<h2>Estimated noise</h2><table id='per-class'><thead><tr><th>given class</th><th>images</th><th>threshold</th>"
            "<th>flagged</th><th>estimated wrong</th></tr></thead><tbody>" + rows + "</tbody></table>"
            "<p>The joint of the given (rows) and the true (columns) labels; off the diagonal, the estimated noise.</p>"
            "<table id='joint'><thead><tr><th>given \\ true</th>" + "".join(f"<th>{esc(c)}</th>" for c in names) +
            "</tr></thead><tbody>" + joint + "</tbody></table>")


def print_summary(images: CheckedImages, found: LabelIssues, folder: Path, fixed: list[Path]) -> None:
    """The per-class table, the first suspects, the counts and where the files are."""
    table = images.table
    n, k = len(table.paths), len(found.issues)
    flagged = found.issue_counts(table.labels)
    summary = PrettyTable(["class", "images", "flagged", "estimated noise"])
    summary.title = "label issues per given class"
    for name, count, f, w in zip(table.class_names, found.given_counts, flagged, found.estimated_wrong):
        summary.add_row([name, int(count), int(f), f"{w / count:.1%}" if count else "-"])
    summary.align["class"] = "l"
    print(summary, flush=True)
    for r, s in list(zip(found.issues, found.suggested))[:10]:
        print(f"  {table.paths[r]}: {table.class_names[table.labels[r]]} -> {table.class_names[s]} "
              f"(score {found.scores[r]:.4f})", flush=True)
    print(f"checked {n} images ({images.source}): {k} flagged as probably mislabeled ({k / max(n, 1):.1%}); "
          f"estimated noise rate {found.noise_rate:.1%}", flush=True)
    if not images.kfold:
        print(f"training images are not checked: they need out-of-fold probabilities: {KFOLD_HINT}", flush=True)
    for path in fixed:
        print(f"--write_fixed_list: {path} (every checked image, the flagged ones relabelled)", flush=True)
    print(f"results: {folder} ({', '.join(sorted(p.name for p in folder.iterdir() if p.suffix != '.yaml'))})", flush=True)
