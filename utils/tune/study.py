"""tune.py's Optuna study: where it is stored, its sampler and pruner, and the loop that runs trials
until the study holds --trials finished ones (complete or pruned), whichever process runs them.

    study = open_study(storage_url(out, ""), "exp", "maximize", sampler, pruner, record)
    run_trials(study, objective, trials=20, timeout=0)

The storage is any RDB URL optuna takes (SQLite by default: OUT/study.db) or a Redis journal
(redis://host:port/db). Several processes or machines running the same command share the study
through it; there is no coordinator. Before each trial a process counts the trials finished or
running, and a trial that finds, once created, that N trials numbered before it are finished or
running gives way (recorded as failed, "not needed"), so two processes that start their last trial
at once do not overshoot (docs: README "Hyper-parameter search").
"""
from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from utils.core.log import UserError

LOGGER = logging.getLogger(__name__)

PRUNERS = ("median", "hyperband", "none")
SAMPLERS = ("tpe", "random", "qmc", "gp")
SCHEMA_ATTEMPTS = 5  # tries to open a new SQLite study file that other processes are creating too
MAX_FAILED_IN_A_ROW = 5  # then the cause is the set-up, not the sampled values: stop and say so
INSTALL = "pip install -r requirements/tune.txt"


def import_optuna() -> Any:
    """optuna, or one line saying how to install it."""
    try:
        import optuna
    except ImportError:
        raise UserError(f"tune.py needs optuna: {INSTALL}") from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # tune.py prints a line of its own per trial
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def check_study_folder(out: Path) -> None:
    """--save_path is new, empty, or a tune.py study's own folder (study.db, trials.csv, trial_NNNN):
    the table, best.yaml and the plots are written over only there, never over a user's files.

    Raises:
        UserError: a folder holding files that no study wrote.
    """
    if not out.is_dir() or all(p.name.startswith(".") for p in out.iterdir()):  # another process's write probe
        return
    if (out / "study.db").exists() or (out / "trials.csv").exists() or any(out.glob("trial_[0-9]*")):
        return
    raise UserError(f"--save_path {out} holds files that are not a tune.py study's (no study.db, trials.csv or "
                    "trial_NNNN): give a new folder, or the folder of the study to resume")


def storage_url(out: Path, storage: str) -> str:
    """--storage, or the default: a SQLite file in the output folder."""
    return storage or f"sqlite:///{(out / 'study.db').resolve()}"


def make_storage(url: str) -> Any:
    """An optuna storage for a URL: a Redis journal (redis://, rediss://, unix://) or an RDB storage
    (SQLite, PostgreSQL, MySQL ...; trials of a process that died are failed after 3 minutes without
    a heartbeat)."""
    optuna = import_optuna()
    if url.split("://", 1)[0] in ("redis", "rediss", "unix"):
        try:
            from optuna.storages.journal import JournalRedisBackend

            return optuna.storages.JournalStorage(JournalRedisBackend(url))
        except ImportError:
            raise UserError(f"--storage {url}: a Redis journal needs the redis package: pip install redis") from None
    sqlite = url.startswith("sqlite")
    kwargs = {"connect_args": {"timeout": 60}} if sqlite else {}  # processes wait for the file's lock
    for attempt in range(SCHEMA_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=60, grace_period=180)
        except Exception as err:  # sqlalchemy: a malformed URL, a missing driver, a server that does not answer
            # processes started together on a new SQLite file race to create its tables; the loser retries
            if sqlite and type(err).__name__ in ("IntegrityError", "OperationalError") and attempt + 1 < SCHEMA_ATTEMPTS:
                time.sleep(0.2 * (attempt + 1))
                continue
            raise UserError(f"--storage {url}: cannot open it ({type(err).__name__}: {str(err).splitlines()[0]}); "
                            "give an RDB URL optuna takes (sqlite:///FILE, postgresql://...) or redis://HOST:PORT/DB") from None
    raise AssertionError("unreachable")


def make_sampler(name: str, seed: int | None) -> Any:
    """tune.py --tune_sampler (main.py's --sampler is the training order): TPE (default), random, quasi-Monte Carlo or a Gaussian process."""
    optuna = import_optuna()
    samplers = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
                "qmc": optuna.samplers.QMCSampler, "gp": optuna.samplers.GPSampler}
    return samplers[name](seed=seed)


