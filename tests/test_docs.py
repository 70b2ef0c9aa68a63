"""The documentation site (mkdocs.yml, docs/): the flag tables generated from the parsers
(docs/hooks/flags.py), every flag of every script in them, the flags and commands the pages name
still existing and parsing, the two languages naming the same flags, and `mkdocs build --strict`
running clean (so `make test`, and CI with it, fails on a broken site)."""
from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, describe

DOCS = REPO / "docs"
ENGLISH = sorted(p for p in DOCS.glob("*.md") if not p.name.endswith(".zh.md"))
CHINESE = sorted(DOCS.glob("*.zh.md"))
ONLY_ENGLISH = {"architecture.md"}  # the reader's map of the code: the Chinese site shows the English page
SCRIPTS = sorted(p.stem for p in REPO.glob("*.py") if any(
    isinstance(n, ast.FunctionDef) and n.name == "get_args_parser" for n in ast.parse(p.read_text(encoding="utf-8")).body))
# Flags the pages name that belong to other programs: torchrun, mlflow, tensorboard, the C++ classify
# (deploy/cpp) and the benchmark scripts (benchmarks/*.py).
FOREIGN_FLAGS = {
    "--nproc_per_node", "--nnodes", "--node_rank", "--rdzv_backend", "--rdzv_endpoint", "--standalone",  # torchrun
    "--backend-store-uri",  # mlflow ui
    "--logdir", "--bind",  # tensorboard
    "--strict",  # mkdocs build
    "--all", "--batch", "--meta", "--build",  # classify (C++), cmake --build
    "--compare", "--timm_train", "--modes", "--bktree", "--save", "--batch_sizes", "--mobile", "--sizes", "--limit_epochs", "--skip",
    "--rounds",  # benchmarks/*.py
    "--deployments", "--batching", "--concurrency", "--requests", "--client",  # benchmarks/serve_load.py
    "--idle", "--gil",  # py-spy record
    "--no-deps",  # pip install
    "--dist",  # pytest-xdist (make test)
    "--data-dir",  # timm's train.py
    "--lrr", "--epohcs",  # mistyped on purpose, to show the one-line error
}
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")


def _hook():
    spec = importlib.util.spec_from_file_location("docs_flags_hook", DOCS / "hooks" / "flags.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(markdown: str) -> dict[str, list[str]]:
    """flag -> its row's cells (flag, aliases, default, choices, help) of generated tables."""
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| <code>"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[re.sub(r"</?code>", "", cells[0])] = cells
    return rows


def _parser_flags(script: str) -> set[str]:
    parser = importlib.import_module(script).get_args_parser()
    return {o for a in parser._actions for o in a.option_strings}


# ------------------------------------------------------------------------------ the hook
def test_flag_tables_of_a_grouped_toy_parser() -> None:
    hook = _hook()
    parser = argparse.ArgumentParser(prog="toy.py")
    parser.add_argument("--version", action="version", version="1")
    data = parser.add_argument_group("data", "where the images are")
    data.add_argument("--data_path", default=str(REPO / "dataset" / "train"), help="images: <root>/<class>/<images>")
    data.add_argument("--epoch", "--epochs", type=int, default=100, help="epochs to train (%(default)s | more)")
    model = parser.add_argument_group("model")
    model.add_argument("--mode", default="crop", choices=["crop", "squash"], help="resize *mode*")
    model.add_argument("--amp", action="store_true", help="mixed precision")
    model.add_argument("--size", nargs="+", type=int, default=[224, 192], help="sizes")
    model.add_argument("--secret", default="x", help=argparse.SUPPRESS)
    text = hook.flag_tables(parser)
    blocks = text.strip().split("\n\n")
    # argparse's own group (--version) untitled, then each group under its title, in the parser's order
    assert blocks[0].startswith("| flag | aliases | default | choices | help |\n") and blocks[0].count("\n| <code>") == 1
    assert blocks[1::2] == ["**data**: where the images are", "**model**"]
    rows = _rows(text)
    assert list(rows) == ["--version", "--data_path", "--epoch", "--mode", "--amp", "--size"]  # --help and SUPPRESS'd hidden
    assert "--secret" not in text and "--help" not in text
    assert rows["--data_path"] == ["<code>--data_path</code>", "", "<code>dataset/train</code>", "",
                                   "images: &lt;root&gt;/&lt;class&gt;/&lt;images&gt;"]  # relative to the repo, HTML escaped
    assert rows["--epoch"] == ["<code>--epoch</code>", "<code>--epochs</code>", "<code>100</code>", "",
                               "epochs to train (100 &#124; more)"]  # %(default)s filled in, the pipe cannot end the cell
    assert rows["--mode"] == ["<code>--mode</code>", "", "<code>crop</code>", "<code>crop</code>, <code>squash</code>", r"resize \*mode\*"]
    assert rows["--amp"][2] == "off" and rows["--size"][2] == "<code>224 192</code>"
    assert blocks[2].index("--data_path") < blocks[2].index("--epoch") and "--mode" not in blocks[2]


def test_flag_table_of_a_parser_without_groups_has_no_titles() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float, default=0.001, help="learning rate")
    text = _hook().flag_tables(parser)
    assert text.startswith("| flag |") and "**" not in text and "\n\n" not in text.strip()
    assert _rows(text)["--lr"] == ["<code>--lr</code>", "", "<code>0.001</code>", "", "learning rate"]


