"""A real local Slurm cluster for tests: install, configure (one or two nodes), start, stop.

Follows ``shared/recipes/local-cluster.md``: Debian's Slurm packages, munge, a slurm.conf with
one node (this host) or two "nodes" ``n1``/``n2`` that are two slurmd daemons on this machine.
Daemons are stopped by the pids in their pid files, never by name. Plain functions and one
dataclass, no pytest: the test modules wrap them in fixtures.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "PACKAGES",
    "SlurmCluster",
    "SlurmUnavailable",
    "install_slurm",
    "slurm_conf",
    "start_cluster",
    "wait_for_job",
]

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
STATE = Path("/tmp/slurm")
CONF = Path("/etc/slurm/slurm.conf")
_TWO_NODE_PORTS = {"n1": 17001, "n2": 17002}


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed here (not root, or no package access); the reason says which."""


@dataclass
class SlurmCluster:
    """A running local cluster.

    Attributes:
        nodes: Slurm node names (``[hostname]`` or ``["n1", "n2"]``).
        pid_files: slurmctld's and every slurmd's pid file, for the teardown.
        munged_pid_file: munged's pid file (None when munged was already running).
    """

    nodes: list[str]
    pid_files: list[Path] = field(default_factory=list)
    munged_pid_file: Path | None = None

    def stop(self) -> None:
        """Stop the daemons this cluster started, by the pids in their pid files."""
        for pid_file in [
            *self.pid_files,
            *([self.munged_pid_file] if self.munged_pid_file else []),
        ]:
            _kill_pid_file(pid_file)


def _run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def install_slurm() -> None:
    """Install the Slurm and munge packages with apt unless they are there already.

    Raises:
        SlurmUnavailable: Not root, no apt, or apt could not install the packages.
    """
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("installing Slurm needs root (apt-get); this user is not root")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("installing Slurm needs apt-get, which this machine lacks")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    if done.returncode != 0:  # a stale package list: refresh once and retry
        subprocess.run(["apt-get", "update"], capture_output=True, env=env, timeout=600)
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        raise SlurmUnavailable(f"apt-get could not install {PACKAGES}: {done.stderr[-800:]}")


