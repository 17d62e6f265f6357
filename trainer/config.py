"""The trainer's typed configuration tree, loaded from YAML plus ``dotted.key=value`` overrides.

One :class:`TrainConfig` describes a whole run. It is loaded with
:func:`srmri.config.load_config`, checked section by section (each ``check()`` names the key it
rejects), printed at start and saved as ``config.yaml`` in the run directory; that file loads back
unchanged, so a Ray Tune trial or a "best config" is just a YAML file or a set of overrides.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from shards.degrade import DegradeConfig
from srmri.config import config_hash, load_config, require
from trainer.augment import AugmentConfig
from trainer.input_kind import InputKind, needs_sr, trains_sr
from trainer.precision import Precision
from trainer.srnet import SRConfig

__all__ = [
    "RESULT_NEUTRAL_KEYS",
    "RESUME_MAY_CHANGE",
    "BackendConfig",
    "CheckpointConfig",
    "DataConfig",
    "EarlyStopConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimConfig",
    "SchedConfig",
    "TrainConfig",
    "TrainSection",
    "load_train_config",
    "run_dir_of",
]

# Keys that cannot change what a run computes, left out of its config fingerprint and free to
# differ on resume: where the run lives (``out_dir``, ``name``; the shard sets' paths
# ``data.root``/``data.sr_root``, since the sets themselves are compared by their ids, and how
# long an http read may wait, since every sample is checked against its checksum), how
# often it logs, how it finds its checkpoint, and which checkpoints it writes and keeps. Not
# here, because each changes the numbers: ``data.num_workers`` (the loader splits an epoch's
# batches into one block per worker, each shuffled on its own), ``train.device``,
# ``train.threads`` (CPU reductions are split per thread), ``data.eval_batch_size``.
RESULT_NEUTRAL_KEYS: tuple[str, ...] = (
    "out_dir",
    "name",
    "data.root",
    "data.sr_root",
    "data.http_connect_timeout",
    "data.http_read_timeout",
    "data.http_retries",
    "train.log_every",
    "train.resume",
    "checkpoint",
    "logging",
)

# What a resume may change (see README "What a resume may change"): ``optim.lr`` and
# ``optim.weight_decay`` while the run is unfinished (PBT mutates them between epochs), and a
# longer ``train.epochs`` (the LR schedule is rebuilt for the new length at the step reached).
RESUME_MAY_CHANGE: tuple[str, ...] = ("optim.lr", "optim.weight_decay", "train.epochs")


@dataclass
class DataConfig:
    """Where samples come from and which input the model sees.

    Attributes:
        root: Shard set (local folder or http(s) URL) with ``index.json``.
        inputs: ``hr`` stored image; ``lr`` degraded then upsampled back; ``sr`` the aligned
            image of ``sr_root``; ``lr+sr`` both, as separate training samples (SR at eval);
            ``lr|sr`` both, as the two channels of one sample (a two-channel network);
            ``tsr`` the LR image at its small size, through an SR network trained with the
            classifier (``model.sr_init``, ``train.recon_weight``).
        sr_root: Shard set written by ``shards enhance``, aligned by key (``sr``, ``lr+sr``,
            ``lr|sr``).
        degrade: The degradation making the ``lr`` input (and the SR task's LR input).
        upsample: How the ``lr`` input goes back to the stored size.
        batch_size: Training samples per rank per micro-step.
        eval_batch_size: Validation samples per rank per step; 0 means ``batch_size``.
        num_workers: DataLoader workers per rank.
        train_split: Split trained on.
        val_split: Split validated on each epoch.
        shuffle_chunk: Shuffle buffer of the loader, in samples.
        http_connect_timeout: Seconds to wait for a connection to an http(s) shard server.
        http_read_timeout: Seconds an http(s) shard read may wait for data before retrying.
        sampler: ``shuffle`` (each training sample once per epoch, in a seeded order) or
            ``balanced`` (each class drawn equally often, with replacement, in as many samples
            per epoch as the split holds).
        http_retries: Times one shard stream is re-opened (at the byte reached) after a stall
            or a broken connection before the run stops with an error naming the URL.
    """

    root: str = ""
    inputs: InputKind = "hr"
    sr_root: str = ""
    degrade: DegradeConfig = field(default_factory=DegradeConfig)
    upsample: Literal["bicubic", "zero_fill"] = "bicubic"
    batch_size: int = 32
    eval_batch_size: int = 0
    num_workers: int = 2
    train_split: str = "train"
    val_split: str = "val"
    shuffle_chunk: int = 256
    http_connect_timeout: float = 10.0
    http_read_timeout: float = 60.0
    http_retries: int = 3
    sampler: Literal["shuffle", "balanced"] = "shuffle"

    def check(self) -> None:
        require(bool(self.root), "data.root", "set the shard set to train on (data.root=PATH)")
        require(
            not needs_sr(self.inputs) or bool(self.sr_root),
            "data.sr_root",
            f"inputs={self.inputs} needs the enhanced shard set (data.sr_root=PATH)",
        )
        require(self.batch_size >= 1, "data.batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.eval_batch_size >= 0, "data.eval_batch_size", "must be >= 0 (0: batch_size)")
        require(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        require(self.shuffle_chunk >= 1, "data.shuffle_chunk", "must be >= 1")
        for name in ("http_connect_timeout", "http_read_timeout"):
            value = getattr(self, name)
            require(value > 0, f"data.{name}", f"must be > 0 seconds, got {value}")
        require(self.http_retries >= 0, "data.http_retries", "must be >= 0")

    @property
    def eval_batch(self) -> int:
        """The validation batch size actually used."""
        return self.eval_batch_size or self.batch_size


@dataclass
class ModelConfig:
    """The network: any timm model by name, classes from the shard set.

    Its input channels follow ``data.inputs`` (two for ``lr|sr``, else one:
    :func:`trainer.input_kind.input_channels`), so the saved config rebuilds the same network.

    Attributes:
        name: timm model name (``resnet50`` by default).
        pretrained_path: Optional local file of (3-channel ImageNet) weights; never downloaded.
        drop_rate: Dropout before the classifier.
        channels_last: Use the channels-last memory format (faster convolutions on GPU).
        compile: Wrap the model in ``torch.compile``.
        sr_init: ``data.inputs=tsr`` only: the SR run directory (``task: sr``) whose trained
            network starts the model's SR part; its saved ``sr`` section and degradation must
            be this run's (the saved config alone then rebuilds the network for evaluation).
    """

    name: str = "resnet50"
    pretrained_path: str | None = None
    drop_rate: float = 0.0
    channels_last: bool = False
    compile: bool = False
    sr_init: str = ""

    def check(self) -> None:
        require(bool(self.name), "model.name", "must name a model, e.g. resnet50")
        require(0.0 <= self.drop_rate < 1.0, "model.drop_rate", "must be in [0, 1)")
        require(
            self.pretrained_path is None or bool(self.pretrained_path),
            "model.pretrained_path",
            "must be a file path or null",
        )


@dataclass
class OptimConfig:
    """Optimizer. ``betas`` apply to adam/adamw; ``momentum``/``nesterov`` to sgd."""

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    betas: tuple[float, float] = (0.9, 0.999)

    def check(self) -> None:
        require(self.lr > 0, "optim.lr", f"must be positive, got {self.lr}")
        require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        require(0 <= self.momentum < 1, "optim.momentum", "must be in [0, 1)")
        require(all(0 <= b < 1 for b in self.betas), "optim.betas", "each must be in [0, 1)")


@dataclass
class SchedConfig:
    """Learning-rate schedule, stepped per optimizer step, with a linear warmup.

    Attributes:
        name: cosine (to ``min_lr``), step (``gamma`` every ``step_epochs``), onecycle, plateau
            (multiply by ``factor`` once the validation metric has gone *more than*
            ``patience`` epochs without improving, i.e. at the ``patience + 1``-th such epoch in
            a row, as torch's ReduceLROnPlateau counts; early stopping instead stops *after*
            ``train.early_stop.patience`` such epochs), constant.
        warmup_epochs: Linear warmup length (fractions allowed).
        warmup_lr: Learning rate at the start of the warmup (at most ``optim.lr``).
        min_lr: Floor of cosine/onecycle/plateau (at most ``optim.lr``).
        patience: Plateau: epochs without improvement tolerated before the LR drops.
    """

    name: Literal["cosine", "step", "onecycle", "plateau", "constant"] = "cosine"
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-6
    min_lr: float = 0.0
    step_epochs: int = 30
    gamma: float = 0.1
    patience: int = 5
    factor: float = 0.1

    def check(self) -> None:
        require(self.warmup_epochs >= 0, "sched.warmup_epochs", "must be >= 0")
        require(self.warmup_lr >= 0, "sched.warmup_lr", "must be >= 0")
        require(self.min_lr >= 0, "sched.min_lr", "must be >= 0")
        require(self.step_epochs >= 1, "sched.step_epochs", "must be >= 1")
        require(0 < self.gamma <= 1, "sched.gamma", "must be in (0, 1]")
        require(self.patience >= 0, "sched.patience", "must be >= 0")
        require(0 < self.factor < 1, "sched.factor", "must be in (0, 1)")


@dataclass
class EarlyStopConfig:
    """Stop after ``patience`` epochs in a row without improvement of ``metric`` (0 disables).

    With ``patience: 2`` a run whose metric last improved at epoch 3 ends after epoch 5 (the
    plateau schedule's ``sched.patience`` counts differently: it acts one epoch later).
    ``metric`` empty means the task's own "best" metric (balanced accuracy for classify); a
    name the validation does not report is an error after the first validation. It also ranks
    checkpoints for ``checkpoint.keep_best`` and drives the plateau schedule.
    """

    metric: str = ""
    mode: Literal["max", "min"] = "max"
    patience: int = 0

    def check(self) -> None:
        require(self.patience >= 0, "train.early_stop.patience", "must be >= 0 (0: off)")


@dataclass
class TrainSection:
    """How long and how to train.

    Attributes:
        epochs: Number of epochs.
        max_steps_per_epoch: Cap on micro-steps per epoch (debugging, tuning), or None.
        grad_accum: Micro-steps per optimizer step.
        clip_grad: Gradient-norm clipping (0: off).
        precision: fp32, bf16 autocast, or fp16 autocast with a grad scaler.
        seed: Seed of model init, shuffling, augmentation and degradation.
        deterministic: Use deterministic algorithms (bitwise resume on CPU).
        device: auto (CUDA when present), cpu or cuda.
        early_stop: Early stopping.
        ema_decay: Keep an EMA of the weights with this decay and validate it; None: off.
        log_every: Log train loss every N optimizer steps.
        resume: ``auto`` (the run dir's last checkpoint if any), ``never`` (start over: the
            run dir's old checkpoints move to ``checkpoints.replaced-N``), or a checkpoint
            path. A checkpoint made under other settings is refused, except for
            :data:`RESUME_MAY_CHANGE`.
        threads: CPU threads of torch's intra-op pool (``torch.set_num_threads``), set at the
            start of the run so that its numbers do not depend on ``OMP_NUM_THREADS`` or the
            machine's load; 0 means this machine's cores shared among its ranks, resolved once
            and recorded in the saved config (a resume elsewhere then asks for that count).
        class_weights: Cross-entropy class weights: ``none``, ``auto`` (inverse class
            frequency of the training split, normalised to mean 1) or one weight per class.
        label_smoothing: Cross-entropy label smoothing in [0, 1).
        nonfinite_loss: What a nan or infinite training loss (on any rank) does: ``stop`` the
            run with an error, or ``skip`` that optimizer step (its gradients are dropped on
            every rank; BatchNorm statistics of its forward stay; ddp backend only).
        recon_weight: ``data.inputs=tsr`` only: weight of the L1 reconstruction term
            ``L1(SR(lr), hr)`` added to the cross-entropy (0.1, fixed by the pre-registration).
    """

    epochs: int = 30
    max_steps_per_epoch: int | None = None
    grad_accum: int = 1
    clip_grad: float = 0.0
    precision: Precision = "fp32"
    seed: int = 0
    deterministic: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    ema_decay: float | None = None
    log_every: int = 20
    resume: str = "auto"
    threads: int = 1
    nonfinite_loss: Literal["stop", "skip"] = "stop"
    class_weights: Literal["none", "auto"] | list[float] = "none"
    label_smoothing: float = 0.0
    recon_weight: float = 0.1

    def check(self) -> None:
        require(self.epochs >= 1, "train.epochs", f"must be >= 1, got {self.epochs}")
        require(
            self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1,
            "train.max_steps_per_epoch",
            "must be >= 1 or null",
        )
        require(self.grad_accum >= 1, "train.grad_accum", "must be >= 1")
        require(self.clip_grad >= 0, "train.clip_grad", "must be >= 0 (0: off)")
        require(
            self.ema_decay is None or 0 < self.ema_decay < 1,
            "train.ema_decay",
            "must be in (0, 1) or null",
        )
        require(self.log_every >= 1, "train.log_every", "must be >= 1")
        require(bool(self.resume), "train.resume", "auto, never or a checkpoint path")
        require(self.threads >= 0, "train.threads", "must be >= 0 (0: the machine's cores)")
        require(0.0 <= self.label_smoothing < 1.0, "train.label_smoothing", "must be in [0, 1)")
        # "not < 0" would let nan through; a nan weight would make every loss nan.
        require(
            0.0 <= self.recon_weight < float("inf"),
            "train.recon_weight",
            f"must be a finite weight >= 0, got {self.recon_weight}",
        )
        require(
            not isinstance(self.class_weights, list)
            or (bool(self.class_weights) and all(w > 0 for w in self.class_weights)),
            "train.class_weights",
            "none, auto or a list of positive weights (one per class)",
        )


@dataclass
class BackendConfig:
    """Distributed backend: torch DDP or DeepSpeed (ZeRO stage 0, 1 or 2).

    Attributes:
        name: ddp or deepspeed.
        zero_stage: DeepSpeed ZeRO stage.
        overlap_comm: DeepSpeed: overlap gradient reduction with backward.
        bucket_size: DeepSpeed reduce/allgather bucket size in elements.
        find_unused_parameters: DDP: allow parameters without gradients.
    """

    name: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: int = 0
    overlap_comm: bool = False
    bucket_size: int = 200_000_000
    find_unused_parameters: bool = False

    def check(self) -> None:
        require(self.zero_stage in (0, 1, 2), "backend.zero_stage", "must be 0, 1 or 2")
        require(self.bucket_size >= 1, "backend.bucket_size", "must be >= 1")


@dataclass
class CheckpointConfig:
    """Which checkpoints are written and kept.

    Attributes:
        keep_last: Newest checkpoints kept (>= 1, resume needs one).
        keep_best: Best-by-validation checkpoints kept (0: none).
        save_every_steps: Also save every N optimizer steps (mid-epoch), or None.
    """

    keep_last: int = 2
    keep_best: int = 1
    save_every_steps: int | None = None

    def check(self) -> None:
        require(self.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
        require(self.keep_best >= 0, "checkpoint.keep_best", "must be >= 0")
        require(
            self.save_every_steps is None or self.save_every_steps >= 1,
            "checkpoint.save_every_steps",
            "must be >= 1 or null",
        )


@dataclass
class LoggingConfig:
    """Experiment tracking beside the run directory's own TensorBoard, CSV and JSON logs.

    Attributes:
        mlflow_uri: MLflow tracking URI (a ``file:`` store or an ``http(s)://`` server); empty:
            off. Rank 0 logs; a server that goes away costs a warning, never the run.
        mlflow_experiment: MLflow experiment the runs are logged under.
        mlflow_run_name: Name of the MLflow run; empty: the run directory's name (the pipeline
            names its stages' runs, a search its trials').
        mlflow_parent_run: Id of an MLflow run to nest this run under (the pipeline sets its
            own); empty: a top-level run.
    """

    mlflow_uri: str = ""
    mlflow_experiment: str = "srmri"
    mlflow_run_name: str = ""
    mlflow_parent_run: str = ""

    def check(self) -> None:
        require(bool(self.mlflow_experiment), "logging.mlflow_experiment", "must be a name")


@dataclass
class TrainConfig:
    """One training run.

    Attributes:
        task: classify or sr (the ``sr`` section configures the SR network and patches).
        out_dir: Parent folder of run directories.
        name: Run directory name; empty means ``{task}-{hash of the config}``, so re-running the
            same config resumes the same run.
    """

    task: Literal["classify", "sr"] = "classify"
    out_dir: str = "runs"
    name: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainSection = field(default_factory=TrainSection)
    backend: BackendConfig = field(default_factory=BackendConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    sr: SRConfig = field(default_factory=SRConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def sr_degradation(self) -> DegradeConfig:
        """The degradation the SR stage trains on and ``enhance`` applies.

        ``data.degrade`` at the SR network's own factor (``sr.scale``) and without a random
        scale: the SR model, ``enhance`` and the ``lr`` arm of a pipeline must see the same LR
        images, so this is the one place that derives them.
        """
        return dataclasses.replace(self.data.degrade, scale=self.sr.scale, random_scale=None)

    def check(self) -> None:
        require(bool(self.out_dir), "out_dir", "must be a folder")
        require(_plain_name(self.name), "name", f"must be a plain folder name, got {self.name!r}")
        o, s = self.optim, self.sched
        require(s.min_lr <= o.lr, "sched.min_lr", f"must be <= optim.lr={o.lr:g}, got {s.min_lr:g}")
        require(
            s.warmup_epochs == 0 or s.warmup_lr <= o.lr,
            "sched.warmup_lr",
            f"the warmup rises to optim.lr={o.lr:g}: must be <= it, got {s.warmup_lr:g}",
        )
        require(
            self.train.nonfinite_loss == "stop" or self.backend.name == "ddp",
            "train.nonfinite_loss",
            "skip needs backend.name=ddp (DeepSpeed steps its own optimizer)",
        )
        require(
            self.backend.name == "deepspeed" or self.backend.zero_stage == 0,
            "backend.zero_stage",
            "ZeRO stages need backend.name=deepspeed",
        )
        tsr = trains_sr(self.data.inputs)
        require(
            not tsr or self.task == "classify",
            "data.inputs",
            f"inputs={self.data.inputs} trains a classifier (task: classify), got task={self.task}",
        )
        require(
            not tsr or bool(self.model.sr_init),
            "model.sr_init",
            f"inputs={self.data.inputs} starts from a trained SR run: set model.sr_init=RUN_DIR",
        )
        require(
            tsr or not self.model.sr_init,
            "model.sr_init",
            f"only data.inputs=tsr starts from an SR run, inputs is {self.data.inputs}",
        )


def _plain_name(name: str) -> bool:
    """Whether ``name`` is empty (the default) or one folder inside ``out_dir``.

    ``..`` or a path would put the run's checkpoints and metrics outside ``out_dir``.
    """
    if not name:
        return True
    return (
        bool(name.strip())
        and name not in (".", "..")
        and not any(c in name for c in "/\\\0")
        and not Path(name).is_absolute()
    )


def run_dir_of(cfg: TrainConfig) -> Path:
    """The run directory: ``out_dir/name``, the name defaulting to a hash of the config."""
    name = cfg.name or f"{cfg.task}-{config_hash(cfg, exclude=('out_dir', 'name'))[:10]}"
    return Path(cfg.out_dir) / name


def load_train_config(
    path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
) -> TrainConfig:
    """Load and check a :class:`TrainConfig` from a YAML file and overrides.

    Args:
        path: YAML file (a saved ``config.yaml`` works as is) or None for defaults.
        overrides: ``dotted.key=value`` strings.

    Returns:
        The checked config.

    Raises:
        srmri.config.ConfigError: Naming the file and key on any invalid input.
    """
    return load_config(TrainConfig, path, overrides)
