"""The Ray executor: every pipeline stage a Ray task, independent stages at the same time.

``srmri pipeline --config FILE --executor ray [--address HOST:PORT]`` joins a Ray cluster
(``executor.address``, else ``$RAY_ADDRESS``, which a Ray job sets, else a local Ray), runs the
data stage, plans the others against the finished set (:func:`~trainer.experiment.plan.
plan_status`) and starts each not-done stage as a task, with the ``num_cpus``/``num_gpus`` of
its kind (``executor.resources``), once every stage it reads has succeeded. A task runs the
stage alone in a subprocess (``python -m trainer.experiment pipeline ... --stage NAME``, under
torchrun with ``ranks`` processes for a distributed stage; not ``launch.cli``, which sits a
layer above) in the driver's working directory, output in ``OUT/logs/<stage>.log``: the stage
computes and records exactly what the serial executor does. A failed stage's dependants are
not started, the other stages finish, and the run fails naming it and its log.
``OUT/executor.json`` records per stage its status, start and end, host and node, and the
resources asked for and granted. Ray workers import this module to run :func:`_stage_task`,
so it imports nothing heavy at its top.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from srmri.atomic import write_json
from srmri.ports import free_port

if TYPE_CHECKING:
    from trainer.experiment.config import ExecutorConfig, PipelineConfig
    from trainer.experiment.plan import PlannedStage

__all__ = ["EXECUTOR_FILE", "check_resources", "connect", "run_with_ray", "stage_log"]

EXECUTOR_FILE = "executor.json"
# What a stage process reads from the driver's environment: on a cluster started apart from the
# driver the workers have the raylet's environment, not the user's (the pseudonym key of
# SRMRI_SECRET_FILE decides the data set's patient ids, hence its id).
_FORWARD_PREFIXES = ("SRMRI_", "MLFLOW_")
_UNSUCCESSFUL = ("failed", "not started")


def stage_log(out: Path, stage: str) -> Path:
    """Where a stage's output goes: ``OUT/logs/<stage>.log`` (``classify/hr-seed0`` nests)."""
    return out / "logs" / f"{stage}.log"


def _stage_command(words: list[str], ranks: int) -> list[str]:
    """``python -m trainer.experiment WORDS``, under torchrun when ``ranks`` > 1."""
    module = ["-m", "trainer.experiment", *words]
    if ranks <= 1:
        return [sys.executable, *module]
    port = free_port()  # free on this node now: the ranks' rendezvous
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1"]
    rdzv = [f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=stage-{port}"]
    return [*torchrun, f"--nproc-per-node={ranks}", "--rdzv-backend=c10d", *rdzv, *module]


def _stage_task(words: list[str], ranks: int, cwd: str, log: str, env: dict[str, str]) -> dict:
    """Run one stage in a subprocess on the node Ray chose (the body of every Ray task).

    Args:
        words: The ``srmri`` words of the stage (:func:`~trainer.experiment.plan.stage_argv`).
        ranks: Its processes (1: no torchrun).
        cwd: The driver's working directory (relative config paths mean it); a node without it
            (a Ray job's copy of the project lives elsewhere on each node) uses its own.
        log: The stage's log file.
        env: Environment variables from the driver (see ``_FORWARD_PREFIXES``).

    Returns:
        ``returncode``, ``start``/``end`` (epoch seconds), ``host``, ``node_id``, ``assigned``
        (the resources Ray granted the task) and ``command``.
    """
    import ray

    ctx = ray.get_runtime_context()
    cmd = _stage_command(words, ranks)
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log, "a") as handle:  # a re-run's attempt follows the failed one's
        handle.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] $ {' '.join(cmd)}\n")
        handle.flush()
        done = subprocess.run(
            cmd,
            cwd=cwd if Path(cwd).is_dir() else None,
            env={**os.environ, **env},
            stdout=handle,
            stderr=subprocess.STDOUT,
            check=False,
        )
    return {
        "returncode": done.returncode,
        "start": start,
        "end": time.time(),
        "host": socket.gethostname(),
        "node_id": ctx.get_node_id(),
        "assigned": ctx.get_assigned_resources(),
        "command": cmd,
    }


