"""Trainer step time against a plain PyTorch loop, and DDP against DeepSpeed ZeRO-1/2.

Part 1 (one process, CPU): the same timm model, batch, precision and optimizer, stepped by a
plain 30-line PyTorch loop and by the trainer's own pieces in the order ``trainer.loop.fit`` runs
them (backend micro_step/backward/step, task loss, LR schedule). Runs are interleaved in rounds so
machine load hits both alike; the median step time of each is reported with the overhead in %.

Part 2 (2 gloo processes, CPU): the trainer's step with backend ddp, deepspeed ZeRO-1 and ZeRO-2
on the same synthetic batches; median step time of rank 0 and the ratio to DDP.

    python benchmarks/train_step.py --model resnet18 --size 64 --batch 16 --steps 20
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import statistics
import sys
import time
from typing import Any

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from trainer.backend import create_backend
from trainer.config import BackendConfig, ModelConfig, OptimConfig, SchedConfig, TrainSection
from trainer.factories import create_model, create_optimizer, create_scheduler
from trainer.precision import Precision, autocast_dtype

__all__ = ["main"]

CLASSES = 4


def _batches(
    n: int, batch: int, size: int, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.rand(batch, 1, size, size, generator=g),
            torch.randint(0, CLASSES, (batch,), generator=g),
        )
        for _ in range(n)
    ]


def plain_loop(model_name: str, batches: list, precision: Precision) -> list[float]:
    """The reference: a plain PyTorch training loop. Returns per-step seconds."""
    torch.manual_seed(0)
    model = create_model(ModelConfig(name=model_name), CLASSES)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    dtype = autocast_dtype(precision)
    model.train()
    times = []
    for x, y in batches:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # both loops sync once per step
        times.append(time.perf_counter() - t0)
    return times


def trainer_loop(
    model_name: str,
    batches: list,
    precision: Precision,
    backend: str = "ddp",
    zero_stage: int = 0,
) -> list[float]:
    """The trainer's step, in the order fit runs it. Returns per-step seconds."""
    torch.manual_seed(0)
    model = create_model(ModelConfig(name=model_name), CLASSES)
    optim = OptimConfig(name="adamw", lr=1e-3, weight_decay=0.0)
    b = create_backend(
        BackendConfig(name=backend, zero_stage=zero_stage),  # type: ignore[arg-type]
        TrainSection(precision=precision, grad_accum=1, clip_grad=0.0),
        model=model,
        optimizer=create_optimizer(model, optim),
        device=torch.device("cpu"),
        micro_batch=len(batches[0][1]),
    )
    sched = create_scheduler(
        b.optimizer, SchedConfig(name="cosine"), lr=optim.lr, epochs=1, steps_per_epoch=len(batches)
    )
    b.train()
    loss_sum = torch.zeros(())
    times = []
    for x, y in batches:
        t0 = time.perf_counter()
        with b.micro_step():
            logits = b.model(b.to_input(x))
            loss = F.cross_entropy(logits.float(), y)
            b.backward(loss)
        loss_sum += loss.detach().float()
        if b.step():
            sched.step()
        loss_sum.item()
        times.append(time.perf_counter() - t0)
    return times


def _median(times: list[float], warmup: int) -> float:
    return statistics.median(times[warmup:])


def compare_single(args: argparse.Namespace) -> None:
    batches = _batches(args.steps, args.batch, args.size)
    runs = {
        "plain": lambda: plain_loop(args.model, batches, args.precision),
        "trainer": lambda: trainer_loop(args.model, batches, args.precision),
    }
    for run in runs.values():  # untimed: first-use allocations, lazy inits
        run()
    rounds: dict[str, list[float]] = {"plain": [], "trainer": []}
    for i in range(args.rounds):  # interleaved, order alternating, so load hits both alike
        for name in ("plain", "trainer") if i % 2 == 0 else ("trainer", "plain"):
            rounds[name].append(_median(runs[name](), args.warmup))
    p, o = min(rounds["plain"]), min(rounds["trainer"])
    pm, om = statistics.median(rounds["plain"]), statistics.median(rounds["trainer"])
    print(f"\n[1] one process, CPU, {args.model} {args.size}px batch {args.batch} {args.precision}")
    print(f"    {args.rounds} rounds x {args.steps} steps; per round the median step, then")
    print("                         best round    median round")
    print(f"    plain PyTorch loop : {p * 1e3:9.2f} ms  {pm * 1e3:9.2f} ms")
    print(f"    trainer step       : {o * 1e3:9.2f} ms  {om * 1e3:9.2f} ms")
    print(f"    overhead           : {100 * (o - p) / p:+8.2f} %  {100 * (om - pm) / pm:+8.2f} %")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(rank: int, world: int, port: int, args: argparse.Namespace, out: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    from srmri.distributed import cleanup, init_distributed

    init_distributed("cpu")
    batches = _batches(args.steps, args.batch, args.size, seed=rank)
    results = {}
    for name, backend, stage in (
        ("ddp", "ddp", 0),
        ("zero1", "deepspeed", 1),
        ("zero2", "deepspeed", 2),
    ):
        results[name] = _median(
            trainer_loop(args.model, batches, args.precision, backend, stage), args.warmup
        )
    if rank == 0:
        out.put(results)
    cleanup()


def compare_backends(args: argparse.Namespace) -> None:
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, args, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs) or out.empty():
        raise SystemExit("a rank of the backend comparison failed")
    res = out.get()
    print(
        f"\n[2] 2 gloo processes, CPU, {args.model} {args.size}px "
        f"batch {args.batch}/rank {args.precision}"
    )
    for name in ("ddp", "zero1", "zero2"):
        print(
            f"    {name:6s}: {res[name] * 1e3:8.2f} ms/step   "
            f"ratio to ddp {res[name] / res['ddp']:.3f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads in part 1 (0: default)"
    )
    parser.add_argument("--skip-backends", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        "command: python "
        + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    )
    compare_single(args)
    if not args.skip_backends:
        compare_backends(args)


if __name__ == "__main__":
    main()
