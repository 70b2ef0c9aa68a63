"""Combine the predictions of several models of the same classes (metrice.py and predict.py).

From lxztju/pytorch_classification's voting script: average the probabilities, weight them, or
let each model vote for its top-1 class.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from utils.log import UserError

ENSEMBLE_METHODS = ("mean", "vote", "weighted")


def check_same_classes(metas: Sequence[dict[str, Any]], names: Sequence[str]) -> list[str]:
    """The shared class list of several models, or a clear error naming the first mismatch.

    Args:
        metas: each model's meta (utils.backends.checkpoint_meta).
        names: how each model is called in messages (its run folder).

    Returns:
        The class names.
    """
    first = list(metas[0]["class_names"])
    for meta, name in zip(metas[1:], names[1:]):
        if list(meta["class_names"]) != first:
            raise UserError(f"{name} was trained on other classes than {names[0]} "
                            f"({len(meta['class_names'])} vs {len(first)} classes, or another order): "
                            "an ensemble needs the same classes in the same order")
    return first


def combine_probs(probs: Sequence[torch.Tensor], method: str = "mean", weights: Sequence[float] | None = None) -> torch.Tensor:
    """Ensemble probability rows (N, C) of several models into one (N, C).

    Args:
        probs: one (N, C) tensor of probabilities per model.
        method: mean (average), weighted (weighted average; weights normalised to sum 1), or
            vote (each model votes for its top-1 class; the result is the vote share, ties broken
            by the mean probability).
        weights: one weight per model, for weighted.

    Returns:
        (N, C) rows that sum to 1.
    """
    if method not in ENSEMBLE_METHODS:
        raise UserError(f"unknown ensemble method '{method}'; choose one of {', '.join(ENSEMBLE_METHODS)}")
    stacked = torch.stack([p.float() for p in probs])  # (M, N, C)
    if method == "mean":
        return stacked.mean(dim=0)
    if method == "weighted":
        if weights is None or len(weights) != len(probs):
            raise UserError(f"weighted ensemble needs one weight per model ({len(probs)}), got {0 if weights is None else len(weights)}")
        w = torch.tensor([float(x) for x in weights])
        if (w < 0).any() or w.sum() <= 0:
            raise UserError(f"ensemble weights must be non-negative and not all zero, got {list(weights)}")
        return (stacked * (w / w.sum()).view(-1, 1, 1)).sum(dim=0)
    votes = torch.nn.functional.one_hot(stacked.argmax(dim=2), stacked.shape[2]).float().mean(dim=0)
    # a tiny share of the mean probability breaks ties without changing any clear majority
    tie_break = stacked.mean(dim=0) / (stacked.shape[0] + 1)
    share = votes + tie_break / stacked.shape[0]
    return share / share.sum(dim=1, keepdim=True)
