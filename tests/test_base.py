"""The base layer (``srmri``): atomic files, the one torch loader, progress, ``python -m srmri``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from srmri.atomic import atomic_path, write_json, write_text
from srmri.markdown import md_table
from srmri.progress import LineProgress, progress
from srmri.torchfile import load_state_dict_file, load_torch_file


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    target = write_text(tmp_path / "sub" / "a.txt", "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.txt"]


def test_a_finished_write_replaces_the_file(tmp_path: Path) -> None:
    target = write_json(tmp_path / "m.json", {"a": 1})
    write_json(target, {"a": 2})
    assert target.read_text().replace(" ", "").replace("\n", "") == '{"a":2}'
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


class _Payload:
    """A pickled object: ``weights_only`` loading must refuse to build it."""


def test_torch_files_load_weights_only_and_name_the_file(tmp_path: Path) -> None:
    good = tmp_path / "w.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, good)
    assert torch.equal(load_state_dict_file(good)["w"], torch.ones(2))
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"obj": _Payload()}, unsafe)
    with pytest.raises(ValueError, match=r"unsafe\.pt"):
        load_torch_file(unsafe)
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        load_torch_file(tmp_path / "missing.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"bad\.safetensors"):
        load_state_dict_file(tmp_path / "bad.safetensors")


def test_python_m_srmri_reports_the_environment() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "srmri"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert f"torch       {torch.__version__.split('+')[0]}" in done.stdout, done.stdout


def test_fingerprints_name_the_differing_keys_and_skip_the_ignored_ones() -> None:
    from dataclasses import dataclass, field

    from srmri.fingerprint import config_fingerprint, differences, flatten

    @dataclass
    class Optim:
        lr: float = 1e-3
        betas: tuple[float, float] = (0.9, 0.999)

    @dataclass
    class Root:
        out_dir: str = "runs"
        optim: Optim = field(default_factory=Optim)
        workers: int = 2

    a, b = Root(), Root(out_dir="elsewhere", workers=8, optim=Optim(lr=2e-3))
    flat = {"out_dir": "runs", "optim.lr": 1e-3, "optim.betas": [0.9, 0.999], "workers": 2}
    assert flatten(a) == flat
    ignore = ("out_dir", "*workers")
    assert [str(d) for d in differences(a, b, ignore)] == ["optim.lr: 0.001 -> 0.002"]
    assert config_fingerprint(a, ignore) != config_fingerprint(b, ignore)
    c = Root(out_dir="x", workers=1)
    assert config_fingerprint(a, ignore) == config_fingerprint(c, ignore)
    assert config_fingerprint(a, ("optim", *ignore)) == config_fingerprint(b, ("optim", *ignore))


def test_progress_in_a_file_is_one_line_per_interval_and_a_bar_on_a_terminal(
    tmp_path: Path,
) -> None:
    log = tmp_path / "log.txt"
    with log.open("w") as f:
        with progress(10, "epoch 0", file=f) as bar:  # a file: lines, not frames
            assert isinstance(bar, LineProgress)
            for _ in range(10):
                bar.update()
                bar.set_postfix(loss="0.5")
        eager = LineProgress(3, "enhance", file=f, interval_s=0.0)  # a line per update
        with eager:
            for _ in range(3):
                eager.update()
    text = log.read_text()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0].startswith("epoch 0: 10/10 (100%)") and lines[0].endswith("loss=0.5")
    assert [line.split()[1] for line in lines[1:]] == ["1/3", "2/3", "3/3"]  # no repeat
    master, slave = os.openpty()  # a terminal: tqdm's bar, redrawn in place
    with os.fdopen(slave, "w") as tty, progress(4, "epoch 1", file=tty) as bar:
        assert not isinstance(bar, LineProgress)
        bar.update(4)
    assert b"\r" in os.read(master, 4096)
    os.close(master)


@pytest.mark.parametrize("given", [None, "ACTIVE"])
def test_packages_set_a_passive_openmp_wait_policy_before_torch_unless_the_user_did(
    given: str | None,
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    # torch imported after the package, as every entry point does; the value libgomp reads
    code = "import launch, torch, os; print(os.environ.get('OMP_WAIT_POLICY'))"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (given or "PASSIVE")


def test_every_dependency_has_an_exact_version_in_the_lock() -> None:
    """A fresh clone installs requirements.lock: a dependency missing there would float."""
    import re

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(__file__).resolve().parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["dev"]]

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    names = {norm(re.split(r"[\[<>=~!; ]", req, maxsplit=1)[0]) for req in wanted}
    lines = (root / "requirements.lock").read_text().splitlines()
    pinned = {norm(line.split("==")[0]) for line in lines if "==" in line}
    assert all("==" in line for line in lines if line and not line.startswith("#"))
    # torch and torchvision come from this machine's disk, by pip (scripts/setup.sh)
    assert names - {"torch", "torchvision"} <= pinned, names - pinned
    assert "torch" not in pinned and "deepspeed" not in pinned
    assert "requirements.lock" in (root / "scripts" / "setup.sh").read_text()


def test_a_markdown_table_keeps_its_columns_when_a_cell_holds_a_bar() -> None:
    table = md_table(["arm", "accuracy"], [["lr|sr", "0.9"], ["lr|sr − lr", "+0.1"]])
    lines = table.splitlines()
    assert lines[1] == "|---|---|"
    assert lines[2] == "| lr\\|sr | 0.9 |"
    # an unescaped | is a column border: three per line, as in the header
    assert [line.replace("\\|", "").count("|") for line in lines] == [3, 3, 3, 3]