def test_a_marker_naming_a_missing_script_fails_the_build() -> None:
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -r requirements/docs.txt)")
    from mkdocs.exceptions import PluginError

    hook = _hook()
    assert "<code>--source</code>" in hook.replace_markers("a\n<!-- flags: predict.py -->\nb")
    with pytest.raises(PluginError, match="nope.py"):
        hook.replace_markers("<!-- flags: nope.py -->", "tune.md")


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_of_every_script_is_in_its_generated_reference(script: str) -> None:
    """Each script's page (both languages) holds its flags marker, and the table made of it names
    every flag, with its aliases, default and choices as the parser has them."""
    hook = _hook()
    marker = f"<!-- flags: {script}.py -->"
    for pages in (ENGLISH, CHINESE):
        assert [p.name for p in pages if marker in p.read_text(encoding="utf-8")], f"no page in docs/ holds {marker}"
    parser = importlib.import_module(script).get_args_parser()
    rows = _rows(hook.flag_tables(parser))
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help is argparse.SUPPRESS:
            continue
        name = next(o for o in action.option_strings if o.startswith("--"))
        assert name in rows, f"{script}.py {name} is missing from its generated table"
        for alias in set(action.option_strings) - {name}:
            assert f"<code>{alias}</code>" in rows[name][1]
        if action.choices is not None:
            assert rows[name][3].count("<code>") == len(action.choices)
    assert len(rows) > 3


# ------------------------------------------------------------------------------ the pages
def _named_flags(path: Path) -> set[str]:
    return set(FLAG.findall(path.read_text(encoding="utf-8")))


@pytest.mark.parametrize("page", [p.relative_to(REPO).as_posix() for p in ENGLISH + CHINESE] + ["README.md", "README.zh-CN.md"])
def test_every_flag_a_page_names_exists(page: str) -> None:
    """A page that names a flag no script has any more (renamed, removed) fails here."""
    known = set().union(*map(_parser_flags, SCRIPTS)) | FOREIGN_FLAGS
    unknown = sorted(_named_flags(REPO / page) - known)
    assert not unknown, f"{page} names flags that no script has: {unknown}"


