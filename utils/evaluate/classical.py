"""CNN features + classical classifiers: metrice.py --task features and predict.py --classical.

    result = run_feature_task(ensemble, class_names, {"train": dir, "val": dir, "test": dir}, ["svm", "knn"], ...)
    ensemble = classical_ensemble(ensemble, "runs/exp", "svm")     # predicts with the network's features + svm

The penultimate features of a run's model (utils.evaluate.split.predict_split(features=True): the
same decoding and forward pass as every evaluation) are saved for each split into
<run>/features/{train,val,test}.npz (features, targets, paths, class_names; read back with
allow_pickle=False). Classifiers from scikit-learn, each a Pipeline of a StandardScaler and the
estimator, are fit on the train features with fixed seeds; the few hyper-parameters that matter
are chosen by a small stratified cross-validation on the train split. They are saved with
skops.io (<run>/features/<name>.skops) and indexed in classical.json (the checkpoint they belong
to, by SHA-256, and the types each file needs); they are loaded with skops.io against the fixed
list TRUSTED_TYPES, never with pickle.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from prettytable import PrettyTable

from utils.core.files import atomic_write, atomic_write_text
from utils.core.log import UserError
from utils.core.names import CLASSICAL
from utils.core.run import Run, RunFolder
from utils.evaluate.metrics import overall_metrics
from utils.evaluate.split import SplitPredictions, predict_split, torch_features
from utils.infer.backends import resolve_weights, results_home
from utils.infer.ensemble import Ensemble, InputPlan

LOGGER = logging.getLogger(__name__)

INDEX_FILE = "classical.json"
INDEX_FORMAT = "pytorch-classifier-ng/classical"
SPLITS = ("train", "val", "test")
SEED = 0
# What skops.io may rebuild beyond its own defaults (numpy arrays, the scikit-learn estimators):
# the inner objects of the fitted models. A file that needs anything else is refused.
TRUSTED_TYPES = (
    "sklearn.calibration._CalibratedClassifier",                      # svm (Platt scaling of the SVC)
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.tree._tree.Tree",                                        # rf
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",    # mlp (its optimiser state)
)
# A few values of the one hyper-parameter that matters most; chosen by cross-validation on train.
GRIDS: dict[str, dict[str, list[Any]]] = {
    "svm": {"clf__estimator__C": [0.1, 1.0, 10.0]},
    "rf": {},
    "knn": {"clf__n_neighbors": [1, 3, 5, 9, 15]},
    "logreg": {"clf__C": [0.01, 0.1, 1.0, 10.0]},
    "mlp": {},  # the slowest to fit: its defaults, no CV
}
LABELS = {"svm": "SVM (RBF)", "rf": "random forest", "knn": "k-nearest neighbours", "logreg": "logistic regression",
          "mlp": "MLP (1 hidden layer)"}


# ---------------------------------------------------------------------------- feature sets
@dataclass
class FeatureSet:
    """The penultimate features of one split.

    Attributes:
        features: (N, D) float32.
        targets: (N,) int64 class indices.
        paths: the N image files.
        class_names: the model's classes, in index order.
    """

    features: np.ndarray
    targets: np.ndarray
    paths: list[str]
    class_names: list[str]

    @classmethod
    def from_split(cls, split: SplitPredictions, class_names: Sequence[str]) -> "FeatureSet":
        return cls(split.features.astype(np.float32), split.targets.astype(np.int64),
                   [split.path(r) for r in range(len(split.targets))], list(class_names))

    def save(self, path: Path) -> None:
        """An .npz of plain arrays (strings as unicode arrays: no pickle needed to read it)."""
        def write(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, features=self.features, targets=self.targets, paths=np.array(self.paths, dtype=str),
                         class_names=np.array(self.class_names, dtype=str))

        atomic_write(path, write)

    @classmethod
    def load(cls, path: str | Path) -> "FeatureSet":
        with np.load(path, allow_pickle=False) as data:
            return cls(data["features"], data["targets"], data["paths"].tolist(), data["class_names"].tolist())


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def features_folder(save_path: str | Path) -> Path:
    """<run>/features for a run folder or a checkpoint file inside one."""
    return results_home(save_path) / RunFolder.FEATURES_DIR


# ---------------------------------------------------------------------------- classifiers
def build_classifier(name: str, seed: int = SEED, calibration_folds: int = 3) -> Any:
    """An unfitted Pipeline(StandardScaler, estimator) with fixed seeds and the default hyper-parameters.

    The SVM's probabilities are Platt-scaled (sigmoid) on `calibration_folds` cross-validated
    decision values of the SVC, which is then refit on all the images (ensemble=False).
    """
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    estimators = {
        "svm": lambda: CalibratedClassifierCV(SVC(kernel="rbf", C=1.0, gamma="scale", random_state=seed), method="sigmoid",
                                              cv=calibration_folds, ensemble=False),
        "rf": lambda: RandomForestClassifier(n_estimators=200, random_state=seed, n_jobs=1),
        # brute force: no search tree to store, and exact on any feature size
        "knn": lambda: KNeighborsClassifier(n_neighbors=5, weights="distance", algorithm="brute"),
        "logreg": lambda: LogisticRegression(C=1.0, max_iter=2000),
        "mlp": lambda: MLPClassifier(hidden_layer_sizes=(256,), alpha=1e-4, max_iter=500, random_state=seed),
    }
    if name not in estimators:
        raise UserError(f"unknown classical classifier '{name}'; choose from {', '.join(CLASSICAL)}")
    return Pipeline([("scale", StandardScaler()), ("clf", estimators[name]())])


@dataclass
class FitResult:
    """A fitted classifier: the pipeline, the hyper-parameters chosen, how."""

    name: str
    pipeline: Any
    params: dict[str, Any]
    cv_folds: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def fit_classifier(name: str, features: np.ndarray, targets: np.ndarray, seed: int = SEED) -> FitResult:
    """Fit one classifier on (standardised) features: a small stratified CV on these samples picks
    GRIDS[name] (3 folds, fewer when a class has fewer images; none below 2), then a refit on all."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(targets, dtype=np.int64)
    grid = {k: list(v) for k, v in GRIDS[name].items()}
    present = np.bincount(y)[np.bincount(y) > 0]
    fewest = int(present.min()) if len(present) > 1 else 0
    folds = min(3, fewest)
    calibration = min(3, fewest - math.ceil(fewest / folds)) if folds >= 2 else 0
    if name == "svm" and calibration < 2:  # too few images per class for calibration inside a CV: no CV
        folds, calibration = 0, min(3, fewest)
        if calibration < 2:
            raise UserError(f"--classical svm: the train split needs at least 2 images of every class, has {fewest}")
    pipeline = build_classifier(name, seed, calibration)
    if name == "knn":  # no more neighbours than the smallest training fold holds
        smallest = len(y) - math.ceil(len(y) / folds) if folds >= 2 else len(y)
        grid["clf__n_neighbors"] = [k for k in grid["clf__n_neighbors"] if k <= smallest] or [1]
    search_grid = folds >= 2 and any(len(v) > 1 for v in grid.values())
    if not search_grid:  # too few images per class for a CV: the defaults (knn: at most the images there are)
        pipeline.set_params(**({"clf__n_neighbors": min(5, max(grid["clf__n_neighbors"]))} if name == "knn" else {}))
        folds = 0
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the MLP and logreg stop at max_iter on hard features
        if search_grid:
            cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
            search = GridSearchCV(pipeline, grid, cv=cv, scoring="accuracy", n_jobs=1, refit=True).fit(x, y)
            pipeline, params = search.best_estimator_, dict(search.best_params_)
            extra = {"cv_accuracy": float(search.best_score_)}
        else:
            pipeline.fit(x, y)
            params, extra = {k: pipeline.get_params()[k] for k in grid}, {}
    params = {k.removeprefix("clf__").removeprefix("estimator__"): v for k, v in params.items()}
    return FitResult(name, pipeline, params, folds, time.perf_counter() - start, extra)


