"""REQUIRE_SYSTEM_DEPS=1 (CI): a test that needs redis-server, Chromium or the C++ toolchain fails
where it would skip (tests/system_deps.py); without it, it skips. Checked on a tiny test file run by
pytest in a subprocess, on the marks of the suite's own tests that need those parts, and on `make test`,
which sets it once every part is installed."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, describe

TINY = '''
import shutil
import pytest

@pytest.mark.system_deps
@pytest.mark.skipif(shutil.which("no-such-server-xyz") is None, reason="no-such-server-xyz is not installed")
def test_needs_a_server():
    pass

@pytest.mark.system_deps
def test_needs_a_compiler():
    if shutil.which("no-such-compiler-xyz") is None:
        pytest.skip("no-such-compiler-xyz is not installed")

def test_optional():
    pytest.skip("an optional extra")

def test_runs():
    assert True
'''


def run_tiny(tmp_path: Path, required: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "test_tiny.py").write_text(TINY)
    env = {k: v for k, v in os.environ.items() if k != "REQUIRE_SYSTEM_DEPS"}
    if required is not None:
        env["REQUIRE_SYSTEM_DEPS"] = required
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "tests"), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "system_deps", "-p", "no:cacheprovider",
                           "-c", os.devnull, "--rootdir", str(tmp_path), "test_tiny.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_a_missing_part_skips_without_the_variable(tmp_path: Path) -> None:
    proc = run_tiny(tmp_path, None)
    assert proc.returncode == 0, describe(proc)
    assert "1 passed, 3 skipped" in proc.stdout, describe(proc)


def test_a_missing_part_fails_with_the_variable(tmp_path: Path) -> None:
    """Both marked tests fail (the one skipped by its skipif mark shows as an error of its set-up); the
    unmarked skip stays a skip."""
    proc = run_tiny(tmp_path, "1")
    assert proc.returncode == 1, describe(proc)
    assert "1 failed, 1 passed, 1 skipped, 1 error" in proc.stdout, describe(proc)
    failed = sorted(line.split()[1] for line in proc.stdout.splitlines() if line.startswith(("FAILED ", "ERROR ")))
    assert failed == ["test_tiny.py::test_needs_a_compiler", "test_tiny.py::test_needs_a_server"], describe(proc)
    for reason in ("no-such-server-xyz is not installed", "no-such-compiler-xyz is not installed"):
        assert f"REQUIRE_SYSTEM_DEPS=1: this test needs what `make system-deps` installs, and it skipped: {reason}" \
            in proc.stdout, describe(proc)


# the suite's tests that need the parts `make system-deps` installs: a module, or test functions in one
NEEDS_SYSTEM = {"test_serve_redis.py": None, "test_fonts.py": None, "test_serve.py": ["test_web_page_in_headless_chromium"],
                "test_audit.py": ["test_report_in_headless_chromium"],
                "test_deploy.py": ["test_cpp_preprocessing_is_bit_identical_to_python", "test_cpp_classify_matches_predict"]}


def _marked(node: ast.AST) -> bool:
    return "pytest.mark.system_deps" in ast.unparse(node)


def test_the_tests_that_need_system_parts_are_marked_and_ci_requires_them() -> None:
    for name, functions in NEEDS_SYSTEM.items():
        tree = ast.parse((REPO / "tests" / name).read_text(encoding="utf-8"))
        if functions is None:
            marks = [n.value for n in tree.body if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "pytestmark"]
            assert marks and _marked(marks[0]), f"{name}: its pytestmark lacks pytest.mark.system_deps"
            continue
        defs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
        for function in functions:
            assert any(_marked(d) for d in defs[function].decorator_list), f"{name}::{function} lacks pytest.mark.system_deps"
    ci = [line for line in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines() if line and line[0] not in "#sc"]
    assert ci == ["make test"], "CI runs exactly the README's test command"
    assert "system-deps" in (REPO / "Makefile").read_text(encoding="utf-8").split("\ntest:", 1)[1].splitlines()[0]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize(("system_deps", "given", "required"), [
    ("sh:dash", None, "1"),                         # every part there (CI, after make system-deps): no skip allowed
    ("no-such-command-here:x", None, ""),           # a part missing (no root to install it): its tests skip
    ("sh:dash", "0", "0"),                          # the caller's choice wins
])
def test_make_test_requires_the_parts_once_they_are_all_there(system_deps: str, given: str | None, required: str) -> None:
    """`make test` (CI's command) runs pytest with REQUIRE_SYSTEM_DEPS=1 when every system part is
    installed. The recipe runs with its prerequisites taken as done (-o) and PY a probe that prints
    what pytest would have been given."""
    probe = f"{sys.executable} -c 'import os; print(\"REQUIRE=\" + os.environ.get(\"REQUIRE_SYSTEM_DEPS\", \"\"))'"
    env = {k: v for k, v in os.environ.items() if k != "REQUIRE_SYSTEM_DEPS"} | ({"REQUIRE_SYSTEM_DEPS": given} if given else {})
    proc = subprocess.run(["make", "-s", "-o", ".venv/.installed-dev", "-o", "system-deps", "test", f"PY={probe}",
                           f"SYSTEM_DEPS={system_deps}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == f"REQUIRE={required}", proc.stdout
