"""Finding mislabeled images by confident learning (Northcutt, Jiang & Chuang, "Confident Learning:
Estimating Uncertainty in Dataset Labels", JAIR 70, 2021): out-of-sample class probabilities and
the given labels in, the images whose label is probably wrong out, most suspicious first.

    found = find_label_issues(labels, probs)        # labels (N,) class indices, probs (N, C) out-of-sample
    found.issues, found.suggested                   # flagged rows, most suspicious first; the class each should be
    found.scores[found.issues]                      # their score: p(given label), lower = more suspicious
    found.joint, found.noise_rate                   # estimated joint of (given, true) labels; 1 - its trace

The steps, as the paper's prune-by-noise-rate method and as cleanlab 2.x's
`filter.find_label_issues(filter_by="prune_by_noise_rate")` does them (the same flagged set; this
is its own code, numpy only: cleanlab is AGPL and serves only as the tests' reference):

1. per-class thresholds: t_j = the mean of p_j(x) over the images whose given label is j;
2. the confident joint C[i][j]: each image of given label i whose p_j(x) >= t_j for some j counts
   once, toward that j; when several classes reach their threshold, toward the argmax of p(x)
   (cleanlab's choice: the paper takes the largest p_j among the classes that reach it; the two
   differ only when the argmax class is itself under its threshold: 14 of 64,000 images of random
   test data);
3. calibration: each row scaled to the number of images given that label, rounded to whole
   counts keeping each row's total (at least one count on the diagonal first), then divided by N:
   the joint Q of (given label, true label);
4. pruning by noise rate: for each off-diagonal (i, j), the N * Q[i][j] images (the calibrated
   whole count) of given label i with the largest margin p_j(x) - p_i(x) are flagged (exact ties:
   the earlier row first, where cleanlab's sort leaves their order open). A class keeps at least
   one image (a class of one image is never pruned); an image whose given label is also its top
   prediction is never flagged;
5. ranking: by self-confidence p_given(x), lowest first (cleanlab's default ranking); the
   suggested label is the most probable class other than the given one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FUZZ = 1e-6                 # a probability this close to a threshold (or to the top one) counts as reaching it
THRESHOLD_FLOOR = 2 * FUZZ  # thresholds are at least this, so a class nobody predicts is never "confident"
UNREACHABLE = 2.0           # the threshold of a class no image is given: no probability reaches it


@dataclass
class LabelIssues:
    """What confident learning found in a labelled set.

    Attributes:
        issues: the flagged rows, most suspicious first (lowest score first; ties: the earlier row).
        suggested: for each flagged row, the most probable class other than its given one.
        scores: every row's self-confidence, the probability of its given label (N,): lower = more suspicious.
        thresholds: each class's confidence threshold t_j (C,).
        confident_joint: C[i][j], the confidently counted images of given label i and probable true label j (C, C).
        calibrated: the confident joint calibrated to whole counts: row i sums to the images given label i (C, C).
        joint: the estimated joint distribution Q[i][j] = P(given i, true j); sums to 1 (C, C).
        prune_counts: how many images of given label i were pruned toward true label j (C, C; 0 on the diagonal).
        given_counts: the images given each label (C,).
    """

    issues: np.ndarray
    suggested: np.ndarray
    scores: np.ndarray
    thresholds: np.ndarray
    confident_joint: np.ndarray
    calibrated: np.ndarray
    joint: np.ndarray
    prune_counts: np.ndarray
    given_counts: np.ndarray

    @property
    def noise_rate(self) -> float:
        """The estimated fraction of wrong labels: the joint's mass off its diagonal."""
        return float(1.0 - np.trace(self.joint))

    @property
    def estimated_wrong(self) -> np.ndarray:
        """How many images of each given label are estimated to be wrong: the calibrated counts off the diagonal (C,)."""
        return self.calibrated.sum(axis=1) - self.calibrated.diagonal()

    def issue_counts(self, labels: np.ndarray) -> np.ndarray:
        """How many images of each given label were flagged (C,)."""
        return np.bincount(np.asarray(labels)[self.issues], minlength=len(self.given_counts))

    def noise_matrix(self) -> np.ndarray:
        """P(given label i | true label j): each column of the joint divided by its total (C, C)."""
        totals = self.joint.sum(axis=0, keepdims=True)
        return np.divide(self.joint, totals, out=np.zeros_like(self.joint), where=totals > 0)