def connect(executor: ExecutorConfig) -> str:
    """Join the cluster of ``executor.address`` or ``$RAY_ADDRESS``, else start a local Ray.

    Returns:
        The GCS address of the cluster joined (recorded in ``executor.json``).
    """
    import ray

    if not ray.is_initialized():
        address = executor.address or os.environ.get("RAY_ADDRESS", "")
        if address.startswith(("http://", "https://")):  # `ray job submit` reads it so
            from srmri.config import ConfigError

            raise ConfigError(
                f"executor.address: $RAY_ADDRESS={address} is a dashboard address; give the "
                "cluster's GCS address HOST:PORT with --address (or executor.address)"
            )
        if address:
            ray.init(address=address, log_to_driver=False)
        else:  # "local": never join some other cluster found on this machine by accident
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
    return str(ray.get_runtime_context().gcs_address)


def _options(executor: ExecutorConfig, kind: str) -> dict[str, float]:
    """The Ray task options of a stage kind."""
    res = getattr(executor.resources, kind)
    return {"num_cpus": res.cpus, "num_gpus": res.gpus}


def check_resources(executor: ExecutorConfig, kinds: set[str], nodes: list[dict]) -> None:
    """Fail unless some node can hold each kind's task (Ray would leave it pending forever).

    Args:
        executor: The executor settings.
        kinds: The kinds of the stages to run.
        nodes: ``ray.nodes()``.

    Raises:
        ConfigError: Naming the ``executor.resources`` key no node satisfies.
    """
    from srmri.config import require

    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    for kind in sorted(kinds):
        opts = _options(executor, kind)
        for key, name in (("num_cpus", "CPU"), ("num_gpus", "GPU")):
            most = max((float(r.get(name, 0)) for r in alive), default=0.0)
            require(
                opts[key] <= most,
                f"executor.resources.{kind}.{key[4:]}",
                f"a {kind} stage asks for {opts[key]:g} {name}s, but no node of the cluster "
                f"has that many (the most on one node: {most:g})",
            )


class _Scheduler:
    """Start each stage once its upstream succeeded, wait for any, record all in executor.json."""

    def __init__(self, cfg: PipelineConfig, launch: Callable[[PlannedStage], Any], meta: dict):
        self.cfg = cfg
        self.launch = launch
        self.out = Path(cfg.out_dir).resolve()
        self.journal: dict[str, Any] = {**meta, "started": time.time(), "stages": {}}
        self.state: dict[str, str] = {}  # waiting, running, done, failed or not started
        self.running: dict[Any, PlannedStage] = {}

    def record(self, stage: PlannedStage, **entry: Any) -> None:
        """Update a stage's entry in ``OUT/executor.json`` (rewritten whole, atomically)."""
        self.journal["stages"].setdefault(stage.name, {"kind": stage.kind}).update(entry)
        write_json(self.out / EXECUTOR_FILE, self.journal, indent=1)

    def run(self, stages: list[PlannedStage]) -> None:
        """Run the stages that are not done (their upstream: done, or among ``stages``).

        Raises:
            PipelineError: Some stage failed; the others that did not read it finished.
        """
        import ray

        todo = [s for s in stages if not s.done]
        for stage in stages:
            self.state[stage.name] = "waiting"
            if stage.done:
                self.state[stage.name] = "done"
                self.record(stage, status="done before", fingerprint=stage.fingerprint)
                _say(f"[pipeline] {stage.name}: done before ({stage.fingerprint[:10]}), skipped")
        try:
            while todo or self.running:
                todo = [s for s in todo if not self._start_or_block(s)]
                if todo and not self.running:  # in serial order a waiting stage can start
                    raise RuntimeError(f"stages {[s.name for s in todo]} wait on none running")
                if self.running:
                    ready, _ = ray.wait(list(self.running), num_returns=1)
                    self._finish(ready[0])
        except BaseException:  # the driver is stopping: stop the stages it started too
            for ref in self.running:  # the task's subprocess.run then kills its stage process
                ray.cancel(ref)
            raise
        self._raise_failed()

    def _start_or_block(self, stage: PlannedStage) -> bool:
        """Start ``stage`` or mark it not started; False while an upstream stage is pending."""
        states = [self.state[name] for name in stage.upstream]
        if all(s == "done" for s in states):
            res = asdict(getattr(self.cfg.executor.resources, stage.kind))
            log = stage_log(self.out, stage.name)
            self.running[self.launch(stage)] = stage
            self.state[stage.name] = "running"
            self.record(stage, status="running", resources=res, log=str(log), submitted=time.time())
            _say(f"[pipeline] {stage.name}: running (Ray task, {_asked(res)}; log {log})")
            return True
        bad = [f"{n} ({s})" for n, s in zip(stage.upstream, states) if s in _UNSUCCESSFUL]
        if not bad:
            return False
        self.state[stage.name] = "not started"
        self.record(stage, status="not started", reads=bad)
        _say(f"[pipeline] {stage.name}: not started: it reads {', '.join(bad)}")
        return True

    def _finish(self, ref: Any) -> None:
        """Record the end of the stage whose task ``ref`` is."""
        import ray

        stage = self.running.pop(ref)
        try:
            result = ray.get(ref)
            why = f"exit {result['returncode']}"
        except ray.exceptions.RayError as exc:  # the worker or its node died
            result, why = {"returncode": None, "error": str(exc)}, type(exc).__name__
        ok = result["returncode"] == 0
        self.state[stage.name] = "done" if ok else "failed"
        begin = result.get("start", self.journal["stages"][stage.name]["submitted"])
        seconds = result.get("end", time.time()) - begin
        self.record(stage, status=self.state[stage.name], seconds=round(seconds, 3), **result)
        if ok:
            _say(f"[pipeline] {stage.name}: done in {seconds:.1f} s")
        else:
            log = stage_log(self.out, stage.name)
            _say(f"[pipeline] {stage.name}: FAILED ({why}) after {seconds:.1f} s; log {log}")

    def _raise_failed(self) -> None:
        """Raise naming every failed stage, its log, and what was not started for it."""
        from trainer.experiment.stage import PipelineError

        failed = [name for name, s in self.state.items() if s == "failed"]
        if not failed:
            return
        logs = "; ".join(f"{name} (log {stage_log(self.out, name)})" for name in failed)
        skipped = [name for name, s in self.state.items() if s == "not started"]
        also = f"; not started because they read it: {', '.join(skipped)}" if skipped else ""
        raise PipelineError(f"stage failed: {logs}{also}")


