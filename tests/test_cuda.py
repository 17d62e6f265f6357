"""The CUDA paths, on a GPU: ``pytest -m cuda tests/test_cuda.py`` (skipped without one).

What no CPU test can show: the degradation gives the same LR images on CUDA as on the CPU; a
DDP step over an nccl process group (of one process: the device machine has one GPU); bf16 and
fp16-with-GradScaler steps through the trainer's precision handling; channels_last;
``torch.compile`` of the model; pinned-memory batches from the loader; DeepSpeed ZeRO-1/2 in
bf16 (skipped when DeepSpeed does not import); and one real ``python -m trainer fit`` on CUDA.
``benchmarks/device_check.py`` runs this file first on the device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
import torch.nn.functional as F
from helpers import make_shard_set

from shards.degrade import DegradeConfig, degrade, sample_generator, upsample_to
from trainer.precision import Precision, autocast_dtype

if TYPE_CHECKING:
    from trainer.backend import Backend
    from trainer.config import BackendConfig

# The trainer's backend, config and factories (timm, torchvision) are imported where used: on a
# machine without CUDA every test here is skipped, and collecting them should cost little
# (benchmarks/device_check.py runs this file on the CPU too, where it reports them skipped).

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ROOT = Path(__file__).resolve().parents[1]
MODEL = "resnet10t"  # small: the compile test compiles forward and backward
SIZE = 32
BATCH = 8
CLASSES = 4


@pytest.fixture(scope="module")
def cuda() -> torch.device:
    """The GPU."""
    return torch.device("cuda", 0)


@pytest.fixture(scope="module")
def nccl_group(cuda: torch.device) -> Iterator[None]:
    """The one-process nccl group the trainer makes for a plain run on a GPU.

    Module-scoped: a process can hold one default group, and DeepSpeed's tests need it too.
    """
    from srmri.distributed import cleanup, init_distributed

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        assert var not in os.environ, f"{var} is set: run these tests as one plain process"
    info = init_distributed("cuda")
    assert info.device == cuda and info.world_size == 1
    yield
    cleanup()


@pytest.fixture
def full_fp32() -> Iterator[None]:
    """No TF32 in convolutions and matrix products, so that fp32 comparisons can be tight."""
    saved = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    yield
    torch.backends.cudnn.allow_tf32 = saved[0]
    torch.set_float32_matmul_precision(saved[1])


def _backend(
    device: torch.device,
    *,
    precision: Precision = "fp32",
    channels_last: bool = False,
    compile_model: bool = False,
    backend: BackendConfig | None = None,
    grad_accum: int = 1,
    clip_grad: float = 0.0,
    seed: int = 0,
) -> Backend:
    """A small classifier behind the trainer's backend, built as ``trainer.loop`` builds it."""
    from trainer.backend import create_backend
    from trainer.config import BackendConfig, ModelConfig, OptimConfig, TrainSection
    from trainer.factories import create_model, create_optimizer

    torch.manual_seed(seed)
    model_cfg = ModelConfig(name=MODEL, channels_last=channels_last, compile=compile_model)
    model = create_model(model_cfg, CLASSES)
    train = TrainSection(precision=precision, grad_accum=grad_accum, clip_grad=clip_grad)
    return create_backend(
        backend or BackendConfig(),
        train,
        model=model,
        optimizer=create_optimizer(model, OptimConfig(name="adamw", lr=1e-3)),
        device=device,
        micro_batch=BATCH,
        model_cfg=model_cfg,
    )


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch on the CPU (random, never zeros: zeros hide wrong indexing)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(BATCH, 1, SIZE, SIZE, generator=g)
    return x, torch.randint(0, CLASSES, (BATCH,), generator=g)


