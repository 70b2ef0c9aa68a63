"""mkdocs hook: the flag tables of the documentation, generated from each script's get_args_parser().

A page that holds the marker `<!-- flags: main.py -->` gets, in its place, one table per argparse
argument group of that script (flag, aliases, default, choices, help), so the reference cannot
drift from the code. The scripts import without side effects (nothing runs at import), so the
hook imports them from the repository root. A marker naming a script that does not exist fails
the build with the marker's page named.
"""
from __future__ import annotations

import argparse
import html
import importlib
import re
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"<!--\s*flags:\s*([\w.-]+\.py)\s*-->")
# argparse's own titles of the groups every parser has: a parser with no other groups gets one
# table with no title.
DEFAULT_TITLES = {"options", "optional arguments", "positional arguments"}


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell: HTML escaped, no pipe, no emphasis, one line."""
    text = html.escape(" ".join(str(text).split()), quote=False).replace("|", "&#124;")
    return re.sub(r"([\\`*_\[\]])", r"\\\1", text)


def _code(text: str) -> str:
    return f"<code>{html.escape(str(text), quote=False).replace('|', '&#124;')}</code>" if text != "" else ""


def _default(action: argparse.Action) -> str:
    """The default as `--help` says it: switches off, nothing for None or empty, lists as typed,
    paths inside the repository relative to it (not this machine's absolute path)."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "off" if isinstance(action, argparse._StoreTrueAction) else "on"
    value = action.default
    if value in (None, "", [], (), argparse.SUPPRESS):
        return ""
    if isinstance(value, (list, tuple)):
        return _code(" ".join(map(str, value)))
    text = str(value)
    if text.startswith(str(REPO) + "/"):
        text = text[len(str(REPO)) + 1:]
    return _code(text)


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help text with argparse's %(default)s-style fields filled in, as `--help` prints it."""
    text = action.help or ""
    if "%" not in text:
        return text
    params: dict[str, Any] = dict(vars(action), prog=parser.prog)
    params = {k: getattr(v, "__name__", v) for k, v in params.items() if v is not argparse.SUPPRESS}
    if params.get("choices") is not None:
        params["choices"] = ", ".join(map(str, params["choices"]))
    return text % params


def _row(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    names = action.option_strings or [action.dest]
    longs = [n for n in names if n.startswith("--")] or names
    flag, aliases = longs[0], [n for n in names if n != longs[0]]
    choices = ", ".join(_code(c) for c in action.choices) if action.choices is not None else ""
    cells = [_code(flag), ", ".join(_code(a) for a in aliases), _default(action), choices,
             _cell(_help(parser, action))]
    return "| " + " | ".join(cells) + " |"


def _shown(action: argparse.Action) -> bool:
    return action.help is not argparse.SUPPRESS and not isinstance(action, argparse._HelpAction)


def flag_tables(parser: argparse.ArgumentParser) -> str:
    """Markdown tables of a parser's flags: one per argument group that has a flag to show, with
    the group's title (and description) above it; argparse's own group (the flags added to the
    parser itself) is untitled, so a parser without groups of its own gets one untitled table. Flags whose help is argparse.SUPPRESS, and --help, are left out.

    Args:
        parser: the script's parser (get_args_parser()).

    Returns:
        Markdown text.
    """
    groups = [(g, [a for a in g._group_actions if _shown(a)]) for g in parser._action_groups]
    groups = [(g, actions) for g, actions in groups if actions]
    titled = any(g.title not in DEFAULT_TITLES for g, _ in groups)
    blocks = []
    for group, actions in groups:
        lines = []
        if titled and group.title not in DEFAULT_TITLES:  # argparse's own group (--version ...) comes first, untitled
            lines.append(f"**{_cell(group.title or '')}**" + (f": {_cell(group.description)}" if group.description else ""))
            lines.append("")
        lines += ["| flag | aliases | default | choices | help |", "| --- | --- | --- | --- | --- |"]
        lines += [_row(parser, a) for a in actions]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def script_parser(script: str) -> argparse.ArgumentParser:
    """The parser of a script of the repository root (`main.py` -> main.get_args_parser())."""
    path = REPO / script
    if not path.is_file():
        raise FileNotFoundError(f"no script {script} in {REPO}")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return importlib.import_module(path.stem).get_args_parser()


def replace_markers(markdown: str, where: str = "a page") -> str:
    """Every `<!-- flags: SCRIPT.py -->` of a page replaced by that script's flag tables."""

    def table(match: re.Match) -> str:
        try:
            return flag_tables(script_parser(match.group(1)))
        except FileNotFoundError as error:
            from mkdocs.exceptions import PluginError

            raise PluginError(f"{where}: {match.group(0)} names a script that does not exist ({error})") from error

    return MARKER.sub(table, markdown)


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """mkdocs' hook: runs on every page's Markdown before it is rendered."""
    return replace_markers(markdown, page.file.src_uri)