def _commands(text: str) -> list[tuple[str, str, list[str]]]:
    """Every `python SCRIPT.py ...` (or torchrun ... SCRIPT.py) line of a page's shell blocks, as
    (the line, the script, its arguments); continuation lines joined, comments and `...` dropped."""
    found = []
    for block in re.findall(r"```(?:bash|sh|shell)?\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            m = re.search(r"(?:^|\s)(?:\S*python3?|torchrun(?:\s+--\S+)*)\s+(\w+)\.py\b(.*)", line)
            if m and m.group(1) in SCRIPTS:
                argv = [a for a in shlex.split(m.group(2), comments=True) if a not in ("...", "…")]
                found.append((line.strip(), m.group(1), argv))
    return found


def test_the_commands_the_pages_quote_parse() -> None:
    """Every script command in a page's code blocks is accepted by that script's parser (flags that
    exist, values of the right type and among the choices)."""
    failures, count = [], 0
    for page in ENGLISH + CHINESE:
        for line, script, argv in _commands(page.read_text(encoding="utf-8")):
            count += 1
            parser = importlib.import_module(script).get_args_parser()
            parser.error = lambda message: (_ for _ in ()).throw(ValueError(message))  # noqa: B023 - raise, do not exit
            try:
                parser.parse_args(argv)
            except ValueError as error:
                failures.append(f"{page.name}: {line}: {error}")
    assert count > 100, count
    assert not failures, "\n".join(failures)


def test_each_page_has_a_chinese_page_naming_the_same_flags() -> None:
    for english in ENGLISH:
        chinese = english.with_name(english.stem + ".zh.md")
        if english.name in ONLY_ENGLISH:
            continue
        assert chinese.is_file(), f"docs/{english.name} has no Chinese page docs/{chinese.name}"
        en, zh = _named_flags(english), _named_flags(chinese)
        assert en == zh, f"{english.name}: only in English {sorted(en - zh)}; only in Chinese {sorted(zh - en)}"


def test_export_pages_hold_the_format_table() -> None:
    """The export page's table is utils.deploy.formats' (the English one verbatim, as
    `formats_table(markdown=True)` prints it; the Chinese one row by row, its words translated)."""
    from utils.deploy.formats import FORMATS, formats_table

    english = (DOCS / "export.md").read_text(encoding="utf-8")
    assert formats_table(markdown=True) in english, "docs/export.md's table: paste formats_table(markdown=True) again"
    chinese = (DOCS / "export.zh.md").read_text(encoding="utf-8")
    for fmt in FORMATS.values():
        cells = [f"`{fmt.flag}", f"`{fmt.file_name('best')}`", "是" if fmt.cpu else "-"]
        assert any(line.startswith("| ") and all(c in line for c in cells) for line in chinese.splitlines()), \
            f"docs/export.zh.md's table lacks {fmt.flag} as the format table has it"


def test_every_page_is_in_the_nav() -> None:
    import yaml

    config = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
    nav = set(re.findall(r":\s*([\w-]+\.md)\s*$", yaml.safe_dump(yaml.safe_load(config)["nav"]), re.M))
    assert nav == {p.name for p in ENGLISH}, f"pages not in mkdocs.yml's nav: {sorted({p.name for p in ENGLISH} - nav)}"


# ------------------------------------------------------------------------------ the build
@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("mkdocs", "material", "mkdocs_static_i18n")),
                    reason="mkdocs, mkdocs-material or mkdocs-static-i18n is not installed (pip install -r requirements/docs.txt)")
def test_the_site_builds_strict(tmp_path: Path) -> None:
    """`mkdocs build --strict` (a broken link or anchor, a marker naming no script: a failure), and
    the built pages of both languages hold the generated tables."""
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, describe(proc)
    assert "WARNING" not in proc.stderr, proc.stderr
    for language in ("", "zh/"):
        for page in ENGLISH:
            assert (site / language / f"{page.stem}.html").is_file(), (language, page)  # use_directory_urls: false
        main_page = (site / language / "training.html").read_text(encoding="utf-8")
        assert all(f"<code>{flag}</code>" in main_page for flag in _parser_flags("main") - {"-h", "--help"})
        assert "<!-- flags:" not in main_page
    assert "全部参数" in (site / "zh" / "training.html").read_text(encoding="utf-8")
