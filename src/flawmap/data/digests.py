"""Naming images by their content: a digest that is the same for the same bytes wherever they lie.

A model keeps the digests of the images it was fitted on, so that ``calibrate`` can recognise
its training images (whose scores are in-sample, too low) under any name or folder, and ``fit``
can count an image given twice (the same folder twice, or a copy) once: cross-fitting leaves
one image out at a time, and a twin left in the model scores it as perfectly normal.

The digest of a file is that of its bytes (the encoded file: a re-encoded copy of an image is
a different image here); of an array, that of its shape, dtype and pixels.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np

from flawmap.data.datasets import Sample

#: Hex digits kept of each sha256 (64 bits: no collision among billions of images).
DIGEST_CHARS = 16
#: Duplicates named in one message, at most.
NAMED_DUPLICATES = 5


class DuplicateImageWarning(UserWarning):
    """Some images were given more than once (same content); each is counted once."""


def content_digest(item: Sample) -> str:
    """The content digest (hex) of an image file, or of an in-memory image's pixels; an
    unreadable file gets a digest of its path (it is reported as unreadable where it is decoded)."""
    digest = hashlib.sha256()
    if item.pixels is not None:
        digest.update(f"{item.pixels.shape} {item.pixels.dtype}\0".encode())
        digest.update(np.ascontiguousarray(item.pixels).tobytes())
    else:
        try:
            with open(item.image_path, "rb") as stream:
                for block in iter(lambda: stream.read(1 << 20), b""):
                    digest.update(block)
        except OSError:
            digest.update(f"unreadable\0{Path(item.image_path).resolve()}".encode())
    return digest.hexdigest()[:DIGEST_CHARS]


def distinct_images(items: Sequence[Sample], known: set[str] = frozenset()) -> tuple[list[Sample], list[str], list[str]]:
    """The first of each content among ``items`` that is not in ``known``.

    Returns the kept items, their digests (in the same order) and, for each dropped item, a
    ``"name (same as other)"`` description (``"name (already learned)"`` for a digest in ``known``).
    """
    kept, digests, dropped = [], [], []
    first_of: dict[str, Sample] = {}
    for item in items:
        digest = content_digest(item)
        if digest in known:
            dropped.append(f"{item.source} (already learned)")
        elif digest in first_of:
            dropped.append(f"{item.source} (same as {first_of[digest].source})")
        else:
            first_of[digest] = item
            kept.append(item)
            digests.append(digest)
    return kept, digests, dropped


def name_some(names: Sequence[str]) -> str:
    """The first :data:`NAMED_DUPLICATES` of ``names``, comma-separated, with how many more."""
    shown = ", ".join(names[:NAMED_DUPLICATES])
    return shown + (f" and {len(names) - NAMED_DUPLICATES} more" if len(names) > NAMED_DUPLICATES else "")
