"""Out-of-distribution scores: how far an image lies from the training images, and the "unknown"
decision of predict.py --reject, serve.py --reject and metrice.py --ood_path.

    scores = ood_scores(["msp", "energy"], logits, probs)   # {"msp": (N,), "energy": (N,)}
    spec, stats = fit_model_ood(model, meta, train, val, tpr=0.95, ...)   # main.py's end of training
    rejector = Rejector(ensemble)                            # the model's default score and threshold
    probs, scores, unknown = rejector.predict(inputs, plan)  # unknown: score > threshold

Every score is oriented "higher = further from the training images":
- msp: 1 - the largest (calibrated: ModelMeta.probabilities) softmax probability (Hendrycks and
  Gimpel, ICLR 2017);
- energy: -logsumexp(logits) of the raw logits, T = 1 (Liu et al., NeurIPS 2020);
- mahalanobis: the smallest Mahalanobis distance of the penultimate features to a class mean, one
  covariance shared by the classes (Lee et al., NeurIPS 2018, without their input perturbation),
  fitted on the training split (no augmentation): class means and an OAS-shrunk covariance (Chen
  et al., IEEE TSP 2010; scikit-learn's OAS formula) from sums that add up over torchrun processes.
  The class means and the precision matrix live in best.pt (Checkpoint.extra["ood_stats"], float32
  tensors: 1 MB for 512-d features, 17 MB for 2048-d). Exported files give the logits only, so they
  compute msp and energy; mahalanobis needs the PyTorch checkpoint.
Each threshold is fitted on the validation split (the training split when there is none): the
smallest value that keeps --reject_tpr of its images known (score <= threshold).

Which score is the default (DEFAULT_SCORE: mahalanobis; for exported files BEST_LOGIT_SCORE: msp) was
measured on scikit-learn's digits (benchmarks/ood_digits.py): a resnet18 at 32 px trained on 0-4,
against 5-9 (near) and against noise and photo tiles (far); the figures are above DEFAULT_SCORE.
pytorch-ood (Apache-2.0) has these detectors, but as torch modules: the deployment path here runs on
numpy without torch (ONNX, OpenVINO), the scores are a line each, and the statistics must be plain
tensors in a checkpoint; so they are written here, and the tests check them against hand-computed
values and scikit-learn's OAS.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from utils.core.log import UserError, progress
from utils.core.schema import LOGIT_OOD_SCORES, OOD_SCORES, Checkpoint, ModelMeta, OodSpec
from utils.data.transforms_np import run_with_tta
from utils.infer.ensemble import Ensemble, InputPlan, combine_probs
from utils.infer.rows import UNKNOWN

STATS_KEY = "ood_stats"  # Checkpoint.extra: {"means": (K, D), "precision": (D, D)} float32 tensors
# Measured by benchmarks/ood_digits.py: resnet18, 32 px, 12 epochs on scikit-learn's digits 0-4 (the toolkit's
# defaults: AdamW, label smoothing 0.1), 3 seeds; the test split's 0-4 (in) against every 5-9 (near, 896 images)
# and against noise and photo tiles (far, 320). Mean AUROC and FPR at 95% TPR, near / far:
#   msp          0.923 / 0.846    0.359 / 0.355
#   energy       0.908 / 0.587    0.405 / 0.641   (many noise images: a logsumexp as large as a digit's, or larger)
#   mahalanobis  0.958 / 1.000    0.198 / 0.000
#   (kNN, k=1    0.951 / 1.000    0.327 / 0.000: no better, and it needs every training feature)
# At the thresholds fitted on the val split (--reject_tpr 0.95) mahalanobis kept 93% of the test digits known and
# called 82% of the 5-9 and all the far images unknown (msp: 96%, 59%, 63%).
DEFAULT_SCORE = "mahalanobis"
# What exported files (logits only) use instead of a feature score: the better logit score above.
BEST_LOGIT_SCORE = "msp"
DEFAULT_REASON = ("it separated unknown images best on digits 0-4 against 5-9 (AUROC 0.96, msp 0.92, energy 0.91) and "
                  "against noise and photos (1.00, msp 0.85, energy 0.59): README, Unknown images")


# ---------------------------------------------------------------------------------- scores
def msp_score(probs: Any) -> np.ndarray:
    """1 - the largest class probability of each row (N,): 0 for a certain prediction."""
    return 1.0 - np.asarray(probs, dtype=np.float64).max(axis=1)


def energy_score(logits: Any) -> np.ndarray:
    """The energy -logsumexp(logits) of each row (N,), T = 1 (Liu et al., NeurIPS 2020)."""
    x = np.asarray(logits, dtype=np.float64)
    top = x.max(axis=1)
    return -(top + np.log(np.exp(x - top[:, None]).sum(axis=1)))


@dataclass(frozen=True)
class OodStats:
    """The training split's feature statistics: the class means and the shared precision matrix.

    Attributes:
        means: (K, D) float32, the mean feature of each class seen in training.
        precision: (D, D) float32, the inverse of the shrunk shared covariance.
    """

    means: np.ndarray
    precision: np.ndarray

    @functools.cached_property
    def float64_terms(self) -> tuple[Any, Any, Any]:
        """(P, the means, each mean's m'Pm) as float64 torch tensors, made once (mahalanobis_score)."""
        import torch

        precision = torch.from_numpy(np.asarray(self.precision, dtype=np.float64))
        means = torch.from_numpy(np.asarray(self.means, dtype=np.float64))
        return precision, means, ((means @ precision) * means).sum(dim=1)

    def to_extra(self) -> dict[str, Any]:
        """As Checkpoint.extra[STATS_KEY]: float32 tensors (torch.load weights_only reads them)."""
        import torch

        return {"means": torch.from_numpy(np.ascontiguousarray(self.means, dtype=np.float32)),
                "precision": torch.from_numpy(np.ascontiguousarray(self.precision, dtype=np.float32))}

    @classmethod
    def of_checkpoint(cls, ckpt: Checkpoint, where: str) -> "OodStats | None":
        """The statistics stored in a checkpoint (None when there are none).

        Raises:
            UserError: statistics of the wrong shapes.
        """
        stored = ckpt.extra.get(STATS_KEY)
        if stored is None:
            return None
        try:
            means, precision = (np.asarray(stored[k].float().numpy() if hasattr(stored[k], "numpy") else stored[k],
                                           dtype=np.float32) for k in ("means", "precision"))
        except (KeyError, TypeError, AttributeError):
            means = precision = np.zeros(0)
        if means.ndim != 2 or precision.shape != (means.shape[1], means.shape[1]):
            raise UserError(f"{where}: '{STATS_KEY}' must hold 'means' (K, D) and 'precision' (D, D): refit it "
                            "(python metrice.py --task calibrate) or retrain")
        return cls(means, precision)


def mahalanobis_score(features: Any, stats: OodStats) -> np.ndarray:
    """The smallest Mahalanobis distance of each feature row to a class mean (N,), with the shared
    precision P: min_k sqrt((f - m_k)' P (f - m_k)), expanded as f'Pf - 2 f'P m_k + m_k'P m_k so that
    no (N, K, D) array is made.

    In float64 on torch's compute threads (the features come from a PyTorch model, so torch is
    there): numpy's matrix product starts OpenBLAS's own pool of threads, which spun against torch's
    between batches and made predict.py --reject 2.8 times slower on 2 cores (667 against 1,895
    images/s on the digits benchmark's 1,797 images, resnet18, one stream)."""
    import torch

    precision, means, means_term = stats.float64_terms
    f = torch.from_numpy(np.asarray(features, dtype=np.float64))
    fp = f @ precision
    squared = (fp * f).sum(dim=1, keepdim=True) - 2.0 * fp @ means.T + means_term[None, :]
    return squared.clamp_min(0.0).amin(dim=1).sqrt().numpy()


def ood_scores(names: Sequence[str], logits: Any, probs: Any, features: Any = None,
               stats: OodStats | None = None) -> dict[str, np.ndarray]:
    """The scores `names` of a batch (each (N,), float64; higher = further from the training images).

    Args:
        names: scores of OOD_SCORES.
        logits: the raw logits (N, C) (energy).
        probs: the model's calibrated probabilities of them (msp).
        features: penultimate features (N, D) (mahalanobis).
        stats: the training split's statistics (mahalanobis).
    """
    out = {}
    for name in names:
        if name == "msp":
            out[name] = msp_score(probs)
        elif name == "energy":
            out[name] = energy_score(logits)
        elif features is None or stats is None:
            raise ValueError("mahalanobis needs the features and the training statistics")
        else:
            out[name] = mahalanobis_score(features, stats)
    return out


# ---------------------------------------------------------------------------------- fitting
@dataclass
class FeatureSums:
    """Sums over the training images that give the class means and the shared covariance, and that
    add up over processes: per-class feature sums (K, D), per-class counts (K,), and the sum of the
    outer products x x' (D, D), all float64."""

    class_sums: np.ndarray
    counts: np.ndarray
    outer: np.ndarray

    @classmethod
    def empty(cls, num_classes: int, dim: int) -> "FeatureSums":
        return cls(np.zeros((num_classes, dim)), np.zeros(num_classes), np.zeros((dim, dim)))

    def add(self, features: np.ndarray, targets: np.ndarray) -> None:
        """Add a batch: features (N, D), class indices (N,). The outer products are summed on torch's
        compute threads, between the model's batches (numpy's product would start OpenBLAS's own
        threads, which spin against torch's: mahalanobis_score)."""
        import torch

        f = np.asarray(features, dtype=np.float64)
        np.add.at(self.class_sums, targets, f)
        self.counts += np.bincount(targets, minlength=len(self.counts))
        t = torch.from_numpy(f)
        self.outer += (t.T @ t).numpy()


def fit_statistics(sums: FeatureSums) -> tuple[OodStats, float]:
    """Class means and the OAS-shrunk shared covariance (scikit-learn's OAS of the features minus
    their class means, computed from the sums), inverted.

    Returns:
        (the statistics of the classes with images, the shrinkage).
    """
    seen = sums.counts > 0
    counts, n, dim = sums.counts[seen], float(sums.counts.sum()), sums.outer.shape[0]
    means = sums.class_sums[seen] / counts[:, None]
    emp = (sums.outer - (means.T * counts) @ means) / n  # (1/n) sum (x - m_y)(x - m_y)'
    mu = np.trace(emp) / dim
    alpha = np.mean(emp ** 2)
    den = (n + 1.0) * (alpha - mu ** 2 / dim)
    shrinkage = 1.0 if den == 0 else min((alpha + mu ** 2) / den, 1.0)
    shrunk = (1.0 - shrinkage) * emp
    shrunk.flat[:: dim + 1] += shrinkage * mu
    precision = np.linalg.pinv(shrunk, hermitian=True)
    return OodStats(means.astype(np.float32), precision.astype(np.float32)), float(shrinkage)


def threshold_at(scores: Any, tpr: float) -> float:
    """The smallest score that keeps a share `tpr` of these scores known (score <= threshold): the
    ceil(tpr * n)-th smallest."""
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    k = min(len(ordered), max(1, math.ceil(tpr * len(ordered) - 1e-9)))
    return float(ordered[k - 1])


def fit_thresholds(scores: dict[str, np.ndarray], tpr: float) -> dict[str, float]:
    """Each score's threshold_at(tpr)."""
    return {name: threshold_at(values, tpr) for name, values in scores.items()}


def torch_batches(model: Any, loader: Any, normalize: Any, device: Any, desc: str) -> Any:
    """(features, logits, targets) numpy arrays of each batch of an ImageDataset loader (float32, no
    gradient, in eval mode; images that failed to decode are left out)."""
    from utils.models.features import features_and_logits

    for batch in progress(loader, desc=desc, leave=False):
        if len(batch["targets"]) == 0:
            continue
        feats, logits = features_and_logits(model, normalize(batch["images"].to(device, non_blocking=True)))
        yield feats.numpy(), logits.numpy(), batch["targets"].numpy()


def _loader(samples: Sequence[tuple[str, int]], meta: ModelMeta, batch_size: int, workers: int, device: Any) -> Any:
    """The test-time loader of one process's share of a split (torchrun: each rank its own)."""
    from utils.core.distributed import world_info
    from utils.data.loaders import EpochSampler, ImageDataset, build_loader
    from utils.data.transforms import image_transform

    rank, world = world_info()
    dataset = ImageDataset(samples, image_transform(meta.preprocess), meta.preprocess.channels,
                           num_classes=meta.num_classes)
    sampler = EpochSampler(len(dataset.samples), shuffle=False, rank=rank, world_size=world, pad=False)
    return build_loader(dataset, batch_size, sampler, workers, getattr(device, "type", "") == "cuda")


def fit_model_ood(model: Any, meta: ModelMeta, train: Sequence[tuple[str, int]], val: Sequence[tuple[str, int]],
                  tpr: float, batch_size: int, workers: int, device: Any, default: str = DEFAULT_SCORE
                  ) -> tuple[OodSpec, OodStats, str]:
    """Fit a multiclass model's rejection: the Mahalanobis statistics on `train`, then every score's
    threshold on `val` (main.py's end of training; metrice.py --task calibrate for an existing run).
    Under torchrun every process runs its share and the sums and scores are combined, so all
    return the same; the caller's rank 0 writes.

    Args:
        model: the classifier (its best weights), on `device`.
        meta: its description (the temperature of msp's probabilities, the preprocessing).
        train: the training split's (path, class index) samples (no augmentation is applied).
        val: the samples the thresholds keep a share `tpr` of (the validation split, else train).
        tpr: --reject_tpr.
        batch_size, workers, device: how the images are run.
        default: the score --reject uses when none is named.

    Returns:
        (meta.ood, the statistics for Checkpoint.extra[STATS_KEY], a line that says what was fitted).
    """
    import torch

    from utils.core.distributed import gather_rows, reduce_sum
    from utils.data.transforms import Normalize

    normalize = Normalize(meta.preprocess.mean, meta.preprocess.std).to(device)
    was_training = model.training
    model.eval()
    try:
        sums = None
        for feats, _, targets in torch_batches(model, _loader(train, meta, batch_size, workers, device), normalize,
                                               device, "ood statistics"):
            sums = sums or FeatureSums.empty(meta.num_classes, feats.shape[1])
            sums.add(feats, targets)
        dim = torch.tensor([float(sums.outer.shape[0]) if sums else 0.0])
        dim = int(gather_rows(dim).max().item())  # a process whose share was empty learns the width
        if dim == 0:
            raise UserError("no training image could be decoded to fit the unknown-image statistics")
        sums = sums or FeatureSums.empty(meta.num_classes, dim)
        sums = FeatureSums(*(reduce_sum(torch.from_numpy(a)).numpy() for a in (sums.class_sums, sums.counts, sums.outer)))
        stats, shrinkage = fit_statistics(sums)
        rows = [np.stack(list(ood_scores(OOD_SCORES, logits, meta.probabilities(logits), feats, stats).values()), axis=1)
                for feats, logits, _ in torch_batches(model, _loader(val, meta, batch_size, workers, device), normalize,
                                                      device, "ood thresholds")]
        table = np.concatenate(rows) if rows else np.zeros((0, len(OOD_SCORES)))
        table = gather_rows(torch.from_numpy(table)).numpy()
    finally:
        model.train(was_training)
    if len(table) == 0:
        raise UserError("no image of the split the thresholds are fitted on could be decoded")
    thresholds = fit_thresholds({name: table[:, i] for i, name in enumerate(OOD_SCORES)}, tpr)
    spec = OodSpec(score=default, tpr=float(tpr), thresholds=tuple(thresholds.items()))
    line = (f"thresholds keeping {tpr:.0%} of {len(table)} images known: "
            + ", ".join(f"{k} {v:.4g}" for k, v in thresholds.items())
            + f" (mahalanobis: {len(stats.means)} class means of {stats.means.shape[1]}-d features, OAS shrinkage "
            f"{shrinkage:.3g}); default {default}")
    return spec, stats, line


def with_ood(ckpt: Checkpoint, spec: OodSpec, stats: OodStats) -> Checkpoint:
    """A checkpoint with its rejection: meta.ood and the statistics (Checkpoint.extra[STATS_KEY])."""
    return dataclasses.replace(ckpt, meta=dataclasses.replace(ckpt.meta, ood=spec),
                               extra={**ckpt.extra, STATS_KEY: stats.to_extra()})


# ------------------------------------------------------------------------------- predicting
def torch_logits_features(backend: Any, images: Any) -> tuple[np.ndarray, np.ndarray]:
    """The logits and penultimate features of a PyTorch backend's model for a uint8 batch (one pass)."""
    from utils.deploy.runtime import torch_input
    from utils.models.features import features_and_logits

    x = backend.normalize(torch_input(images, backend.device))
    feats, logits = features_and_logits(backend.model, x.half() if backend.half else x)
    return logits.numpy(), feats.numpy()


def member_outputs(backend: Any, images: np.ndarray, names: Sequence[str],
                   stats: OodStats | None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One model's calibrated probabilities (N, C) and scores {name: (N,)} of a uint8 batch; a
    TenCrop batch averages both over its crops (as utils.infer.backends.predict_probs does the probabilities)."""
    meta = backend.meta

    def run(x: np.ndarray) -> np.ndarray:
        if "mahalanobis" in names:
            logits, feats = torch_logits_features(backend, x)
        else:
            logits, feats = np.asarray(backend(x), dtype=np.float32), None
        probs = np.asarray(meta.probabilities(logits), dtype=np.float64)
        scores = ood_scores(names, logits, probs, feats, stats)
        return np.concatenate([probs, np.stack([scores[n] for n in names], axis=1)], axis=1)

    out = run_with_tta(run, np.asarray(images))
    classes = meta.num_classes
    return out[:, :classes].astype(np.float32), {n: out[:, classes + i] for i, n in enumerate(names)}


def member_stats(ensemble: Ensemble) -> list[OodStats | None]:
    """Each member's Mahalanobis statistics (None for an exported model or a checkpoint without)."""
    return [OodStats.of_checkpoint(m.backend.checkpoint, m.name) if getattr(m.backend, "checkpoint", None) is not None
            else None for m in ensemble.members]


class OodScorer:
    """The scores of an ensemble's images beside its probabilities: each member's scores, averaged
    (weighted for --ensemble weighted), the probabilities combined as Ensemble.predict does.

    Args:
        ensemble: the models (multiclass).
        names: the scores to compute (default: every one all members can: msp, energy, and
            mahalanobis when every member is a checkpoint with statistics).
    """

    def __init__(self, ensemble: Ensemble, names: Sequence[str] | None = None) -> None:
        if ensemble.meta.task_type.multilabel:
            raise UserError("unknown-image scores are for multiclass models (one softmax): this is a multilabel model")
        self.ensemble = ensemble
        self.stats = member_stats(ensemble)
        self.available = [*LOGIT_OOD_SCORES, *(["mahalanobis"] if all(s is not None for s in self.stats) else [])]
        self.names = list(names or self.available)
        missing = [n for n in self.names if n not in self.available]
        if missing:
            lacking = next(m.name for m, s in zip(ensemble.members, self.stats) if s is None)
            raise UserError(f"{missing[0]} needs the training statistics of a PyTorch checkpoint (best.pt's "
                            f"'{STATS_KEY}'), which {lacking} lacks: refit it (python metrice.py --task calibrate) "
                            "or retrain")
        self.weights = ensemble.weights if ensemble.method == "weighted" else None

    def predict(self, inputs: Sequence[np.ndarray], plan: InputPlan
                ) -> tuple[np.ndarray, list[np.ndarray], dict[str, np.ndarray]]:
        """(the combined probabilities (N, C), each member's, the scores {name: (N,)}) of uint8
        batches, one per geometry of `plan` (as Ensemble.predict)."""
        outputs = [member_outputs(m.backend, inputs[g], self.names, s)
                   for m, g, s in zip(self.ensemble.members, plan.group_of, self.stats)]
        probs = [p for p, _ in outputs]
        combined = probs[0] if len(probs) == 1 else combine_probs(probs, self.ensemble.method, self.ensemble.weights)
        scores = {n: np.average(np.stack([s[n] for _, s in outputs]), axis=0, weights=self.weights) for n in self.names}
        return combined, probs, scores


def rejection_score(ensemble: Ensemble, requested: str | None) -> tuple[str, str]:
    """The score --reject uses and a line saying which and why.

    Args:
        ensemble: the models; each must have a fitted rejection (meta.ood).
        requested: --ood_score (None: the first model's default).

    Raises:
        UserError: a model without meta.ood, a score not fitted, mahalanobis of an exported model.
    """
    for m in ensemble.members:
        if m.backend.meta.task_type.multilabel:
            raise UserError("--reject is for multiclass models (one softmax): this is a multilabel model")
        if m.backend.meta.ood is None:
            raise UserError(f"{m.name} has no fitted rejection (trained before it existed, or it was not fitted): refit "
                            "it with python metrice.py --task calibrate, or train again with main.py")
    if UNKNOWN in ensemble.class_names:
        raise UserError(f"the model has a class named '{UNKNOWN}', the name --reject gives images of no trained class: "
                        "rename that class (its folder) and train again to use --reject")
    spec = ensemble.meta.ood
    score = requested or spec.score
    why = f" ({DEFAULT_REASON})" if score == DEFAULT_SCORE else ""
    note = f"--ood_score {requested}" if requested else f"the model's default{why}"
    exported = [m.name for m in ensemble.members if getattr(m.backend, "checkpoint", None) is None]
    if score not in LOGIT_OOD_SCORES and exported:
        if requested:
            raise UserError(f"--ood_score {score} needs the penultimate features of the PyTorch checkpoint; {exported[0]} "
                            f"gives logits only: choose {' or '.join(LOGIT_OOD_SCORES)}")
        score, note = BEST_LOGIT_SCORE, (f"the default {spec.score} needs the PyTorch checkpoint's features; "
                                         f"{exported[0]} gives logits only, so the best logit score")
    for m in ensemble.members:
        if m.backend.meta.ood.threshold(score) is None:
            fitted = ", ".join(k for k, _ in m.backend.meta.ood.thresholds)
            raise UserError(f"{m.name} has no {score} threshold (fitted: {fitted}): choose one with --ood_score")
    return score, note


def ensemble_threshold(ensemble: Ensemble, score: str, weights: Sequence[float] | None = None) -> float | None:
    """The members' mean threshold of a score (weighted as their scores are), None when one lacks it."""
    found = [m.backend.meta.ood.threshold(score) if m.backend.meta.ood else None for m in ensemble.members]
    return None if any(t is None for t in found) else float(np.average(found, weights=weights))


class Rejector:
    """--reject: an image is unknown when its score (OodScorer, the members' mean) is above the
    threshold (the members' mean: the same mean as the scores', so one model decides as it would alone).

    Args:
        ensemble: the models, each with a fitted rejection (ModelMeta.ood).
        score: --ood_score (None: the model's default; for exported models the best logit score).
    """

    def __init__(self, ensemble: Ensemble, score: str | None = None) -> None:
        self.score, note = rejection_score(ensemble, score)
        self.scorer = OodScorer(ensemble, [self.score])
        self.threshold = ensemble_threshold(ensemble, self.score, self.scorer.weights)
        tpr = ensemble.meta.ood.tpr
        self.describe = (f"--reject: {self.score} score, unknown above {self.threshold:.4g} ({tpr:.0%} of the validation "
                         f"images known{', the models averaged' if len(ensemble) > 1 else ''}): {note}")

    def predict(self, inputs: Sequence[np.ndarray], plan: InputPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(the combined probabilities (N, C), the scores (N,), unknown (N,) bool) of uint8 batches."""
        probs, _, scores = self.scorer.predict(inputs, plan)
        return probs, scores[self.score], scores[self.score] > self.threshold


def predict_maybe_rejecting(ensemble: Ensemble, rejector: Rejector | None, inputs: Sequence[np.ndarray], plan: InputPlan
                            ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """The combined probabilities (N, C) of uint8 batches, and with a rejector (--reject) each image's
    (score, unknown) for utils.infer.rows.prediction_rows (None without)."""
    if rejector is None:
        return ensemble.predict(inputs, plan)[0], None
    probs, scores, unknown = rejector.predict(inputs, plan)
    return probs, (scores, unknown)


def check_reject_flags(reject: bool, ood_score: str | None, other: str = "") -> None:
    """--ood_score needs --reject; --reject does not go with `other` (a flag that replaces the model)."""
    if ood_score and not reject:
        raise UserError(f"--ood_score {ood_score} chooses the score of --reject: add --reject")
    if reject and other:
        raise UserError(f"--reject scores the network's own outputs: it does not go with {other}")
