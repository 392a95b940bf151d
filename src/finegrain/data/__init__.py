"""Data: readers for every supported layout (registered in ``DATASETS`` on import), datasets and pipelines."""

from finegrain.data import benchmarks, generic  # noqa: F401  (registers the readers)
from finegrain.data.base import DATASETS, ImageList, open_dataset

__all__ = ["DATASETS", "ImageList", "open_dataset"]
