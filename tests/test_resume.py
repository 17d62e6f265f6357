"""A changed setting never hands back old weights; the same command gives the same numbers.

Against real tiny runs (timm ``test_resnet``, 32 px, 2 optimizer steps an epoch): a re-run of a
fixed-name run under other settings or data is refused before it writes a file, naming each key;
a longer ``train.epochs`` continues along the longer LR schedule; ``evaluate`` refuses a set
whose classes are permuted; and ``train.threads``, not ``OMP_NUM_THREADS``, sets the numbers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import CLASSES, make_shard_set

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "debug.yaml"
COUNTS = {"train": [16, 16], "val": [8], "test": [8]}

BASE = (
    "model.name=test_resnet",
    "data.batch_size=8",
    "data.num_workers=0",
    "train.epochs=2",
    "train.max_steps_per_epoch=2",
    "train.device=cpu",
    "optim.lr=0.01",
    "sched.name=cosine",
    "sched.warmup_epochs=0.5",
    "sched.warmup_lr=0.001",
    "checkpoint.keep_last=1",
    "checkpoint.keep_best=0",
)


# fit sets train.threads in this process; the module gives the count back afterwards
pytestmark = pytest.mark.usefixtures("restore_threads")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("resume") / "toy"
    make_shard_set(root, COUNTS, size=32)
    return root


@pytest.fixture(scope="module")
def permuted(shards: Path) -> Path:
    """The same images and labels' positions, the class list in another order (same id)."""
    root = shards.parent / "permuted"
    make_shard_set(root, COUNTS, size=32, classes=[*CLASSES[1:], CLASSES[0]])
    return root


