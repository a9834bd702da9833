"""Shared fixtures: the private systemd user manager of the sandbox tier.

On a developer's machine that cannot make the sandbox, its tests are skipped
with the reason. Under CI (the CI environment variable set) the sandbox tier
must run: a sandbox that cannot be made fails, and so does a session in which
a `sandbox` test was skipped or none ran.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import settings

from tests.sandboxing import Sandbox, SandboxUnavailable

# Speed is measured by the benchmarks, not by tests: a property test must not
# fail because a loaded machine ran one example slowly (Hypothesis's default
# deadline is 200 ms per example).
settings.register_profile("no-deadline", deadline=None)
settings.load_profile("no-deadline")


def _in_ci() -> bool:
    return bool(os.environ.get("CI"))


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    """A private systemd user manager shared by the tests of one module."""
    try:
        sb = Sandbox.start()
    except SandboxUnavailable as e:
        reason = str(e)
    else:
        reason = ""
    if reason and _in_ci():
        pytest.fail(f"CI needs the sandbox tier, but {reason}", pytrace=False)
    if reason:
        pytest.skip(f"no sandbox here: {reason}")
    try:
        yield sb
    finally:
        sb.close()


# Outcomes of the tests marked `sandbox`, for the CI check below.
_sandbox_outcomes: dict[str, int] = {"passed": 0, "skipped": 0, "failed": 0}
_CI_PROBLEM_KEY = pytest.StashKey[str]()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "sandbox" not in report.keywords:
        return
    if report.skipped:
        _sandbox_outcomes["skipped"] += 1
    elif report.failed:
        _sandbox_outcomes["failed"] += 1
    elif report.when == "call":
        _sandbox_outcomes["passed"] += 1


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _in_ci():
        return
    if _sandbox_outcomes["skipped"]:
        problem = f"{_sandbox_outcomes['skipped']} sandbox test(s) were skipped"
    elif not any(_sandbox_outcomes.values()):
        problem = "no sandbox test ran"
    else:
        return
    session.config.stash[_CI_PROBLEM_KEY] = problem
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    problem = terminalreporter.config.stash.get(_CI_PROBLEM_KEY, None)
    if problem:
        terminalreporter.section("sandbox tier", sep="!", red=True, bold=True)
        terminalreporter.line(
            f"CI is set but {problem}: the sandbox tier must run in CI "
            "(scripts/sandbox must work on this machine).",
            red=True,
            bold=True,
        )
