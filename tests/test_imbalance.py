"""Class imbalance: ``train.class_weights``, ``train.label_smoothing`` and ``data.sampler``.

On a real, deliberately imbalanced shard set on disk (4 classes, ``notumor`` 10x each other
class in the training split; balanced validation split): the loss is torch's weighted and
smoothed cross-entropy, the balanced sampler draws the classes equally often with exact
steps, determinism and resume, and a tiny model trained with either option leans less on the
majority class than one trained with neither.
"""

from __future__ import annotations

import hashlib
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import webdataset as wds
from helpers import CLASSES, run_distributed, toy_image

from shards.format import DatasetIndex, ShardInfo, encode_sample, shard_name, to_uint16, write_index
from shards.labels import read_split_labels, split_class_counts
from shards.loader import ShardLoader, create_loader
from shards.plan import balanced_draws, plan_epoch
from srmri.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "debug.yaml"
MAJOR = CLASSES.index("notumor")
TRAIN_PER_CLASS = [6, 6, 60, 6]  # 78 samples, notumor 10x each other class
VAL_PER_CLASS = [6, 6, 6, 6]
TRAIN_SHARDS = [30, 26, 22]  # uneven, every shard mixes the classes
N_TRAIN = sum(TRAIN_PER_CLASS)

RUN = (
    "model.name=test_resnet",
    "data.batch_size=8",
    "data.num_workers=0",
    "train.epochs=2",
    "train.max_steps_per_epoch=null",
    "train.device=cpu",
    "optim.lr=0.003",
    "augment.enabled=false",
    "checkpoint.keep_last=20",
    "checkpoint.keep_best=0",
    "checkpoint.save_every_steps=5",  # result-neutral: mid-epoch checkpoints for the resume test
)


