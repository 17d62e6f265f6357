"""The SR task and enhance: real training on real shards, real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_shard_set, run_distributed

from shards.degrade import DegradeConfig, bicubic_up, degrade
from shards.enhance import EnhanceSpec, enhance
from shards.format import decode_image, from_uint16, read_index
from shards.loader import create_loader, iter_shard
from shards.verify import verify
from trainer.config import load_train_config
from trainer.loop import fit
from trainer.metrics import masked_psnr
from trainer.srnet import SRConfig, count_parameters, create_sr_model

ROOT = Path(__file__).resolve().parent.parent


def sr_config(data: Path, out: Path, *extra: str):
    return load_train_config(
        ROOT / "configs" / "sr-debug.yaml",
        [
            f"data.root={data}",
            f"out_dir={out}",
            "train.epochs=1",
            "train.max_steps_per_epoch=3",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sr") / "data"
    make_shard_set(root, {"train": [10, 6], "val": [5, 4], "test": [3, 2, 4]}, size=32)
    return root


def test_presets_and_shapes():
    full = create_sr_model(SRConfig(arch="edsr", scale=2, preset="full"))
    assert 1.2e6 < count_parameters(full) < 1.6e6  # EDSR-baseline size at x2
    for arch in ("edsr", "srresnet"):
        for scale in (2, 4):
            net = create_sr_model(SRConfig(arch=arch, scale=scale, preset="tiny"))
            assert net(torch.rand(2, 1, 8, 8)).shape == (2, 1, 8 * scale, 8 * scale)


def test_fit_sr_one_process_reports_all_three_methods(shard_root, tmp_path):
    summary = fit(sr_config(shard_root, tmp_path))
    final = summary["final"]
    for method in ("sr", "bicubic", "zero_fill"):
        assert final[f"{method}_n"] == 9  # every val slice once
        assert 5 < final[f"{method}_psnr"] < 100 and 0 < final[f"{method}_ssim"] <= 1
    run = Path(summary["run_dir"])
    assert (run / "sr_examples_val.png").stat().st_size > 5000
    saved = json.loads((run / "metrics.json").read_text())
    assert {"sr_psnr", "bicubic_psnr", "zero_fill_psnr", "psnr_gain_db"} <= saved["final"].keys()


def _fit_ddp(rank: int, world: int, data: str, out: str) -> None:
    summary = fit(sr_config(Path(data), Path(out), "name=ddp"))
    assert summary["final"]["sr_n"] == 9  # padding of the uneven eval split is masked out


def test_fit_sr_two_ddp_processes(shard_root, tmp_path):
    run_distributed(_fit_ddp, 2, str(shard_root), str(tmp_path))
    assert (tmp_path / "ddp" / "metrics.json").is_file()


def test_overfitting_one_slice_beats_bicubic_clearly():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: extra threads only contend on 2 cores
    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    hr = ((xx**2 + yy**2 < 0.7) * (0.5 + 0.3 * torch.sin(9 * xx) * torch.cos(7 * yy))).float()
    hr = hr[None, None]
    lr, _ = degrade(hr, DegradeConfig(scale=2), None)
    net = create_sr_model(SRConfig(arch="edsr", scale=2, preset="custom", blocks=4, features=32))
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    try:
        for _ in range(200):
            opt.zero_grad()
            loss = (net(lr) - hr).abs().mean()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    mask = torch.ones_like(hr, dtype=torch.bool)
    with torch.no_grad():
        sr_psnr = masked_psnr(net(lr).clamp(0, 1), hr, mask).item()
    bic_psnr = masked_psnr(bicubic_up(lr, (32, 32)).clamp(0, 1), hr, mask).item()
    assert sr_psnr > bic_psnr + 3.0, (sr_psnr, bic_psnr)


def _enhance_ddp(rank: int, world: int, src: str, out: str, stop_after: int) -> None:
    net = create_sr_model(SRConfig(arch="edsr", scale=2, preset="tiny")).eval()
    spec = EnhanceSpec(DegradeConfig(scale=2), seed=0, model_id="tiny-test", batch_size=3)
    if stop_after:  # simulate a crash: this rank finishes some shards and dies
        from shards import enhance as mod

        real = mod._enhance_shard
        calls = []

        def limited(*a, **k):
            if len(calls) >= stop_after:
                raise SystemExit(3)
            calls.append(1)
            return real(*a, **k)

        mod._enhance_shard = limited
    enhance(src, out, net, spec, device=torch.device("cpu"), rank=rank, world_size=world)


def test_enhance_two_processes_every_key_once_and_resumes(shard_root, tmp_path):
    out = tmp_path / "sr"
    with pytest.raises(AssertionError):
        run_distributed(_enhance_ddp, 2, str(shard_root), str(out), 1)
    assert not (out / "index.json").exists(), "an interrupted enhance must not look finished"
    done_before = {p.name: p.stat().st_mtime_ns for p in (out / ".done").glob("*.json")}
    assert 0 < len(done_before) < len(read_index(shard_root).shards)
    run_distributed(_enhance_ddp, 2, str(shard_root), str(out), 0)
    for name, mtime in done_before.items():  # finished shards were kept, not redone
        assert (out / ".done" / name).stat().st_mtime_ns == mtime
    assert verify(out) == []
    src_index, sr_index = read_index(shard_root), read_index(out)
    assert [(s.name, s.count) for s in src_index.shards] == [
        (s.name, s.count) for s in sr_index.shards
    ]
    assert sr_index.kind == "sr" and sr_index.source_dataset_id == src_index.dataset_id
    src_keys = [k for s in src_index.shards for k, _ in iter_shard(str(shard_root / s.name))]
    sr_keys = [k for s in sr_index.shards for k, _ in iter_shard(str(out / s.name))]
    assert sr_keys == src_keys and len(set(sr_keys)) == len(sr_keys)
    # the SR image is the model applied to the deterministic eval degradation of the HR image
    loader = create_loader(shard_root, "test", 9, mode="eval", aligned_roots=[out])
    batch = next(iter(loader))
    assert batch["aligned"][0].shape == batch["image"].shape


def test_enhance_cli_from_a_trained_checkpoint(shard_root, tmp_path):
    summary = fit(sr_config(shard_root, tmp_path))
    out = tmp_path / "enhanced"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "shards",
        "enhance",
        "--checkpoint",
        summary["run_dir"],
        "--out",
        str(out),
        str(shard_root),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert verify(out) == []
    first = next(iter_shard(str(out / read_index(out).shards[0].name)))[1]
    img = from_uint16(decode_image(first["npy"]))
    assert img.shape == (32, 32) and np.isfinite(img).all() and img.max() > 0
    again = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert again.returncode == 0 and "finished shards kept" in again.stdout
    # the SR model is named by its weights: no checkpoint path in the index or any sample
    index = read_index(out)
    assert index.made_from["model"].startswith("sr-") and index.fingerprint
    run_dir = str(summary["run_dir"])
    assert run_dir not in (out / "index.json").read_text()
    shard = str(out / index.shards[0].name)
    meta = next(iter_shard(shard, 0, frozenset({"json"})))[1]["json"].decode()
    assert run_dir not in meta and index.made_from["model"] in meta
