"""The report's opening sentences follow the numbers: an interval with zero is no difference."""

from __future__ import annotations

from trainer.experiment.results import ArmResults, ReportProtocol, Results, SRSummary
from trainer.experiment.stats import PairedComparison
from trainer.experiment.summary import summary_sentences


def _arm(acc: float, seeds: list[int]) -> ArmResults:
    return ArmResults(seeds=seeds, summary={"accuracy": (acc, 0.0)}, per_class={}, per_seed=[])


def _pair(a: str, b: str, diff: float, lo: float, hi: float) -> PairedComparison:
    return PairedComparison(a, b, diff, lo, hi, "samples", [], [])


def _results(source: str, seeds: list[int], sr: SRSummary | None) -> Results:
    return Results(
        classes=["glioma", "meningioma", "notumor", "pituitary"],
        source=source,
        train_samples=1500,
        test_samples=420,
        test_keys_sha256="",
        dataset_id="d",
        arms={"hr": _arm(0.912, seeds), "lr": _arm(0.781, seeds), "sr": _arm(0.79, seeds)},
        comparisons=[
            _pair("hr", "lr", 0.131, 0.09, 0.17),
            _pair("sr", "lr", 0.009, -0.02, 0.04),
            _pair("lr", "sr", -0.05, -0.08, -0.01),
        ],
        protocol=ReportProtocol(seeds, "test", "95% percentile bootstrap", "McNemar"),
        sr=sr,
    )


def test_the_sentences_say_what_the_intervals_say() -> None:
    sr = SRSummary(
        4, "edsr", "custom", {"sr_psnr": 25.3, "bicubic_psnr": 23.9, "zero_fill_psnr": 24.1}, 8
    )
    text = summary_sentences(_results("synth", [0], sr))
    assert len(text) == 5
    assert text[0].startswith("3 classifiers") and "1500 synthetic training slices" in text[0]
    assert "lr (low-resolution copies (x4))" in text[0] and "420 held-out test slices" in text[0]
    assert text[1] == "Test accuracy: hr 0.912, lr 0.781, sr 0.790."
    assert "25.30 dB PSNR against 24.10 dB for zero-filling" in text[2] and "+1.20 dB" in text[2]
    assert "hr beats lr (+0.131, 95% interval +0.090 to +0.170)" in text[3]
    assert "sr and lr cannot be told apart" in text[3] and "includes zero" in text[3]
    assert "sr beats lr (-0.050" in text[3]  # a negative interval names the other arm
    assert "synthetic" in text[4] and "one training seed" in text[4]


def test_real_data_and_several_seeds_change_the_limits() -> None:
    text = summary_sentences(_results("kaggle", [0, 1, 2], None))
    assert len(text) == 4  # no SR sentence without an SR stage
    assert "9 classifiers" in text[0] and "kaggle" in text[0] and "(x" not in text[0]
    assert "3 training seeds" in text[3] and "one data set from one source (kaggle)" in text[3]


# ------------------------------------------------------------------ the lr|sr arm in the report


def test_an_arm_no_pair_names_is_compared_with_lr() -> None:
    from trainer.experiment.config import ReportConfig
    from trainer.experiment.report import report_pairs

    defaults = ReportConfig().pairs
    arms = ["hr", "lr", "sr", "lr+sr", "lr|sr"]
    pairs = report_pairs(arms, defaults)
    assert pairs[: len(defaults)] == [tuple(p) for p in defaults]
    assert pairs.count(("lr|sr", "lr")) == 1 and len(pairs) == len(set(pairs))
    assert report_pairs(["hr", "lr", "sr", "lr+sr"], defaults) == [tuple(p) for p in defaults]
    assert report_pairs(["hr", "lr|sr"], defaults) == [tuple(p) for p in defaults]  # no lr arm
    mine = [("lr|sr", "sr")]
    assert report_pairs(["lr", "sr", "lr|sr"], mine) == [("lr|sr", "sr")]  # named: as given


def test_the_lr_sr_arm_has_its_row_its_comparison_and_whole_markdown_tables(tmp_path) -> None:
    import numpy as np

    from trainer.experiment.config import ReportConfig
    from trainer.experiment.pages import write_md
    from trainer.experiment.report import report_pairs
    from trainer.experiment.results import SUMMARY
    from trainer.experiment.stats import compare_arms

    rng = np.random.default_rng(0)
    correct = {arm: rng.random((1, 40)) < 0.7 for arm in ("lr", "sr", "lr|sr")}
    pairs = report_pairs(list(correct), ReportConfig().pairs)
    comparisons = compare_arms(correct, pairs, n_boot=200)
    assert [(c.a, c.b) for c in comparisons] == [("sr", "lr"), ("lr|sr", "lr")]
    res = _results("synth", [0], None)
    res.arms = {
        arm: ArmResults([0], {k: (acc, 0.0) for k in SUMMARY}, {}, [])
        for arm, acc in (("lr", 0.7), ("sr", 0.75), ("lr|sr", 0.8))
    }
    res.comparisons = comparisons
    text = summary_sentences(res)
    assert "lr|sr (each low-resolution copy and its enhanced copy as the two channels" in text[0]
    assert "lr|sr 0.800" in text[1] and "lr|sr" in text[-2]  # the paired verdicts
    write_md(tmp_path / "report.md", res, {}, tmp_path)
    lines = (tmp_path / "report.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| arm |"))
    row = next(line for line in lines if line.startswith("| lr\\|sr | 0.800 |"))
    # The escaped pipe is no cell border: the row has as many cells as the header.
    assert row.replace("\\|", "").count("|") == header.count("|")
    assert any(line.startswith("| lr\\|sr − lr |") for line in lines)
