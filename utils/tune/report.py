"""What tune.py writes into its folder: the table of trials (printed, and trials.csv), best.yaml (a
main.py config that trains the best trial's options as they are) and the PNG plots of Optuna's
matplotlib visualisations (optimisation history, parameter importances, slice).

    print(trials_table(rows))
    write_trials_csv(out / "trials.csv", rows)
    write_best_yaml(out / "best.yaml", best_config(base, study.best_trial.params, out))
    write_plots(study, out)
"""
from __future__ import annotations

import csv
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import yaml

from utils.core.config import load_yaml, to_plain
from utils.core.files import atomic_write, atomic_write_text
from utils.core.options import Options

LOGGER = logging.getLogger(__name__)

COLUMNS = ("number", "state", "value", "seconds", "epochs", "run", "error")
# options that are not a trained run's own: best.yaml leaves them out
NOT_IN_CONFIG = ("config", "save_path", "resume", "list_models", "explicit")


def trial_rows(study: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per trial (number, state, value, seconds, epochs trained, run folder, error, then each
    parameter) and the parameter names; trials that gave way to another process's are left out."""
    rows, names = [], []
    for trial in study.get_trials(deepcopy=False):
        if trial.user_attrs.get("surplus"):
            continue
        seconds = ((trial.datetime_complete - trial.datetime_start).total_seconds()
                   if trial.datetime_complete and trial.datetime_start else None)
        row = {"number": trial.number, "state": trial.state.name, "value": trial.value, "seconds": seconds,
               "epochs": trial.user_attrs.get("epochs"), "run": trial.user_attrs.get("run", ""),
               "error": trial.user_attrs.get("error", "")}
        for name, value in trial.params.items():
            names += [name] if name not in names else []
            row[name] = value
        rows.append(row)
    return rows, names


def _shown(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def trials_table(rows: list[dict[str, Any]], names: list[str], metric: str) -> str:
    """The trials as a PrettyTable: number, parameters, value, state, seconds (and why a trial failed)."""
    from prettytable import PrettyTable

    table = PrettyTable(["trial", *names, metric, "state", "epochs", "seconds", "error"])
    table.align = "r"
    table.align["error"] = "l"
    for row in rows:
        table.add_row([row["number"], *[_shown(row.get(n)) for n in names], _shown(row["value"]), row["state"],
                       _shown(row["epochs"]), _shown(row["seconds"] and round(row["seconds"], 1)), row["error"][:60]])
    return table.get_string()


def write_trials_csv(path: Path, rows: list[dict[str, Any]], names: list[str]) -> None:
    """trials.csv: one row per trial, the columns of COLUMNS then one per parameter (empty where a trial
    has none)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*COLUMNS, *names], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())


def best_config(base: Options, params: dict[str, Any], out: Path) -> dict[str, Any]:
    """The best trial as a main.py config: the base config file's keys, the flags given on the command
    line, the tuned values, and a save_path of its own (OUT/best: `main.py --config OUT/best.yaml`
    trains it there, as a run of its own, not into a trial's folder).

    Args:
        base: the base options (their --config file and the flags typed: `explicit`).
        params: the best trial's parameters (flag name -> value in main.py's types).
        out: the study's folder.
    """
    config = load_yaml(base.config) if base.get("config") else {}
    typed = {k: base.get(k) for k in sorted(base.get("explicit", ())) if k not in NOT_IN_CONFIG}
    return to_plain({**config, **typed, **params, "save_path": str(out / "best")})


def write_best_yaml(path: Path, config: dict[str, Any], header: str) -> None:
    """best.yaml: `header` as comment lines, then the config."""
    comments = "".join(f"# {line}\n" for line in header.splitlines())
    atomic_write_text(path, comments + yaml.safe_dump(config, sort_keys=False, allow_unicode=True))


def _save(axes: Any, path: Path) -> None:
    """The figure of an axes (or an array of axes) optuna drew with pyplot, as a PNG; then closed."""
    import numpy as np
    from matplotlib import pyplot

    fig = np.asarray(axes).flat[0].figure
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    pyplot.close(fig)


def write_plots(study: Any, out: Path, complete: int) -> list[str]:
    """history.png, importances.png (two complete trials and two parameters at least) and slice.png.

    Returns:
        The files written, and a note for each plot left out.
    """
    from utils.draw.figures import offscreen_pyplot

    offscreen_pyplot()
    from optuna.visualization import matplotlib as plots

    written: list[str] = []
    params = {name for trial in study.get_trials(deepcopy=False) for name in trial.params}
    wanted = [("history.png", plots.plot_optimization_history, complete >= 1, "no complete trial"),
              ("importances.png", plots.plot_param_importances, complete >= 2 and len(params) >= 2,
               "parameter importances need 2 complete trials and 2 parameters"),
              ("slice.png", plots.plot_slice, complete >= 1 and params, "no complete trial")]
    for name, plot, possible, why in wanted:
        if not possible:
            written.append(f"{name} left out: {why}")
            continue
        try:
            with warnings.catch_warnings():  # matplotlib's notes on one-valued axes
                warnings.simplefilter("ignore", UserWarning)
                _save(plot(study), out / name)
            written.append(str(out / name))
        except Exception as err:  # a plot is a convenience: the study and its tables stand without it
            LOGGER.warning("%s not drawn: %s: %s", name, type(err).__name__, err)
            written.append(f"{name} left out: {type(err).__name__}")
    return written
