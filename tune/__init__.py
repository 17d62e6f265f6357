"""Hyperparameter search over trainer runs on Ray Tune (ASHA/FIFO/PBT, random/grid/Optuna).

Entry points: ``python -m tune {run,resume,report}`` (:mod:`tune.cli`); in Python,
:func:`tune.search.run_search`, :func:`tune.search.resume_search` and
:func:`tune.results.write_outputs`. Submodules are imported on use, so ``import tune`` stays light.
"""

import srmri  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads; see srmri)

__all__: list[str] = []