def confident_thresholds(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """t_j: the mean predicted probability of class j over the images given label j (C,); a class
    no image is given gets a threshold no probability reaches."""
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    out = np.full(probs.shape[1], UNREACHABLE)
    for j in np.unique(labels):
        out[j] = probs[labels == j, j].mean()
    return np.maximum(out, THRESHOLD_FLOOR)


def confident_joint(labels: np.ndarray, probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """C[i][j]: how many images of given label i are confidently of class j (step 2 of the module
    docstring); an image that reaches no threshold is not counted.

    Returns:
        Integer counts (C, C).
    """
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    confident = probs >= thresholds - FUZZ
    reached = confident.sum(axis=1)
    guess = np.where(reached > 1, probs.argmax(axis=1), confident.argmax(axis=1))
    counted = reached > 0
    num_classes = probs.shape[1]
    joint = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(joint, (labels[counted], guess[counted]), 1)
    return joint


def round_keeping_total(values: np.ndarray) -> np.ndarray:
    """Round to integers keeping the (rounded) total: rounded half to even first, then the entries
    rounded down the most are raised (or those rounded up the most lowered) until the total fits."""
    values = np.asarray(values, dtype=np.float64)
    ints = values.round()
    target = values.sum().round()
    while abs(ints.sum() - target) > FUZZ:
        step = 1 if target > ints.sum() else -1
        changes = min(int(abs(round(target - ints.sum()))), len(values))
        order = np.argsort(values - ints)[::-step][:changes]  # step +1: the most rounded down first
        ints[order] += step
    return ints.astype(np.int64)


def calibrate(joint_counts: np.ndarray, given_counts: np.ndarray) -> np.ndarray:
    """The confident joint calibrated to whole counts: at least 1 on the diagonal, each row scaled
    to the images given that label, the whole to N, rounded keeping each row's total (C, C)."""
    joint = np.asarray(joint_counts, dtype=np.float64).copy()
    np.fill_diagonal(joint, np.maximum(joint.diagonal(), 1))  # every class is partly labelled right: no row sums to 0
    joint = joint / joint.sum(axis=1, keepdims=True) * np.asarray(given_counts, dtype=np.float64)[:, None]
    # The total is N up to float noise, and that noise decides an exact half (4.5 -> 4 or 5): summed
    # column by column, as cleanlab sums its (column-major) matrix, so both round halves alike.
    joint = joint / max(float(np.sum(joint.ravel(order="F"))), 1e-100) * float(np.sum(given_counts))
    return np.stack([round_keeping_total(row) for row in joint])


def counts_to_prune(calibrated_counts: np.ndarray) -> np.ndarray:
    """How many images of given label i to prune toward each true label j: the calibrated
    off-diagonal counts, except that each class keeps at least one image: where a calibrated
    diagonal is 0 (all of a class's images look like other classes), each non-zero off-diagonal
    count of that class gives up one (C, C; 0 on the diagonal).

    cleanlab raises the diagonal to 1 and takes 1 / max(k - 1, 1) off each of the class's k non-zero
    counts, then truncates: on whole counts that is one less each, as here. A class of one image
    (its row sums to 1) is therefore never pruned.
    """
    out = np.asarray(calibrated_counts, dtype=np.int64).copy()
    for i in range(len(out)):
        if out[i, i] < 1:
            out[i] = np.maximum(out[i] - 1, 0)
    np.fill_diagonal(out, 0)
    return out


def prune_by_noise_rate(labels: np.ndarray, probs: np.ndarray, prune: np.ndarray) -> np.ndarray:
    """The flagged rows (a boolean mask, N): for each given label i and each j != i, the prune[i][j]
    images of label i with the largest p_j(x) - p_i(x) (`prune` from counts_to_prune, 0 on the
    diagonal); then every image whose given label is (within FUZZ) its top prediction is cleared again."""
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    flagged = np.zeros(len(labels), dtype=bool)
    for i in range(probs.shape[1]):
        rows = np.flatnonzero(labels == i)
        for j in np.flatnonzero(prune[i]):  # the diagonal is 0
            margin = probs[rows, j] - probs[rows, i]
            flagged[rows[np.argsort(-margin, kind="stable")[:prune[i, j]]]] = True
    nudged = probs.copy()
    nudged[np.arange(len(labels)), labels] += FUZZ
    flagged[nudged.argmax(axis=1) == labels] = False
    return flagged


def find_label_issues(labels: np.ndarray, probs: np.ndarray) -> LabelIssues:
    """Confident learning, pruned by noise rate (the module docstring's five steps).

    Args:
        labels: the given class of each image (N,), integers in [0, C).
        probs: out-of-sample predicted probabilities (N, C): out-of-fold for a training set, or a
            model's on a split it was not trained on. In-sample probabilities find almost nothing.

    Returns:
        LabelIssues.

    Raises:
        ValueError: shapes that do not match, or a label that is not a whole number in [0, C).
    """
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    if labels.ndim != 1 or probs.ndim != 2 or len(labels) != len(probs) or probs.shape[1] < 2:
        raise ValueError(f"labels {labels.shape} and probabilities {probs.shape} do not fit: (N,) and (N, C >= 2)")
    if len(labels) and (labels.min() < 0 or labels.max() >= probs.shape[1] or np.any(labels % 1)):
        raise ValueError(f"labels must be class indices in [0, {probs.shape[1]})")
    labels = labels.astype(np.int64)  # whole floats (1.0) are class indices too
    given_counts = np.bincount(labels, minlength=probs.shape[1])
    thresholds = confident_thresholds(labels, probs)
    counted = confident_joint(labels, probs, thresholds)
    calibrated = calibrate(counted, given_counts)
    prune = counts_to_prune(calibrated)
    flagged = np.flatnonzero(prune_by_noise_rate(labels, probs, prune))
    scores = probs[np.arange(len(labels)), labels]
    issues = flagged[np.argsort(scores[flagged], kind="stable")]
    others = probs[issues].copy()
    others[np.arange(len(issues)), labels[issues]] = -np.inf
    return LabelIssues(issues=issues, suggested=others.argmax(axis=1),
                       scores=scores, thresholds=thresholds, confident_joint=counted, calibrated=calibrated,
                       joint=calibrated / max(calibrated.sum(), 1), prune_counts=prune, given_counts=given_counts)