def _say(line: str) -> None:
    """Print a progress line now (the driver's output is often a pipe: a Ray job's log)."""
    print(line, flush=True)


def _asked(res: dict[str, Any]) -> str:
    """``1 CPU, 0 GPU`` (and the ranks when more than one)."""
    ranks = f", {res['ranks']} ranks" if res["ranks"] > 1 else ""
    return f"{res['cpus']:g} CPU, {res['gpus']:g} GPU{ranks}"


def _launcher(
    cfg: PipelineConfig, config: str, overrides: list[str]
) -> Callable[[PlannedStage], Any]:
    """A function that starts one stage's Ray task and returns its ObjectRef."""
    import ray

    from trainer.experiment.plan import stage_argv

    remote = ray.remote(max_retries=0)(_stage_task)  # a failed stage is the user's to re-run
    env = {k: v for k, v in os.environ.items() if k.startswith(_FORWARD_PREFIXES)}
    cwd, out = os.getcwd(), Path(cfg.out_dir).resolve()

    def launch(stage: PlannedStage) -> Any:
        res = getattr(cfg.executor.resources, stage.kind)
        ranks = res.ranks if stage.distributed else 1
        words = stage_argv(config, overrides, stage.name)
        opts = {**_options(cfg.executor, stage.kind), "name": f"stage:{stage.name}"}
        log = str(stage_log(out, stage.name))
        return remote.options(**opts).remote(words, ranks, cwd, log, env)

    return launch


def run_with_ray(cfg: PipelineConfig, config: str, overrides: list[str]) -> Path:
    """Run every not-done stage of the pipeline as Ray tasks.

    Args:
        cfg: The pipeline config (``executor`` says where and with what).
        config: The pipeline YAML as the user gave it (the stage processes load it again).
        overrides: The user's dotted overrides of it.

    Returns:
        The path of the HTML report.

    Raises:
        PipelineError: A stage failed (the message names it and its log).
        ConfigError: No node of the cluster can hold some kind's resources.
    """
    import ray

    from trainer.experiment.plan import plan_status

    cluster = connect(cfg.executor)
    _, planned = plan_status(cfg)
    check_resources(cfg.executor, {s.kind for s in planned}, ray.nodes())
    meta = {"executor": "ray", "cluster": cluster, "address": cfg.executor.address}
    scheduler = _Scheduler(cfg, _launcher(cfg, config, overrides), meta)
    scheduler.run(planned[:1])  # the data stage: every other stage's plan depends on its set
    _, planned = plan_status(cfg)
    scheduler.run(planned[1:])
    report = Path(cfg.out_dir).resolve() / "report.html"
    _say(f"\n[pipeline] report: {report}")
    return report
