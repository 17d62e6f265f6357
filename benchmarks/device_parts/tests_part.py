"""The device check's ``tests`` part: ``pytest -m cuda tests/test_cuda.py`` in the background.

It runs while the shard sets are made (CPU work) and is waited for before any timing starts:
one row per test on CUDA, one summary row of skipped tests on a CPU.
"""

from __future__ import annotations

import importlib.util
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from device_parts.context import Context
from device_parts.logged import Logged
from device_parts.report import NO_CUDA, Figure, verdict

__all__ = ["finish_tests", "start_tests"]


def start_tests(ctx: Context) -> Logged:
    """Start ``pytest -m cuda tests/test_cuda.py`` in the background; see :func:`finish_tests`.

    Args:
        ctx: The run context.

    Returns:
        The running command.
    """
    xml = ctx.work / "pytest_cuda.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "cuda",
        "tests/test_cuda.py",
        "-q",
        "-rs",
        "-p",
        "no:cacheprovider",
        f"--junitxml={xml}",
    ]
    if importlib.util.find_spec("pytest_timeout"):  # a hung test must not take the budget
        cmd.append("--timeout=240")
    ctx.report.log("tests: started in the background", echo=True)
    return Logged(cmd, ctx.report.out / "pytest_cuda.log")


def finish_tests(ctx: Context, running: Logged) -> None:
    """Wait for the CUDA tests; one row per test on CUDA, a summary row on a CPU.

    Args:
        ctx: The run context.
        running: What :func:`start_tests` returned.
    """
    timeout = min(ctx.sizes.tests_timeout - (time.perf_counter() - running.t0), ctx.clock.left())
    rc, seconds, _ = running.wait(timeout)
    cases = _junit_cases(ctx.work / "pytest_cuda.xml")
    counts = {k: sum(1 for c in cases if c[1] == k) for k in ("passed", "failed", "skipped")}
    ctx.report.meta["tests"] = {"exit": rc, "seconds": round(seconds, 1), **counts}
    note = f"exit {rc} in {seconds:.0f} s; pytest_cuda.log"
    if rc == 124:
        note = f"killed after {seconds:.0f} s (time budget); pytest_cuda.log"
    if ctx.cuda:
        _case_rows(ctx, cases, rc, counts, note)
    else:
        ctx.report.add(
            Figure(
                "tests",
                "pytest -m cuda: skipped",
                counts["skipped"],
                "tests",
                "all pass on CUDA",
                NO_CUDA,
                note,
            )
        )


def _case_rows(
    ctx: Context, cases: list[tuple[str, str, str]], rc: int, counts: dict[str, int], note: str
) -> None:
    """On CUDA: a row per test case, then the summary row (``note``: how pytest ended)."""
    for name, outcome, message in cases:
        result = {"passed": "pass", "failed": "fail"}.get(outcome, f"skipped ({message[:100]})")
        why = message[:160] if outcome == "failed" else ""
        ctx.report.add(Figure("tests", name, None, target="pass", result=result, note=why))
    ok = rc == 0 and counts["failed"] == 0 and counts["passed"] > 0
    note = f"{counts['failed']} failed, {counts['skipped']} skipped; {note}"
    ctx.report.add(
        Figure(
            "tests",
            "pytest -m cuda: passed",
            counts["passed"],
            "tests",
            "all pass",
            verdict(ok),
            note,
        )
    )


def _junit_cases(xml: Path) -> list[tuple[str, str, str]]:
    """(test name, outcome, message) of every test case in a JUnit XML file."""
    if not xml.is_file():
        return []
    cases = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = "failed", child.get("message", "")
            elif child.tag == "skipped":
                outcome, message = "skipped", child.get("message", "")
        cases.append((case.get("name", "?"), outcome, message.replace("\n", " ")))
    return cases
