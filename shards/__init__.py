"""shards: scans of every common format into WebDataset shards with a parquet manifest."""

import srmri  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads; see srmri)

__all__: list[str] = []
