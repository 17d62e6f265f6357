"""The pipeline end to end at smoke size: every stage, every report section, skip and resume."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards.format import read_index
from trainer.experiment.pipeline import load_pipeline_config
from trainer.experiment.report import ReportError, collect

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "pipeline-smoke.yaml"


def _cmd(out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "launch.cli",
        "pipeline",
        "--config",
        str(SMOKE),
        f"out_dir={out}",
    ]


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "SRMRI_SECRET_FILE": str(tmp / "secret.key")}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A smoke pipeline killed during classifier training, then re-run to completion."""
    tmp = tmp_path_factory.mktemp("pipeline")
    out = tmp / "out"
    log = (tmp / "first.log").open("w")
    proc = subprocess.Popen(
        _cmd(out), cwd=ROOT, env=_env(tmp), stdout=log, stderr=subprocess.STDOUT
    )
    # the smoke classifier checkpoints every step; kill at the first, mid-epoch one
    marker = out / "runs" / "lr-seed0" / "checkpoints" / "step-00000001"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not marker.is_dir():
        time.sleep(0.02)
    assert proc.poll() is None, "the pipeline ended before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "report.html").exists()
    stages = json.loads((out / "stages.json").read_text())
    assert {"data", "sr", "enhance", "classify/hr-seed0"} <= stages.keys()
    assert "classify/lr-seed0" not in stages
    again = subprocess.run(_cmd(out), cwd=ROOT, env=_env(tmp), capture_output=True, text=True)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for stage in ("data", "sr", "enhance", "classify/hr-seed0"):
        assert f"[pipeline] {stage}: done before" in again.stdout
    assert "[pipeline] classify/lr-seed0: running" in again.stdout
    assert "resumed from" in again.stdout  # lr-seed0 continued from its checkpoint
    return out


def test_report_has_every_section(finished: Path) -> None:
    res = json.loads((finished / "results.json").read_text())
    assert set(res["arms"]) == {"hr", "lr", "sr", "lr+sr"}
    for arm in res["arms"].values():
        assert len(arm["per_seed"]) == 2
        assert {"accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "ece"} <= arm[
            "summary"
        ].keys()
        assert set(arm["per_class"]) == set(res["classes"])
    pairs = {(c["a"], c["b"]) for c in res["comparisons"]}
    assert pairs == {("lr+sr", "lr"), ("sr", "lr"), ("hr", "lr")}
    for c in res["comparisons"]:
        assert c["ci_low"] <= c["diff"] <= c["ci_high"] and len(c["pvalues_holm"]) == 2
    assert res["sr"]["best"]["sr_psnr"] > 0 and "zero_fill_psnr" in res["sr"]["best"]
    assert res["test_keys_sha256"] == read_index(finished / "data").test_keys_sha256
    html = (finished / "report.html").read_text()
    for heading in (
        "Arms",
        "Paired comparisons",
        "Super-resolution",
        "Learning curves",
        "Confusion matrices",
        "SR examples",
        "Grad-CAM",
    ):
        assert heading in html, heading
    assert html.count("data:image/png;base64,") == 4  # self-contained: every figure inline
    md = (finished / "report.md").read_text()
    assert "| lr+sr − lr |" in md
    for png in ("curves.png", "confusion.png", "gradcam.png"):
        assert (finished / "report_files" / png).stat().st_size > 3000


def test_rerun_skips_every_stage(finished: Path, tmp_path: Path) -> None:
    again = subprocess.run(
        _cmd(finished), cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "running" not in again.stdout.replace("[pipeline] report", "")
    assert again.stdout.count("done before") == 3 + 2 * 4 * 2  # data, sr, enhance; fit+eval x8


def test_report_refuses_a_moved_test_split(finished: Path) -> None:
    cfg = load_pipeline_config(str(SMOKE), [f"out_dir={finished}"])
    index = read_index(finished / "data")
    moved = dataclasses.replace(index, test_keys_sha256="0" * 64)
    with pytest.raises(ReportError, match="test split"):
        collect(cfg, finished, moved)


def _chromium() -> str:
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", "chromium"],
            capture_output=True,
            check=False,
        )
    found = shutil.which("chromium")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is needed for the render test and could not be installed")
        pytest.skip("chromium not installed and cannot be installed here (not root / no apt)")
    return found


def test_report_renders_in_headless_chromium(finished: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    cmd = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--hide-scrollbars",
        "--window-size=1200,2400",
        f"--screenshot={shot}",
        (finished / "report.html").resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 20_000, proc.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.std() > 10  # text, tables and figures, not a blank page
