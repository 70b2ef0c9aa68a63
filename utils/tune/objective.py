"""One tune.py trial: the sampled flags on top of the base options, one main.py training run in this
process into OUT/trial_NNNN (the optuna trial number: unique across the processes of a study), every
epoch's validation metric reported to Optuna, which may prune the run after an epoch.

    objective = Objective(base, space, out, train=main.train, trials=20)
    study.optimize(objective, n_trials=1, catch=(Exception,))      # utils.tune.study.run_trials

A trial that raises (a refused flag combination, a loss that is not finite, out of memory) is
recorded failed with its reason in one line (the trial's user attribute "error"); Ctrl-C records the
trial failed ("interrupted") and goes up to tune.py.
"""
from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any, Callable

from utils.core.log import UserError
from utils.core.options import Options
from utils.tune.space import SearchSpace, trial_options
from utils.tune.study import ahead_of, import_optuna

# main.py's train(options, resumed, on_epoch): the training run (tune.py passes main.train)
TrainFunction = Callable[[Options, Any, Callable[[int, float], bool]], dict[str, Any]]


class TrialFailed(Exception):
    """A trial that could not finish; its one-line reason is its user attribute "error"."""


class NotNeeded(Exception):
    """A trial started after the study already held enough finished or running trials."""


def one_line(err: BaseException) -> str:
    """An exception as one line: a UserError's own message; otherwise its type and first line."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    line = text if isinstance(err, UserError) else f"{type(err).__name__}: {text}".rstrip(": ")
    return line if len(line) <= 300 else line[:297] + "..."


def trial_folder(out: Path, number: int) -> Path:
    """The run folder of trial `number` (OUT/trial_0007)."""
    return out / f"trial_{number:04d}"


def free_memory() -> None:
    """What a trial left behind (a model, its optimizer, a CUDA cache), freed before the next one."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Objective:
    """The objective optuna calls for each trial.

    Args:
        base: the base options (main.py's, of the flags given to tune.py).
        space: the search space.
        out: the study's folder (the trials' run folders go into it).
        train: main.py's train(options, resumed, on_epoch).
        trials: the study's number of trials (a trial started beyond it gives way).
        metric: the metric optimised, for the printed lines.
    """

    def __init__(self, base: Options, space: SearchSpace, out: Path, train: TrainFunction, trials: int,
                 metric: str) -> None:
        self.base, self.space, self.out, self.train, self.trials, self.metric = base, space, out, train, trials, metric

    def __call__(self, trial: Any) -> float:
        optuna = import_optuna()
        if ahead_of(trial.study, trial.number) >= self.trials:  # another process started the last one first
            trial.set_user_attr("surplus", True)
            trial.set_user_attr("error", f"not needed: {self.trials} trials were finished or running when it started")
            raise NotNeeded(trial.user_attrs["error"])
        start = time.perf_counter()
        try:
            return self.run_trial(trial)
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:  # optuna records the trial failed and hands the interrupt on to tune.py
            trial.set_user_attr("error", "interrupted (Ctrl-C)")
            raise
        except Exception as err:  # the study goes on: the reason is recorded and said in one line
            line = one_line(err)
            trial.set_user_attr("error", line)
            print(f"trial {trial.number} FAILED after {time.perf_counter() - start:.1f} s: {line}", flush=True)
            raise TrialFailed(line) from None
        finally:
            free_memory()

    def run_trial(self, trial: Any) -> float:
        """Sample, train, report each epoch; the run's best value, or optuna.TrialPruned."""
        optuna = import_optuna()
        params = self.space.sample(trial)
        folder = trial_folder(self.out, trial.number)
        trial.set_user_attr("run", str(folder))
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        print(f"trial {trial.number}: {shown} -> {folder}", flush=True)
        epochs: list[tuple[int, float]] = []
        pruned: list[bool] = []

        def on_epoch(epoch: int, value: float) -> bool:
            epochs.append((epoch, value))
            trial.set_user_attr("epochs", len(epochs))
            trial.report(value, epoch)
            pruned.append(trial.should_prune())
            return pruned[-1]

        start = time.perf_counter()
        if folder.exists():
            raise UserError(f"{folder} exists already (another study writing into {self.out}?): give each study its "
                            "own --save_path")
        result = self.train(trial_options(self.base, params, folder), None, on_epoch)
        seconds = time.perf_counter() - start
        if pruned and pruned[-1]:  # the trainer stopped after this epoch
            epoch, value = epochs[-1]
            print(f"trial {trial.number} PRUNED after epoch {epoch} ({seconds:.1f} s): val {self.metric} {value:.4f}",
                  flush=True)
            raise optuna.TrialPruned(f"pruned after epoch {epoch}")
        value = float(result["best_value"])
        trial.set_user_attr("metric", result["best_metric"])
        print(f"trial {trial.number} COMPLETE ({seconds:.1f} s): best {result['best_metric']} {value:.4f} at epoch "
              f"{result['best_epoch']}", flush=True)
        return value
