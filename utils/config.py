"""Options: YAML config file -> argparse defaults -> command line (the command line wins).

The config file is data, read with yaml.safe_load; nothing in it is executed. Its keys are either
flag names (they change that flag's default) or config-only keys such as lr_scheduler (listed in
CONFIG_ONLY_KEYS). An unknown key is an error that lists the known ones.
"""
from __future__ import annotations

import argparse
import difflib
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from utils.log import UserError

LOGGER = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "config.yaml"

# Keys that only the config file sets (pytorch-classifier kept these in config/config.py).
CONFIG_ONLY_KEYS: dict[str, Any] = {
    "lr_scheduler": None,
    "lr_scheduler_params": {},
    "random_seed": 0,
    "plot_train_batch_count": 5,
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a 'did you mean' hint for mistyped flags and no abbreviated flags."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # noqa: D401 - argparse's signature
        if message.startswith("unrecognized arguments:"):
            known = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
            hints = []
            for arg in message.split(":", 1)[1].split():
                flag = arg.split("=", 1)[0]
                if flag.startswith("-"):
                    close = difflib.get_close_matches(flag, known, n=2, cutoff=0.6)
                    if close:
                        hints.append(f"{flag} -> {' or '.join(close)}?")
            if hints:
                message += " (did you mean: " + "; ".join(hints) + ")"
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message}\n")


def _config_path_from_argv(argv: Sequence[str]) -> str | None:
    """Find --config's value without parsing the rest (the full parse comes after)."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping safely.

    Args:
        path: the YAML file.

    Returns:
        The mapping (empty for an empty file).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path} (pass --config PATH to an existing YAML file)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"config file {path}{where} is not valid YAML: {getattr(err, 'problem', err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of key: value, not {type(data).__name__}")
    return data


def parse_with_config(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    config_only: dict[str, Any] | None = None,
) -> argparse.Namespace:
    """Parse argv with defaults taken from the YAML file named by --config.

    Args:
        parser: the script's parser; it must define --config.
        argv: arguments (default sys.argv[1:]).
        config_only: config-only keys and their defaults, added to the namespace.

    Returns:
        The resolved namespace: flags, then config-only keys. `args.explicit` is the set of flag
        destinations the user typed on the command line.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    config_only = dict(CONFIG_ONLY_KEYS if config_only is None else config_only)
    cfg_path = _config_path_from_argv(argv) or parser.get_default("config")
    cfg = load_yaml(cfg_path) if cfg_path else {}

    dests = {a.dest for a in parser._actions if a.dest != "help"}
    unknown = [k for k in cfg if k not in dests and k not in config_only]
    if unknown:
        known = sorted(dests | set(config_only))
        hint = difflib.get_close_matches(unknown[0], known, n=1)
        raise UserError(
            f"config {cfg_path}: unknown key '{unknown[0]}'"
            + (f" (did you mean '{hint[0]}'?)" if hint else "")
            + f"; known keys: {', '.join(known)}"
        )
    parser.set_defaults(**{k: v for k, v in cfg.items() if k in dests})
    args = parser.parse_args(argv)
    for key, default in config_only.items():
        setattr(args, key, cfg.get(key, default))
    args.explicit = explicit_dests(parser, argv)
    return args


def explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The destinations of the flags typed on the command line (as opposed to defaults).

    Parsers here use allow_abbrev=False, so an option string is always spelled out in full.
    """
    by_option = {s: a.dest for a in parser._actions for s in a.option_strings}
    return {by_option[arg.split("=", 1)[0]] for arg in argv if arg.split("=", 1)[0] in by_option}


def to_plain(value: Any) -> Any:
    """Turn a value into YAML/JSON-able data (Paths to str, sets and tuples to lists)."""
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_plain(v) for v in (sorted(value) if isinstance(value, set) else value)]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def args_to_dict(args: argparse.Namespace) -> dict[str, Any]:
    """Every resolved option as plain data (what args.yaml and checkpoints store)."""
    return {k: to_plain(v) for k, v in vars(args).items() if k != "explicit"}
