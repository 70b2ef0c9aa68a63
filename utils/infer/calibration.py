"""Calibrated probabilities: the temperature of a model (temperature scaling, Guo et al., ICML 2017)
and the measures of calibration (ECE, NLL, Brier score) that metrice.py and main.py report.

    fit = fit_temperature(val_logits, val_targets, MULTICLASS)      # one T (multi-label: one per class)
    meta = dataclasses.replace(meta, temperature=fit.stored)        # predict_probs then divides the logits by it
    scores = calibration_scores(targets, probs, MULTICLASS)         # {"ece", "nll", "brier"}
    before = at_temperature(probs, MULTICLASS, fit.temperature)     # the same logits' probabilities at T = 1

The temperature is the one number (one per class for sigmoids) that minimises the negative
log-likelihood of the validation split's labels under softmax(logits / T); it changes no decision
(argmax and each class's ranking stay), only how sure the probabilities are. The fit is scipy's
bounded Brent search (minimize_scalar) over log T: a one-dimensional problem, solved to 1e-7 in
log T with no learning rate or iteration count to choose, in float64 numpy, so it runs wherever the
logits are (the training processes, or metrice.py). numpy only at import; scipy when a fit is made.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from utils.core.task import MULTICLASS, TaskType

CALIBRATION_BINS = 15  # equal-width bins of the confidence for the ECE and the reliability diagram
# The search range of the temperature. The NLL is convex in 1 / T, and it has no minimum at all in two
# cases, which fit_temperature tells from the logits before searching: every image is classified right
# (every label decided right at 0.5), when the NLL keeps falling as T shrinks to 0; or the true class
# scores no higher than the mean logit on average (no better than chance), when it keeps falling as T
# grows. Such a split cannot fix a temperature (it stays 1), nor can an optimum on an edge of the range.
TEMPERATURE_RANGE = (0.01, 100.0)
_LOG_TOLERANCE = 1e-7   # Brent's tolerance in log T
_EDGE = 1e-3            # an optimum this close (in log T) to an end of the range is on the edge
_TOP_PROBABILITY = 1.0 - 2.0 ** -25  # float32 sigmoids round to 1 above this: the largest logit they can tell


@dataclass(frozen=True)
class TemperatureFit:
    """A fitted temperature.

    Attributes:
        temperature: one value (multiclass) or one per class (multilabel); 1 where nothing could be fit.
        kept: the indices (classes of a multi-label model, 0 for a multiclass one) left at 1 because the
            split has no NLL minimum for them (see TEMPERATURE_RANGE).
        images: the validation images it was fit on.
    """

    temperature: tuple[float, ...]
    kept: tuple[int, ...]
    images: int

    @property
    def stored(self) -> tuple[float, ...] | None:
        """What ModelMeta.temperature holds: None (uncalibrated) when nothing could be fit."""
        return None if len(self.kept) == len(self.temperature) else self.temperature


def calibration_bins(targets: Any, probs: Any, bins: int = CALIBRATION_BINS) -> dict[str, Any]:
    """Reliability of the top-1 confidence: equal-width bins over [0, 1].

    Args:
        targets: true class indices (N,).
        probs: probabilities (N, C).
        bins: number of bins.

    Returns:
        {"edges": (bins+1,), "confidence": mean confidence per bin, "accuracy": accuracy per bin
        (nan where empty), "count": images per bin, "ece": sum over bins of
        count/N * |accuracy - confidence|}.
    """
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == targets).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # bin b holds (edges[b], edges[b+1]]; a confidence of exactly 0 goes to the first bin
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, weights=confidence, minlength=bins) / count
        accuracy = np.bincount(which, weights=correct, minlength=bins) / count
    filled = count > 0
    ece = float(np.sum(count[filled] / max(1, len(targets)) * np.abs(accuracy[filled] - mean_conf[filled])))
    return {"edges": edges, "confidence": mean_conf, "accuracy": accuracy, "count": count, "ece": ece}


def reliability(targets: Any, probs: Any, task: TaskType = MULTICLASS, bins: int = CALIBRATION_BINS) -> dict[str, Any]:
    """calibration_bins for either task: a multiclass model's top-1 confidence; for a multi-label model
    every (image, label) pair as a two-class prediction (present or not: its confidence is the larger
    of p and 1 - p, right when p >= 0.5 matches the label).

    Args:
        targets: class indices (N,), or multi-hot (N, C) for a multi-label model.
        probs: probabilities (N, C).
        task: the model's task type.
        bins: number of bins.
    """
    if not task.multilabel:
        return calibration_bins(targets, probs, bins)
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    y = (np.asarray(targets, dtype=np.float64).reshape(-1) >= 0.5).astype(np.int64)
    return calibration_bins(y, np.stack([1.0 - p, p], axis=1), bins)


def negative_log_likelihood(targets: Any, probs: Any, task: TaskType = MULTICLASS) -> float:
    """The mean negative log-likelihood of the labels: -log p(true class) over the images, or for a
    multi-label model the binary cross-entropy over every (image, label) pair (the mean of
    scikit-learn's log_loss of each label). Probabilities are floored at 1e-12 (a float32 softmax
    can round a probability to 0)."""
    p = np.asarray(probs, dtype=np.float64)
    if task.multilabel:
        y = np.asarray(targets, dtype=np.float64) >= 0.5
        picked = np.where(y, p, 1.0 - p)
    else:
        picked = p[np.arange(len(p)), np.asarray(targets, dtype=np.int64)]
    return float(-np.mean(np.log(np.clip(picked, 1e-12, 1.0)))) if picked.size else float("nan")


def brier_score(targets: Any, probs: Any, task: TaskType = MULTICLASS) -> float:
    """The Brier score: the mean over images of sum_c (p_c - y_c)^2 with y one-hot (Brier's original
    multiclass form, between 0 and 2; scikit-learn's brier_score_loss of a multiclass split); for a
    multi-label model the mean of (p - y)^2 over every (image, label) pair (the mean of each label's
    binary brier_score_loss)."""
    p = np.asarray(probs, dtype=np.float64)
    if task.multilabel:
        y = (np.asarray(targets, dtype=np.float64) >= 0.5).astype(np.float64)
        return float(np.mean((p - y) ** 2)) if p.size else float("nan")
    y = np.eye(p.shape[1])[np.asarray(targets, dtype=np.int64)]
    return float(np.mean(np.sum((p - y) ** 2, axis=1))) if len(p) else float("nan")


def calibration_scores(targets: Any, probs: Any, task: TaskType = MULTICLASS) -> dict[str, float]:
    """{"ece", "nll", "brier"} of probabilities against the labels (reliability,
    negative_log_likelihood, brier_score)."""
    return {"ece": reliability(targets, probs, task)["ece"], "nll": negative_log_likelihood(targets, probs, task),
            "brier": brier_score(targets, probs, task)}


def logits_of(probs: Any, task: TaskType = MULTICLASS) -> np.ndarray:
    """Logits (float64) whose probabilities are `probs`: log p for a softmax (softmax(log p) == p), the
    logit of each sigmoid; exact up to float32 rounding (a probability of 0 or 1 is clamped)."""
    p = np.asarray(probs, dtype=np.float64)
    if task.multilabel:
        p = np.clip(p, 1e-38, _TOP_PROBABILITY)
        return np.log(p) - np.log1p(-p)
    return np.log(np.clip(p, 1e-45, 1.0))


def at_temperature(probs: Any, task: TaskType, stored: Sequence[float] | None,
                   wanted: Sequence[float] | None = None) -> np.ndarray:
    """The probabilities that the same logits give at another temperature: softmax(z / wanted) from
    softmax(z / stored) (sigmoids alike, class by class). metrice.py's "before" (wanted = None, 1) from
    the calibrated probabilities it predicted.

    Args:
        probs: (N, C) probabilities made at temperature `stored`.
        task: the model's task type.
        stored: the temperature they were made with (None = 1).
        wanted: the temperature wanted (None = 1).

    Returns:
        float32 (N, C).
    """
    scale = np.asarray(stored if stored is not None else [1.0], dtype=np.float64)
    scale = scale / np.asarray(wanted if wanted is not None else [1.0], dtype=np.float64)
    return task.probabilities(logits_of(probs, task) * scale)


def _multiclass_nll(logits: np.ndarray, targets: np.ndarray) -> Any:
    """NLL(log T) of softmax(logits / T) for integer targets."""
    true = logits[np.arange(len(logits)), targets]

    def nll(log_t: float) -> float:
        z = logits / math.exp(log_t)
        top = z.max(axis=1)
        return float(np.mean(top + np.log(np.exp(z - top[:, None]).sum(axis=1)) - true / math.exp(log_t)))

    return nll


def _binary_nll(logits: np.ndarray, positive: np.ndarray) -> Any:
    """NLL(log T) of sigmoid(logits / T) for 0/1 labels: the mean of softplus(-s z / T), s = +-1."""
    signed = np.where(positive, -logits, logits)
    return lambda log_t: float(np.mean(np.logaddexp(0.0, signed / math.exp(log_t))))


def _multiclass_unbounded(logits: np.ndarray, targets: np.ndarray) -> bool:
    """Whether softmax(logits / T) has no NLL minimum: every true class scores highest (d NLL / d(1/T) < 0
    for every T), or the true class scores no higher than the mean logit on average (>= 0 at 1/T = 0)."""
    true = logits[np.arange(len(logits)), targets]
    others = logits.copy()
    others[np.arange(len(logits)), targets] = -np.inf
    return bool((true >= others.max(axis=1)).all() or np.mean(logits.mean(axis=1) - true) >= 0)


def _binary_unbounded(logits: np.ndarray, positive: np.ndarray) -> bool:
    """Whether sigmoid(logits / T) has no NLL minimum for these labels: no image on the wrong side of 0,
    or the signed logits' mean not above 0 (the binary counterparts of _multiclass_unbounded)."""
    signed = np.where(positive, logits, -logits)
    return bool((signed >= 0).all() or signed.mean() <= 0)


def _minimise(nll: Any, unbounded: bool) -> tuple[float, bool]:
    """(the temperature that minimises nll(log T) within TEMPERATURE_RANGE, whether there is none to fit:
    `unbounded`, or the optimum on an edge of the range)."""
    from scipy.optimize import minimize_scalar

    if unbounded:
        return 1.0, True

    low, high = (math.log(t) for t in TEMPERATURE_RANGE)
    result = minimize_scalar(nll, bounds=(low, high), method="bounded", options={"xatol": _LOG_TOLERANCE})
    x = float(result.x)
    return math.exp(x), (x - low < _EDGE or high - x < _EDGE)


def fit_temperature(logits: Any, targets: Any, task: TaskType = MULTICLASS) -> TemperatureFit:
    """The temperature that minimises the validation split's negative log-likelihood (Guo et al.,
    ICML 2017): one for a softmax, one per class for sigmoids (each class's binary NLL).

    Args:
        logits: (N, C) raw model outputs (log-probabilities do as well for a softmax).
        targets: class indices (N,), or multi-hot (N, C) for a multi-label model.
        task: the model's task type.

    Returns:
        The fit; a temperature with no optimum, or one on an edge of TEMPERATURE_RANGE, stays 1 (`kept`).

    Raises:
        ValueError: no rows.
    """
    z = np.asarray(logits, dtype=np.float64)
    if not len(z):
        raise ValueError("a temperature needs at least one image")
    if task.multilabel:
        positive = np.asarray(targets, dtype=np.float64) >= 0.5
        found = [_minimise(_binary_nll(z[:, c], positive[:, c]), _binary_unbounded(z[:, c], positive[:, c]))
                 for c in range(z.shape[1])]
    else:
        y = np.asarray(targets, dtype=np.int64)
        found = [_minimise(_multiclass_nll(z, y), _multiclass_unbounded(z, y))]
    kept = tuple(i for i, (_, edge) in enumerate(found) if edge)
    return TemperatureFit(temperature=tuple(1.0 if edge else t for t, edge in found), kept=kept, images=len(z))


def temperature_text(temperature: Sequence[float] | None, class_names: Sequence[str] = ()) -> str:
    """'1.5234' (one value), 'a 1.21, b 0.93 ...' (one per class), or '1 (uncalibrated)'."""
    if temperature is None:
        return "1 (uncalibrated)"
    if len(temperature) == 1:
        return f"{temperature[0]:.4f}"
    return ", ".join(f"{name} {t:.4g}" for name, t in zip(class_names, temperature))


def fit_text(fit: TemperatureFit, before: dict[str, float], after: dict[str, float], class_names: Sequence[str]) -> str:
    """One line about a fit: the temperature, ECE and NLL before -> after, and what stayed at 1 and why."""
    if fit.stored is None:
        return (f"calibration on the val split ({fit.images} images): nothing to fit, the temperature stays 1 (the "
                "NLL has no minimum: every image is classified right, so it keeps falling as the temperature shrinks, "
                "or the model does no better than chance)")
    kept = ""
    if fit.kept:
        names = [class_names[i] for i in fit.kept] if len(fit.temperature) > 1 else []
        kept = f"; kept at 1 (nothing to fit on the val split): {', '.join(names)}"
    return (f"calibration on the val split ({fit.images} images): temperature "
            f"{temperature_text(fit.temperature, class_names)}; ECE {before['ece']:.4f} -> {after['ece']:.4f}, "
            f"NLL {before['nll']:.4f} -> {after['nll']:.4f}, Brier {before['brier']:.4f} -> {after['brier']:.4f}{kept}")
