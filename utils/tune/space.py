"""tune.py's search space: a YAML file naming main.py flags and the values each trial may give them.

    lr: {low: 1.0e-4, high: 1.0e-2, log: true}     # a float range, sampled on a log scale
    image_size: {low: 32, high: 64, step: 16}       # an integer range (the flag's own type decides)
    optimizer: {choices: [AdamW, SGD]}              # one of these values
    ema: {choices: [true, false]}                   # a switch

Each key is a main.py flag name (its destination, as in a config file); each value is checked as a
config file's value is (utils.core.config.config_value) and, one at a time against the base options,
by main.py's own checks (utils.train.flags.check_values): a space that cannot work is one line naming
the key before any trial. A trial's options are the base options with the sampled values
(`trial_options`), checked again as a whole (a refused combination fails that trial only).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from utils.core.config import config_value, finite_float, load_yaml
from utils.core.log import UserError
from utils.core.options import Options
from utils.train.flags import check_values

SPEC_KEYS = ("low", "high", "log", "step", "choices")
# main.py flags a trial cannot take: tune.py owns the run folders, and a trial is one plain run
NOT_SEARCHED = ("config", "save_path", "resume", "list_models", "kfold", "lr_find", "version", "help")


class Param:
    """One searched flag.

    Args:
        name: the flag's destination (lr, Augment ...).
        kind: "int", "float" (a range) or "choices".
        low, high: the range's ends (inclusive).
        log: sample the range on a log scale.
        step: the range's step (None: any value).
        choices: the values of a "choices" parameter, in main.py's types.
    """

    def __init__(self, name: str, kind: str, low: float | None = None, high: float | None = None, log: bool = False,
                 step: float | None = None, choices: tuple[Any, ...] = ()) -> None:
        self.name, self.kind, self.low, self.high, self.log, self.step, self.choices = name, kind, low, high, log, step, choices

    def sample(self, trial: Any) -> Any:
        """This parameter's value for an optuna trial."""
        if self.kind == "choices":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def to_plain(self) -> dict[str, Any]:
        """The parameter as YAML-able data (stored with the study, compared when it is resumed)."""
        if self.kind == "choices":
            return {"choices": list(self.choices)}
        return {"low": self.low, "high": self.high, "log": self.log, "step": self.step}


def _range(name: str, spec: dict[str, Any], action: argparse.Action, where: str) -> Param:
    """A low/high range of a numeric flag."""
    kind = "int" if action.type is int else "float"
    missing = [k for k in ("low", "high") if k not in spec]
    if missing:
        raise UserError(f"{where}: a range needs low and high; '{missing[0]}' is missing")
    number = int if kind == "int" else (int, float)
    for key in ("low", "high", "step"):
        value = spec.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, number) or not math.isfinite(value)):
            raise UserError(f"{where}: '{key}' must be {'an integer' if kind == 'int' else 'a number'} "
                            f"(--{name} takes {kind}s), not {value!r}")
    low, high, step, log = spec["low"], spec["high"], spec.get("step"), spec.get("log", False)
    if not isinstance(log, bool):
        raise UserError(f"{where}: 'log' must be true or false, not {log!r}")
    if low > high:
        raise UserError(f"{where}: low {low} is above high {high}")
    if step is not None and step <= 0:
        raise UserError(f"{where}: 'step' must be positive, not {step}")
    if log and step is not None and not (kind == "int" and step == 1):
        raise UserError(f"{where}: a log scale takes no step (give one of log or step)")
    if log and low <= 0:
        raise UserError(f"{where}: a log scale needs low > 0, not {low}")
    return Param(name, kind, float(low) if kind == "float" else low, float(high) if kind == "float" else high, log, step)


def parse_param(name: str, spec: Any, action: argparse.Action, path: str) -> Param:
    """One entry of the space file, checked for its flag's type and choices.

    Raises:
        UserError: one line naming the file and the key.
    """
    where = f"space {path}: '{name}'"
    if not isinstance(spec, dict) or not spec:
        raise UserError(f"{where} must be a mapping such as {{low: 0.0001, high: 0.01, log: true}} or "
                        f"{{choices: [a, b]}}, not {spec!r}")
    unknown = [k for k in spec if k not in SPEC_KEYS]
    if unknown:
        raise UserError(f"{where}: unknown entry '{unknown[0]}' (known: {', '.join(SPEC_KEYS)})")
    if action.nargs in ("+", "*"):
        raise UserError(f"{where}: --{name} takes a list of values, which the search does not sample")
    if "choices" in spec:
        if set(spec) != {"choices"}:
            raise UserError(f"{where}: give either choices or a range (low, high, log, step), not both")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise UserError(f"{where}: 'choices' must be a non-empty list, not {choices!r}")
        converted = tuple(config_value(action, c, path) for c in choices)
        if len(set(map(repr, converted))) != len(converted):
            raise UserError(f"{where}: 'choices' lists a value twice: {choices}")
        return Param(name, "choices", choices=converted)
    if action.type not in (int, float, finite_float) or action.choices is not None:
        raise UserError(f"{where}: --{name} is not a number: give its values as choices: [...]")
    return _range(name, spec, action, where)


class SearchSpace:
    """The flags a study searches and how.

    Args:
        params: the parameters, in the file's order.
        path: the file they came from (for messages).
    """

    def __init__(self, params: list[Param], path: str) -> None:
        self.params, self.path = params, path

    @classmethod
    def load(cls, path: str | Path, parser: argparse.ArgumentParser, base: Options) -> SearchSpace:
        """Read and check a space file against main.py's parser and the base options.

        Args:
            path: the YAML file (--space).
            parser: main.py's parser (the flags, their types and choices).
            base: the base options (main.py's parse_args of the flags given to tune.py).

        Raises:
            UserError: the file is missing or not YAML, a key is no main.py flag or cannot be searched,
                a spec is malformed, or a value of it fails main.py's checks.
        """
        data = load_yaml(path)
        actions = {a.dest: a for a in parser._actions if a.dest not in NOT_SEARCHED}
        if not data:
            raise UserError(f"space {path} names no flag to search: add entries such as lr: {{low: 1.0e-4, high: 1.0e-2, log: true}}")
        aliases = {s[2:]: a.dest for a in parser._actions for s in a.option_strings if s.startswith("--")}
        params = []
        for key, spec in data.items():
            name = aliases.get(str(key), key)  # a flag by any of its names: augment or Augment, epochs or epoch
            if name in NOT_SEARCHED:
                raise UserError(f"space {path}: '{name}' cannot be searched (tune.py sets it for each trial or refuses it)")
            if name not in actions:
                import difflib

                hint = difflib.get_close_matches(str(name), sorted(set(actions) | set(aliases)), n=1)
                raise UserError(f"space {path}: '{name}' is not a main.py flag" + (f" (did you mean '{hint[0]}'?)" if hint else "")
                                + "; keys are flag names without the dashes, e.g. lr, optimizer, augment")
            if any(p.name == name for p in params):
                raise UserError(f"space {path}: '{key}' and another name of the same flag (--{name}) are both given; keep one")
            params.append(parse_param(name, spec, actions[name], str(path)))
        space = cls(params, str(path))
        space.check_against(base)
        return space

    def check_against(self, base: Options) -> None:
        """Every end of every range and every choice, alone with the base options, passes main.py's checks."""
        for param in self.params:
            values = param.choices if param.kind == "choices" else (param.low, param.high)
            for value in values:
                try:
                    trial_options(base, {param.name: value}, base.save_path)
                except UserError as err:
                    raise UserError(f"space {self.path}: '{param.name}' value {value!r} is refused with the other "
                                    f"options: {err}") from None

    def sample(self, trial: Any) -> dict[str, Any]:
        """A value for every parameter, from an optuna trial (its sampler chooses)."""
        return {p.name: p.sample(trial) for p in self.params}

    def to_plain(self) -> dict[str, Any]:
        """The space as YAML-able data."""
        return {p.name: p.to_plain() for p in self.params}


def trial_options(base: Options, params: dict[str, Any], save_path: str | Path) -> Options:
    """The options of one trial: the base options, the sampled values, the trial's run folder;
    checked by main.py's checks (utils.train.flags.check_values) as a whole.

    Raises:
        UserError: a value or a combination main.py refuses (--swa with --ema ...).
    """
    values = base.to_dict() | params | {"save_path": str(save_path)}
    if "seed" in params:  # main.py: the flag wins over the config's random_seed
        values["random_seed"] = params["seed"]
    values["explicit"] = set(base.get("explicit", set())) | set(params) | {"save_path"}
    options = Options(values)
    check_values(options)
    return options
