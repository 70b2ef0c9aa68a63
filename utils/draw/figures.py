"""matplotlib figures of a run: the training curves, and metrice.py's figures (confusion matrix,
reliability diagram, a gallery of mistakes, t-SNE, the histograms of an unknown-image score).

    fig = plot_confusion_matrix(confusion, class_names, normalize=True)
    run.savefig(fig, "confusion_matrix.png")

Figures are made without pyplot (no global state: any thread, no closing), and matplotlib is
imported on first use. Every figure writes in DejaVu Sans with a CJK font behind it glyph by glyph
(utils.draw.fonts), so any class name shows. Images with text drawn by Pillow are utils.draw.labels.
"""
from __future__ import annotations
import math
from typing import TYPE_CHECKING, Any, Sequence
import numpy as np

from utils.draw.fonts import check_glyphs, configure_matplotlib

if TYPE_CHECKING:  # matplotlib and torch are imported where they are used: metrice.py draws without torch
    pass


def subplots(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """A matplotlib Figure and its axes, without pyplot: no global state, so figures can be drawn
    in any thread and need no closing; matplotlib is imported on first use (it takes a second)."""
    from matplotlib.figure import Figure

    configure_matplotlib()  # the font families, once per process
    figsize = kwargs.pop("figsize", None)
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def curve_panels(metrics: tuple[str, str] = ("acc", "mean_acc")) -> list[tuple[str, list[tuple[str, str]], str]]:
    """The training curves: (file name, [(train.log column, legend label)], y label) of loss, the two
    metrics and the learning rate."""
    return [
        ("loss.png", [("loss", "train"), ("test_loss", "val")], "loss"),
        ("acc.png", [(metrics[0], f"train {metrics[0]}"), (f"test_{metrics[0]}", f"val {metrics[0]}"),
                     (metrics[1], f"train {metrics[1]}"), (f"test_{metrics[1]}", f"val {metrics[1]}")],
         "accuracy" if metrics[0] == "acc" else "score"),
        ("lr.png", [("lr", "learning rate")], "learning rate"),
    ]


def draw_curves(ax: Any, rows: Sequence[dict[str, str]], keys: Sequence[tuple[str, str]], ylabel: str) -> None:
    """Each train.log column of `keys` against the epoch, on one axes."""
    for key, label in keys:
        pts = [(int(r["epoch"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 30 else None, markersize=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()


def offscreen_pyplot() -> Any:
    """pyplot on the Agg backend (PNG files, never a window), for a library that draws only through
    pyplot (tune.py's Optuna plots); the toolkit's own figures use `subplots`. Its figures must be closed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def plot_curves(rows: Sequence[dict[str, str]], metrics: tuple[str, str] = ("acc", "mean_acc")) -> dict[str, Any]:
    """Loss, accuracy (or the multi-label model's map and f1) and learning-rate curves from train.log rows.

    Args:
        rows: train.log rows.
        metrics: the two metric columns of train.log.

    Returns:
        {"loss.png": fig, "acc.png": fig, "lr.png": fig}
    """
    figs = {}
    for name, keys, ylabel in curve_panels(metrics):
        fig, ax = subplots(figsize=(6, 4))
        draw_curves(ax, rows, keys, ylabel)
        fig.tight_layout()
        figs[name] = fig
    return figs


def plot_results(rows: Sequence[dict[str, str]], metrics: tuple[str, str], best_epoch: int, best_metric: str) -> Any:
    """results.png: the loss, metric and learning-rate curves of train.log side by side, each with a
    dashed line at the epoch best.pt comes from.

    Args:
        rows: train.log rows.
        metrics: train.log's two metric columns.
        best_epoch: best.pt's epoch (1-based).
        best_metric: the --metrice that chose it (in the title).

    Returns:
        The matplotlib figure.
    """
    panels = curve_panels(metrics)
    fig, axes = subplots(1, len(panels), figsize=(5.2 * len(panels), 4))
    for ax, (_, keys, ylabel) in zip(axes, panels):
        draw_curves(ax, rows, keys, ylabel)
        ax.axvline(best_epoch, color="black", linestyle="--", linewidth=1, label=f"best epoch {best_epoch}")
        ax.legend(fontsize=8)
    fig.suptitle(f"best.pt: epoch {best_epoch} of {len(rows)} (best {best_metric})", fontsize=11)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------- evaluation figures
CELL_TEXT_MAX_CLASSES = 30  # past this many classes the cells carry no numbers (they would be unreadable)


def plot_confusion_matrix(confusion: Any, class_names: Sequence[str], normalize: bool = False, title: str = "") -> Any:
    """A confusion matrix as a heat map, rows true class, columns predicted class.

    The figure grows with the number of classes (about 0.3 inch per class, up to 100 classes
    readable), the tick labels shrink, and past CELL_TEXT_MAX_CLASSES classes the cells carry
    no numbers.

    Args:
        confusion: counts (C, C).
        class_names: the C class names.
        normalize: divide each row by its total (rows without images stay 0).
        title: figure title.

    Returns:
        The matplotlib figure (the caller saves and closes it).
    """
    counts = np.asarray(confusion, dtype=np.float64)
    n = len(class_names)
    if normalize:
        totals = counts.sum(axis=1, keepdims=True)
        values = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    else:
        values = counts
    side = min(40.0, max(5.0, 0.3 * n + 2.5))
    fig, ax = subplots(figsize=(side + 1.2, side))
    image = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalize else max(1.0, values.max()), interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    font = max(5.0, min(10.0, 300.0 / max(n, 1)))
    labels = [str(c)[:24] for c in class_names]
    check_glyphs(labels)
    ax.set_xticks(range(n), labels, rotation=90, fontsize=font)
    ax.set_yticks(range(n), labels, fontsize=font)
    ax.set_xlabel("predicted class", fontsize=max(10.0, side * 0.4))
    ax.set_ylabel("true class", fontsize=max(10.0, side * 0.4))
    if n <= CELL_TEXT_MAX_CLASSES:
        threshold = (1.0 if normalize else max(1.0, values.max())) / 2
        for i in range(n):
            for j in range(n):
                if counts[i, j] == 0 and i != j:
                    continue
                text = f"{values[i, j]:.2f}" if normalize else f"{int(counts[i, j])}"
                ax.text(j, i, text, ha="center", va="center", fontsize=max(5.0, font - 1),
                        color="white" if values[i, j] > threshold else "black")
    if title:
        ax.set_title(title, fontsize=max(11.0, side * 0.45))
    fig.tight_layout()
    return fig


def plot_reliability(curves: dict[str, dict[str, Any]], title: str = "") -> Any:
    """Reliability diagram: accuracy against confidence per bin for one or more probability sets of the
    same images (metrice.py: before and after calibration), each with its ECE (a dot's area: the bin's
    share of the predictions), the diagonal of perfect calibration, and the predictions per bin below.

    Args:
        curves: {label: utils.infer.calibration.reliability output}, drawn in order.
        title: figure title.

    Returns:
        The matplotlib figure.
    """
    fig, (ax, ax_count) = subplots(2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    colours = ["tab:red", "tab:blue", "tab:green", "tab:purple"]
    for k, (label, bins) in enumerate(curves.items()):
        edges = np.asarray(bins["edges"])
        filled = np.asarray(bins["count"]) > 0
        confidence = np.asarray(bins["confidence"], dtype=np.float64)[filled]
        accuracy = np.asarray(bins["accuracy"], dtype=np.float64)[filled]
        colour = colours[k % len(colours)]
        count = np.asarray(bins["count"])[filled]
        ax.plot(confidence, accuracy, "-", color=colour, linewidth=1, alpha=0.6, label=f"{label}: ECE {bins['ece']:.4f}")
        ax.scatter(confidence, accuracy, s=8 + 80 * count / max(1, count.max()), color=colour, zorder=3)  # area: predictions
        ax.fill_between(confidence, accuracy, confidence, color=colour, alpha=0.12)  # the gap to the diagonal
        ax_count.stairs(np.asarray(bins["count"]), edges, color=colour, linewidth=1.5, label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title)
    ax_count.set_xlabel("confidence (top-1 probability; multi-label: each label's yes or no)")
    ax_count.set_ylabel("predictions")
    fig.tight_layout()
    return fig


def plot_gallery(images: Sequence[Any], titles: Sequence[str], title: str = "", cols: int = 8) -> Any:
    """A grid of uint8 images (C, H, W) with multi-line titles (the mistakes of metrice.py --visual).

    Returns:
        The matplotlib figure.
    """
    check_glyphs([title, *titles])
    n = max(1, len(images))
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    height = rows * 2.5 + (0.5 if title else 0.0)
    fig, axes = subplots(rows, cols, figsize=(cols * 2.0, height), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= len(images):
            continue
        img = np.asarray(images[i].detach().cpu() if hasattr(images[i], "detach") else images[i])
        if img.shape[0] == 1:
            ax.imshow(img[0], cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(img.transpose(1, 2, 0))
        ax.set_title(titles[i], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.5 / height if title else 0.0)))
    return fig


def plot_embedding(points: Any, targets: Sequence[int], class_names: Sequence[str], title: str = "") -> Any:
    """2-D points (a t-SNE of features) coloured by class; a legend up to 30 classes.

    Returns:
        The matplotlib figure.
    """
    points = np.asarray(points)
    targets = np.asarray(targets)
    n = len(class_names)
    from matplotlib import colormaps

    check_glyphs(class_names)
    cmap = colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "turbo"]
    fig, ax = subplots(figsize=(7.5, 6.5))
    for c in range(n):
        mask = targets == c
        if mask.any():
            colour = cmap(c if n <= 20 else c / max(1, n - 1))
            ax.scatter(points[mask, 0], points[mask, 1], s=12, color=colour, label=str(class_names[c])[:24], alpha=0.8)
    if n <= 30:
        ax.legend(fontsize=7, markerscale=1.5, loc="best", ncol=1 if n <= 15 else 2)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_score_histogram(inside: Any, outside: Any, name: str, threshold: float | None = None, title: str = "") -> Any:
    """Histograms of an out-of-distribution score on images of the trained classes (in) and of none
    (out), on shared bins, with the model's threshold (metrice.py --ood_path).

    Returns:
        The matplotlib figure.
    """
    inside, outside = np.asarray(inside, dtype=np.float64), np.asarray(outside, dtype=np.float64)
    both = np.concatenate([inside, outside])
    low, high = (float(both.min()), float(both.max())) if len(both) else (0.0, 1.0)
    bins = np.linspace(low, high if high > low else low + 1.0, 41)
    fig, ax = subplots(figsize=(6.5, 4))
    for values, colour, label in ((inside, "tab:blue", f"in: trained classes ({len(inside)})"),
                                  (outside, "tab:red", f"out: --ood_path ({len(outside)})")):
        if len(values):  # each set's share per bin: sets of any size compare
            ax.hist(values, bins=bins, weights=np.full(len(values), 1.0 / len(values)), alpha=0.6, color=colour, label=label)
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:.4g}")
    ax.set_xlabel(f"{name} (higher = further from the training images)")
    ax.set_ylabel("share of the set's images")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig
