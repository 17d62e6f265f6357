"""What a launch runs: the program after ``--`` (a trainer, tune or pipeline command).

``python -m launch TARGET [options] -- ARGS``: ARGS are the arguments of ``python -m trainer``
(the default: ``-- fit --config X``), or start with a package name (``-- trainer fit ...``,
``-- tune run ...``, ``-- shards ...``), with ``pipeline`` (``srmri pipeline ...``), or with
``python`` for any other Python command (``-- python -m mymodule``). Every target turns a
:class:`Program` into its own command line; trainer ``fit``/``evaluate`` runs are spread over
ranks, and so is a pipeline stage that its plan says runs on every rank (the Slurm DAG of
:mod:`launch.slurm_pipeline` marks those); everything else runs once.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from srmri.ports import free_port  # re-exported: the launch targets' rendezvous port

__all__ = [
    "PACKAGES",
    "Program",
    "free_port",
    "parse_program",
    "quote",
]

PACKAGES = ("trainer", "tune", "shards")
_DISTRIBUTED = {"trainer": ("fit", "evaluate")}


@dataclass(frozen=True)
class Program:
    """A Python program to launch.

    Attributes:
        module: Module run with ``python -m`` (``trainer``, ``tune``, ``launch.cli`` for the
            ``srmri`` script); empty for a raw ``python ...`` command.
        args: Its arguments (for a raw command: everything after ``python``).
        spread: Run it on every rank although its command alone does not say so (a pipeline
            ``--stage`` that trains, enhances or evaluates: only the plan knows).
    """

    module: str
    args: tuple[str, ...]
    spread: bool = False

    @property
    def distributed(self) -> bool:
        """True for runs that torchrun/DeepSpeed spread over ranks (trainer fit/evaluate)."""
        commands = _DISTRIBUTED.get(self.module, ())
        return self.spread or (bool(self.args) and self.args[0] in commands)

    @property
    def is_pipeline(self) -> bool:
        """True for ``srmri pipeline ...`` (the ``launch.cli`` console script's command)."""
        return self.module == "launch.cli" and self.args[:1] == ("pipeline",)

    @property
    def is_fit(self) -> bool:
        """True for a ``trainer fit`` run (it has a run directory and a backend)."""
        return self.module == "trainer" and bool(self.args) and self.args[0] == "fit"

    def python_argv(self, python: str = "python") -> list[str]:
        """The plain command line: ``python -m MODULE ARGS`` (or the raw ``python ...``)."""
        if not self.module:
            return [python, *self.args]
        return [python, "-m", self.module, *self.args]

    def module_argv(self) -> list[str]:
        """What a launcher taking a module gets: ``-m MODULE ARGS`` (raw: the script + ARGS)."""
        if not self.module:
            return list(self.args)
        return ["-m", self.module, *self.args]

    def with_args(self, *extra: str) -> Program:
        """A copy with ``extra`` appended to the arguments (e.g. a dotted override)."""
        return Program(self.module, (*self.args, *extra), self.spread)

    def has_override(self, key: str) -> bool:
        """Whether the arguments already set ``key=...`` (a dotted trainer override)."""
        return any(a.startswith(f"{key}=") for a in self.args)


def parse_program(args: list[str] | tuple[str, ...]) -> Program:
    """Read the words after ``--`` into a :class:`Program`.

    Args:
        args: e.g. ``["fit", "--config", "configs/debug.yaml"]``, ``["tune", "run", ...]``,
            ``["pipeline", ...]`` or ``["python", "-m", "pkg.job"]``.

    Returns:
        The program.

    Raises:
        ValueError: When ``args`` is empty or a raw ``python`` command has nothing to run.
    """
    words = list(args)
    if not words:
        raise ValueError(
            "nothing to launch: give the program after '--', e.g. "
            "`python -m launch local -- fit --config configs/debug.yaml`"
        )
    head = words[0]
    if head in ("python", "python3"):
        if len(words) < 2:
            raise ValueError("`-- python` needs a script or `-m MODULE` after it")
        if words[1] == "-m" and len(words) > 2:
            return Program(words[2], tuple(words[3:]))
        return Program("", tuple(words[1:]))
    if head in PACKAGES:
        return Program(head, tuple(words[1:]))
    if head == "pipeline":  # `srmri pipeline ...`: the console script's module
        return Program("launch.cli", tuple(words))
    return Program("trainer", tuple(words))


def quote(argv: list[str] | tuple[str, ...]) -> str:
    """One shell-safe line for ``argv`` (what ``--dry-run`` prints)."""
    return shlex.join(argv)
