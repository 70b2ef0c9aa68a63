"""Figures of a run: training batches as the model sees them, and the training curves."""
from __future__ import annotations

import math
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def plot_batch(images: torch.Tensor, labels: Sequence[str], title: str = "", max_images: int = 32) -> Any:
    """A grid of uint8 images (N, C, H, W) with their labels.

    Returns:
        The matplotlib figure (the caller saves and closes it).
    """
    n = min(len(images), max_images)
    cols = min(8, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 1.8), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        img = images[i].detach().cpu()
        if img.dtype != torch.uint8:
            img = img.float()
            img = ((img - img.min()) / (img.max() - img.min()).clamp_min(1e-6) * 255).to(torch.uint8)
        if img.shape[0] == 1:
            ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(img.permute(1, 2, 0).numpy())
        ax.set_title(str(labels[i])[:18], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_curves(rows: Sequence[dict[str, str]]) -> dict[str, Any]:
    """Loss, accuracy and learning-rate curves from train.log rows.

    Returns:
        {"loss.png": fig, "acc.png": fig, "lr.png": fig}
    """
    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(int(r["epoch"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        return [p[0] for p in pts], [p[1] for p in pts]

    figs = {}
    for name, keys, ylabel in (
        ("loss.png", [("loss", "train"), ("test_loss", "val")], "loss"),
        ("acc.png", [("acc", "train acc"), ("test_acc", "val acc"), ("mean_acc", "train mean acc"),
                     ("test_mean_acc", "val mean acc")], "accuracy"),
        ("lr.png", [("lr", "learning rate")], "learning rate"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label in keys:
            x, y = series(key)
            if x:
                ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        figs[name] = fig
    return figs