def _step(b: Backend, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """One micro-step as the loop runs it; returns (the loss, whether the optimizer stepped)."""
    with b.micro_step():
        logits = b.model(b.to_input(x))
        loss = F.cross_entropy(logits.float(), y.to(b.device))
        b.backward(loss)
    return loss.detach(), b.step()


def _weights(b: Backend) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() for k, v in b.module.state_dict().items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------------- degradation


DEGRADATIONS = {
    "kspace-x2": DegradeConfig(),
    "kspace-tukey-x3": DegradeConfig(scale=3, window="tukey"),
    "kspace-hamming-x4": DegradeConfig(scale=4, window="hamming"),
    "bicubic-x2": DegradeConfig(method="bicubic"),
    "kspace-noise-random-scale": DegradeConfig(noise_sigma=0.03, random_scale=(2, 4)),
}


@pytest.mark.parametrize("name", list(DEGRADATIONS))
@pytest.mark.parametrize("shape", [(1, 64, 64), (4, 1, 63, 65)])
def test_degradation_on_cuda_equals_cpu(
    cuda: torch.device, name: str, shape: tuple[int, ...]
) -> None:
    cfg = DEGRADATIONS[name]
    img = torch.rand(shape, generator=torch.Generator().manual_seed(3))
    # The generator stays on the CPU for both: the draws are then the same numbers, and
    # rician_noise moves them to the image's device (what the loader's workers do).
    lr_cpu, s_cpu = degrade(img, cfg, sample_generator(0, 1, "digest"))
    lr_gpu, s_gpu = degrade(img.to(cuda), cfg, sample_generator(0, 1, "digest"))
    assert lr_gpu.device.type == "cuda" and lr_gpu.dtype == torch.float32
    assert s_gpu == s_cpu and lr_gpu.shape == lr_cpu.shape
    assert torch.isfinite(lr_gpu).all()
    assert _rel(lr_gpu, lr_cpu) < 1e-5  # float32 FFTs and interpolation differ in rounding only
    for method in ("bicubic", "zero_fill"):
        up_cpu = upsample_to(lr_cpu, shape[-2:], method)
        up_gpu = upsample_to(lr_gpu, shape[-2:], method)
        assert up_gpu.shape == img.shape
        assert _rel(up_gpu, up_cpu) < 1e-5, method


def test_degradation_of_half_images_on_cuda(cuda: torch.device) -> None:
    img = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(4))
    ref, _ = degrade(img, DegradeConfig(), None)
    out, _ = degrade(img.to(cuda, torch.float16), DegradeConfig(), None)
    assert out.dtype == torch.float16  # computed in float32, cast back
    assert _rel(out.float(), ref) < 2e-3  # fp16 input rounding (about 5e-4 per pixel)


# ------------------------------------------------------------------------------- DDP and nccl


@pytest.mark.usefixtures("nccl_group", "full_fp32")
def test_ddp_step_on_nccl_matches_the_plain_module(
    cuda: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import trainer.backend
    from srmri.distributed import all_gather_floats

    assert dist.get_backend() == "nccl"
    plain = _backend(cuda, grad_accum=2)
    # A group of one never gets the DDP wrapper (nothing to reduce); pretend to be two ranks
    # while the backend is built, so that DDP's reducer, its nccl all-reduce and no_sync run.
    with monkeypatch.context() as patch:
        patch.setattr(trainer.backend, "_world", lambda: 2)
        ddp = _backend(cuda, grad_accum=2)
    assert isinstance(ddp.model, DistributedDataParallel)
    before = _weights(plain)
    assert all(torch.equal(v, before[k]) for k, v in _weights(ddp).items())  # same seed
    stepped = []
    for seed in (1, 2):  # one accumulation window: no_sync first, the all-reduce second
        x, y = _batch(seed)
        loss_p, step_p = _step(plain, x, y)
        loss_d, step_d = _step(ddp, x, y)
        stepped.append((step_p, step_d))
        assert torch.isfinite(loss_d) and abs(float(loss_d) - float(loss_p)) < 1e-5
        # The loop's collective of every optimizer step, over nccl.
        assert all_gather_floats(loss_d.reshape(1)) == pytest.approx([float(loss_d)])
    assert stepped == [(False, False), (True, True)]
    after_p, after_d = _weights(plain), _weights(ddp)
    moved = [k for k in before if not torch.equal(before[k], after_p[k])]
    assert moved, "the optimizer step changed nothing"
    for k in moved:
        # The mean over one rank is the gradient itself: DDP and the plain module agree.
        assert _rel(after_d[k], after_p[k]) < 1e-5, k
    dist.barrier()


# -------------------------------------------------------------------------- precision, layout


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps(cuda: torch.device, precision: Precision) -> None:
    b = _backend(cuda, precision=precision, clip_grad=1.0)
    ref = _backend(cuda, precision="fp32")
    scaler_on = precision == "fp16"
    assert b.scaler.is_enabled() is scaler_on  # fp16 trains with a GradScaler, bf16 without
    x, _ = _batch()
    with b.micro_step():
        logits = b.model(b.to_input(x))
    assert logits.dtype == autocast_dtype(precision)
    with torch.no_grad(), ref.micro_step():
        ref_logits = ref.model(ref.to_input(x))
    assert _rel(logits.float(), ref_logits.float()) < 5e-2  # same weights, lower precision
    before = _weights(b)
    for seed in (1, 2, 3):
        loss, stepped = _step(b, *_batch(seed))
        assert stepped and torch.isfinite(loss)
    after = _weights(b)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(p.dtype == torch.float32 for p in b.module.parameters())  # fp32 master weights
    if scaler_on:
        scale = b.scaler.get_scale()
        assert 0 < scale <= 2.0**16  # started at 2**16; halved only on an overflow


@pytest.mark.usefixtures("full_fp32")
def test_channels_last(cuda: torch.device) -> None:
    cl = _backend(cuda, channels_last=True)
    plain = _backend(cuda)
    conv = next(m for m in cl.module.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x, y = _batch()
    assert cl.to_input(x).is_contiguous(memory_format=torch.channels_last)
    cl.eval()
    plain.eval()
    with torch.no_grad():
        assert _rel(cl.model(cl.to_input(x)), plain.model(plain.to_input(x))) < 1e-4
    cl.train()
    loss, stepped = _step(cl, x, y)
    assert stepped and torch.isfinite(loss)


def test_torch_compile_of_the_model(cuda: torch.device) -> None:
    # The paper's setting: bf16 autocast and channels_last, compiled.
    compiled = _backend(cuda, precision="bf16", channels_last=True, compile_model=True)
    eager = _backend(cuda, precision="bf16", channels_last=True)
    assert hasattr(compiled.model, "_orig_mod")  # an OptimizedModule around the module
    x, _ = _batch()
    compiled.eval()
    eager.eval()
    with torch.no_grad(), compiled.autocast():
        out_c = compiled.model(compiled.to_input(x)).float()
        out_e = eager.model(eager.to_input(x)).float()
    assert _rel(out_c, out_e) < 3e-2  # bf16 rounding, fused differently
    compiled.train()
    before = _weights(compiled)
    for seed in (1, 2):
        loss, stepped = _step(compiled, *_batch(seed))
        assert stepped and torch.isfinite(loss)
    assert any(not torch.equal(before[k], v) for k, v in _weights(compiled).items())


# ------------------------------------------------------------------------------------- loader


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cuda-shards") / "toy"
    make_shard_set(root, {"train": [24, 20, 20], "val": [7, 6], "test": [5, 4]}, size=SIZE)
    return root


def test_loader_pins_batches_for_cuda(cuda: torch.device, shards: Path) -> None:
    from shards.loader import create_loader

    loader = create_loader(shards, "train", BATCH, mode="train", num_workers=2, pin_memory=True)
    n = 0
    for batch in loader:
        assert batch["image"].is_pinned() and batch["label"].is_pinned()
        on_gpu = batch["image"].to(cuda, non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(on_gpu.cpu(), batch["image"])
        n += 1
    assert n == len(loader) == 64 // BATCH


# ---------------------------------------------------------------------------------- DeepSpeed


@pytest.mark.usefixtures("nccl_group")
@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero_bf16(cuda: torch.device, stage: int, tmp_path: Path) -> None:
    try:
        import deepspeed  # noqa: F401
    except Exception as exc:  # not only ImportError: a wrong pydantic, a CUDA check, ...
        pytest.skip(f"DeepSpeed does not import here: {type(exc).__name__}: {exc}")
    from trainer.config import BackendConfig

    cfg = BackendConfig(name="deepspeed", zero_stage=stage)
    b = _backend(cuda, precision="bf16", backend=cfg, grad_accum=2, clip_grad=1.0)
    assert b.ds_config["bf16"] == {"enabled": True}  # DeepSpeed's native bf16 on CUDA
    assert b.ds_config["zero_optimization"]["stage"] == stage
    assert next(b.module.parameters()).dtype == torch.bfloat16  # the module is cast
    before = _weights(b)
    boundaries = []
    for seed in (1, 2, 3, 4):
        loss, stepped = _step(b, *_batch(seed))
        assert torch.isfinite(loss)
        boundaries.append(stepped)
    assert boundaries == [False, True, False, True]
    after = _weights(b)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    b.save(tmp_path)  # collective: the ZeRO partitions and the fp32 module weights
    assert list((tmp_path / "deepspeed").glob("*optim_states.pt"))
    assert (tmp_path / "module.pt").is_file()


# ------------------------------------------------------------------------ the real entry point


def test_trainer_fit_on_cuda(shards: Path, tmp_path: Path) -> None:
    """``python -m trainer fit`` on CUDA: its own nccl group, pinned loader, bf16, channels_last."""
    out = tmp_path / "runs"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), env.get("PYTHONPATH", "")] if p)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    args = [
        "--config", str(ROOT / "configs" / "debug.yaml"), f"data.root={shards}",
        f"out_dir={out}", "name=cuda", "train.device=cuda", "train.precision=bf16",
        "model.channels_last=true", "data.num_workers=2", "train.epochs=2",
        "train.max_steps_per_epoch=4",
    ]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "trainer", "fit", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    metrics = json.loads((out / "cuda" / "metrics.json").read_text())
    assert metrics["steps"] == 8 and metrics["epochs_run"] == 2
    assert metrics["final"]["n"] == 13  # every validation sample counted once
    saved = (out / "cuda" / "config.yaml").read_text()
    assert "device: cuda" in saved
