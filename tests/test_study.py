"""The pre-registered study across splits: its statistics on known inputs, then end to end.

The end-to-end part runs the smoke pipeline for two split seeds (in this process, to pay for
torch's import once), then the ``study`` command on them and on folders that must be refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from trainer.experiment.__main__ import main as experiment_main
from trainer.experiment.stats import hierarchical_bootstrap, mixed_intercept, paired_bootstrap
from trainer.experiment.study_stats import verdict

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "pipeline-smoke.yaml"
SPLIT_SEEDS = (1, 2)


def _groups(n: int, per: int = 4) -> list[str]:
    return [f"p{i // per:03d}" for i in range(n)]


def _noisy(rng: np.random.Generator, mean: float, seeds: int = 3, n: int = 200) -> np.ndarray:
    """Per-slice differences in {-1, 0, 1} with the given expected value."""
    a = rng.random((seeds, n)) < 0.5 + mean / 2
    b = rng.random((seeds, n)) < 0.5 - mean / 2
    return a.astype(float) - b.astype(float)


# ---------------------------------------------------------------- hierarchical bootstrap


def test_a_constant_difference_gives_a_zero_width_interval_at_it() -> None:
    diffs = [np.full((3, 40), 0.25), np.full((3, 60), 0.25), np.full((2, 40), 0.25)]
    groups = [_groups(40), None, _groups(40, per=2)]
    assert hierarchical_bootstrap(diffs, groups, n_boot=500) == pytest.approx((0.25, 0.25, 0.25))


def test_splits_that_disagree_widen_the_interval_beyond_each_split() -> None:
    rng = np.random.default_rng(0)
    diffs = [_noisy(rng, m) for m in (0.3, -0.3, 0.0)]
    groups = [_groups(200)] * 3
    per_split = [
        paired_bootstrap(d, np.zeros_like(d), g, n_boot=2000) for d, g in zip(diffs, groups)
    ]
    diff, lo, hi = hierarchical_bootstrap(diffs, groups, n_boot=4000)
    assert diff == pytest.approx(np.mean([d.mean() for d in diffs]))
    widest = max(h - low for _, low, h in per_split)
    assert hi - lo > 2 * widest
    # the disagreeing splits' own intervals each lie inside the across-split one's reach
    assert lo < per_split[1][2] and hi > per_split[0][1]


def test_the_bootstrap_repeats_exactly_under_its_seed() -> None:
    rng = np.random.default_rng(1)
    diffs, groups = [_noisy(rng, 0.1), _noisy(rng, 0.05)], [_groups(200), None]
    first = hierarchical_bootstrap(diffs, groups, n_boot=3000, seed=7)
    assert hierarchical_bootstrap(diffs, groups, n_boot=3000, seed=7) == first
    assert hierarchical_bootstrap(diffs, groups, n_boot=3000, seed=8) != first


def test_one_split_with_identical_seeds_matches_the_per_split_bootstrap() -> None:
    # With one split and seeds that agree, only the patient level varies: the report's interval.
    row = _noisy(np.random.default_rng(2), 0.1, seeds=1, n=400)
    same = np.repeat(row, 3, axis=0)
    g = _groups(400)
    hier = hierarchical_bootstrap([same], [g], n_boot=8000)
    flat = paired_bootstrap(same, np.zeros_like(same), g, n_boot=8000)
    assert hier[0] == pytest.approx(flat[0])
    assert hier[1:] == pytest.approx(flat[1:], abs=0.01)


def test_the_observed_difference_is_the_mean_over_runs_whatever_the_split_sizes() -> None:
    rng = np.random.default_rng(3)
    diffs = [_noisy(rng, 0.2, n=80), _noisy(rng, 0.0, n=300)]
    per_run = [row.mean() for d in diffs for row in d]
    diff, _, _ = hierarchical_bootstrap(diffs, [None, None], n_boot=10)
    assert diff == pytest.approx(np.mean(per_run))


def test_mismatched_groups_are_an_error() -> None:
    with pytest.raises(ValueError, match="one group list per split"):
        hierarchical_bootstrap([np.zeros((1, 3))], [None, None])


# ---------------------------------------------------------------------- mixed model


def test_the_mixed_model_recovers_the_mean_of_per_run_differences() -> None:
    rng = np.random.default_rng(4)
    splits = np.repeat([0, 1, 2], 3)
    values = 0.05 + np.array([0.02, -0.015, 0.0])[splits] + rng.normal(0, 0.005, 9)
    fit = mixed_intercept(values, splits)
    assert fit.status == "fitted", fit.notes
    # balanced design: the REML intercept is the grand mean
    assert fit.estimate == pytest.approx(values.mean(), abs=1e-9)
    assert fit.ci_low < 0.05 < fit.ci_high
    assert fit.group_var > fit.residual_var > 0


def test_a_mixed_model_that_cannot_be_fitted_says_why() -> None:
    same = mixed_intercept([0.1] * 6, [0, 0, 1, 1, 2, 2])
    assert (same.status, same.estimate) == ("failed", None)
    assert "same" in same.notes[0]
    one = mixed_intercept([0.1, 0.2, 0.3], ["a", "a", "a"])
    assert one.status == "failed" and "two groups" in one.notes[0]
    # no split effect at all: the between-split variance goes to zero, and that is stated
    rng = np.random.default_rng(0)
    flat = mixed_intercept(0.05 + rng.normal(0, 0.01, 9), np.repeat([0, 1, 2], 3))
    assert flat.status == "singular"
    assert flat.estimate is not None and "between-split variance" in flat.notes[0]


def test_the_verdict_follows_the_interval() -> None:
    assert verdict(0.01, 0.2) == "helps"
    assert verdict(-0.2, -0.01) == "hurts"
    assert verdict(-0.01, 0.3) == "cannot tell"


# ---------------------------------------------------------------------- end to end


def _overrides(out: Path, split_seed: int) -> list[str]:
    return [
        f"out_dir={out}",
        "arms=[hr,lr,sr]",
        "seeds=[0,1]",
        f"data.split.seed={split_seed}",
        "report.gradcam_per_class=0",
    ]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, restore_threads) -> dict[str, Path]:
    """Two finished smoke pipelines (split seeds 1 and 2) and one stopped after its data."""
    from trainer.experiment.config import load_pipeline_config
    from trainer.experiment.pipeline import run_pipeline

    tmp = tmp_path_factory.mktemp("study")
    found: dict[str, Path] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SRMRI_SECRET_FILE", str(tmp / "secret.key"))
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.chdir(ROOT)  # the smoke config names its stage configs relative to the repository
        for seed in SPLIT_SEEDS:
            out = tmp / f"split{seed}"
            run_pipeline(load_pipeline_config(str(SMOKE), _overrides(out, seed)))
            found[f"split{seed}"] = out
        unfinished = tmp / "split3-unfinished"
        run_pipeline(load_pipeline_config(str(SMOKE), _overrides(unfinished, 3)), only="data")
        found["unfinished"] = unfinished
    return found


def _study(argv: list[str], capsys) -> tuple[int, str]:
    rc = experiment_main(["study", *argv])
    return rc, capsys.readouterr().err


def _metadata_copy(src: Path, dst: Path) -> Path:
    """What the checks before any prediction read: the report, the stages, the data set."""
    dst.mkdir()
    for name in ("results.json", "stages.json"):
        shutil.copy(src / name, dst / name)
    shutil.copytree(src / "data", dst / "data")
    return dst


@pytest.fixture(scope="module")
def study(folders, tmp_path_factory) -> dict:
    """The study command on the two finished folders: its JSON and markdown."""
    tmp = tmp_path_factory.mktemp("study-out")
    md, js = tmp / "study.md", tmp / "study.json"
    argv = [str(folders[f"split{s}"]) for s in SPLIT_SEEDS]
    # the per-split bootstrap as the smoke reports ran it (report.bootstrap 200)
    flags = ["--out", str(md), "--json", str(js), "--bootstrap", "2000", "--split-bootstrap", "200"]
    assert experiment_main(["study", *argv, *flags]) == 0
    return {"json": json.loads(js.read_text()), "md": md.read_text(), "tmp": tmp}


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_the_study_identifies_every_split_by_its_ids_never_a_path(study, folders) -> None:
    doc = study["json"]
    for info, seed in zip(doc["splits"], SPLIT_SEEDS):
        res = _results(folders[f"split{seed}"])
        assert info["split_seed"] == seed
        assert info["dataset_id"] == res["dataset_id"]
        assert info["data_fingerprint"] == res["data_fingerprint"]
        assert info["test_keys_sha256"] == res["test_keys_sha256"]
        assert info["resampled"] == "patients"
        assert info["dataset_id"] in study["md"]
    assert doc["splits"][0]["dataset_id"] != doc["splits"][1]["dataset_id"]
    text = study["md"] + json.dumps(doc)
    for out in folders.values():
        assert str(out.parent) not in text and out.name not in text


def test_the_comparisons_are_every_arm_minus_lr_with_every_interval(study, folders) -> None:
    comps = study["json"]["comparisons"]
    assert [(c["a"], c["b"]) for c in comps] == [("hr", "lr"), ("sr", "lr")]
    for c in comps:
        runs = c["runs"]
        assert [(r["split"], r["seed"]) for r in runs] == [
            (f"split {s}", m) for s in SPLIT_SEEDS for m in (0, 1)
        ]
        # the primary difference is the mean over the (split, seed) runs, and each run's is
        # the accuracy difference its report recorded
        assert c["diff"] == pytest.approx(np.mean([r["diff"] for r in runs]))
        for r in runs:
            arms = _results(folders[r["split"].replace(" ", "")])["arms"]
            acc = {a: arms[a]["per_seed"][r["seed"]]["accuracy"] for a in (c["a"], c["b"])}
            assert r["diff"] == pytest.approx(acc[c["a"]] - acc[c["b"]])
        assert c["ci_low"] <= c["diff"] <= c["ci_high"]
        assert c["verdict"] == verdict(c["ci_low"], c["ci_high"])
        assert c["mixed"]["status"] in ("fitted", "singular", "not converged", "failed")
        assert [r["pvalue_holm"] >= r["pvalue"] for r in runs] == [True] * len(runs)


def test_the_per_split_interval_is_the_reports_own(study, folders) -> None:
    for c in study["json"]["comparisons"]:
        for p, seed in zip(c["per_split"], SPLIT_SEEDS):
            reported = {
                (r["a"], r["b"]): r for r in _results(folders[f"split{seed}"])["comparisons"]
            }[(c["a"], c["b"])]
            got = (p["diff"], p["ci_low"], p["ci_high"])
            assert got == pytest.approx((reported["diff"], reported["ci_low"], reported["ci_high"]))


def test_the_arm_and_sr_tables_come_from_every_run(study, folders) -> None:
    doc = study["json"]
    rows = {r["arm"]: r for r in doc["arm_table"]}
    assert list(rows) == ["hr", "lr", "sr"]
    for arm, row in rows.items():
        runs = [
            m for s in SPLIT_SEEDS for m in _results(folders[f"split{s}"])["arms"][arm]["per_seed"]
        ]
        assert row["runs"] == 4
        assert row["accuracy"][0] == pytest.approx(np.mean([m["accuracy"] for m in runs]))
        assert row["balanced_accuracy"][1] == pytest.approx(
            np.std([m["balanced_accuracy"] for m in runs], ddof=1)
        )
    for row, seed in zip(doc["sr_table"], SPLIT_SEEDS):
        best = _results(folders[f"split{seed}"])["sr"]["best"]
        assert row["split"] == f"split {seed}"
        assert row["psnr"]["bicubic"] == pytest.approx(best["bicubic_psnr"])
        assert row["ssim"]["zero_fill"] == pytest.approx(best["zero_fill_ssim"])


def test_the_markdown_has_every_table_and_every_mixed_model_note(study) -> None:
    md = study["md"]
    for heading in (
        "## Study: 2 splits x 2 model seeds",
        "### Comparisons across splits (primary)",
        "### Per split",
        "### McNemar per run",
        "### Every arm",
        "### SR quality per split",
    ):
        assert heading in md
    assert "| hr − lr |" in md and "| sr − lr |" in md
    assert "2000 replicates" in md and "coarse" in md
    for c in study["json"]["comparisons"]:
        assert f"- {c['a']} − {c['b']}: {c['mixed']['status']}" in md


def test_folders_with_other_arms_or_seeds_are_refused(folders, tmp_path, capsys) -> None:
    for what, edit in (
        ("arms", lambda arms: arms.pop("sr")),
        ("seeds", lambda arms: arms["lr"].update(seeds=[0, 5])),
    ):
        odd = _metadata_copy(folders["split2"], tmp_path / f"other-{what}")
        res = _results(odd)
        edit(res["arms"])
        (odd / "results.json").write_text(json.dumps(res))
        rc, err = _study([str(folders["split1"]), str(odd)], capsys)
        assert rc == 1
        assert str(odd) in err and what in err, err


def test_a_split_given_twice_is_refused(folders, tmp_path, capsys) -> None:
    again = _metadata_copy(folders["split1"], tmp_path / "split1-again")
    rc, err = _study([str(folders["split1"]), str(folders["split2"]), str(again)], capsys)
    assert rc == 1
    assert f"{again} is the same split as {folders['split1']}" in err, err


def test_an_unfinished_or_stale_report_is_refused(folders, tmp_path, capsys) -> None:
    rc, err = _study([str(folders["split1"]), str(folders["unfinished"])], capsys)
    assert rc == 1
    assert f"{folders['unfinished']}: its report is unfinished" in err, err
    stale = _metadata_copy(folders["split2"], tmp_path / "stale")
    stages = json.loads((stale / "stages.json").read_text())
    stages["classify/sr-seed1"]["fingerprint"] = "0" * 64  # re-run under another config since
    (stale / "stages.json").write_text(json.dumps(stages))
    rc, err = _study([str(folders["split1"]), str(stale)], capsys)
    assert rc == 1 and "out of date" in err and "classify/sr-seed1" in err, err
    rc, err = _study([str(folders["split1"])], capsys)
    assert rc == 1 and "at least two" in err


# ---------------------------------------------------------------------- archives


@pytest.fixture(scope="module")
def archives(folders, tmp_path_factory) -> dict[str, Path]:
    """Each finished smoke folder archived by the command (what RESULTS.md's study keeps)."""
    tmp = tmp_path_factory.mktemp("archives")
    made = {}
    for seed in SPLIT_SEEDS:
        dest = tmp / f"split{seed}"
        assert experiment_main(["archive", str(folders[f"split{seed}"]), str(dest)]) == 0
        made[f"split{seed}"] = dest
    return made


def test_a_study_of_archives_is_the_study_of_their_folders(archives, folders, study) -> None:
    js = study["tmp"] / "from-archives.json"
    argv = [str(archives[f"split{s}"]) for s in SPLIT_SEEDS]
    flags = ["--json", str(js), "--bootstrap", "2000", "--split-bootstrap", "200"]
    assert experiment_main(["study", *argv, *flags]) == 0
    assert json.loads(js.read_text()) == study["json"]
    for seed in SPLIT_SEEDS:
        arch, out = archives[f"split{seed}"], folders[f"split{seed}"]
        files = [p for p in arch.rglob("*") if p.is_file()]
        # records only: no shard, no checkpoint, a small fraction of the folder
        assert not [
            p
            for p in files
            if p.suffix in (".tar", ".pt", ".safetensors", ".yaml") and p.name != "config.yaml"
        ]
        size = sum(p.stat().st_size for p in files)
        assert size < 0.05 * sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        for p in files:  # no path of the machine's, the folder's own included
            assert str(out.parent).encode() not in p.read_bytes(), p


def test_a_changed_or_missing_archived_file_is_refused(archives, tmp_path, capsys) -> None:
    changed = tmp_path / "changed"
    shutil.copytree(archives["split2"], changed)
    preds = next(changed.rglob("predictions_test.parquet"))
    preds.write_bytes(preds.read_bytes() + b"\0")
    rc, err = _study([str(archives["split1"]), str(changed)], capsys)
    assert rc == 1 and f"{changed}: archived file" in err and "changed since" in err, err
    preds.unlink()
    rc, err = _study([str(archives["split1"]), str(changed)], capsys)
    assert rc == 1 and "is missing" in err, err


def test_archiving_refuses_an_unfinished_folder_or_a_taken_dest(
    folders, archives, tmp_path, capsys
) -> None:
    assert experiment_main(["archive", str(folders["unfinished"]), str(tmp_path / "a")]) == 1
    assert "its report is unfinished" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert experiment_main(["archive", str(folders["split1"]), str(archives["split1"])]) == 1
    assert "already exists" in capsys.readouterr().err
    # an interrupted archive's leftovers are replaced, never taken for the archive
    dest = tmp_path / "b"
    (tmp_path / "b.partial").mkdir()
    (tmp_path / "b.partial" / "stray").write_text("x")
    assert experiment_main(["archive", str(folders["split1"]), str(dest)]) == 0
    assert not (dest / "stray").exists() and not (tmp_path / "b.partial").exists()


def test_a_pipeline_refuses_to_run_into_an_archive(archives) -> None:
    from trainer.experiment.config import load_pipeline_config
    from trainer.experiment.pipeline import run_pipeline
    from trainer.experiment.stage import PipelineError

    cfg = load_pipeline_config(str(SMOKE), _overrides(archives["split1"], 1))
    with pytest.raises(PipelineError, match="an archive of a finished pipeline"):
        run_pipeline(cfg)