def make_pruner(name: str, epochs: int, startup: int, warmup: int) -> Any:
    """--pruner: median (a trial below the median of the earlier trials at the same epoch stops),
    hyperband (successive halving over the epochs) or none.

    Args:
        name: median, hyperband or none.
        epochs: the epochs of a trial (--epoch): hyperband's largest budget.
        startup: trials finished before the median pruner prunes.
        warmup: epochs a trial trains before it can be pruned.
    """
    optuna = import_optuna()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=warmup)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(warmup, 1), max_resource=max(epochs, 1))
    return optuna.pruners.NopPruner()


def open_study(url: str, name: str, direction: str, sampler: Any, pruner: Any, record: dict[str, Any]) -> Any:
    """Create the study, or load it if it exists (the same command resumes it).

    Args:
        url: the storage URL.
        name: the study's name.
        direction: maximize or minimize.
        sampler, pruner: this process's.
        record: what must stay the same for a study to go on (the metric, the search space): stored
            with a new study, compared with a loaded one.

    Raises:
        UserError: the storage cannot be reached, or the study was started with another direction,
            metric or search space.
    """
    optuna = import_optuna()
    storage = make_storage(url)
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction=direction, sampler=sampler,
                                    pruner=pruner, load_if_exists=True)
    except UserError:
        raise
    except Exception as err:  # a database or Redis that does not answer
        raise UserError(f"--storage {url}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    if study.direction.name.lower() != direction:
        raise UserError(f"study '{name}' in {url} {study.direction.name.lower()}s its value, this command would "
                        f"{direction} it (another --metrice?): give another --study_name or --save_path")
    for key, value in record.items():
        stored = study.user_attrs.get(key)
        if stored is None:
            study.set_user_attr(key, value)
        elif stored != value:
            raise UserError(f"study '{name}' in {url} was started with another {key} ({stored}); resume it with the "
                            f"same one, or give another --study_name or --save_path for a new study")
    return study


def counts(study: Any) -> tuple[int, int]:
    """(finished, running) trials of the study: finished = complete or pruned (failed ones do not count)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
    running = sum(t.state == TrialState.RUNNING for t in trials)
    return len(trials) - running, running


def ahead_of(study: Any, number: int) -> int:
    """Trials numbered before `number` that are finished or running (the count that decides whether
    trial `number` is still needed)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
    return sum(t.number < number for t in trials)


def run_trials(study: Any, objective: Callable[[Any], float], trials: int, timeout: float) -> int:
    """Run trials, one at a time, until the study holds `trials` finished or running ones, or
    `timeout` seconds have passed (0: no limit).

    Args:
        study: the study.
        objective: one trial (utils.tune.objective.Objective): returns the value, raises
            optuna.TrialPruned, or raises for a failed trial (recorded FAIL, and the loop goes on).
        trials: the number of finished trials the study should hold.
        timeout: seconds after which no new trial starts (0: none).

    Returns:
        The number of trials this process ran.

    Raises:
        UserError: MAX_FAILED_IN_A_ROW trials of this process failed one after another.
        KeyboardInterrupt: Ctrl-C (the trial under way recorded failed).
    """
    from optuna.trial import TrialState

    start, ran, failed, last = time.monotonic(), 0, 0, ""
    while True:
        finished, running = counts(study)
        if finished + running >= trials:
            return ran
        if timeout and time.monotonic() - start >= timeout:
            print(f"--timeout {timeout:g} s reached: no new trial started ({finished} of {trials} finished)", flush=True)
            return ran
        done: list[Any] = []
        study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[lambda _s, trial: done.append(trial)])
        trial = done[0]
        if trial.user_attrs.get("surplus"):
            continue
        ran += 1
        failed = failed + 1 if trial.state == TrialState.FAIL else 0
        last = trial.user_attrs.get("error", last)
        if failed >= MAX_FAILED_IN_A_ROW:
            raise UserError(f"{failed} trials failed one after another (the last: {last}); fix the cause and run the "
                            "same command again (the study resumes)")
