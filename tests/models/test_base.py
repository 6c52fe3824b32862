"""The shared fitting machinery of flawmap.models.base: what the learning pass keeps for cross-fitting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from flawmap.data import Batch, Sample
from flawmap.models import base

N_IMAGES, BATCH, SCORED = 20, 4, 6


def _batch(samples: list[Sample], first: int) -> Batch:
    """A batch of 8 x 8 images whose pixels are all ``(first + i) / 64`` for its i-th image."""
    values = (first + np.arange(len(samples), dtype=np.float32)) / 64
    images = np.broadcast_to(values[:, None, None, None], (len(samples), 3, 8, 8)).copy()
    return Batch(images=images, samples=samples, original_hw=[(8, 8)] * len(samples), masks=[None] * len(samples))


def _features(first: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of two tensors (B x 2 x 3 x 3 and B x 5) filled with each image's index."""
    index = torch.arange(first, first + n, dtype=torch.float32)
    return index.view(n, 1, 1, 1).expand(n, 2, 3, 3).clone(), index.view(n, 1).expand(n, 5).clone()


def _learning_pass(first_number: int = 100) -> base._EmbeddedTraining:
    samples = [Sample(image_path=Path(f"/bottles/{i:02d}.png")) for i in range(N_IMAGES)]
    training = base._EmbeddedTraining(first_number, samples, seed=0, cross_fit=True)
    buffers = None
    for start in range(0, N_IMAGES, BATCH):
        training.add(_batch(samples[start : start + BATCH], start), _features(start, BATCH))
        if training.features is not None:
            pointers = [tensor.data_ptr() for tensor in base._tensors(training.features)]
            assert buffers in (None, pointers), "the kept features moved to new memory"
            buffers = pointers
    return training


def test_kept_features_fill_buffers_sized_once_for_every_sampled_image(monkeypatch):
    """Past CROSS_FIT_MAX_IMAGES, the sampled images' features are copied into one buffer per
    feature tensor, allocated at the first batch for all of them (a slice kept per batch between
    each batch's large temporaries fragmented the C heap: a PaDiM fit's memory grew with its
    number of images), and come back ``batch_size`` at a time with their image numbers."""
    monkeypatch.setattr(base, "CROSS_FIT_MAX_IMAGES", SCORED)
    training = _learning_pass()
    assert training.n_kept == training.capacity == SCORED
    assert [tensor.shape[0] for tensor in base._tensors(training.features)] == [SCORED, SCORED]
    kept = list(training.kept_batches(batch_size=4))
    assert [len(image_ids) for image_ids, _, _ in kept] == [4, 2]
    image_ids = torch.cat([image_ids for image_ids, _, _ in kept])
    positions = image_ids - 100  # image number - first number = position in the fit
    assert positions.tolist() == sorted(positions.tolist()) and len(set(positions.tolist())) == SCORED
    expected = {f"/bottles/{i:02d}.png" for i in positions.tolist()}
    assert expected == training.scored
    for image_ids, (grids, vectors), images in kept:
        assert torch.equal(grids[:, 0, 0, 0], (image_ids - 100).float())
        assert torch.equal(vectors[:, 4], (image_ids - 100).float())
        np.testing.assert_array_equal(images[:, 0, 0, 0], np.rint((image_ids - 100).numpy() / 64 * 255))


def test_no_features_are_kept_when_all_of_them_would_not_fit(monkeypatch):
    """Beyond CROSS_FIT_CACHE_BYTES for all sampled images the cross-fitting pass embeds them again."""
    monkeypatch.setattr(base, "CROSS_FIT_MAX_IMAGES", SCORED)
    row_bytes = (2 * 3 * 3 + 5) * 4
    monkeypatch.setattr(base, "CROSS_FIT_CACHE_BYTES", SCORED * row_bytes - 1)
    training = _learning_pass()
    assert training.features is None and training.count == N_IMAGES
    assert sorted(training.numbers.values()) == list(range(100, 100 + N_IMAGES))

