"""DDP and DeepSpeed behind one small interface, so the loop never asks which one it runs on.

A backend owns the wrapped model and optimizer and everything precision-, accumulation- and
sharding-specific: the autocast context, loss scaling, ``no_sync`` between accumulation
boundaries, gradient clipping, the optimizer step, and how model and optimizer state go to and
from a checkpoint directory (DeepSpeed's checkpoints are collective and sharded; DDP's are one
file written by rank 0). Every rank calls every method.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer.config import BackendConfig

__all__ = [
    "MODULE_FILE",
    "Backend",
    "DDPBackend",
    "DeepSpeedBackend",
    "create_backend",
    "deepspeed_config",
]

Precision = Literal["fp32", "bf16", "fp16"]
MODULE_FILE = "module.pt"  # fp32 weights of the unwrapped model, written by rank 0
_OPTIM_FILE = "optim.pt"
_DS_TAG = "deepspeed"
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Backend(Protocol):
    """What the loop and the tasks use; implemented by :class:`DDPBackend` and
    :class:`DeepSpeedBackend`.

    Attributes:
        module: The unwrapped model (for EMA, export, evaluation hooks).
        model: What to call for a training forward (DDP wrapper, DeepSpeed engine, compiled).
        optimizer: The optimizer whose param groups the LR schedule drives.
        device: Where the model lives.
    """

    module: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        """Move an input batch to the device, dtype and memory format the model expects."""
        ...

    def micro_step(self) -> contextlib.AbstractContextManager[None]:
        """Context for one micro-batch's forward and backward (autocast, no_sync)."""
        ...

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """Autocast context for evaluation forwards."""
        ...

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's (unscaled, per-micro-batch) loss."""
        ...

    def step(self) -> bool:
        """Step the optimizer if this micro-step ends an accumulation window; returns whether."""
        ...

    def train(self) -> None: ...

    def eval(self) -> None: ...

    def save(self, directory: Path) -> None:
        """Write model and optimizer state into ``directory`` (collective)."""
        ...

    def load(self, directory: Path) -> None:
        """Restore what :meth:`save` wrote (collective)."""
        ...


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _prepare(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _write_module(module: nn.Module, directory: Path) -> None:
    """Rank 0: the fp32 weights of the unwrapped model (tensors only, no pickled objects)."""
    if _rank() == 0:
        state = {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}
        torch.save(state, directory / MODULE_FILE)


def _torch_load(path: Path, device: torch.device | str = "cpu") -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file is missing")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: corrupt checkpoint file ({type(exc).__name__}: {exc})") from exc


