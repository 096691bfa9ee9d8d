"""Under `CI=true` a test may not skip: a missing tool (espeak-ng, MBROLA, torch), data file or
device the test needs is a failure there, never a silent skip (locally it still skips)."""

import os

import pytest


def _ci() -> bool:
  return os.environ.get("CI", "").lower() == "true"


def _fail_skip(report) -> None:
  reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
  report.outcome = "failed"
  report.longrepr = f"skipped under CI=true (a missing tool or file is a failure): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  report = (yield).get_result()
  if _ci() and report.skipped and not hasattr(report, "wasxfail"):
    _fail_skip(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):  # module-level pytest.importorskip
  report = (yield).get_result()
  if _ci() and report.skipped:
    _fail_skip(report)