def _write_set(root: Path, prefix: str = "imb", counts: bool = True) -> DatasetIndex:
    """Write the imbalanced set; ``prefix`` names the keys (as another ingest secret would),
    ``counts`` whether ``index.json`` records the per-class counts as ingest does."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    splits = {
        "train": (np.repeat(np.arange(4), TRAIN_PER_CLASS), TRAIN_SHARDS),
        "val": (np.repeat(np.arange(4), VAL_PER_CLASS), [sum(VAL_PER_CLASS)]),
    }
    infos, recorded, n = [], {}, 0
    for split, (labels, sizes) in splits.items():
        labels = rng.permutation(labels)
        recorded[split] = {CLASSES[c]: int(k) for c, k in enumerate(np.bincount(labels))}
        for i, (a, b) in enumerate(zip(np.cumsum([0, *sizes[:-1]]), np.cumsum(sizes))):
            path = root / shard_name(split, i)
            with wds.TarWriter(str(path)) as sink:
                for label in labels[a:b]:
                    key = f"{prefix}_{n:06d}"
                    image = to_uint16(toy_image(int(label), 32, rng))
                    sink.write(encode_sample(key, image, int(label), {"key": key}))
                    n += 1
            data = path.read_bytes()
            infos.append(ShardInfo(path.name, split, int(b - a), hashlib.sha256(data).hexdigest()))
    index = DatasetIndex(
        dataset_id="imbalanced-0",
        classes=list(CLASSES),
        image_size=32,
        shards=infos,
        test_keys_sha256="",
        counts={"samples": recorded} if counts else {},
    )
    write_index(root, index)
    return index


# fit sets train.threads in this process; the module gives the count back afterwards
pytestmark = pytest.mark.usefixtures("restore_threads")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("imbalance") / "set"
    _write_set(path)
    return path


def _labels(batches: Sequence[dict[str, Any]]) -> Counter:
    return Counter(int(x) for b in batches for x in b["label"])


def _loader(root: Path, sampler: str = "balanced", **kw: Any) -> ShardLoader:
    batch = kw.pop("batch", 6)
    settings = {"mode": "train", "seed": 5, "shuffle_chunk": 8, **kw}
    return create_loader(root, "train", batch, sampler=sampler, **settings)


# ---- the loss -----------------------------------------------------------------------------------


def _task(root: Path, *overrides: str) -> Any:
    from shards.format import read_index
    from trainer.config import load_train_config
    from trainer.criterion import train_class_counts
    from trainer.task import create_task

    cfg = load_train_config(DEBUG, [f"data.root={root}", *overrides])
    index = read_index(root)
    return create_task(cfg, list(index.classes), train_class_counts(cfg, index))


def test_auto_weights_are_inverse_frequencies_and_weigh_the_loss_as_torch_does(
    root: Path, tmp_path: Path
) -> None:
    from shards.format import read_index

    counts = split_class_counts(str(root), read_index(root), "train")
    assert counts == TRAIN_PER_CLASS
    # A set whose index records no counts has its labels read: the same counts.
    bare = tmp_path / "bare"
    _write_set(bare, counts=False)
    assert split_class_counts(str(bare), read_index(bare), "train") == TRAIN_PER_CLASS

    inverse = 1 / torch.tensor(TRAIN_PER_CLASS, dtype=torch.float64)
    expected = (inverse / inverse.mean()).float()
    weighted = _task(root, "train.class_weights=auto").loss
    torch.testing.assert_close(weighted.weight, expected)
    assert weighted.weight.mean().item() == pytest.approx(1.0)
    assert weighted.weight[MAJOR] < weighted.weight[0] == weighted.weight[1]

    gen = torch.Generator().manual_seed(0)
    logits, target = torch.randn(16, 4, generator=gen), torch.tensor([0, 2, 2, 2] * 4)
    got = weighted(logits, target)
    assert torch.equal(got, F.cross_entropy(logits, target, weight=expected))
    plain = _task(root).loss(logits, target)
    assert torch.equal(plain, F.cross_entropy(logits, target)) and got != plain
    listed = _task(root, "train.class_weights=[1,2,3,4]").loss
    assert torch.equal(
        listed(logits, target),
        F.cross_entropy(logits, target, weight=torch.tensor([1.0, 2.0, 3.0, 4.0])),
    )


def test_a_weight_list_of_the_wrong_length_is_an_error_naming_key_and_classes(
    root: Path, tmp_path: Path
) -> None:
    from trainer.config import load_train_config
    from trainer.loop import fit

    with pytest.raises(ConfigError, match=r"train\.class_weights: 3 weights.*4 classes") as err:
        _task(root, "train.class_weights=[1,2,3]")
    assert "glioma, meningioma, notumor, pituitary" in str(err.value)
    # fit refuses it before it writes a file into the run directory (the lock aside).
    cfg = load_train_config(
        DEBUG, [*RUN, f"data.root={root}", f"out_dir={tmp_path}", "train.class_weights=[1,2]"]
    )
    with pytest.raises(ConfigError, match=r"train\.class_weights: 2 weights"):
        fit(cfg)
    assert [p.name for p in (tmp_path / cfg.name).iterdir()] in ([], [".lock"])


def test_label_smoothing_changes_the_loss_as_torch_does(root: Path) -> None:
    logits = torch.randn(12, 4, generator=torch.Generator().manual_seed(1))
    target = torch.arange(12) % 4
    smoothed = _task(root, "train.label_smoothing=0.2").loss(logits, target)
    assert torch.equal(smoothed, F.cross_entropy(logits, target, label_smoothing=0.2))
    assert smoothed != F.cross_entropy(logits, target)
    both = _task(root, "train.label_smoothing=0.2", "train.class_weights=auto").loss
    expected = F.cross_entropy(logits, target, weight=both.weight, label_smoothing=0.2)
    assert torch.equal(both(logits, target), expected)


def test_the_validation_loss_is_the_plain_cross_entropy(root: Path) -> None:
    task = _task(root, "train.class_weights=auto", "train.label_smoothing=0.3")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 4))
    task.eval_reset(torch.device("cpu"))
    losses = []
    with torch.no_grad():
        for batch in create_loader(root, "val", 5, mode="eval"):
            task.eval_update(model, batch, lambda x: x)
            logits = model(batch["image"])
            losses += F.cross_entropy(logits, batch["label"], reduction="none")[batch["valid"]]
    results = task.eval_compute()
    assert results["loss"] == pytest.approx(torch.stack(losses).mean().item(), rel=1e-6)


# ---- the balanced sampler -----------------------------------------------------------------------


def test_balanced_draws_give_every_class_its_quota() -> None:
    labels = [np.array([2, 2, 0, 2, 1]), np.array([2, 2, 2, 2, 3, 2])]
    draws = balanced_draws(labels, (1, 0), seed=0, epoch=0)
    stream = np.concatenate([labels[1], labels[0]])
    assert len(draws) == 11 and np.all(np.diff(draws) >= 0)
    assert sorted(np.bincount(stream[draws]).tolist()) == [2, 3, 3, 3]


def test_balanced_epochs_are_near_uniform_and_shuffled_ones_are_not(root: Path) -> None:
    balanced = _labels(list(_loader(root)))
    shuffled = _labels(list(_loader(root, "shuffle")))
    assert sum(balanced.values()) == sum(shuffled.values()) == N_TRAIN // 6 * 6
    # Each class drawn 19 or 20 times of 78, less the batch remainder cut from the end.
    assert all(13 <= balanced[c] <= 20 for c in range(4)), balanced
    assert shuffled[MAJOR] >= 54, shuffled
    keys = _keys(_loader(root, "shuffle"))
    assert len(keys) == len(set(keys))  # each sample once


def _keys(loader: ShardLoader) -> list[str]:
    return [k for b in loader for k in b["key"]]


def test_the_plan_repeats_for_the_same_seed_and_epoch_and_changes_across_epochs(
    root: Path,
) -> None:
    from shards.format import read_index

    index = read_index(root)
    labels = read_split_labels(str(root), index, "train")
    kw = {"train": True, "seed": 5, "rank": 0, "world": 1, "batch": 6, "workers": 2, "done": 0}
    shards = index.split_shards("train")
    plan = plan_epoch(shards, epoch=3, labels=labels, **kw)
    assert plan == plan_epoch(shards, epoch=3, labels=labels, **kw)
    assert plan.picks != plan_epoch(shards, epoch=4, labels=labels, **kw).picks
    assert plan.picks != plan_epoch(shards, epoch=3, labels=labels, **{**kw, "seed": 6}).picks
    assert len(plan.picks) == N_TRAIN // 6 * 6

    first, again, later = _loader(root), _loader(root), _loader(root)
    first.set_epoch(3), again.set_epoch(3), later.set_epoch(4)
    keys = _keys(first)
    assert keys == _keys(again) and keys != _keys(later)
    assert len(set(keys)) < len(keys)  # with replacement: minority samples come back


def test_draws_follow_content_not_keys_and_repeats_are_the_same_sample(
    root: Path, tmp_path: Path
) -> None:
    renamed = tmp_path / "renamed"
    _write_set(renamed, prefix="other")  # the same images and order under other keys
    batches = list(_loader(root, num_workers=2))
    assert [b["digest"] for b in batches] == [b["digest"] for b in _loader(renamed, num_workers=2)]
    copies: dict[str, list[tuple]] = {}
    for b in batches:
        for i, key in enumerate(b["key"]):
            copies.setdefault(key, []).append((b["image"][i], int(b["seed"][i]), b["digest"][i]))
    repeated = [c for c in copies.values() if len(c) > 1]
    assert repeated
    for (image, seed, digest), *rest in repeated:
        assert all(torch.equal(image, i) and (seed, digest) == (s, d) for i, s, d in rest)


def _with_inplace_transform(sample: dict[str, Any]) -> dict[str, Any]:
    sample["image"].numpy()[0, 0, 0] ^= 1  # in place: must not reach the next copy's payload
    return sample


def test_repeats_survive_an_in_place_transform_on_stored_pixels(root: Path) -> None:
    loader = _loader(root, transform=_with_inplace_transform, image_dtype="uint16")
    images: dict[str, list[torch.Tensor]] = {}
    for b in loader:  # no copy may see another copy's change (or fail its checksum)
        for key, image in zip(b["key"], b["image"]):
            images.setdefault(key, []).append(image)
    assert sum(map(len, images.values())) == N_TRAIN // 6 * 6
    assert any(len(copies) > 1 for copies in images.values())
    assert all(all(torch.equal(c[0], x) for x in c) for c in images.values())


def test_mid_epoch_resume_of_the_balanced_sampler_yields_exactly_the_rest(root: Path) -> None:
    def make() -> ShardLoader:
        loader = _loader(root, num_workers=2, batch=4)
        loader.set_epoch(1)
        return loader

    full = [b["key"] for b in make()]
    interrupted = make()
    for done, _ in enumerate(interrupted, start=1):
        if done == 7:
            break
    resumed = make()
    resumed.load_state_dict(interrupted.state_dict())
    assert [b["key"] for b in resumed] == full[7:]
    shuffled = _loader(root, "shuffle", num_workers=2, batch=4)
    with pytest.raises(ValueError, match="sampler='balanced' \\(this loader: 'shuffle'\\)"):
        shuffled.load_state_dict(interrupted.state_dict())


def test_evaluation_has_no_balanced_sampler(root: Path) -> None:
    with pytest.raises(ValueError, match="in eval mode"):
        create_loader(root, "val", 4, mode="eval", sampler="balanced")


def _ddp_balanced(rank: int, world: int, root: str) -> None:
    torch.set_num_threads(1)
    loader = create_loader(root, "train", 4, mode="train", sampler="balanced", num_workers=1)
    steps, labels = 0, []
    for batch in loader:
        step = torch.tensor([steps])
        dist.all_reduce(step, op=dist.ReduceOp.MAX)  # a rank a step ahead would differ here
        assert step.item() == steps
        labels += batch["label"].tolist()
        steps += 1
    assert steps == len(loader) == N_TRAIN // world // 4
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, (steps, labels))
    assert len({s for s, _ in gathered}) == 1
    drawn = Counter(label for _, ls in gathered for label in ls)
    assert all(12 <= drawn[c] <= 21 for c in range(4)), drawn


@pytest.mark.timeout(180)
def test_two_gloo_ranks_run_equal_steps_and_draw_balanced_classes(root: Path) -> None:
    run_distributed(_ddp_balanced, 2, str(root))


# ---- training ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same tiny run (2 epochs of 9 steps) with neither option, auto weights, balanced."""
    from trainer.config import load_train_config
    from trainer.loop import fit

    out = tmp_path_factory.mktemp("runs")
    options = {
        "none": (),
        "auto": ("train.class_weights=auto",),
        "balanced": ("data.sampler=balanced",),
    }
    summaries = {}
    for name, extra in options.items():
        cfg = load_train_config(
            DEBUG, [*RUN, f"data.root={root}", f"out_dir={out}", f"name={name}", *extra]
        )
        summaries[name] = fit(cfg)
    return {"out": out, "summaries": summaries}


