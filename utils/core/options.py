"""The resolved options of a script: one read-only object, made once after parsing.

    args = Options.of(parser.parse_args(argv))     # every flag, config key and derived value
    args.lr, args.get("tracker", "none")           # read like a Namespace
    args.lr = 0.1                                  # AttributeError: nothing downstream rewrites an option
    resolved = args.replace(batch_size=48)         # a new object, made where options are resolved

A script parses and checks its flags, resolves what depends on the data or the machine (main.py:
the task type, loss, metric, batch size and loader processes) in one place, and hands the result
on; what a run used is what args.yaml records.
"""
from __future__ import annotations

import argparse
from typing import Any, Iterator, Mapping


class Options:
    """Read-only options with attribute access.

    Args:
        values: option name -> value.
    """

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_values", dict(values))

    @classmethod
    def of(cls, args: argparse.Namespace | Mapping[str, Any] | Options) -> Options:
        """Options from a parsed Namespace (or a mapping, or Options)."""
        if isinstance(args, Options):
            return args
        return cls(vars(args) if isinstance(args, argparse.Namespace) else args)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"no option '{name}'") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"the options are resolved once: '{name}' cannot be changed here "
                             f"(resolve it where the options are made, with .replace({name}=...))")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"the options are resolved once: '{name}' cannot be removed")

    def __reduce__(self) -> tuple[Any, ...]:  # pickle and deepcopy through the constructor
        return (Options, (self._values,))

    def __contains__(self, name: str) -> bool:
        return name in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Options) and other._values == self._values

    def __repr__(self) -> str:
        return "Options(" + ", ".join(f"{k}={v!r}" for k, v in self._values.items()) + ")"

    def get(self, name: str, default: Any = None) -> Any:
        return self._values.get(name, default)

    def replace(self, **changes: Any) -> Options:
        """A copy with some options changed or added (where options are resolved)."""
        return Options({**self._values, **changes})

    def to_dict(self) -> dict[str, Any]:
        """A plain copy of every option."""
        return dict(self._values)
