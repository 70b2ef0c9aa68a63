"""Logging set-up, the user-error type, and the entry-point wrapper every script uses.

A mistake by the user (a missing folder, a bad flag value, a checkpoint from elsewhere) raises
`UserError`; `run_cli` turns it into one line on stderr and exit code 2, never a traceback.
A script ends with `script_main(main, parse_args)`: run_cli in the script's own process, then
exit_cli. There, `settle_heap()` (called once the heavy work is about to start) takes the
imported libraries out of the garbage collector's reach.
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
from typing import Any, Callable, Iterable, Sequence, TypeVar

LOGGER = logging.getLogger(__name__)
T = TypeVar("T")
_OWN_PROCESS = False  # True once script_main runs: this process is the script's own, not a test's


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


class Stopped(Exception):
    """A run that a signal stopped cleanly, having said what it kept and how to go on: the exit
    code is 128 + the signal's number (143 for SIGTERM, 130 for Ctrl-C), as if it had been killed.

    Args:
        signum: the signal that stopped it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag the work polls at a boundary it can stop at (a training
    step, a batch of predictions). A second Ctrl-C stops at once. Processes forked meanwhile inherit
    the handler, so a signal to the whole process group leaves them to the main process, which stops
    them itself: training's loaders through their queues; predict.py's loader processes, which a pool
    stops with SIGTERM, reset the handlers first (utils.infer.loader.loader_process_signals).

    Args:
        doing: what happens before it stops, for the line printed when the signal arrives.
    """

    def __init__(self, doing: str = "stopping at the next boundary") -> None:
        self.doing = doing
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        LOGGER.warning("\n%s received: %s ...", signal.Signals(signum).name, self.doing)

    def __call__(self) -> bool:
        return self.signal is not None

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def progress(iterable: Iterable[T] | None = None, **kwargs: Any) -> Any:
    """tqdm, shown only where a person watches: when stderr is a terminal (CI logs and redirected
    output get no bars) and the caller does not pass disable=True (e.g. processes other than rank 0).
    Every progress bar of the toolkit comes from here."""
    from tqdm import tqdm

    isatty = getattr(sys.stderr, "isatty", None)
    shown = not kwargs.pop("disable", False) and callable(isatty) and isatty()
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=not shown, **kwargs)


def setup_logging(verbose: bool = False) -> None:
    """Route library logging to stderr with a short format.

    Args:
        verbose: log DEBUG messages too.
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
        force=True,
    )
    # Third-party chatter that says nothing a user acts on.
    for name in ("PIL", "matplotlib", "urllib3", "huggingface_hub", "timm"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run_cli(
    main: Callable[[argparse.Namespace], object],
    parse: Callable[[Sequence[str] | None], argparse.Namespace],
    argv: Sequence[str] | None = None,
) -> int:
    """Parse arguments, run `main`, and map user errors to one line and exit code 2.

    Args:
        main: the script's main(args).
        parse: turns argv into the resolved Namespace (may raise UserError).
        argv: command-line arguments (default: sys.argv[1:]).

    Returns:
        The process exit code.
    """
    setup_logging()
    try:
        args = parse(argv)
        main(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Stopped as stop:  # the run said what it kept; the code tells a supervisor which signal ended it
        return 128 + stop.signum
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # under torchrun the first process alone says it (and where it stopped)
            print("interrupted", file=sys.stderr)
        return 130
    return 0


def script_main(main: Callable[[argparse.Namespace], object],
                parse: Callable[[Sequence[str] | None], argparse.Namespace]) -> None:
    """A script's `if __name__ == "__main__":` line: run_cli on sys.argv, then exit_cli with its
    code. Only here does settle_heap() act (the process ends with the script)."""
    global _OWN_PROCESS
    _OWN_PROCESS = True
    exit_cli(run_cli(main, parse))


def settle_heap() -> None:
    """Take every object alive now out of the garbage collector's reach (gc.freeze), in a
    script's own process only (script_main; a no-op in a test or a notebook, whose later garbage
    this would keep for good).

    Called where a script's heavy work starts, after torch, torchvision and timm are imported:
    those are about a million objects that each full collection walks again, and the collection
    at exit (exit_cli) walked them in 0.55 of its 0.6 s here. What the work makes afterwards is
    collected as usual. Objects frozen here that later become unreachable cycles are not freed
    before exit; what is alive at this point (the libraries, the model, the file lists) lives to
    the end anyway.
    """
    if _OWN_PROCESS:
        gc.freeze()


def exit_cli(code: int) -> None:
    """End a script's process with `code` (script_main calls it; never in-process).

    What is garbage is collected first, so every finaliser runs (loader workers stop, files close);
    then the live objects are frozen out of the collector. Python's shutdown otherwise walks the
    million objects torch, torchvision and timm leave behind and took 1 to 1.4 s of every run here
    after the work was done; frozen, it frees them by reference counting alone.
    """
    gc.collect()
    gc.freeze()
    sys.exit(code)