def _majority_share(run: Path) -> float:
    """The final model's mean probability of the majority class on the balanced val split."""
    table = pq.read_table(run / "predictions.parquet")
    assert table.num_rows == sum(VAL_PER_CLASS)
    return float(table.column(f"prob_{CLASSES[MAJOR]}").to_numpy().mean())


def test_either_option_leans_less_on_the_majority_class(runs: dict[str, Any]) -> None:
    # 18 steps teach this model the class prior well before the images (seeds 0-2 measured:
    # none 0.63-0.83; auto 0.13-0.46, balanced 0.10-0.26, at least 0.29 below none each).
    plain = _majority_share(runs["out"] / "none")
    assert plain > 0.5
    for name in ("auto", "balanced"):
        share = _majority_share(runs["out"] / name)
        assert share < plain - 0.15, (name, share, plain)
        assert runs["summaries"][name]["final"]["n"] == sum(VAL_PER_CLASS)


def test_a_balanced_run_interrupted_mid_epoch_resumes_to_the_same_weights(
    runs: dict[str, Any], root: Path, tmp_path: Path
) -> None:
    from trainer.config import load_train_config
    from trainer.loop import fit

    reference = runs["out"] / "balanced"
    run = tmp_path / "balanced"
    shutil.copytree(reference, run)
    # What a run killed after step 5 (mid-epoch 0) leaves: no later checkpoint, no summary.
    for ckpt in (run / "checkpoints").glob("step-*"):
        if int(ckpt.name[5:]) > 5:
            shutil.rmtree(ckpt)
    (run / "metrics.json").unlink()
    cfg = load_train_config(
        DEBUG,
        [
            *RUN,
            f"data.root={root}",
            f"out_dir={tmp_path}",
            "name=balanced",
            "data.sampler=balanced",
        ],
    )
    fit(cfg)
    last = [sorted((r / "checkpoints").glob("step-*"))[-1] for r in (reference, run)]
    assert last[0].name == last[1].name == "step-00000018"
    want, got = (torch.load(p / "module.pt", weights_only=True) for p in last)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize(
    ("name", "override", "shown"),
    [
        ("none", "data.sampler=balanced", "data.sampler: 'shuffle' -> 'balanced'"),
        ("balanced", "data.sampler=shuffle", "data.sampler: 'balanced' -> 'shuffle'"),
        ("none", "train.class_weights=auto", "train.class_weights: 'none' -> 'auto'"),
        ("auto", "train.class_weights=[1,1,1,1]", "train.class_weights: 'auto' -> [1.0"),
        ("none", "train.label_smoothing=0.1", "train.label_smoothing: 0.0 -> 0.1"),
    ],
)
def test_a_resume_under_another_sampler_weights_or_smoothing_is_refused(
    runs: dict[str, Any], root: Path, tmp_path: Path, name: str, override: str, shown: str
) -> None:
    from trainer.config import load_train_config
    from trainer.loop import fit
    from trainer.resume import ResumeRefused

    shutil.copytree(runs["out"] / name, tmp_path / name)
    own = {"none": [], "auto": ["train.class_weights=auto"], "balanced": ["data.sampler=balanced"]}
    args = [*RUN, f"data.root={root}", f"out_dir={tmp_path}", f"name={name}", *own[name]]
    with pytest.raises(ResumeRefused, match="cannot resume from") as err:
        fit(load_train_config(DEBUG, [*args, override]))
    assert shown in str(err.value), str(err.value)