class DDPBackend:
    """torch DistributedDataParallel (plain module in a one-process run).

    fp16 uses ``torch.amp.GradScaler``; bf16 is autocast alone. Accumulation windows skip the
    gradient all-reduce with ``no_sync`` until their last micro-step.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        precision: Precision,
        grad_accum: int,
        clip_grad: float,
        channels_last: bool = False,
        compile_model: bool = False,
        find_unused_parameters: bool = False,
    ) -> None:
        self.device = device
        self.precision = precision
        self.grad_accum = grad_accum
        self.clip_grad = clip_grad
        self.channels_last = channels_last
        self.module = _prepare(model, device, channels_last)
        self.optimizer = optimizer
        wrapped: nn.Module = self.module
        if _world() > 1:
            wrapped = DistributedDataParallel(
                self.module,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=find_unused_parameters,
            )
        self._ddp = wrapped if isinstance(wrapped, DistributedDataParallel) else None
        self.model = torch.compile(wrapped) if compile_model else wrapped
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self._micro = 0

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        fmt = torch.channels_last if self.channels_last and x.ndim == 4 else torch.preserve_format
        return x.to(self.device, non_blocking=True, memory_format=fmt)

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        dtype = _DTYPES.get(self.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def _boundary(self) -> bool:
        return (self._micro + 1) % self.grad_accum == 0

    @contextlib.contextmanager
    def micro_step(self) -> Iterator[None]:
        sync = self._ddp is None or self._boundary()
        with self.autocast(), contextlib.nullcontext() if sync else self._ddp.no_sync():
            yield

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.grad_accum
        self.scaler.scale(loss).backward()

    def step(self) -> bool:
        boundary = self._boundary()
        self._micro += 1
        if not boundary:
            return False
        if self.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()

    def save(self, directory: Path) -> None:
        _write_module(self.module, directory)
        if _rank() == 0:
            state = {
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "micro": self._micro,
            }
            torch.save(state, directory / _OPTIM_FILE)

    def load(self, directory: Path) -> None:
        weights = _torch_load(directory / MODULE_FILE, self.device)
        try:
            self.module.load_state_dict(weights)
        except RuntimeError as exc:
            raise ValueError(f"{directory / MODULE_FILE}: does not fit the model: {exc}") from exc
        state = _torch_load(directory / _OPTIM_FILE, self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self._micro = int(state["micro"])


def deepspeed_config(
    cfg: BackendConfig,
    precision: Precision,
    micro_batch: int,
    grad_accum: int,
    clip_grad: float,
    world_size: int,
    on_cuda: bool,
) -> dict[str, Any]:
    """The DeepSpeed config dict for the typed settings.

    On CUDA, bf16/fp16 use DeepSpeed's native sections. On CPU they use its ``torch_autocast``
    section: the native ``bf16`` section casts the whole model and timm's BatchNorm then fails
    on CPU (see DESIGN.md).

    Returns:
        A JSON-able dict for ``deepspeed.initialize(config=...)``.
    """
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": float(clip_grad),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "zero_optimization": {
            "stage": cfg.zero_stage,
            "overlap_comm": cfg.overlap_comm,
            "contiguous_gradients": True,
            "reduce_bucket_size": cfg.bucket_size,
            "allgather_bucket_size": cfg.bucket_size,
        },
    }
    if precision != "fp32":
        dtype = "bfloat16" if precision == "bf16" else "float16"
        if on_cuda and precision == "bf16":
            out["bf16"] = {"enabled": True}
        elif on_cuda:
            out["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
        else:
            out["torch_autocast"] = {"enabled": True, "dtype": dtype}
    return out


class DeepSpeedBackend:
    """DeepSpeed engine (ZeRO 0/1/2); accumulation, clipping and loss scaling are its own."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        precision: Precision,
        grad_accum: int,
        clip_grad: float,
        micro_batch: int,
        cfg: BackendConfig,
        channels_last: bool = False,
        compile_model: bool = False,
    ) -> None:
        import deepspeed  # imported here: slow to import and unused by DDP runs

        self.device = device
        self.precision = precision
        self.channels_last = channels_last
        self.ds_config = deepspeed_config(
            cfg, precision, micro_batch, grad_accum, clip_grad, _world(), device.type == "cuda"
        )
        model = _prepare(model, device, channels_last)
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config, dist_init_required=False
        )
        self.engine = engine
        self.module: nn.Module = engine.module
        self.model: nn.Module = engine
        # The LR schedule drives the client optimizer: DeepSpeed's ZeRO/bf16 wrappers step it
        # and share its param-group dicts, and torch schedulers only accept a real Optimizer.
        self.optimizer = optimizer
        self.engine_optimizer = ds_optimizer
        if compile_model:
            engine.compile()
        # Native bf16/fp16 cast the module; inputs must follow it.
        self._input_dtype = next(self.module.parameters()).dtype

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        fmt = torch.channels_last if self.channels_last and x.ndim == 4 else torch.preserve_format
        dtype = self._input_dtype if x.is_floating_point() else x.dtype
        return x.to(self.device, dtype=dtype, non_blocking=True, memory_format=fmt)

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        enabled = self.precision != "fp32" and "torch_autocast" in self.ds_config
        dtype = _DTYPES.get(self.precision, torch.bfloat16)
        return torch.autocast(self.device.type, dtype=dtype, enabled=enabled)

    def micro_step(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # the engine's forward autocasts; it handles no_sync

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> bool:
        boundary = bool(self.engine.is_gradient_accumulation_boundary())
        self.engine.step()
        return boundary

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

    def save(self, directory: Path) -> None:
        # Collective: every rank writes its optimizer partition.
        self.engine.save_checkpoint(str(directory), tag=_DS_TAG, save_latest=False)
        _write_module(self.module, directory)

    def load(self, directory: Path) -> None:
        if not (directory / _DS_TAG).is_dir():
            raise FileNotFoundError(
                f"{directory / _DS_TAG}: DeepSpeed checkpoint state is missing (was this "
                "checkpoint written by the ddp backend? resume with the backend that wrote it)"
            )
        path, _ = self.engine.load_checkpoint(
            str(directory), tag=_DS_TAG, load_lr_scheduler_states=False
        )
        if path is None:
            raise ValueError(f"{directory / _DS_TAG}: DeepSpeed could not load this checkpoint")


def create_backend(
    cfg: BackendConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    precision: Precision,
    grad_accum: int,
    clip_grad: float,
    micro_batch: int,
    channels_last: bool = False,
    compile_model: bool = False,
) -> Backend:
    """Wrap ``model`` and ``optimizer`` in the configured backend (collective).

    Args:
        cfg: Backend settings (name, ZeRO stage, ...).
        model: The unwrapped model (moved to ``device`` here).
        optimizer: Its optimizer.
        device: This rank's device.
        precision: fp32, bf16 or fp16.
        grad_accum: Micro-steps per optimizer step.
        clip_grad: Gradient-norm clipping (0: off).
        micro_batch: Samples per micro-step per rank (DeepSpeed's bookkeeping).
        channels_last: Channels-last memory format.
        compile_model: torch.compile the model.

    Returns:
        The backend.
    """
    if cfg.name == "deepspeed":
        return DeepSpeedBackend(
            model,
            optimizer,
            device,
            precision,
            grad_accum,
            clip_grad,
            micro_batch,
            cfg,
            channels_last,
            compile_model,
        )
    return DDPBackend(
        model,
        optimizer,
        device,
        precision,
        grad_accum,
        clip_grad,
        channels_last,
        compile_model,
        cfg.find_unused_parameters,
    )