def slurm_conf(two_nodes: bool) -> str:
    """The slurm.conf text of the recipe: this host as one node, or ``n1``/``n2`` on it.

    One addition to the recipe: ``AuthInfo=cred_expire=10``. A requeued job waits the credential
    lifetime (120 s by default) before it may start again; 10 s keeps the pre-emption test short.

    Args:
        two_nodes: Declare two one-CPU nodes n1 and n2 (two slurmd daemons) instead of one.

    Returns:
        The configuration file's text.
    """
    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    common = f"""ClusterName=localcluster
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation={STATE}/state
SlurmctldPidFile={STATE}/slurmctld.pid
SlurmctldLogFile={STATE}/log/slurmctld.log
SlurmctldPort=6817
"""
    if not two_nodes:
        return common + (
            f"SlurmdSpoolDir={STATE}/spool\nSlurmdPidFile={STATE}/slurmd.pid\n"
            f"SlurmdLogFile={STATE}/log/slurmd.log\nSlurmdPort=6818\n"
            f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} State=UNKNOWN\n"
            f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP\n"
        )
    nodes = "".join(
        f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs=1 "
        f"RealMemory={mem // 2} State=UNKNOWN\n"
        for n, port in _TWO_NODE_PORTS.items()
    )
    return common + (
        f"SlurmdSpoolDir={STATE}/spool/%n\nSlurmdPidFile={STATE}/slurmd-%n.pid\n"
        f"SlurmdLogFile={STATE}/log/slurmd-%n.log\n{nodes}"
        "PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP\n"
    )


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie nobody reaped yet counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # the state follows the parenthesised command name in /proc/PID/stat
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _wait_gone(pid: int, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while _running(pid):
        if time.monotonic() > end:
            return False
        time.sleep(0.1)
    return True


def _kill_pid_file(pid_file: Path, timeout: float = 30.0) -> None:
    """SIGTERM the pid in ``pid_file`` and wait for it to go (SIGKILL after ``timeout``).

    slurmctld saves its state on SIGTERM, which on a loaded 2-core machine took over 10 s; a
    cluster started while the old one is still exiting would find its daemon alive.
    """
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if _wait_gone(pid, timeout):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if not _wait_gone(pid, 10.0):
        raise RuntimeError(f"pid {pid} of {pid_file} outlived SIGKILL by 10 s")


def _alive(pid_file: Path) -> bool:
    try:
        return _running(int(pid_file.read_text().split()[0]))
    except (OSError, ValueError, IndexError):
        return False


def _start_munge() -> Path | None:
    """Start munged unless a credential round trip already works; returns its pid file."""
    if _run(["bash", "-c", "munge -n | unmunge"]).returncode == 0:
        return None
    run_dir = Path("/run/munge")
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.chown(run_dir, "munge", "munge")
    run_dir.chmod(0o755)
    started = _run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"])
    if started.returncode != 0:
        raise RuntimeError(f"munged did not start: {started.stderr}")
    check = _run(["bash", "-c", "munge -n | unmunge"])
    if "Success" not in check.stdout:
        raise RuntimeError(f"munge round trip failed: {check.stdout}{check.stderr}")
    return run_dir / "munged.pid"


def _wait_idle(nodes: list[str], timeout: float) -> None:
    end = time.monotonic() + timeout
    states: str = ""
    while time.monotonic() < end:
        states = _run(["sinfo", "-h", "-N", "-o", "%N %T"]).stdout
        idle = {line.split()[0] for line in states.splitlines() if line.split()[1:] == ["idle"]}
        if idle >= set(nodes):
            return
        time.sleep(0.5)
    raise RuntimeError(f"Slurm nodes {nodes} not idle after {timeout:.0f} s: {states!r}")


def start_cluster(two_nodes: bool = False, timeout: float = 60.0) -> SlurmCluster:
    """Install if needed, write slurm.conf, start munged, slurmctld and slurmd(s), wait idle.

    Args:
        two_nodes: Start the two-node variant (n1, n2) instead of one node.
        timeout: Seconds to wait for the nodes to become idle.

    Returns:
        The running cluster; call ``stop()`` to tear it down.

    Raises:
        SlurmUnavailable: Slurm cannot be installed here.
        RuntimeError: A daemon did not start or the nodes did not become idle.
    """
    install_slurm()
    for pid_file in STATE.glob("slurm*.pid"):
        if _alive(pid_file):
            raise RuntimeError(f"a Slurm daemon is already running ({pid_file}); stop it first")
    munged = _start_munge()
    for sub in ("state", "spool", "log"):
        (STATE / sub).mkdir(parents=True, exist_ok=True)
    # A fresh controller state: jobs of an earlier cluster (other node names) must not linger.
    shutil.rmtree(STATE / "state", ignore_errors=True)
    (STATE / "state").mkdir()
    CONF.parent.mkdir(parents=True, exist_ok=True)
    CONF.write_text(slurm_conf(two_nodes))
    host = socket.gethostname().split(".")[0]
    nodes = list(_TWO_NODE_PORTS) if two_nodes else [host]
    cluster = SlurmCluster(nodes, [STATE / "slurmctld.pid"], munged)
    daemons = [["slurmctld"]]
    if two_nodes:
        for n in nodes:
            (STATE / "spool" / n).mkdir(parents=True, exist_ok=True)
            daemons.append(["slurmd", "-N", n])
            cluster.pid_files.append(STATE / f"slurmd-{n}.pid")
    else:
        daemons.append(["slurmd"])
        cluster.pid_files.append(STATE / "slurmd.pid")
    try:
        for cmd in daemons:
            done = _run(cmd)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr or done.stdout}")
        _wait_idle(nodes, timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def wait_for_job(job_id: str, timeout: float, poll_s: float = 0.5) -> str:
    """Poll ``squeue`` every ``poll_s`` until the job leaves the queue; return its final state.

    Args:
        job_id: Slurm job id.
        timeout: Seconds before giving up.
        poll_s: Polling interval (``sbatch --wait`` is slow to return on this cluster).

    Returns:
        The ``JobState`` that ``scontrol show job`` reports (e.g. ``COMPLETED``).

    Raises:
        TimeoutError: The job is still queued or running after ``timeout`` seconds.
    """
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not _run(["squeue", "-h", "-j", job_id]).stdout.strip():
            break
        time.sleep(poll_s)
    else:
        raise TimeoutError(f"Slurm job {job_id} still in the queue after {timeout:.0f} s")
    shown = _run(["scontrol", "show", "job", job_id]).stdout
    for token in shown.split():
        if token.startswith("JobState="):
            return token.split("=", 1)[1]
    return "UNKNOWN"
