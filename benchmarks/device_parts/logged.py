"""A command of the device check, its output into one of the files the device returns.

:class:`Logged` runs it as a child process; :class:`LoggedCall` runs the same command line in
this process through the command's own ``main`` (``--tiny``, where a child would spend most of
its time importing torch and timm again). Both logs start with the command line.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from device_parts.environment import ROOT

__all__ = ["LAUNCHER_VARS", "Logged", "LoggedCall", "child_env"]

# A launcher's rendezvous: every command here makes its own process group of one.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def child_env() -> dict[str, str]:
    """The subprocesses' environment: this one's, with the project importable from ROOT."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), env.get("PYTHONPATH", "")] if p)
    for var in LAUNCHER_VARS:
        env.pop(var, None)  # every child makes its own group of one
    return env


def _open_log(cmd: list[str], log: Path) -> IO[str]:
    """The log file, opened for writing, with the command line as its first line."""
    fh = open(log, "w")  # noqa: SIM115 - open while the command runs
    fh.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
    fh.flush()
    return fh


class Logged:
    """A command running in ROOT with its output into a log file; see :meth:`wait`.

    Args:
        cmd: The command.
        log: File for its stdout and stderr (the command line is its first line).
    """

    def __init__(self, cmd: list[str], log: Path) -> None:
        self.log = log
        self._fh = _open_log(cmd, log)
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=child_env(), stdout=self._fh, stderr=subprocess.STDOUT
        )

    def wait(self, timeout: float) -> tuple[int, float, str]:
        """Wait at most ``timeout`` seconds (then kill it).

        Args:
            timeout: Seconds from now.

        Returns:
            (exit status, 124 if it was killed; wall seconds since it started; the log's text).
        """
        try:
            rc = self.proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            rc = 124
            self._fh.write(f"\n[device_check] killed after {timeout:.0f} s (time budget)\n")
        self._fh.close()
        return rc, time.perf_counter() - self.t0, self.log.read_text(errors="replace")


class LoggedCall:
    """A command line run in this process by its ``main``, in ROOT, output into a log file.

    The same interface as :class:`Logged`; the call runs in :meth:`wait`.

    Args:
        cmd: The command line as a child would run it (the log's first line).
        log: File for its stdout and stderr.
        main: The command's entry point: takes the arguments after the program
            (``cmd[skip:]``) and returns the exit status.
        skip: How many leading words of ``cmd`` name the program (``python -m trainer``: 3).
    """

    def __init__(self, cmd: list[str], log: Path, main: Callable[[list[str]], int], skip: int):
        self.log = log
        self._argv = cmd[skip:]
        self._main = main
        with _open_log(cmd, log) as fh:
            fh.write("[device_check] run in this process through its main (--tiny)\n")
        self.t0 = time.perf_counter()

    def wait(self, timeout: float) -> tuple[int, float, str]:
        """Run the call to its end (in this process ``timeout`` cannot stop it).

        Args:
            timeout: Unused: the run's own budget bounds a ``--tiny`` run.

        Returns:
            (exit status, 1 for an exception, whose traceback goes into the log; wall seconds
            of the call; the log's text).
        """
        t0 = time.perf_counter()
        with open(self.log, "a", buffering=1) as fh, _as_child(fh):
            try:
                rc = self._main(self._argv)
            except SystemExit as exc:  # argparse's exit on a bad command line
                rc = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            except Exception:  # as a child's crash: its exit status and the log say so
                traceback.print_exc()
                rc = 1
        return rc, time.perf_counter() - t0, self.log.read_text(errors="replace")


@contextlib.contextmanager
def _as_child(fh: IO[str]) -> Iterator[None]:
    """What a child would have: ROOT as the folder, output to ``fh``, no launcher's variables."""
    saved = {var: os.environ.pop(var) for var in LAUNCHER_VARS if var in os.environ}
    try:
        with (
            contextlib.chdir(ROOT),
            contextlib.redirect_stdout(fh),
            contextlib.redirect_stderr(fh),
        ):
            yield
    finally:
        os.environ.update(saved)
