"""Options: YAML config file -> argparse defaults -> command line (the command line wins).

The config file is data, read with yaml.safe_load; nothing in it is executed. Its keys are either
flag names (they change that flag's default; a flag's alias works too: `epochs:` for `epoch:`),
config-only keys such as lr_scheduler (listed in CONFIG_ONLY_KEYS), or what a run writes into its
args.yaml beside its options (RUN_KEYS: mean, std ...; ignored with one note, so that
`main.py --config RUN/args.yaml` trains the run again). Any other key is an error that names the
close known one.

The one command line of every script (ArgumentParser): one help format (HelpFormatter), options in
titled groups (group_flags), choices in any case, and a mistake answered in one line.
"""
from __future__ import annotations

import argparse
import difflib
import logging
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from utils.core.log import UserError
from utils.core.names import FLAG_GROUPS

LOGGER = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "config" / "config.yaml"

# Keys that only the config file sets (pytorch-classifier kept these in config/config.py).
CONFIG_ONLY_KEYS: dict[str, Any] = {
    "lr_scheduler": None,
    "lr_scheduler_params": {},
    "random_seed": 0,
    "plot_train_batch_count": 5,
}
# What a run writes into args.yaml beside its options (utils.train.trainer, utils.train.kfold): derived from
# the data or the run, never read back as options. A config file holding them (a run's own args.yaml) is
# taken with one note naming them; any other unknown key is refused.
RUN_KEYS = ("mean", "std", "fold")  # a key added to args.yaml beside the options goes here too
# --data ROOT: the split flags it sets, and the name each takes under ROOT (timm's --data-dir).
DATA_ROOT_PATHS = {"train_path": "train", "val_path": "val", "test_path": "test", "label_path": "label.txt"}
# What each config-only key takes: (accepted types, description for the error, lowest number or None).
CONFIG_ONLY_TYPES: dict[str, tuple[tuple[type, ...], str, int | None]] = {
    "lr_scheduler": ((str, type(None)), "a torch.optim.lr_scheduler class name or null", None),
    "lr_scheduler_params": ((dict,), "a mapping of keyword arguments", None),
    "random_seed": ((int,), "an integer >= 0", 0),
    "plot_train_batch_count": ((int,), "an integer >= 0", 0),
    "custom_augment": ((list,), "a list of {name, params} entries", None),
}


def finite_float(text: str) -> float:
    """argparse type: a finite number (nan and inf are refused)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text}")
    return value


def canonical_choice(action: argparse.Action, value: Any) -> Any:
    """A flag's value spelled as its choices spell it, whatever the case (`randaugment` ->
    `RandAugment`); other values unchanged (refused after as not a choice)."""
    if isinstance(value, str) and action.choices is not None and value not in action.choices:
        folded = {c.lower(): c for c in action.choices if isinstance(c, str)}
        return folded.get(value.lower(), value)
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """The one help format of every script: `help (choices: a, b) (default: x)`.

    A flag with choices shows a name (its metavar) in the usage, and its choices once at the end of
    its help, unless the help already names them all. "(default: ...)" is added unless the help
    already says it (as "(default: the run's)" when no literal value is the default), and not for
    switches, empty defaults or None (a flag that is off unless given).
    """

    def _metavar_formatter(self, action: argparse.Action, default_metavar: str) -> Any:
        if action.choices is not None and action.metavar is None:
            return super()._metavar_formatter(argparse.Action(action.option_strings, action.dest), default_metavar)
        return super()._metavar_formatter(action, default_metavar)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.choices is not None and not all(str(c) in text for c in action.choices):
            text += " (choices: " + ", ".join(map(str, action.choices)) + ")"
        if ("(default" in text or action.default in (None, "", [], argparse.SUPPRESS)
                or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))):
            return text
        if isinstance(action.default, (list, tuple)):  # as typed: --export onnx torchscript
            return text + " (default: " + " ".join(map(str, action.default)).replace("%", "%%") + ")"
        return text + " (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the one help format (HelpFormatter), --version, no abbreviated flags, choices
    in any case, and every mistake in one line (exit code 2): an unknown flag with the close one,
    a bad value with the flag, the value and what it takes; --help shows the rest."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from utils import __version__

        kwargs.setdefault("allow_abbrev", False)
        kwargs["formatter_class"] = HelpFormatter
        super().__init__(*args, **kwargs)
        self.add_argument("--version", action="version", version=f"pytorch-classifier-ng {__version__}",
                          help="print the version and exit")

    def _get_value(self, action: argparse.Action, arg_string: str) -> Any:
        return canonical_choice(action, super()._get_value(action, arg_string))

    def error(self, message: str) -> None:  # noqa: D401 - argparse's signature
        self.exit(2, f"error: {one_line_error(self, message)}\n")


def _expanded_pattern(words: Sequence[str]) -> bool:
    """Whether stray words look like the paths an unquoted glob or {a..b} pattern became: shards
    (.tar), or several paths of one folder with one suffix."""
    if all(w.endswith(".tar") for w in words):
        return True
    kinds = {(str(Path(w).parent), Path(w).suffix) for w in words}
    return len(words) > 1 and len(kinds) == 1 and next(iter(kinds))[1] != ""


def one_line_error(parser: argparse.ArgumentParser, message: str) -> str:
    """argparse's error message as one line that names the flag and how to go on.

    Args:
        parser: the parser that refused the command line.
        message: argparse's message ("unrecognized arguments: --lrr 3", "argument --x: invalid choice ...").

    Returns:
        The line, without "error: ".
    """
    more, every = " (--help lists them all)", " (--help lists every flag)"
    if message.startswith("unrecognized arguments:"):
        known = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
        words = message.split(":", 1)[1].split()
        flags = [w.split("=", 1)[0] for w in words if w.startswith("-")]
        if not flags and _expanded_pattern(words):
            shown = " ".join(words) if len(words) <= 2 else f"{words[0]} ... {words[-1]} ({len(words)} paths)"
            return (f"unexpected arguments {shown}: the shell expanded a pattern into several paths: quote it, "
                    "e.g. --train_path 'shards/train/train-{000000..000009}.tar'")
        if not flags:
            return f"unexpected argument{'s' if len(words) > 1 else ''} {' '.join(words)}: a value follows its flag" + every
        close = [difflib.get_close_matches(flag, known, n=1, cutoff=0.6) for flag in flags]
        if len(flags) == 1:
            return f"unknown flag {flags[0]}" + (f"; did you mean {close[0][0]}?" if close[0] else "") + more
        return "unknown flags " + ", ".join(f + (f" ({c[0]}?)" if c else "") for f, c in zip(flags, close)) + more
    if message.startswith("argument "):
        flag, _, what = message[len("argument "):].partition(": ")
        flag = flag.split("/")[0]  # "--epochs/--epoch": a flag of several names is named by its first
        action = next((a for a in parser._actions if flag in a.option_strings), None)
        if "invalid choice" in what and action is not None:
            value = what.split("'")[1] if what.count("'") >= 2 else what
            return f"{flag} {value}: not one of {', '.join(map(str, action.choices))} (any case)"
        return f"{flag}: {what}" + every
    return message + every


def group_flags(parser: argparse.ArgumentParser, script: str) -> argparse.ArgumentParser:
    """Put a script's flags into the titled argument groups of utils.core.names.FLAG_GROUPS (--help's
    sections; the docs' table sections, read as argparse's parser._action_groups).

    Args:
        parser: a parser whose flags are all defined.
        script: its FLAG_GROUPS entry (main, predict ...).

    Returns:
        The parser; its flags in no group stay under argparse's "options" (with --help and --version).

    Raises:
        ValueError: a destination the parser does not have (a programming error).
    """
    by_dest = {a.dest: a for a in parser._actions}
    general = parser._optionals
    for title, dests in FLAG_GROUPS[script].items():
        group = parser.add_argument_group(title)
        for dest in dests:
            if dest not in by_dest:
                raise ValueError(f"group {title!r}: the parser has no flag {dest!r}")
            general._group_actions.remove(by_dest[dest])
            group._group_actions.append(by_dest[dest])
    return parser


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
        destinations the user typed on the command line. A parser with --data (DATA_ROOT_PATHS):
        the split paths the command line does not give are under it (a --data in the config file
        leaves the config's own paths alone; a typed --data replaces them: `--config RUN/args.yaml
        --data OTHER` trains a run's options on other data).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    config_only = dict(CONFIG_ONLY_KEYS if config_only is None else config_only)
    cfg_path = _config_path_from_argv(argv) or parser.get_default("config")
    cfg = config_keys(parser, load_yaml(cfg_path) if cfg_path else {}, config_only, cfg_path)
    dests = {a.dest for a in parser._actions if a.dest not in ("help", "version")}
    actions = {a.dest: a for a in parser._actions}
    parser.set_defaults(**{k: config_value(actions[k], v, cfg_path) for k, v in cfg.items() if k in dests})
    args = parser.parse_args(argv)
    for key, default in config_only.items():
        value = cfg.get(key, default)
        if key in cfg and key in CONFIG_ONLY_TYPES:
            check_config_only(key, value, cfg_path)
        setattr(args, key, value)
    args.explicit = explicit_dests(parser, argv)
    if getattr(args, "data", None):
        for dest, path in data_root_paths(args.data).items():
            if dest not in args.explicit and (dest not in cfg or "data" in args.explicit):  # typed --data beats the config
                setattr(args, dest, path)
    return args


def config_keys(parser: argparse.ArgumentParser, cfg: dict[str, Any], config_only: dict[str, Any],
                path: str | Path) -> dict[str, Any]:
    """A config file's keys as the parser's destinations: a flag's alias (`epochs:`) as its flag
    (`epoch`), a run's own keys (RUN_KEYS: a run's args.yaml) dropped with one note.

    Raises:
        UserError: an unknown key (with the close known one), or a flag given under two names.
    """
    names = {s[2:]: a.dest for a in parser._actions for s in a.option_strings
             if s.startswith("--") and a.dest not in ("help", "version")}
    out: dict[str, Any] = {}
    derived = []
    for key, value in cfg.items():
        dest = names.get(key, key if key in config_only else None)
        if dest is None and key in RUN_KEYS:
            derived.append(key)
            continue
        if dest is None:
            hint = difflib.get_close_matches(key, sorted(names) + sorted(config_only), n=1)
            raise UserError(f"config {path}: unknown key '{key}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
                            + f"; known keys: {', '.join(sorted(set(names.values()) | set(config_only)))}")
        if dest in out:
            raise UserError(f"config {path}: '{key}' and another name of the same flag (--{dest}) are both given; keep one")
        out[dest] = value
    if derived:
        LOGGER.info("config %s: ignoring what a run wrote beside its options (recomputed): %s", path, ", ".join(derived))
    return out


def data_root_paths(root: str | Path) -> dict[str, str]:
    """--data ROOT: the split paths under it (ROOT/train, ROOT/val, ROOT/test, ROOT/label.txt), as
    timm's --data-dir; an absent val/ or test/ is an absent split."""
    return {dest: str(Path(root) / name) for dest, name in DATA_ROOT_PATHS.items()}


def _describe(action: argparse.Action) -> str:
    if action.nargs in ("+", "*"):
        return "a list"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "true or false"
    if action.type is int:
        return "an integer"
    if action.type in (float, finite_float):
        return "a number"
    return "a string"


def config_value(action: argparse.Action, value: Any, path: str | Path) -> Any:
    """A config file's value for a flag, checked like the command line checks it.

    Raises:
        UserError: a value of the wrong type (a list for a number, 16.5 for an integer, a number
            for a name ...) or outside the flag's choices, naming the key and what it takes.
    """
    wrong = UserError(f"config {path}: '{action.dest}' must be {_describe(action)}"
                      + (f" (one of {', '.join(map(str, action.choices))})" if action.choices else "")
                      + f", not {value!r}")
    if value is None and action.default is None:
        return None
    if action.nargs == "?" and action.const is not None and isinstance(value, bool):
        return action.const if value else action.default  # `class_balance: true` as the bare flag means
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise wrong
        return value
    if action.nargs in ("+", "*"):
        if not isinstance(value, list):
            raise wrong
        return [config_scalar(action, v, wrong) for v in value]
    return config_scalar(action, value, wrong)


def config_scalar(action: argparse.Action, value: Any, wrong: UserError) -> Any:
    """One value for a flag: the flag's type applied to a string (as on the command line), the
    right Python type otherwise; and within the choices."""
    convert = action.type or str
    if isinstance(value, bool) or isinstance(value, (list, dict)) or value is None:
        raise wrong
    if isinstance(value, str):
        try:
            value = convert(value)
        except (argparse.ArgumentTypeError, TypeError, ValueError):
            raise wrong from None
    elif convert is int and not isinstance(value, int):
        raise wrong
    elif convert in (float, finite_float):
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise wrong
        value = float(value)
    elif convert is str:
        if not isinstance(value, int):
            raise wrong  # a fraction where a name is expected
        value = str(value)  # device: 0, a class named 10
    elif convert is not int:
        raise wrong  # a name checker (--optimizer) takes names only
    value = canonical_choice(action, value)  # any case, as on the command line
    if action.choices is not None and value not in action.choices:
        raise wrong
    return value


def check_config_only(key: str, value: Any, path: str | Path) -> None:
    """A config-only key's value (lr_scheduler, random_seed ...) is of the type it takes.

    Raises:
        UserError: naming the key and what it takes.
    """
    types, described, low = CONFIG_ONLY_TYPES[key]
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if ok and low is not None and value < low:
        ok = False
    if not ok:
        raise UserError(f"config {path}: '{key}' must be {described}, not {value!r}")


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


def args_to_dict(args: Any) -> dict[str, Any]:
    """Every resolved option (a Namespace or utils.core.options.Options) as plain data: what args.yaml
    and checkpoints store."""
    values = args.to_dict() if hasattr(args, "to_dict") else vars(args)
    return {k: to_plain(v) for k, v in values.items() if k != "explicit"}
