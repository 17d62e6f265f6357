"""The ``slurm`` target: render a small sbatch script (one torchrun per node) and submit it.

The script asks for ``--nodes`` nodes with one task each; ``srun`` starts one torchrun per node,
and the torchruns meet in a c10d rendezvous on the allocation's first node (at the address
Slurm itself uses for it). Pre-emption: ``--signal=B:USR1@90`` makes Slurm warn the batch shell
90 s before the time limit (``scancel --signal=USR1 --batch JOB`` does the same by hand); the
shell forwards the signal to every process of the step, the trainer saves a checkpoint and
stops, and the shell requeues the job, which resumes from the run directory's last checkpoint.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

from launch.local import torchrun_command
from launch.program import Program, quote
from srmri.config import require
from srmri.exitcodes import REQUEUE

__all__ = ["SlurmOptions", "job_dirs", "render_sbatch", "run_slurm", "submit_sbatch"]

# torchrun forwards only these signals to its workers; USR1 is added so pre-emption reaches them.
_TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"
_SIGNAL = re.compile(r"^(?:B:)?(?:SIG)?(USR1|USR2|TERM|INT|HUP|QUIT)@(\d+)$")

_SCRIPT = Template(
    """#!/bin/bash
# ${title}
# Rendered by `python -m launch slurm`; submit again with `sbatch ${script_name}`.
${sbatch}

# Environment set-up (--setup).
${setup}

# Rendezvous on the first node of the allocation, at the address Slurm uses for it (NodeAddr),
# so that node names need not resolve; the job id keeps concurrent jobs apart.
head_node=$$(scontrol show hostnames "$$SLURM_JOB_NODELIST" | head -n1)
head_addr=$$(scontrol show node "$$head_node" | grep -oP 'NodeAddr=\\K\\S+')
port=${port}
echo "launch: job $$SLURM_JOB_ID restart $${SLURM_RESTART_COUNT:-0} on $$SLURM_JOB_NODELIST," \\
     "rendezvous $$head_addr:$$port"

# One task per node. In the background, so that this shell can take the pre-emption signal.
${srun} \\
  ${command} &
step=$$!
${preemption}"""
)

_PREEMPTION = Template(
    """
# Pre-emption: Slurm sends SIG${sig} to this shell ${warn}s before the time limit (or by hand:
# scancel --signal=${sig} --batch JOB). srun passes it to every process of the step; the trainer
# saves a checkpoint at its next step and stops. torchrun then exits 1 (it does not pass on the
# trainer's own status ${code}), so a non-zero end after the signal requeues the job, and the
# requeued job resumes from the run directory's last checkpoint.
preempted=0
trap 'preempted=1; echo "launch: SIG${sig}, forwarding to the step"; kill -${sig} "$$step"' ${sig}
wait "$$step"; rc=$$?
while kill -0 "$$step" 2>/dev/null; do wait "$$step"; rc=$$?; done  # wait returns at a signal
if [ "$$rc" -eq ${code} ] || { [ "$$preempted" = 1 ] && [ "$$rc" -ne 0 ]; }; then
  echo "launch: step ended with status $$rc after pre-emption; requeueing job $$SLURM_JOB_ID"
  scontrol requeue "$$SLURM_JOB_ID"
