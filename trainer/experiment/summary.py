"""The report's opening: a few plain sentences a person reads before any table.

They say what was compared, what came out, how sure the numbers let us be, and what the
experiment does not show. Every number in them is one the tables below also give; the wording
follows the intervals (an interval that includes zero is never called a difference).
"""

from __future__ import annotations

import math

from trainer.experiment.results import Results
from trainer.experiment.stats import PairedComparison

__all__ = ["summary_sentences"]

_ARM_WORDS = {
    "hr": "the full-resolution slices",
    "lr": "low-resolution copies{scale}",
    "sr": "the low-resolution copies enhanced by the SR model",
    "lr+sr": "low-resolution and enhanced copies together",
    "lr|sr": "each low-resolution copy and its enhanced copy as the two channels of one input",
    "tsr": "low-resolution copies through the SR model fine-tuned jointly with the classifier",
}


def _arm_word(arm: str, scale: int | None) -> str:
    word = _ARM_WORDS.get(arm, arm)
    return f"{arm} ({word.format(scale=f' (x{scale})' if scale else '')})"


def _compared(res: Results) -> str:
    scale = res.sr.scale if res.sr is not None else None
    arms = ", ".join(_arm_word(a, scale) for a in res.arms)
    seeds = next(iter(res.arms.values())).seeds if res.arms else []
    data = "synthetic" if res.source == "synth" else res.source
    n_runs = len(res.arms) * len(seeds)
    return (
        f"{n_runs} classifier{'s' if n_runs != 1 else ''} (one per arm and seed, "
        f"seed{'s' if len(seeds) != 1 else ''} {', '.join(map(str, seeds))}) were trained on "
        f"the same {res.train_samples} {data} "
        f"training slices, seen as {arms}, and scored on the same {res.test_samples} "
        "held-out test slices."
    )


def _outcome(res: Results) -> str:
    accs = ", ".join(f"{a} {r.summary['accuracy'][0]:.3f}" for a, r in res.arms.items())
    return f"Test accuracy: {accs}."


def _verdict(c: PairedComparison) -> str:
    span = f"{c.diff:+.3f}, 95% interval {c.ci_low:+.3f} to {c.ci_high:+.3f}"
    if c.ci_low > 0:
        return f"{c.a} beats {c.b} ({span})"
    if c.ci_high < 0:
        return f"{c.b} beats {c.a} ({span})"
    return f"{c.a} and {c.b} cannot be told apart ({span}: the interval includes zero)"


def _certainty(res: Results) -> str:
    if not res.comparisons:
        return "No paired comparison was made."
    verdicts = "; ".join(_verdict(c) for c in res.comparisons)
    what = res.protocol.ci
    return f"Paired over the same test slices: {verdicts} ({what})."


def _sr_sentence(res: Results) -> str | None:
    if res.sr is None:
        return None
    best = res.sr.best
    sr, bic, zf = (best.get(f"{m}_psnr", math.nan) for m in ("sr", "bicubic", "zero_fill"))
    base, name = (bic, "bicubic") if bic >= zf else (zf, "zero-filling")
    if math.isnan(sr) or math.isnan(base):
        return None
    return (
        f"On held-out validation slices the SR model reaches {sr:.2f} dB PSNR against "
        f"{base:.2f} dB for {name}, the better plain upsampler ({sr - base:+.2f} dB)."
    )


def _limits(res: Results) -> str:
    seeds = len(res.protocol.seeds)
    runs = (
        "one training seed, so the intervals leave out how much another training run would move"
        if seeds == 1
        else f"{seeds} training seeds"
    )
    if res.source == "synth":
        return (
            f"What this does not show: the slices are synthetic and the runs short ({runs}); "
            "it demonstrates what the system measures, not how super-resolution behaves on "
            "real MRI."
        )
    return (
        f"What this does not show: one data set from one source ({res.source}) and {runs}; "
        "the intervals resample its test slices, not other scanners, sites or protocols."
    )


def summary_sentences(res: Results) -> list[str]:
    """The report's opening sentences.

    Args:
        res: The report's results (the SR section set when an SR arm ran).

    Returns:
        Three to five sentences: what was compared, what came out (with the SR stage's gain
        when there is one), how sure the intervals let us be, and what it does not show.
    """
    out = [_compared(res), _outcome(res)]
    sr = _sr_sentence(res)
    if sr is not None:
        out.append(sr)
    return [*out, _certainty(res), _limits(res)]
