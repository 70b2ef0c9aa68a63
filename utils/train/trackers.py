"""Experiment trackers beside TensorBoard: Weights & Biases and MLflow (main.py --tracker).

    tracker = create_tracker("mlflow", run.path, "pytorch-classifier", options)   # None for "none"
    tracker.log_params(options)                       # every option of the run
    tracker.log_metrics({"train/loss": 0.3, "val/acc": 0.9, "lr": 1e-3}, step=epoch)
    tracker.log_artifacts([run / "best.pt", run / "train.log", ...])
    tracker.close()

Both work offline by default, inside the run folder: wandb in offline mode (<run>/wandb/, upload
later with `wandb sync <run>/wandb/offline-run-*`; WANDB_MODE=online logs live), MLflow in a local
file store (<run>/mlruns/, browse with `mlflow ui --backend-store-uri <run>/mlruns`;
MLFLOW_TRACKING_URI points it at a server instead). Neither package is installed by the training
requirements: `pip install -r requirements/trackers.txt`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable

from utils.core.log import UserError

LOGGER = logging.getLogger(__name__)

PACKAGES = {"wandb": "wandb", "mlflow": "mlflow-skinny"}  # --tracker -> the package that provides it


def flatten(options: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested options as flat `key.sub: text` pairs (MLflow params are strings)."""
    flat: dict[str, str] = {}
    for key, value in options.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat |= flatten(value, name + ".")
        else:
            flat[name] = str(value)[:500]
    return flat


class Tracker:
    """What the trainer calls; each tracker implements it. Calls after close() do nothing."""

    name = "none"

    def log_params(self, options: dict[str, Any]) -> None:
        raise NotImplementedError

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        raise NotImplementedError

    def log_artifacts(self, files: Iterable[Path]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class WandbTracker(Tracker):
    """Weights & Biases, offline unless WANDB_MODE says otherwise; files in <run>/wandb/."""

    name = "wandb"

    def __init__(self, run_path: Path, project: str) -> None:
        import wandb

        self.wandb = wandb
        mode = os.environ.get("WANDB_MODE", "offline")
        self.run = wandb.init(project=project, name=run_path.name, dir=str(run_path), mode=mode,
                              settings=wandb.Settings(console="off", silent=True))
        self.where = str(Path(self.run.dir).parent)

    def log_params(self, options: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.config.update(options, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_artifacts(self, files: Iterable[Path]) -> None:
        files = [Path(f) for f in files if Path(f).is_file()]
        if self.run is None or not files:
            return
        artifact = self.wandb.Artifact(f"{self.run.name}-files", type="model")
        for file in files:
            artifact.add_file(str(file), name=file.name)
        self.run.log_artifact(artifact)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class MlflowTracker(Tracker):
    """MLflow, in the file store <run>/mlruns/ unless MLFLOW_TRACKING_URI names another."""

    name = "mlflow"

    def __init__(self, run_path: Path, project: str) -> None:
        import mlflow

        self.mlflow = mlflow
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (run_path / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this opt-in to a file store
        self.where = uri
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(project)
        self.run = mlflow.start_run(run_name=run_path.name)

    def log_params(self, options: dict[str, Any]) -> None:
        if self.run is not None:
            self.mlflow.log_params(flatten(options))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.run is not None:
            self.mlflow.log_metrics(metrics, step=step)

    def log_artifacts(self, files: Iterable[Path]) -> None:
        for file in files:
            if self.run is not None and Path(file).is_file():
                self.mlflow.log_artifact(str(file))

    def close(self) -> None:
        if self.run is not None:
            self.mlflow.end_run()
            self.run = None


TRACKER_CLASSES: dict[str, type[Tracker]] = {"wandb": WandbTracker, "mlflow": MlflowTracker}


def create_tracker(name: str, run_path: Path, project: str) -> Tracker | None:
    """The tracker --tracker names (None for "none").

    Raises:
        UserError: its package is not installed.
    """
    if not name or name == "none":
        return None
    cls = TRACKER_CLASSES[name]
    try:
        tracker = cls(Path(run_path), project)
    except ImportError:
        raise UserError(f"--tracker {name} needs the {PACKAGES[name]} package: pip install -r requirements/trackers.txt "
                        f"(or pip install {PACKAGES[name]})") from None
    print(f"tracker: {name} ({tracker.where})", flush=True)
    return tracker


def epoch_metrics(row: dict[str, Any], seconds: float) -> dict[str, float]:
    """A train.log row as tracker metrics: train/loss, val/acc, lr, ... (val is train.log's test_*)."""
    out = {"epoch_seconds": float(seconds)}
    for key, value in row.items():
        if key == "epoch" or value is None:
            continue
        if key == "lr":
            out["lr"] = float(value)
        elif key.startswith("test_"):
            out["val/" + key.removeprefix("test_")] = float(value)
        else:
            out["train/" + key] = float(value)
    return out
