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
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from srmri.torchfile import load_torch_file
from trainer.config import BackendConfig, ModelConfig, TrainSection
from trainer.precision import Precision, autocast, autocast_dtype

__all__ = [
    "MODULE_FILE",
    "Backend",
    "DDPBackend",
    "DeepSpeedBackend",
    "create_backend",
    "deepspeed_config",
]

MODULE_FILE = "module.pt"  # fp32 weights of the unwrapped model, written by rank 0
_OPTIM_FILE = "optim.pt"
_DS_TAG = "deepspeed"


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

    def at_boundary(self) -> bool:
        """Whether this micro-step (backward done, :meth:`step` not yet called) ends a window."""
        ...

    def skip_step(self) -> None:
        """End this window without an optimizer step: its gradients are dropped (instead of
        :meth:`step`, at a boundary)."""
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


class DDPBackend:
    """torch DistributedDataParallel (plain module in a one-process run).

    fp16 uses ``torch.amp.GradScaler``; bf16 is autocast alone. Accumulation windows skip the
    gradient all-reduce with ``no_sync`` until their last micro-step.

    Args:
        cfg: The ``backend`` section (``find_unused_parameters``).
        train: The ``train`` section (``precision``, ``grad_accum``, ``clip_grad``).
        model: The unwrapped model (moved to ``device`` here).
        optimizer: Its optimizer.
        device: This rank's device.
        model_cfg: The ``model`` section (``channels_last``, ``compile``); defaults when None.
    """

    def __init__(
        self,
        cfg: BackendConfig,
        train: TrainSection,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        model_cfg: ModelConfig | None = None,
    ) -> None:
        model_cfg = model_cfg or ModelConfig()
        self.device = device
        self.precision: Precision = train.precision
        self.grad_accum = train.grad_accum
        self.clip_grad = train.clip_grad
        self.channels_last = model_cfg.channels_last
        self.module = _prepare(model, device, self.channels_last)
        self.optimizer = optimizer
        wrapped: nn.Module = self.module
        if _world() > 1:
            wrapped = DistributedDataParallel(
                self.module,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=cfg.find_unused_parameters,
            )
        self._ddp = wrapped if isinstance(wrapped, DistributedDataParallel) else None
        self.model = torch.compile(wrapped) if model_cfg.compile else wrapped
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self._micro = 0

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        fmt = torch.channels_last if self.channels_last and x.ndim == 4 else torch.preserve_format
        return x.to(self.device, non_blocking=True, memory_format=fmt)

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        return autocast(self.device, self.precision)

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

    def at_boundary(self) -> bool:
        return self._boundary()

    def skip_step(self) -> None:
        # No scaler.update() either: no inf check was recorded, and the scale stays.
        self._micro += 1
        self.optimizer.zero_grad(set_to_none=True)

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
        weights = load_torch_file(directory / MODULE_FILE, self.device)
        try:
            self.module.load_state_dict(weights)
        except RuntimeError as exc:
            raise ValueError(f"{directory / MODULE_FILE}: does not fit the model: {exc}") from exc
        state = load_torch_file(directory / _OPTIM_FILE, self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self._micro = int(state["micro"])


def deepspeed_config(
    cfg: BackendConfig,
    train: TrainSection,
    *,
    micro_batch: int,
    world_size: int,
    on_cuda: bool,
) -> dict[str, Any]:
    """The DeepSpeed config dict for the typed settings.

    On CUDA, bf16/fp16 use DeepSpeed's native sections. On CPU they use its ``torch_autocast``
    section instead, because the native ``bf16`` section casts the whole model to bf16, and
    timm's BatchNorm then fails on CPU.

    Args:
        cfg: The ``backend`` section (ZeRO stage, communication settings).
        train: The ``train`` section (``precision``, ``grad_accum``, ``clip_grad``).
        micro_batch: Samples per micro-step per rank.
        world_size: Ranks in the job.
        on_cuda: Whether the model runs on CUDA.

    Returns:
        A JSON-able dict for ``deepspeed.initialize(config=...)``.
    """
    precision, grad_accum = train.precision, train.grad_accum
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": float(train.clip_grad),
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
    """DeepSpeed engine (ZeRO 0/1/2); accumulation, clipping and loss scaling are its own.

    Args:
        cfg: The ``backend`` section (ZeRO stage, communication settings).
        train: The ``train`` section (``precision``, ``grad_accum``, ``clip_grad``).
        model: The unwrapped model (moved to ``device`` here).
        optimizer: Its optimizer.
        device: This rank's device.
        micro_batch: Samples per micro-step per rank (DeepSpeed's bookkeeping).
        model_cfg: The ``model`` section (``channels_last``, ``compile``); defaults when None.
    """

    def __init__(
        self,
        cfg: BackendConfig,
        train: TrainSection,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        micro_batch: int,
        model_cfg: ModelConfig | None = None,
    ) -> None:
        import deepspeed  # imported here: slow to import and unused by DDP runs

        model_cfg = model_cfg or ModelConfig()
        self.device = device
        self.precision: Precision = train.precision
        self.channels_last = model_cfg.channels_last
        self.ds_config = deepspeed_config(
            cfg, train, micro_batch=micro_batch, world_size=_world(), on_cuda=device.type == "cuda"
        )
        model = _prepare(model, device, self.channels_last)
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config, dist_init_required=False
        )
        self.engine = engine
        self.module: nn.Module = engine.module
        self.model: nn.Module = engine
        # The LR schedule drives the client optimizer: DeepSpeed's ZeRO/bf16 wrappers step it
        # and share its param-group dicts, and torch schedulers only accept a real Optimizer.
        self.optimizer = optimizer
        if model_cfg.compile:
            engine.compile()
        # Native bf16/fp16 cast the module; inputs must follow it.
        self._input_dtype = next(self.module.parameters()).dtype

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        fmt = torch.channels_last if self.channels_last and x.ndim == 4 else torch.preserve_format
        dtype = self._input_dtype if x.is_floating_point() else x.dtype
        return x.to(self.device, dtype=dtype, non_blocking=True, memory_format=fmt)

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        # Native bf16/fp16 sections cast the module instead; only torch_autocast needs a context.
        enabled = self.precision != "fp32" and "torch_autocast" in self.ds_config
        dtype = autocast_dtype(self.precision) or torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype, enabled=enabled)

    def micro_step(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # the engine's forward autocasts; it handles no_sync

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def at_boundary(self) -> bool:
        return bool(self.engine.is_gradient_accumulation_boundary())

    def skip_step(self) -> None:
        # The engine's step also keeps its own counters, loss scale and ZeRO buffers: there is
        # no public way to skip it (TrainConfig.check refuses train.nonfinite_loss=skip here).
        raise NotImplementedError("train.nonfinite_loss=skip needs backend.name=ddp")

    def step(self) -> bool:
        boundary = self.at_boundary()
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
    train: TrainSection,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    micro_batch: int,
    model_cfg: ModelConfig | None = None,
) -> Backend:
    """Wrap ``model`` and ``optimizer`` in the configured backend (collective).

    Args:
        cfg: The ``backend`` section (name, ZeRO stage, ...).
        train: The ``train`` section (``precision``, ``grad_accum``, ``clip_grad``).
        model: The unwrapped model (moved to ``device`` here).
        optimizer: Its optimizer.
        device: This rank's device.
        micro_batch: Samples per micro-step per rank (DeepSpeed's bookkeeping).
        model_cfg: The ``model`` section (``channels_last``, ``compile``); defaults when None.

    Returns:
        The backend.
    """
    if cfg.name == "deepspeed":
        return DeepSpeedBackend(
            cfg,
            train,
            model=model,
            optimizer=optimizer,
            device=device,
            micro_batch=micro_batch,
            model_cfg=model_cfg,
        )
    return DDPBackend(
        cfg, train, model=model, optimizer=optimizer, device=device, model_cfg=model_cfg
    )
