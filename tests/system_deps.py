"""A pytest plugin (loaded by conftest.py): tests marked `system_deps` need what `make system-deps`
installs (redis-server, headless Chromium, the C++ toolchain and headers) and skip, saying why,
where it is missing. With REQUIRE_SYSTEM_DEPS=1 (which `make test` sets once it finds them all
installed, as in CI, where it installs them) such a skip is a failure, so a broken install or skip
condition cannot pass unnoticed as skips.

    REQUIRE_SYSTEM_DEPS=1 python -m pytest -q      # as CI runs the suite
"""
from __future__ import annotations

import os
from typing import Any

import pytest

VARIABLE = "REQUIRE_SYSTEM_DEPS"
MARKER = "system_deps"


def required() -> bool:
    """Whether a skip of a `system_deps` test is to fail this run (REQUIRE_SYSTEM_DEPS=1)."""
    return os.environ.get(VARIABLE, "").strip() == "1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARKER}: needs redis-server, headless Chromium, the C++ toolchain or a CJK font "
                            f"(make system-deps); skips without them, fails instead with {VARIABLE}=1 (CI)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    """A `system_deps` test that skipped reported as failed when required (pytest shows a failure in
    set-up, a skipif mark or a fixture's importorskip, as an error)."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and required() and item.get_closest_marker(MARKER):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = f"{VARIABLE}=1: this test needs what `make system-deps` installs, and it skipped: {reason}"