fi
exit "$$rc"
"""
)

_NO_PREEMPTION = """wait "$step"
"""


@dataclass
class SlurmOptions:
    """Options of ``python -m launch slurm``; each maps to one ``#SBATCH`` line or script part.

    Attributes:
        nodes: ``--nodes``; one torchrun runs on each.
        gpus_per_node: ``--gpus-per-node`` (0: none asked for).
        nproc_per_node: Ranks per node; 0 means ``gpus_per_node`` (at least 1).
        cpus_per_task: ``--cpus-per-task`` (the torchrun task of a node and all its ranks).
        mem: ``--mem`` per node, e.g. ``64G`` (empty: the partition's default).
        time: ``--time`` limit, e.g. ``04:00:00``.
        partition: ``--partition``.
        account: ``--account``.
        qos: ``--qos``.
        job_name: ``--job-name``; also the log and script file names.
        setup: Shell lines run before the job (``module load ...``, ``source .venv/bin/activate``).
        signal: Pre-emption warning ``SIG@SECONDS`` (``--signal=B:USR1@90``); empty disables.
        requeue: Add ``--requeue`` and requeue the job after a pre-emption stop.
        port: Rendezvous port; 0 derives one from the job id (20000 + id mod 20000).
        output_dir: Where the script and the job's log ``NAME-JOBID.out`` go.
        workdir: The job's working directory (``--chdir``); empty: the current directory.
        extra: More ``#SBATCH`` options, verbatim (e.g. ``--constraint=a100``).
    """

    nodes: int = 1
    gpus_per_node: int = 0
    nproc_per_node: int = 0
    cpus_per_task: int = 0
    mem: str = ""
    time: str = ""
    partition: str = ""
    account: str = ""
    qos: str = ""
    job_name: str = "srmri"
    setup: list[str] = field(default_factory=list)
    signal: str = "USR1@90"
    requeue: bool = True
    port: int = 0
    output_dir: str = "runs/slurm"
    workdir: str = ""
    extra: list[str] = field(default_factory=list)

    def check(self) -> None:
        require(self.nodes >= 1, "--nodes", f"must be >= 1, got {self.nodes}")
        require(self.gpus_per_node >= 0, "--gpus-per-node", "must be >= 0")
        require(self.nproc_per_node >= 0, "--nproc-per-node", "must be >= 0 (0: GPUs per node)")
        require(self.cpus_per_task >= 0, "--cpus-per-task", "must be >= 0 (0: Slurm's default)")
        require(0 <= self.port < 65536, "--port", f"must be a TCP port or 0, got {self.port}")
        require(bool(re.fullmatch(r"[\w.-]+", self.job_name)), "--job-name", "letters, digits, ._-")
        require(
            not self.signal or bool(_SIGNAL.match(self.signal)),
            "--signal",
            f"{self.signal!r} must look like USR1@90 (signal@seconds before the time limit)",
        )
        require(
            not self.time or bool(re.fullmatch(r"[\d:-]+", self.time)),
            "--time",
            f"{self.time!r} must be a Slurm time such as 04:00:00 or 1-00:00:00",
        )

    @property
    def ranks_per_node(self) -> int:
        """Ranks torchrun starts on each node."""
        return self.nproc_per_node or max(self.gpus_per_node, 1)


def job_dirs(options: SlurmOptions, cwd: Path | None = None) -> tuple[Path, Path]:
    """The job's working directory and its script/log folder, both absolute.

    Args:
        options: The target's options (``workdir`` and ``output_dir``, maybe relative).
        cwd: What relative paths mean (default: the current directory).

    Returns:
        ``(workdir, output_dir)``; a relative ``output_dir`` is inside ``workdir``.
    """
    base = (cwd or Path.cwd()).resolve()
    workdir = (base / options.workdir).resolve() if options.workdir else base
    return workdir, (workdir / options.output_dir).resolve()


def _sbatch_lines(
    options: SlurmOptions, output_dir: Path, workdir: Path, preemptible: bool
) -> list[str]:
    o = options
    lines = [
        f"#SBATCH --job-name={o.job_name}",
        f"#SBATCH --nodes={o.nodes}",
        "#SBATCH --ntasks-per-node=1                # one task (torchrun) per node",
    ]
    optional = [
        ("--gpus-per-node", o.gpus_per_node or ""),
        ("--cpus-per-task", o.cpus_per_task or ""),
        ("--mem", o.mem),
        ("--time", o.time),
        ("--partition", o.partition),
        ("--account", o.account),
        ("--qos", o.qos),
    ]
    lines += [f"#SBATCH {flag}={value}" for flag, value in optional if value]
    lines += [
        f"#SBATCH --chdir={workdir}",
        f"#SBATCH --output={output_dir}/%x-%j.out  # stdout and stderr",
    ]
    if preemptible and o.requeue:
        lines += [
            "#SBATCH --requeue                          # may go back to the queue ...",
            "#SBATCH --open-mode=append                 # ... and then appends to the same log",
        ]
    if preemptible and o.signal:
        sig, seconds = _SIGNAL.match(o.signal).groups()  # type: ignore[union-attr]
        lines.append(f"#SBATCH --signal=B:{sig}@{seconds}                 # pre-emption warning")
    lines += [f"#SBATCH {e}" for e in o.extra]
    return lines


def render_sbatch(
    options: SlurmOptions, program: Program, cwd: Path | None = None, title: str = ""
) -> str:
    """The sbatch script that runs ``program`` as ``options`` say.

    Args:
        options: The target's options.
        program: A trainer run (torchrun on every node) or a program run once (one node).
        cwd: The job's working directory when ``options.workdir`` is empty (default: here).
        title: What the job is, put before the script's first comment line (e.g. the
            pipeline stage it runs); empty: nothing.

    Returns:
        The script text.

    Raises:
        srmri.config.ConfigError: A program that is not spread over ranks with ``--nodes`` > 1.
    """
    workdir, output_dir = job_dirs(options, cwd)
    require(
        program.distributed or options.nodes == 1,
        "--nodes",
        f"`{quote(program.python_argv())}` runs once; ask for one node",
    )
    if program.distributed:
        nodes = "$SLURM_JOB_NUM_NODES"
        extra = () if not options.signal else (f"--signals-to-handle={_TORCHRUN_SIGNALS}",)
        cmd = torchrun_command(
            program,
            options.ranks_per_node,
            '"$head_addr:$port"',
            '"$SLURM_JOB_ID"',
            nnodes=nodes,
            extra=extra,
        )
        what = f"{options.nodes} node(s) x {options.ranks_per_node} rank(s): {program.module}"
    else:
        cmd = program.python_argv()
        what = f"one process: {quote(cmd)}"
    # The launcher's words are shell expressions ("$head_addr:$port"); the program's are quoted.
    n_prog = len(program.module_argv()) if program.distributed else len(cmd)
    lines = [*cmd[: len(cmd) - n_prog], quote(cmd[len(cmd) - n_prog :])]
    srun = f"srun --nodes={options.nodes} --ntasks-per-node=1 --kill-on-bad-exit=1"
    sig = _SIGNAL.match(options.signal).group(1) if options.signal else ""  # type: ignore[union-attr]
    preemptible = bool(options.signal and options.requeue and program.distributed)
    if preemptible:
        warn = _SIGNAL.match(options.signal).group(2)  # type: ignore[union-attr]
        preemption = _PREEMPTION.substitute(sig=sig, warn=warn, code=REQUEUE)
    else:
        preemption = _NO_PREEMPTION
    port = options.port or "$((20000 + SLURM_JOB_ID % 20000))"
    return _SCRIPT.substitute(
        title=f"{title}: {what}" if title else what,
        script_name=f"{output_dir}/{options.job_name}.sbatch",
        sbatch="\n".join(_sbatch_lines(options, output_dir, workdir, preemptible)),
        setup="\n".join(options.setup) or "# (none: the job inherits the environment of sbatch)",
        port=port,
        srun=srun,
        command=" \\\n    ".join(lines),
        preemption=preemption,
    )


def submit_sbatch(script: str, options: SlurmOptions, cwd: Path | None = None) -> str:
    """Write the script to ``OUTPUT_DIR/JOB_NAME.sbatch``, submit it and return the job id.

    Raises:
        RuntimeError: When sbatch fails (its message included).
    """
    _, output_dir = job_dirs(options, cwd)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"{options.job_name}.sbatch"
    path.write_text(script)
    done = subprocess.run(
        ["sbatch", "--parsable", str(path)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"sbatch {path} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip().split(";")[0]


def run_slurm(options: SlurmOptions, program: Program, dry_run: bool = False) -> int:
    """Render the script; print it (dry run) or submit it and print the job id.

    Returns:
        0 on success.
    """
    script = render_sbatch(options, program)
    if dry_run:
        print(script, end="")
        return 0
    job = submit_sbatch(script, options)
    _, out = job_dirs(options)
    print(f"submitted Slurm job {job}", file=sys.stderr)
    print(f"log: {out}/{options.job_name}-{job}.out", file=sys.stderr)
    logs = f"python -m launch logs {job}"
    print(f"status: python -m launch status {job}   logs: {logs}", file=sys.stderr)
    print(job, flush=True)
    return 0
