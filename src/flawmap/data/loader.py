"""Streaming samples into batches of resized float arrays, decoding in a small thread pool.

Pillow releases the GIL while decoding and resizing, so a few threads keep the backbone fed.
At most about two batches are decoded ahead of the consumer, so memory stays bounded however
many samples are given, and batches come out in input order. Batches are numpy arrays, so that
exported models predict without torch; torch code wraps them with ``torch.from_numpy``.
:func:`iter_images` streams images at their own size instead, one at a time, for tiled models.
"""

from __future__ import annotations

import sys
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from flawmap.data.datasets import Sample, in_memory
from flawmap.data.images import open_rgb_image, read_mask
from flawmap.errors import FlawmapError

_BATCHES_AHEAD = 2
"""How many batches of decoding may run ahead of the consumer."""

PATCH_STRIDE = 8
"""Input pixels per cell of the finest patch grid (stride-8 features): an image needs at least
``image_size / PATCH_STRIDE`` pixels a side to give every grid cell its own pixel."""


_Combined = TypeVar("_Combined")


class InvalidImageWarning(UserWarning):
    """An unreadable image was skipped (``iter_batches(..., skip_invalid=True)``)."""


@dataclass
class Batch:
    """A batch of ``B`` samples, resized for the model and with their original-size masks.

    Attributes
    ----------
    images : ndarray of shape (B, 3, S, S)
        ``float32`` RGB in ``[0, 1]`` (not mean/std normalised), C-contiguous.
    samples : list of Sample
        The samples in batch order (in-memory arrays as :func:`~flawmap.data.datasets.in_memory` samples).
    original_hw : list of (int, int)
        ``(height, width)`` of each image before resizing.
    masks : list of ndarray or None
        ``bool`` ``H x W`` at the original size when masks were requested: all-False for normal
        samples, None for an anomalous sample without a mask file or when not requested.
    """

    images: np.ndarray
    samples: list[Sample]
    original_hw: list[tuple[int, int]]
    masks: list[np.ndarray | None]


@dataclass
class DecodedImage:
    """One decoded sample: ``pixels`` is ``uint8`` of shape ``S x S x 3`` (resized) or
    ``H x W x 3`` (at its own size, :func:`iter_images`); ``mask`` as in :class:`Batch`."""

    sample: Sample
    pixels: np.ndarray
    original_hw: tuple[int, int]
    mask: np.ndarray | None


def iter_batches(
    samples: Sequence[Sample | np.ndarray],
    image_size: int,
    batch_size: int = 16,
    num_workers: int = 2,
    load_masks: bool = False,
    skip_invalid: bool = False,
    progress: str | None = None,
) -> Iterator[Batch]:
    """Decode, resize (squash to ``image_size x image_size``) and batch ``samples``, in order.

    ``samples`` holds :class:`Sample` objects and/or in-memory ``uint8`` arrays of shape
    ``H x W``, ``H x W x 3`` or ``H x W x 4`` (alpha dropped). The last batch may be smaller.

    Parameters
    ----------
    num_workers : int
        Decoding threads.
    load_masks : bool
        Also read each sample's mask at its original size (see :class:`Batch`).
    skip_invalid : bool
        Warn (:class:`InvalidImageWarning`) and skip unreadable samples instead of raising.
    progress : str or None
        If given, show a progress bar over samples with this description (on stderr).

    Raises
    ------
    FlawmapError
        At the call, if a size argument is below 1; while iterating, if a sample cannot be read
        (unless ``skip_invalid``).
    """
    sizes = {"image_size": image_size, "batch_size": batch_size, "num_workers": num_workers}
    for name, value in sizes.items():
        if value < 1:
            raise FlawmapError(f"{name} must be at least 1, got {value}")
    return _generate(as_samples(samples), image_size, batch_size, num_workers, load_masks, skip_invalid, progress, _stack)


def iter_images(
    samples: Sequence[Sample | np.ndarray],
    num_workers: int = 2,
    load_masks: bool = False,
    skip_invalid: bool = False,
    progress: str | None = None,
) -> Iterator[DecodedImage]:
    """Decode ``samples`` at their own size (no resize), one at a time, in order: what tiled
    models (:mod:`flawmap.tiling`) cut. Arguments and errors as for :func:`iter_batches`."""
    if num_workers < 1:
        raise FlawmapError(f"num_workers must be at least 1, got {num_workers}")
    return _generate(as_samples(samples), None, 1, num_workers, load_masks, skip_invalid, progress, lambda decoded: decoded[0])


def _generate(
    items: list[Sample],
    image_size: int | None,
    batch_size: int,
    num_workers: int,
    load_masks: bool,
    skip_invalid: bool,
    progress: str | None,
    combine: Callable[[list[DecodedImage]], _Combined],
) -> Iterator[_Combined]:
    """The generator behind :func:`iter_batches` and :func:`iter_images`, once their arguments
    are checked: groups of ``batch_size`` decoded samples, each passed through ``combine``."""
    bar = tqdm(
        total=len(items), desc=progress, disable=progress is None, mininterval=0.5, leave=False,
        file=sys.stderr, unit="img",
    )
    executor = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="flawmap-decode")
    pending: deque[tuple[Sample, Future[DecodedImage]]] = deque()
    decoded: list[DecodedImage] = []
    try:
        for sample in items:
            pending.append((sample, executor.submit(_decode, sample, image_size, load_masks)))
            if len(pending) > _BATCHES_AHEAD * batch_size:
                yield from _collect(pending.popleft(), decoded, batch_size, skip_invalid, bar, combine)
        while pending:
            yield from _collect(pending.popleft(), decoded, batch_size, skip_invalid, bar, combine)
        if decoded:
            yield combine(decoded)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        bar.close()


