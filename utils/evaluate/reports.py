"""What metrice.py writes and prints about a split's predictions: tables, CSVs, plots, the pycm report.

    per_class = write_reports(out, split.targets, split.probs, class_names, results, "runs/exp, test")
    write_visual(out, split, class_names, spec)        # correct.csv, incorrect.csv, incorrect.png
    write_tsne(out, split, class_names, "runs/exp")    # tsne.csv, tsne.png
    print_calibration(section); write_calibration(out, curves, section, "runs/exp, test")   # calibration.png

Every file goes through a utils.core.run.Run (the output folder), so a distributed run writes
on rank 0 only. The metrics themselves are computed in utils.evaluate.metrics (calibration:
utils.evaluate.split.score_calibration).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from prettytable import PrettyTable

from utils.core.run import Run
from utils.core.schema import PreprocessSpec
from utils.core.task import MULTILABEL
from utils.data.decode import load_image
from utils.data.transforms_np import image_transform
from utils.draw.figures import plot_confusion_matrix, plot_embedding, plot_gallery, plot_reliability
from utils.evaluate.metrics import (METRIC_LABELS, MULTILABEL_PER_CLASS_FIELDS, PER_CLASS_FIELDS, confusion_matrix_from,
                                    most_confused_pairs, multilabel_metrics, per_class_metrics, pycm_matrix)
from utils.evaluate.split import SplitPredictions

LOGGER = logging.getLogger(__name__)

GALLERY_IMAGES = 32        # most confident mistakes drawn by --visual
CONFUSED_PAIRS = 20        # rows of confused_pairs.csv
TSNE_MAX_POINTS = 10_000   # t-SNE is quadratic-ish: a seeded sample beyond this
TOPK = 5                   # classes listed per image by --visual


def fmt(value: Any) -> Any:
    """A table cell: floats to 4 decimals, nan as '-'."""
    if isinstance(value, float):
        return "-" if np.isnan(value) else f"{value:.4f}"
    return value


def print_overall(results: dict[str, dict[str, float]]) -> None:
    """The overall metrics, one column per model (the ensemble's first)."""
    table = PrettyTable(["metric", *results])
    table.title = "overall"
    keys = [k for k in METRIC_LABELS if any(k in r for r in results.values())]
    for key in keys:
        cells = [int(r[key]) if key == "images" else fmt(r.get(key, float("nan"))) for r in results.values()]
        table.add_row([METRIC_LABELS[key], *cells])
    table.align["metric"] = "l"
    print(table, flush=True)


def print_per_class(rows: list[dict[str, Any]], title: str) -> None:
    """The per-class metrics table (with each class's support)."""
    fields = MULTILABEL_PER_CLASS_FIELDS if rows and "ap" in rows[0] else PER_CLASS_FIELDS
    table = PrettyTable(fields)
    table.title = title
    for row in rows:
        table.add_row([fmt(row[f]) if f != "class" else str(row[f]) for f in fields])
    table.align["class"] = "l"
    print(table, flush=True)


def topk_columns(probs: np.ndarray, class_names: list[str]) -> tuple[list[str], list[list[Any]]]:
    """The header and cells of the top-5 (class, probability) columns of each row."""
    k = min(TOPK, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    header = [h for j in range(1, k + 1) for h in (f"top{j}_class", f"top{j}_probability")]
    cells = [[v for c in row_order for v in (class_names[c], f"{probs[r, c]:.6f}")] for r, row_order in enumerate(order)]
    return header, cells


def write_visual(out: Run, split: SplitPredictions, class_names: list[str], spec: PreprocessSpec) -> tuple[int, int]:
    """correct.csv and incorrect.csv (most confident first) and a gallery of the worst mistakes.

    Returns:
        (correct, incorrect) counts.
    """
    targets, probs = split.targets, split.probs
    preds = probs.argmax(axis=1)
    confidence = probs.max(axis=1)
    top_header, top_cells = topk_columns(probs, class_names)
    header = ["path", "true_class", "predicted_class", "probability", "true_class_probability", *top_header]
    counts = []
    for name, wanted in (("correct.csv", True), ("incorrect.csv", False)):
        idx = [r for r in np.argsort(-confidence, kind="stable") if (preds[r] == targets[r]) == wanted]
        out.write_csv(name, header, [[split.path(r), class_names[targets[r]], class_names[preds[r]],
                                        f"{confidence[r]:.6f}", f"{probs[r, targets[r]]:.6f}", *top_cells[r]] for r in idx])
        counts.append(len(idx))
    mistakes = [r for r in np.argsort(-confidence, kind="stable") if preds[r] != targets[r]][:GALLERY_IMAGES]
    if mistakes:
        transform = image_transform(spec)
        images = [transform(load_image(split.path(r), spec.channels)) for r in mistakes]
        titles = [f"{Path(split.path(r)).name[:22]}\ntrue {class_names[targets[r]][:16]}\n"
                  f"pred {class_names[preds[r]][:16]} {confidence[r]:.2f}" for r in mistakes]
        out.savefig(plot_gallery(images, titles, f"the {len(mistakes)} most confident mistakes"), "incorrect.png")
    return counts[0], counts[1]


def write_tsne(out: Run, split: SplitPredictions, class_names: list[str], label: str) -> None:
    """A 2-D t-SNE of the penultimate features: tsne.csv (one point per image) and tsne.png."""
    from sklearn.manifold import TSNE

    feats, targets = split.features, split.targets

    n = len(feats)
    if n < 4:
        LOGGER.warning("--tsne: %d image(s) are too few for a t-SNE; skipped", n)
        return
    rows = np.arange(n)
    if n > TSNE_MAX_POINTS:
        rows = np.sort(np.random.default_rng(0).choice(n, TSNE_MAX_POINTS, replace=False))
        LOGGER.info("--tsne: a random sample of %d of the %d images", TSNE_MAX_POINTS, n)
    perplexity = float(min(30.0, max(1.0, (len(rows) - 1) / 3)))
    points = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=0).fit_transform(
        feats[rows].astype(np.float64))
    out.write_csv("tsne.csv", ["path", "class", "x", "y"],
              [[split.path(r), class_names[targets[r]], f"{x:.6f}", f"{y:.6f}"] for r, (x, y) in zip(rows, points)])
    out.savefig(plot_embedding(points, targets[rows], class_names,
                               f"t-SNE of the penultimate features ({label}, {len(rows)} images, {feats.shape[1]}-d)"),
                "tsne.png")


def write_reports(out: Run, targets: np.ndarray, probs: np.ndarray, class_names: list[str],
                  results: dict[str, dict[str, float]], title: str) -> list[dict[str, Any]]:
    """Every file of the final prediction (the ensemble's, or the single run's); returns the per-class rows."""
    confusion = confusion_matrix_from(targets, probs.argmax(axis=1), len(class_names))
    cm = pycm_matrix(confusion, class_names)
    per_class = per_class_metrics(targets, probs, class_names, cm)

    labels = list(results)
    out.write_csv("metrics.csv", ["metric", *(["value"] if len(labels) == 1 else labels)],
              [[key, *[(int(r[key]) if key == "images" else r.get(key, float("nan"))) for r in results.values()]]
               for key in METRIC_LABELS if any(key in r for r in results.values())])
    out.write_csv("per_class.csv", PER_CLASS_FIELDS, [[row[f] for f in PER_CLASS_FIELDS] for row in per_class])
    out.write_csv("confusion_matrix.csv", ["true \\ predicted", *class_names],
              [[name, *confusion[i].tolist()] for i, name in enumerate(class_names)])
    totals = confusion.sum(axis=1, keepdims=True)
    normalized = np.divide(confusion, totals, out=np.zeros(confusion.shape), where=totals > 0)
    out.write_csv("confusion_matrix_normalized.csv", ["true \\ predicted", *class_names],
              [[name, *[f"{v:.6f}" for v in normalized[i]]] for i, name in enumerate(class_names)])
    pairs = most_confused_pairs(confusion, class_names, CONFUSED_PAIRS)
    out.write_csv("confused_pairs.csv", ["true_class", "predicted_class", "count", "fraction_of_true_class"],
              [[p["true"], p["predicted"], p["count"], f"{p['fraction_of_true']:.6f}"] for p in pairs])
    out.savefig(plot_confusion_matrix(confusion, class_names, False, f"confusion matrix: {title}"), "confusion_matrix.png")
    out.savefig(plot_confusion_matrix(confusion, class_names, True, f"confusion matrix, rows normalised: {title}"),
                "confusion_matrix_normalized.png")
    status = cm.save_html(str(out / "pycm_report"))  # pycm adds .html
    if not status.get("Status", False):
        LOGGER.warning("pycm report not written: %s", status.get("Message"))
    if pairs:
        shown = ", ".join(f"{p['true']} -> {p['predicted']} ({p['count']})" for p in pairs[:5])
        print(f"most confused: {shown}", flush=True)
    return per_class


UNCALIBRATED = ("uncalibrated (temperature 1): main.py fits one at the end of training; metrice.py --task calibrate "
                "fits one for this run")
CALIBRATION_ROWS = {"ece": "ECE (15 equal-width bins)", "nll": "negative log-likelihood", "brier": "Brier score"}


def temperature_label(temperature: Any) -> str:
    """'temperature 1.52', 'temperatures per class', or 'temperatures per model' for a table column."""
    if isinstance(temperature, dict):
        return "temperatures per model"
    return "temperatures per class" if isinstance(temperature, list) else f"temperature {temperature:.4g}"


def print_calibration(section: dict[str, Any]) -> None:
    """The calibration table (metrice.py): ECE, NLL and Brier score before (temperature 1) and after
    (the stored temperature), or the line that says the model is uncalibrated.

    Args:
        section: utils.evaluate.split.score_calibration's results.json section.
    """
    table = PrettyTable(["metric", "before (temperature 1)", f"after ({temperature_label(section['temperature'])})"])
    table.title = "calibration"
    for key, label in CALIBRATION_ROWS.items():
        table.add_row([label, fmt(section[f"{key}_before"]), fmt(section[f"{key}_after"])])
    table.align["metric"] = "l"
    print(table, flush=True)
    if not section["calibrated"]:
        print(UNCALIBRATED, flush=True)
    elif isinstance(section["temperature"], (list, dict)):
        print(f"temperature: {section['temperature']}", flush=True)


def write_calibration(out: Run, curves: dict[str, dict[str, Any]], section: dict[str, Any], title: str) -> None:
    """calibration.png: the reliability diagram before and after calibration (one curve when the
    model is uncalibrated: both are the same)."""
    label = temperature_label(section["temperature"])
    shown = ({"before (temperature 1)": curves["before"], f"after ({label})": curves["after"]} if section["calibrated"]
             else {"uncalibrated (temperature 1)": curves["after"]})
    out.savefig(plot_reliability(shown, f"reliability: {title}"), "calibration.png")


def write_multilabel_reports(out: Run, split: SplitPredictions, thresholds: Sequence[float], class_names: list[str],
                             results: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """A multi-label model's files: metrics.csv, per_class.csv (AP, precision, recall, F1 at each
    class's threshold, support) and predictions.csv (each image's true and predicted labels).

    Returns:
        The per-class rows.
    """
    _, per_class = multilabel_metrics(split.targets, split.probs, thresholds, class_names)
    labels = list(results)
    out.write_csv("metrics.csv", ["metric", *(["value"] if len(labels) == 1 else labels)],
                  [[key, *[(int(r[key]) if key == "images" else r.get(key, float("nan"))) for r in results.values()]]
                   for key in METRIC_LABELS if any(key in r for r in results.values())])
    out.write_csv("per_class.csv", MULTILABEL_PER_CLASS_FIELDS,
                  [[row[f] for f in MULTILABEL_PER_CLASS_FIELDS] for row in per_class])
    decided = MULTILABEL.decide(split.probs, thresholds)

    def names(mask: np.ndarray) -> str:
        return "|".join(class_names[c] for c in np.flatnonzero(mask))

    out.write_csv("predictions.csv", ["path", "true_labels", "predicted_labels", "exact", *[f"p_{n}" for n in class_names]],
                  [[split.path(r), names(split.targets[r]), names(decided[r]), int((decided[r] == split.targets[r]).all()),
                    *[f"{v:.6f}" for v in split.probs[r]]] for r in range(len(split.keep))])
    return per_class


def write_speed(out: Run, rows: list[dict[str, Any]], title: str, extra: dict[str, Any]) -> None:
    """The speed table (metrice.py --task fps), a line per model and batch size with its faster
    memory format, and fps.csv (with the `extra` columns, e.g. device and precision)."""
    table = PrettyTable(["run", "batch", "memory format", "images/s", "ms/image", "batch ms (median)", "p10-p90 ms", "iterations"])
    table.title = title
    for r in rows:
        table.add_row([r["run"], r["batch_size"], r["memory_format"] + (" *" if r["fastest"] and r["memory_format"] != "-" else ""),
                       f"{r['images_per_s']:.1f}", f"{r['ms_per_image']:.3f}", f"{r['batch_ms_median']:.3f}",
                       f"{r['batch_ms_p10']:.2f}-{r['batch_ms_p90']:.2f}", r["iterations"]])
    print(table, flush=True)
    print("the model alone: random uint8 batches already on the device (no decoding or resizing), the median batch "
          "time after a warm-up; * = the faster memory format", flush=True)
    for r in rows:
        if r["fastest"]:
            layout = f" ({r['memory_format']})" if r["memory_format"] != "-" else ""
            print(f"{r['run']}: batch {r['batch_size']}: {r['images_per_s']:.1f} images/s, {r['ms_per_image']:.3f} ms/image"
                  f"{layout}", flush=True)
    fields = ["run", "batch_size", "memory_format", "fastest", "images_per_s", "ms_per_image", "batch_ms_median",
              "batch_ms_p10", "batch_ms_p90", "iterations"]
    out.write_csv("fps.csv", fields + list(extra), [[r.get(f) for f in fields] + list(extra.values()) for r in rows])

