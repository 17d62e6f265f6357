"""benchmarks/device_check.py at its tiny size on the CPU, so that the device's script cannot rot.

The script is what a session with a lent GPU runs in its one device call (issue 18); here it
runs once per module with ``--tiny`` in a subprocess (under a minute on two idle cores: it and
its ``pytest -m cuda`` child each import torch; its two ``trainer fit`` command lines run inside
it), and every part must report measured figures, or ``n/a (no CUDA)`` where only a GPU can
measure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device_check.py"
NO_CUDA = "n/a (no CUDA)"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One ``device_check.py --tiny --device cpu`` run: its output, folder and results."""
    out = tmp_path_factory.mktemp("device-check")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=480,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    return {"out": out, "stdout": proc.stdout, "results": results}


def _rows(run: dict[str, Any], part: str) -> dict[str, dict[str, Any]]:
    return {f["name"]: f for f in run["results"]["figures"] if f["part"] == part}


def _row(run: dict[str, Any], part: str, prefix: str) -> dict[str, Any]:
    rows = _rows(run, part)
    found = [row for name, row in rows.items() if name.startswith(prefix)]
    assert len(found) == 1, f"{part}: no single row starting {prefix!r} in {sorted(rows)}"
    return found[0]


def test_every_part_ran_without_an_error(tiny_run: dict[str, Any]) -> None:
    figures = tiny_run["results"]["figures"]
    assert {f["part"] for f in figures} == {"setup", "tests", "data", "resnet50", "sr", "paper"}
    errors = [f for f in figures if f["result"].startswith(("error", "skipped (time"))]
    assert not errors, errors
    meta = tiny_run["results"]["meta"]
    assert meta["device"] == "cpu" and meta["sizes"]["size"] == 32
    assert set(meta["part_seconds"]) == {"data", "tests", "resnet50", "sr", "paper"}


def test_measured_figures_are_positive_numbers(tiny_run: dict[str, Any]) -> None:
    measured = [
        ("data", "ingest shards"),
        ("resnet50", "synthetic on device, eager"),
        ("resnet50", "end to end from shards, eager"),
        ("resnet50", "end to end / synthetic, eager"),
        ("resnet50", "loader alone, train transform"),
        ("resnet50", "loader alone, no transform"),
        ("sr", "train,"),
        ("sr", "model alone"),
        ("sr", "enhance end to end"),
        ("paper", "trainer fit, classify: val balanced_accuracy"),
        ("paper", "trainer fit, sr: val sr_psnr"),
    ]
    for part, prefix in measured:
        row = _row(tiny_run, part, prefix)
        assert isinstance(row["value"], int | float) and row["value"] > 0, row


def test_the_real_configuration_trained_its_steps(tiny_run: dict[str, Any]) -> None:
    for stage in ("classify", "sr"):
        row = _row(tiny_run, "paper", f"trainer fit, {stage} stage")
        assert row["value"] == 2 and row["result"] == "pass", row
        log = (tiny_run["out"] / f"fit_{stage}.log").read_text()
        assert log.startswith("$ ") and "-m trainer fit --config configs/" in log.splitlines()[0]
        assert "sps=" in log and "epoch 0: epoch=0, step=2" in log  # the trainer's own output
    # The paper's own stage configs and overrides were used, then shortened and placed.
    first = (tiny_run["out"] / "fit_classify.log").read_text().splitlines()[0]
    assert "configs/classify.yaml train.epochs=60 train.device=auto" in first
    assert "model.name" not in first  # ResNet50, as the paper has it
    resnet = _row(tiny_run, "resnet50", "synthetic on device, eager")
    assert "resnet50 32 px" in resnet["note"] and "channels_last=True" in resnet["note"]


def test_cuda_only_figures_say_so(tiny_run: dict[str, Any]) -> None:
    tests = _row(tiny_run, "tests", "pytest -m cuda")
    assert tests["result"] == NO_CUDA and tests["value"] >= 10  # every CUDA test, skipped
    assert "skipped" in (tiny_run["out"] / "pytest_cuda.log").read_text()
    for prefix in ("peak GPU memory", "torch.compile"):
        row = _row(tiny_run, "resnet50", prefix)
        assert row["result"] == NO_CUDA and row["value"] is None, row
    # The targets are for an H200: measured here, but not judged.
    for prefix in ("end to end from shards", "end to end / synthetic"):
        row = _row(tiny_run, "resnet50", prefix)
        assert row["result"] == NO_CUDA and row["target"], row


def test_one_table_at_the_end_and_files_the_device_can_return(tiny_run: dict[str, Any]) -> None:
    stdout = tiny_run["stdout"]
    table = stdout[stdout.rindex("device check, ") :]
    header = table.splitlines()[1].split()
    assert header == ["part", "figure", "value", "unit", "target", "result"]
    for figure in tiny_run["results"]["figures"]:
        assert figure["name"] in table
    files = sorted(p.name for p in tiny_run["out"].iterdir())
    assert files == [
        "device_check.log",
        "fit_classify.log",
        "fit_sr.log",
        "pytest_cuda.log",
        "results.json",
    ]
    assert len(files) + 1 <= 8  # + console.log from device_check.sh: the device returns 8


def test_report_reprints_the_table(tiny_run: dict[str, Any]) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--report", str(tiny_run["out"])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    stdout = tiny_run["stdout"]
    assert proc.stdout.strip() == stdout[stdout.rindex("\ndevice check, ") :].strip()


def test_the_full_size_times_a_whole_epoch_of_the_largest_batch() -> None:
    """The device run's shard set must hold warmup + a dozen timed batches of the cap."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import device_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    full = device_check.FULL
    train = full.samples * (1 - 2 * full.val_fraction)
    assert train // full.batch_cap >= full.e2e_warmup + 12
    assert full.size == 224 and full.compile and full.search and full.precision == ""
    assert full.fit_steps == 50 and full.budget <= 480  # under 8 minutes on the device


def test_the_shell_script_parses() -> None:
    script = ROOT / "benchmarks" / "device_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    text = script.read_text()
    assert "--no-index --find-links" in text and '--out "$OUT"' in text
