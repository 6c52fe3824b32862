"""Reading images, masks and datasets, streaming them in batches, and making demo data.

``make_demo_data`` is imported on first use: it needs scikit-image (the ``flawmap[torch]``
extra), which the torch-free runtime install lacks.
"""

from typing import Any

from flawmap.data.datasets import Dataset, Sample, open_dataset, samples_from_paths
from flawmap.data.images import IMAGE_SUFFIXES, list_images, read_image, read_mask
from flawmap.data.loader import Batch, iter_batches

__all__ = [
    "IMAGE_SUFFIXES",
    "Batch",
    "Dataset",
    "Sample",
    "iter_batches",
    "list_images",
    "make_demo_data",
    "open_dataset",
    "read_image",
    "read_mask",
    "samples_from_paths",
]


def __getattr__(name: str) -> Any:
    if name == "make_demo_data":
        from flawmap.data.demo import make_demo_data

        return make_demo_data
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