def class_probs(pipeline: Any, features: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, num_classes) probabilities of a fitted classifier; classes it never saw get 0."""
    proba = pipeline.predict_proba(np.asarray(features, dtype=np.float64))
    full = np.zeros((len(proba), num_classes), dtype=np.float64)
    full[:, np.asarray(pipeline.classes_, dtype=np.int64)] = proba
    return full


# ---------------------------------------------------------------------------- saving and loading
def save_classifier(fit: FitResult, folder: Path) -> dict[str, Any]:
    """<folder>/<name>.skops; returns its classical.json entry (file, hash, types it needs ...)."""
    import skops.io as sio

    data = sio.dumps(fit.pipeline)
    needs = sorted(sio.get_untrusted_types(data=data))
    unexpected = [t for t in needs if t not in TRUSTED_TYPES]
    if unexpected:  # a new scikit-learn stores another inner type: fail here, not when predicting
        raise RuntimeError(f"{fit.name}: skops needs types outside TRUSTED_TYPES: {unexpected}")
    path = folder / f"{fit.name}.skops"
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    return {"file": path.name, "sha256": hashlib.sha256(data).hexdigest(), "estimator": type(fit.pipeline[-1]).__name__,
            "params": fit.params, "cv_folds": fit.cv_folds, "fit_seconds": round(fit.seconds, 3), "trusted_types": needs,
            **fit.extra}


def read_index(folder: Path) -> dict[str, Any]:
    """classical.json of a features folder, or a clear error when there is none."""
    path = folder / INDEX_FILE
    if not path.is_file():
        raise UserError(f"no fitted classifiers in {folder} ({INDEX_FILE} missing): run "
                        f"metrice.py --save_path {folder.parent} --task features first")
    index = json.loads(path.read_text(encoding="utf-8"))
    if index.get("format") != INDEX_FORMAT:
        raise UserError(f"{path} was not written by metrice.py --task features")
    return index


def load_classifier(folder: Path, name: str) -> tuple[Any, dict[str, Any]]:
    """A saved classifier (skops.io, only TRUSTED_TYPES beyond skops' defaults) and the index.

    Raises:
        UserError: no such classifier, a file changed since it was written, or untrusted types inside.
    """
    import skops.io as sio
    from skops.io.exceptions import UntrustedTypesFoundException

    index = read_index(folder)
    entry = index["classifiers"].get(name)
    if entry is None:
        raise UserError(f"{folder} has no '{name}' classifier (fitted: {', '.join(index['classifiers']) or 'none'}); run "
                        f"metrice.py --save_path {folder.parent} --task features --classical {name}")
    path = folder / entry["file"]
    data = path.read_bytes() if path.is_file() else b""
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise UserError(f"{path} is missing or differs from the one metrice.py wrote: run metrice.py --task features again")
    try:
        return sio.loads(data, trusted=list(TRUSTED_TYPES)), index
    except UntrustedTypesFoundException as err:
        raise UserError(f"{path} holds types this toolkit does not trust ({err}); refusing to load it") from None


# ---------------------------------------------------------------------------- the task
def write_report(out: Run, results: dict[str, dict[str, float]], fits: dict[str, FitResult], title: str) -> None:
    """The test metrics of the network and of each classifier: one table, metrics.csv."""
    table = PrettyTable(["model", "accuracy", "mean acc (MPA)", "macro F1", "hyper-parameters", "fit s"])
    table.title = title
    for label, r in results.items():
        fit = fits.get(label)
        params = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in fit.params.items()) if fit else ""
        table.add_row([label if fit is None else f"{label}: {LABELS[label]}", f"{r['acc']:.4f}", f"{r['mean_acc']:.4f}",
                       f"{r['f1']:.4f}", params or "-", f"{fit.seconds:.2f}" if fit else "-"])
    table.align["model"] = "l"
    table.align["hyper-parameters"] = "l"
    print(table, flush=True)
    keys = list(next(iter(results.values())))
    out.write_csv("metrics.csv", ["model", *keys, "params"],
                  [[label, *[r[k] for k in keys], json.dumps(fits[label].params) if label in fits else ""]
                   for label, r in results.items()])


def extract_features(ensemble: Ensemble, class_names: Sequence[str], samples: dict[str, list[tuple[str, int]]],
                     batch_size: int, workers: int, tta: bool, device: torch.device
                     ) -> tuple[dict[str, FeatureSet], SplitPredictions]:
    """The features of each split (first member), and the test split's predictions."""
    sets: dict[str, FeatureSet] = {}
    test = None
    for split, pairs in samples.items():
        pred = predict_split(ensemble, pairs, batch_size, workers, tta, device, features=True, desc=f"features {split}")
        sets[split] = FeatureSet.from_split(pred, class_names)
        test = pred if split == "test" else test
    return sets, test


def run_feature_task(ensemble: Ensemble, class_names: Sequence[str], samples: dict[str, list[tuple[str, int]]],
                     names: Sequence[str], batch_size: int, workers: int, tta: bool, device: torch.device,
                     info: dict[str, Any]) -> dict[str, Any]:
    """metrice.py --task features: features of every split, classifiers fit on train, test metrics.

    Args:
        samples: {split: (path, class) pairs}, with train and test.
        names: classifiers to fit (CLASSICAL names).
        info: what args.yaml holds (the options, the splits' folders); copied into classical.json.

    Returns:
        {"output": the features folder, "metrics": {model: test metrics}, "fits": {name: FitResult}}.
    """
    member = ensemble.members[0]
    folder = features_folder(member.name)
    out = Run(folder)
    out.write_yaml(RunFolder.ARGS, info)
    (folder / INDEX_FILE).unlink(missing_ok=True)  # a run cut short leaves no index of stale files
    sets, test = extract_features(ensemble, class_names, samples, batch_size, workers, tta, device)
    for split, fs in sets.items():
        fs.save(folder / f"{split}.npz")
    print(f"features: {sets['train'].features.shape[1]}-d, " + ", ".join(f"{s} {len(f.targets)}" for s, f in sets.items()),
          flush=True)
    results = {"network": overall_metrics(test.targets, test.probs, list(class_names))}
    fits: dict[str, FitResult] = {}
    entries: dict[str, Any] = {}
    test_probs = {"network": test.probs}
    for name in names:
        fits[name] = fit_classifier(name, sets["train"].features, sets["train"].targets)
        test_probs[name] = class_probs(fits[name].pipeline, sets["test"].features, len(class_names))
        results[name] = overall_metrics(test.targets, test_probs[name], list(class_names))
        entries[name] = save_classifier(fits[name], folder) | {"test": {k: results[name][k] for k in ("acc", "mean_acc", "f1")}}
    write_report(out, results, fits, f"test metrics: {member.name} and classifiers on its features")
    out.write_csv("test_predictions.csv", ["path", "true_class", *[f"{m}_class" for m in test_probs]],
                  [[p, class_names[t], *[class_names[int(pr[r].argmax())] for pr in test_probs.values()]]
                   for r, (p, t) in enumerate(zip(sets["test"].paths, sets["test"].targets))])
    import sklearn
    import skops

    checkpoint = resolve_weights(member.name, "torch")
    index = {"format": INDEX_FORMAT, "version": 1, "checkpoint": str(checkpoint), "checkpoint_sha256": file_sha256(checkpoint),
             "model_name": member.backend.meta.model_name, "class_names": list(member.backend.meta.class_names),
             "feature_dim": int(sets["train"].features.shape[1]), "test_tta": tta, "seed": SEED,
             "splits": {s: {"file": f"{s}.npz", "images": len(f.targets)} for s, f in sets.items()},
             "versions": {"scikit-learn": sklearn.__version__, "skops": skops.__version__}, **info, "classifiers": entries}
    atomic_write_text(folder / INDEX_FILE, json.dumps(index, indent=2) + "\n")
    return {"output": folder, "metrics": results, "fits": fits}


# ---------------------------------------------------------------------------- predict.py
class ClassicalEnsemble:
    """An Ensemble of one PyTorch model whose probabilities come from a classical classifier fit on
    its penultimate features (predict.py --classical); every other attribute is the ensemble's."""

    def __init__(self, ensemble: Ensemble, name: str, pipeline: Any) -> None:
        self.ensemble, self.name, self.pipeline = ensemble, name, pipeline

    def __getattr__(self, attr: str) -> Any:
        if attr == "ensemble":  # not set yet (a copy being built): no endless recursion
            raise AttributeError(attr)
        return getattr(self.ensemble, attr)

    def __len__(self) -> int:
        return len(self.ensemble)

    def predict(self, inputs: Sequence[np.ndarray], plan: InputPlan) -> tuple[np.ndarray, list[np.ndarray]]:
        """(N, C) float32 probabilities of the classifier on the model's features of uint8 batches
        (TenCrop: averaged features), as Ensemble.predict returns them."""
        feats = torch_features(self.ensemble.members[0].backend, inputs[plan.group_of[0]])
        probs = class_probs(self.pipeline, feats, len(self.ensemble.class_names)).astype(np.float32)
        return probs, [probs]

    def describe(self) -> str:
        return f"--classical {self.name}: {LABELS[self.name]} on the penultimate features of {self.ensemble.members[0].name}"


def classical_ensemble(ensemble: Ensemble, save_path: str | Path, name: str, tta: bool = False) -> ClassicalEnsemble:
    """predict.py --classical NAME: the classifier saved by metrice.py --task features for this model.

    Raises:
        UserError: not a PyTorch model, no such classifier, or one fit on another checkpoint's features.
    """
    backend = ensemble.members[0].backend
    if len(ensemble) != 1 or getattr(backend, "model_type", None) != "torch":
        raise UserError("--classical reads the penultimate features inside the network: pass one --save_path (one fold "
                        "of a --kfold run: RUN/foldN) with --model_type torch")
    folder = features_folder(save_path)
    pipeline, index = load_classifier(folder, name)
    checkpoint = resolve_weights(save_path, "torch")
    if file_sha256(checkpoint) != index["checkpoint_sha256"]:
        raise UserError(f"the classifiers in {folder} were fit on the features of {index['checkpoint']}, not of {checkpoint}: "
                        f"run metrice.py --save_path {save_path} --task features again")
    if bool(index.get("test_tta")) != tta:
        LOGGER.warning("--classical %s was fit on features %s TenCrop TTA; predicting %s it", name,
                       "with" if index.get("test_tta") else "without", "with" if tta else "without")
    return ClassicalEnsemble(ensemble, name, pipeline)