def as_samples(items: Sequence[Sample | np.ndarray | Image.Image]) -> list[Sample]:
    """``items`` as samples: arrays and PIL images become in-memory samples named by their place
    in ``items`` (:func:`~flawmap.data.datasets.in_memory`); samples stay as they are."""
    return [_as_sample(item, index) for index, item in enumerate(items)]


def _as_sample(item: Sample | np.ndarray | Image.Image, index: int) -> Sample:
    if isinstance(item, Sample):
        return item
    if isinstance(item, Image.Image):
        item = pil_to_array(item)
    if isinstance(item, np.ndarray):
        return in_memory(item, index)
    raise FlawmapError(f"samples[{index}] is a {type(item).__name__}, expected a Sample, a numpy array or a PIL image")


def pil_to_array(image: Image.Image) -> np.ndarray:
    """A PIL image as a uint8 ``H x W x 3`` array, upright by its EXIF orientation."""
    return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def _collect(
    entry: tuple[Sample, Future[DecodedImage]],
    decoded: list[DecodedImage],
    batch_size: int,
    skip_invalid: bool,
    bar: tqdm,
    combine: Callable[[list[DecodedImage]], _Combined],
) -> Iterator[_Combined]:
    """Append one finished decode to ``decoded``; yield it combined and empty it once it holds a batch."""
    sample, future = entry
    bar.update(1)
    try:
        decoded.append(future.result())
    except FlawmapError as error:
        if not skip_invalid:
            raise
        reason = str(error) if sample.source in str(error) else f"{sample.source}: {error}"
        warnings.warn(f"skipping {reason}", InvalidImageWarning, stacklevel=3)
        return
    if len(decoded) == batch_size:
        yield combine(decoded)
        decoded.clear()


def check_image_side(original_hw: tuple[int, int], image_size: int | None, name: str) -> None:
    """FlawmapError naming ``name`` when an image of ``original_hw`` is smaller than the patch grid of
    a model resizing to ``image_size`` (None: images kept at their size, any size will do)."""
    min_side = 1 if image_size is None else max(1, image_size // PATCH_STRIDE)
    if min(original_hw) < min_side:
        height, width = original_hw
        raise FlawmapError(
            f"{name}: image is {width}x{height}, smaller than the model's {min_side}x{min_side} patch grid "
            f"(at least {min_side} pixels a side are needed)"
        )


def _decode(sample: Sample, image_size: int | None, load_masks: bool) -> DecodedImage:
    """Read (or take, when in memory) one image, resize it to ``image_size`` squared (None: keep
    its size) and read its mask if asked."""
    if sample.pixels is None:
        image = open_rgb_image(sample.image_path)
    else:
        image = Image.fromarray(_array_to_rgb(sample.pixels, sample.source))
    original_hw = (image.height, image.width)
    check_image_side(original_hw, image_size, sample.source)
    if image_size is not None:
        image = image.resize((image_size, image_size), Image.BILINEAR, reducing_gap=None)
    mask = _read_sample_mask(sample, original_hw) if load_masks else None
    return DecodedImage(sample=sample, pixels=np.asarray(image), original_hw=original_hw, mask=mask)


def _array_to_rgb(array: np.ndarray, name: str) -> np.ndarray:
    """An in-memory ``uint8`` ``H x W``, ``H x W x 3`` or ``H x W x 4`` image as ``H x W x 3``."""
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise FlawmapError(
            f"{name}: expected a uint8 array of shape H x W, H x W x 3 or H x W x 4, "
            f"got {array.dtype} of shape {array.shape}"
        )
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    return np.ascontiguousarray(array[:, :, :3])


def _read_sample_mask(sample: Sample, original_hw: tuple[int, int]) -> np.ndarray | None:
    """The sample's mask at ``original_hw``: read from file, all-False if normal, else None."""
    if sample.mask_path is not None:
        return read_mask(sample.mask_path, original_hw, threshold=sample.mask_threshold)
    if not sample.is_anomalous:
        return np.zeros(original_hw, dtype=bool)
    return None


def _stack(decoded: list[DecodedImage]) -> Batch:
    """One :class:`Batch` from decoded samples: ``uint8 B x S x S x 3`` to ``float B x 3 x S x S``."""
    return Batch(
        images=to_float_images(np.stack([item.pixels for item in decoded])),
        samples=[item.sample for item in decoded],
        original_hw=[item.original_hw for item in decoded],
        masks=[item.mask for item in decoded],
    )


def to_float_images(pixels: np.ndarray) -> np.ndarray:
    """``uint8 B x H x W x 3`` to C-contiguous ``float32 B x 3 x H x W`` in [0, 1]."""
    images = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype=np.float32)
    images /= np.float32(255.0)
    return images
