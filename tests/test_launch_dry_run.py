"""Dry runs of every ``python -m launch`` target, checked against the exact expected commands.

These run the real command line (``launch.commands.main``) and only stop short of starting
anything; the scheduler tests (test_launch_slurm.py, test_launch_ray.py) submit the same
commands for real.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from launch.commands import main
from launch.deepspeed_host import hostfile_text, parse_hosts
from launch.program import Program, parse_program
from srmri.config import ConfigError

FIT = ["fit", "--config", "configs/debug.yaml", "data.root=/data/set", "name=run1"]


def _dry(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[str, str]:
    assert main([*argv]) == 0
    out = capsys.readouterr()
    return out.out, out.err


def test_program_forms() -> None:
    assert parse_program(["fit", "--config", "c.yaml"]) == Program(
        "trainer", ("fit", "--config", "c.yaml")
    )
    assert parse_program(["trainer", "evaluate"]).distributed
    assert parse_program(["tune", "run", "x.yaml"]) == Program("tune", ("run", "x.yaml"))
    assert not parse_program(["tune", "run"]).distributed
    assert parse_program(["pipeline", "a"]).python_argv() == [
        "python",
        "-m",
        "launch.cli",
        "pipeline",
        "a",
    ]
    assert parse_program(["python", "-m", "pkg.job", "1"]) == Program("pkg.job", ("1",))
    assert parse_program(["python", "script.py"]).python_argv() == ["python", "script.py"]
    with pytest.raises(ValueError, match="nothing to launch"):
        parse_program([])


def test_local_dry_run(capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = _dry(capsys, "local", "--nproc", "2", "--port", "29555", "--dry-run", "--", *FIT)
    assert out.strip() == (
        "torchrun --nnodes=1 --nproc-per-node=2 --rdzv-backend=c10d "
        "--rdzv-endpoint=127.0.0.1:29555 --rdzv-id=local-29555 "
        "-m trainer fit --config configs/debug.yaml data.root=/data/set name=run1"
    )
    # Without --port a free port is chosen; without --nproc one rank per GPU (none here: 1).
    out, _ = _dry(capsys, "local", "--dry-run", "--", *FIT)
    assert "--nproc-per-node=1" in out and "--rdzv-endpoint=127.0.0.1:" in out
    # A tune search is not spread over ranks: it runs once, as it is.
    out, _ = _dry(capsys, "local", "--dry-run", "--", "tune", "run", "space.yaml")
    assert out.strip() == f"{sys.executable} -m tune run space.yaml"


def test_deepspeed_dry_run_with_hosts(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    out, _ = _dry(
        capsys,
        "deepspeed",
        "--hosts",
        "gpu01:4,gpu02:4",
        "--hostfile",
        str(hostfile),
        "--port",
        "29600",
        "--dry-run",
        "--",
        *FIT,
    )
    assert out == (
        f"# hostfile {hostfile}\ngpu01 slots=4\ngpu02 slots=4\n"
        f"deepspeed --hostfile={hostfile} --master_addr=gpu01 --master_port=29600 "
        "--no_local_rank --module trainer fit --config configs/debug.yaml data.root=/data/set "
        "name=run1 backend.name=deepspeed\n"
    )
    assert not hostfile.exists(), "a dry run must not write the hostfile"


def test_deepspeed_falls_back_to_torchrun_without_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the DeepSpeed launcher itself is used")
    out, err = _dry(
        capsys,
        "deepspeed",
        "--nproc",
        "2",
        "--port",
        "29601",
        "--dry-run",
        "--",
        *FIT,
        "backend.zero_stage=1",
    )
    assert "no GPU on this machine; falling back to torchrun" in err
    assert out.strip() == (
        "torchrun --nnodes=1 --nproc-per-node=2 --rdzv-backend=c10d "
        "--rdzv-endpoint=127.0.0.1:29601 --rdzv-id=local-29601 -m trainer fit --config "
        "configs/debug.yaml data.root=/data/set name=run1 backend.zero_stage=1 "
        "backend.name=deepspeed"
    )


def test_hosts_parsing() -> None:
    assert parse_hosts("a:2, b:8") == [("a", 2), ("b", 8)]
    assert hostfile_text([("a", 2)]) == "a slots=2\n"
    for bad in ("a", "a:0", "a:x", ":3", ""):
        with pytest.raises(ConfigError, match="--hosts"):
            parse_hosts(bad)


def test_slurm_dry_run_script(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out, _ = _dry(
        capsys,
        "slurm",
        "--nodes",
        "4",
        "--gpus-per-node",
        "8",
        "--cpus-per-task",
        "64",
        "--mem",
        "480G",
        "--time",
        "12:00:00",
        "--partition",
        "gpu",
        "--account",
        "proj42",
        "--qos",
        "high",
        "--job-name",
        "sr-x4",
        "--setup",
        "module load cuda/12.4",
        "--setup",
        "source .venv/bin/activate",
        "--output-dir",
        "logs",
        "--workdir",
        str(tmp_path),
        "--dry-run",
        "--",
        *FIT,
    )
    sbatch = [line for line in out.splitlines() if line.startswith("#SBATCH")]
    assert [line.split("#", 2)[1].strip() for line in sbatch] == [
        "SBATCH --job-name=sr-x4",
        "SBATCH --nodes=4",
        "SBATCH --ntasks-per-node=1",
        "SBATCH --gpus-per-node=8",
        "SBATCH --cpus-per-task=64",
        "SBATCH --mem=480G",
        "SBATCH --time=12:00:00",
        "SBATCH --partition=gpu",
        "SBATCH --account=proj42",
        "SBATCH --qos=high",
        f"SBATCH --chdir={tmp_path}",
        f"SBATCH --output={tmp_path}/logs/%x-%j.out",
        "SBATCH --requeue",
        "SBATCH --open-mode=append",
        "SBATCH --signal=B:USR1@90",
    ]
    assert "module load cuda/12.4\nsource .venv/bin/activate\n" in out
    assert 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in out
    assert "port=$((20000 + SLURM_JOB_ID % 20000))" in out
    command = out[out.index("srun ") : out.index(" &\n")]
    assert command.split() == [
        "srun",
        "--nodes=4",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        "\\",
        "torchrun",
        "\\",
        "--nnodes=$SLURM_JOB_NUM_NODES",
        "\\",
        "--nproc-per-node=8",
        "\\",
        "--rdzv-backend=c10d",
        "\\",
        '--rdzv-endpoint="$head_addr:$port"',
        "\\",
        '--rdzv-id="$SLURM_JOB_ID"',
        "\\",
        "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2",
        "\\",
        "-m",
        "trainer",
        "fit",
        "--config",
        "configs/debug.yaml",
        "data.root=/data/set",
        "name=run1",
    ]
    assert "trap 'preempted=1;" in out and "' USR1\n" in out
    assert 'scontrol requeue "$SLURM_JOB_ID"' in out
    # torchrun runs the trainer; no other Python is started; and bash accepts the script.
    code = "\n".join(line for line in out.splitlines() if not line.lstrip().startswith("#"))
    assert "python" not in code
    script = tmp_path / "job.sbatch"
    script.write_text(out)
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0


def test_slurm_dry_run_without_preemption_and_for_tune(capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = _dry(
        capsys, "slurm", "--signal", "", "--no-requeue", "--port", "29700", "--dry-run", "--", *FIT
    )
    assert "--requeue" not in out and "--signal" not in out and "trap" not in out
    assert "port=29700" in out and "--nproc-per-node=1" in out
    out, _ = _dry(capsys, "slurm", "--dry-run", "--", "tune", "run", "space.yaml")
    assert '  python -m tune run space.yaml &\nstep=$!\nwait "$step"\n' in out
    assert "torchrun --" not in out and "--requeue" not in out and "trap" not in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["slurm", "--nodes", "0"], "--nodes: must be >= 1"),
        (["slurm", "--signal", "USR1"], "--signal"),
        (["slurm", "--time", "two hours"], "--time"),
        (["slurm", "--nodes", "2", "--dry-run", "--", "tune", "run"], "ask for one node"),
        (["local", "--nproc", "-1"], "--nproc"),
        (["deepspeed", "--hosts", "gpu01"], "HOST:SLOTS"),
        (["ray", "--working-dir", "/no/such/dir"], "--working-dir"),
    ],
)
def test_bad_options_are_named(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    words = argv if "--" in argv else [*argv, "--dry-run", "--", *FIT]
    assert main(words) == 2
    assert message in capsys.readouterr().err


def test_ray_dry_run(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("out_dir: results\ndata:\n  root: data/set\n")
    (tmp_path / "data" / "set").mkdir(parents=True)
    cwd = Path.cwd()
    try:
        import os

        os.chdir(tmp_path)
        out, _ = _dry(
            capsys,
            "ray",
            "--address",
            "http://head:8265",
            "--working-dir",
            str(tmp_path),
            "--nproc",
            "2",
            "--cpus",
            "2",
            "--submission-id",
            "job-1",
            "--dry-run",
            "--",
            "fit",
            "--config",
            str(config),
            "name=r",
        )
    finally:
        os.chdir(cwd)
    assert out.strip() == (
        f"ray job submit --address=http://head:8265 --working-dir={tmp_path} "
        "--submission-id=job-1 --no-wait --entrypoint-num-cpus=2 -- python -m launch local "
        f"--nproc=2 -- trainer fit --config {config} name=r out_dir={tmp_path}/results "
        f"data.root={tmp_path}/data/set"
    )
    out, _ = _dry(
        capsys, "ray", "--submission-id", "t-1", "--dry-run", "--", "tune", "run", "s.yaml"
    )
    assert out.strip().endswith("--submission-id=t-1 --no-wait -- python -m tune run s.yaml")