def _fit(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``python -m trainer fit`` in this process; returns (status, stdout, stderr)."""
    from trainer.__main__ import main

    status = main(["fit", "--config", str(DEBUG), *BASE, *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def finished(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-epoch cosine run (``out/base``), copied by the tests that re-run it."""
    from trainer.config import load_train_config
    from trainer.loop import fit

    out = tmp_path_factory.mktemp("finished")
    fit(load_train_config(DEBUG, [*BASE, f"data.root={shards}", f"out_dir={out}", "name=base"]))
    return out / "base"


def _copy(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / run.name)
    return tmp_path / run.name


def _files(run: Path) -> dict[str, bytes]:
    # .lock is the run-dir lock a running fit holds, not one of the run's results.
    return {
        str(p.relative_to(run)): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.mark.parametrize(
    ("override", "shown"),
    [
        ("train.seed=1", "train.seed: 0 -> 1"),
        ("augment.enabled=true", "augment.enabled: False -> True"),
        ("optim.name=sgd", "optim.name: 'adamw' -> 'sgd'"),
        ("sched.name=step", "sched.name: 'cosine' -> 'step'"),
        ("data.inputs=lr", "data.inputs: 'hr' -> 'lr'"),
        ("train.epochs=1", "train.epochs: 2 -> 1"),
        # Declared keys, but the run is finished: a "rescaled" LR would hand back its weights.
        ("optim.lr=0.02", "optim.lr: 0.01 -> 0.02"),
        ("optim.weight_decay=0.1", "optim.weight_decay: 0.0 -> 0.1"),
    ],
)
def test_resume_under_other_settings_is_refused_before_any_file_is_written(
    finished: Path,
    shards: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    override: str,
    shown: str,
) -> None:
    run = _copy(finished, tmp_path)
    before = _files(run)
    status, out, err = _fit(
        capsys, f"data.root={shards}", f"out_dir={tmp_path}", "name=base", override
    )
    assert status == 2, (out[-2000:], err[-2000:])
    assert "cannot resume from" in err and shown in err, err
    assert "name=NEW" in err and "train.resume=never" in err, err
    assert "resumed from" not in out
    assert _files(run) == before  # config.yaml, checkpoints, metrics, tb: all as they were


def test_resume_on_other_data_or_class_order_is_refused(
    finished: Path,
    shards: Path,
    permuted: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    other = shards.parent / "other"
    make_shard_set(other, COUNTS, size=32, seed=1)  # another data set: another dataset_id
    run = _copy(finished, tmp_path)
    before = _files(run)
    common = (f"out_dir={tmp_path}", "name=base")
    status, _, err = _fit(capsys, f"data.root={permuted}", *common)
    assert status == 2 and "classes (in order)" in err and str(CLASSES) in err, err
    status, _, err = _fit(capsys, f"data.root={other}", *common)
    assert status == 2 and "data set id (data.root): 'toy-0-48' -> 'toy-1-48'" in err, err
    assert _files(run) == before
    # The same set at another path is the same data: the finished run resumes (nothing to do).
    moved = shards.parent / "moved"
    shutil.copytree(shards, moved)
    status, out, err = _fit(capsys, f"data.root={moved}", *common)
    assert status == 0 and "resumed from" in out, err


def test_a_checkpoint_whose_draws_were_seeded_from_keys_is_not_continued(
    finished: Path, shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before SAMPLE_DRAWS, augmentation and LR draws came from keys: another run's numbers.
    run = _copy(finished, tmp_path)
    for marker in (run / "checkpoints").glob("step-*/complete.json"):
        data = json.loads(marker.read_text())
        data.pop("sample_draws")
        marker.write_text(json.dumps(data))
    before = _files(run)
    status, _, err = _fit(capsys, f"data.root={shards}", f"out_dir={tmp_path}", "name=base")
    assert status == 2 and "per-sample draws: 'seeded from sample keys' ->" in err, err
    assert _files(run) == before


def test_resume_never_starts_the_run_over_with_the_new_settings(
    finished: Path, shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from trainer.checkpoint import find_checkpoints
    from trainer.weights import checkpoint_config

    run = _copy(finished, tmp_path)
    common = (f"data.root={shards}", f"out_dir={tmp_path}", "name=base", "train.seed=1")
    status, _, err = _fit(capsys, *common, "train.resume=never")
    assert status == 0, err
    found = find_checkpoints(run / "checkpoints")
    assert [checkpoint_config(c).train.seed for c in found] == [1], found
    kept = find_checkpoints(run / "checkpoints.replaced-1")  # the old run is moved, not deleted
    assert kept and {checkpoint_config(c).train.seed for c in kept} == {0}, kept
    status, out, err = _fit(capsys, *common)  # the same command again: it resumes that run
    assert status == 0 and "resumed from" in out, err


def test_rebuilt_schedule_continues_the_longer_one_without_a_second_warmup() -> None:
    from trainer.config import SchedConfig
    from trainer.factories import create_scheduler

    cfg = SchedConfig(name="cosine", warmup_epochs=0.5, warmup_lr=0.001)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    old = create_scheduler(opt, cfg, lr=0.01, epochs=2, steps_per_epoch=4)
    lrs = []
    for _ in range(8):
        lrs.append(old.lr())
        opt.step()
        old.step()
    # What a resume with train.epochs=3 builds on the restored optimizer...
    rebuilt = create_scheduler(opt, cfg, lr=0.01, epochs=3, steps_per_epoch=4, at_step=8)
    ref_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    ref = create_scheduler(ref_opt, cfg, lr=0.01, epochs=3, steps_per_epoch=4)
    for _ in range(8):
        ref_opt.step()
        ref.step()
    # ...is the 3-epoch schedule at step 8: epoch 2 starts below where epoch 1 started.
    assert rebuilt.lr() == pytest.approx(ref.lr(), rel=1e-6)
    assert rebuilt.lr() <= lrs[4] < 0.01, (rebuilt.lr(), lrs)
    for _ in range(4):
        assert rebuilt.lr() == pytest.approx(ref.lr(), rel=1e-6)
        opt.step()
        rebuilt.step()
        ref_opt.step()
        ref.step()


def _tb_lrs(run: Path) -> dict[int, float]:
    """``train/lr`` by step from every TensorBoard event file of a run."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    lrs = {}
    for path in sorted((run / "tb").glob("events.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == "train/lr":
                    has = value.HasField("simple_value")
                    lrs[event.step] = value.simple_value if has else value.tensor.float_val[0]
    return lrs


def test_longer_epochs_train_on_along_the_longer_schedule(
    finished: Path, shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(finished, tmp_path)
    common = (f"data.root={shards}", f"out_dir={tmp_path}", "train.epochs=3")
    status, out, err = _fit(capsys, *common, "name=base")
    assert status == 0 and "resumed from" in out, err
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs_run"] == 3 and metrics["steps"] == 6, metrics
    status, _, err = _fit(capsys, *common, "name=straight")  # 3 epochs from the start
    assert status == 0, err
    resumed, straight = _tb_lrs(run), _tb_lrs(tmp_path / "straight")
    # TensorBoard's lr at step k is the LR step k+1 trains with; steps 5 and 6 are the new epoch.
    assert resumed[5] == pytest.approx(straight[5], rel=1e-6), (resumed, straight)
    assert resumed[6] == pytest.approx(straight[6], rel=1e-6), (resumed, straight)
    assert resumed[6] <= resumed[5] <= resumed[2], resumed  # no climb back to the peak


def test_evaluate_refuses_a_set_with_the_classes_in_another_order(
    finished: Path, permuted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from trainer.__main__ import main

    args = ["evaluate", "--checkpoint", str(finished), "--split", "test", "--out", str(tmp_path)]
    status = main([*args, f"data.root={permuted}"])
    err = capsys.readouterr().err
    assert status == 2, err
    assert str(CLASSES) in err and str([*CLASSES[1:], CLASSES[0]]) in err, err
    assert not (tmp_path / "metrics_test.json").exists()


def _start_fit(shards: Path, out: Path, omp: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=omp, MKL_NUM_THREADS=omp, PYTHONUNBUFFERED="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "trainer", "fit", "--config", str(DEBUG), *BASE]
    cmd += [f"data.root={shards}", f"out_dir={out}", "name=same", "augment.enabled=true"]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def test_the_same_command_gives_the_same_numbers_whatever_omp_num_threads(
    shards: Path, tmp_path: Path
) -> None:
    # Side by side: most of each process's time is its start-up (imports).
    procs = [_start_fit(shards, tmp_path / omp, omp) for omp in ("1", "2")]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    one, two = tmp_path / "1" / "same", tmp_path / "2" / "same"
    weights = [
        torch.load(next((r / "checkpoints").glob("step-*")) / "module.pt", weights_only=True)
        for r in (one, two)
    ]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), "weights differ"
    metrics = [json.loads((r / "metrics.json").read_text()) for r in (one, two)]
    for m in metrics:
        assert m.pop("threads") == 1 and m.pop("run_dir")
    assert metrics[0] == metrics[1]
    marker = json.loads(
        next((one / "checkpoints").glob("step-*")).joinpath("complete.json").read_text()
    )
    assert marker["threads"] == 1 and marker["dataset_id"] == "toy-0-48"
    assert "threads: 1" in (one / "config.yaml").read_text()
