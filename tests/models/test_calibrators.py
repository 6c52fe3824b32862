"""The calibration strategies of flawmap.models.calibrators: what the learning pass keeps for cross-fitting,
and how in-memory images are told apart."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from flawmap.data import Batch, Sample
from flawmap.models import calibrators
from flawmap.prediction import training_samples

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


def _learning_pass(first_number: int = 100) -> calibrators.CrossFit:
    samples = [Sample(image_path=Path(f"/bottles/{i:02d}.png")) for i in range(N_IMAGES)]
    model = SimpleNamespace(n_train_images_=first_number, random_state=0)
    training = calibrators.CrossFit(model, first=False, skip_invalid=False)
    assert training.split(samples) == samples  # cross-fitting holds nothing out
    buffers = None
    for start in range(0, N_IMAGES, BATCH):
        training.observe(_batch(samples[start : start + BATCH], start), _features(start, BATCH))
        if training.features is not None:
            pointers = [tensor.data_ptr() for tensor in calibrators.tensors_in(training.features)]
            assert buffers in (None, pointers), "the kept features moved to new memory"
            buffers = pointers
    return training


def test_kept_features_fill_buffers_sized_once_for_every_sampled_image(monkeypatch):
    """Past CROSS_FIT_MAX_IMAGES, the sampled images' features are copied into one buffer per
    feature tensor, allocated at the first batch for all of them (a slice kept per batch between
    each batch's large temporaries fragmented the C heap: a PaDiM fit's memory grew with its
    number of images), and come back ``batch_size`` at a time with their image numbers."""
    monkeypatch.setattr(calibrators, "CROSS_FIT_MAX_IMAGES", SCORED)
    training = _learning_pass()
    assert training.n_kept == training.capacity == SCORED
    assert [tensor.shape[0] for tensor in calibrators.tensors_in(training.features)] == [SCORED, SCORED]
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
    monkeypatch.setattr(calibrators, "CROSS_FIT_MAX_IMAGES", SCORED)
    row_bytes = (2 * 3 * 3 + 5) * 4
    monkeypatch.setattr(calibrators, "CROSS_FIT_CACHE_BYTES", SCORED * row_bytes - 1)
    training = _learning_pass()
    assert training.features is None and training.n_embedded == N_IMAGES
    assert sorted(training.numbers.values()) == list(range(100, 100 + N_IMAGES))


def test_in_memory_images_are_named_by_their_place_among_all_training_images():
    """Nested inputs of arrays: each in-memory image has its own source (the cross-fitting pass
    finds its training number by it), whatever group it came in, and files keep their path."""
    black, grey = np.zeros((8, 8, 3), dtype=np.uint8), np.full((8, 8, 3), 128, dtype=np.uint8)
    samples = training_samples([[black, grey], [grey.copy()], Sample(image_path=Path("/bottles/00.png"))])
    assert [sample.source for sample in samples] == ["array 0", "array 1", "array 2", "/bottles/00.png"]
    assert samples[1].pixels is grey and samples[3].pixels is None


def test_hold_out_is_the_same_whether_images_come_in_one_fit_or_in_several():
    """The held-out images are chosen by a seeded hash of each image's identity."""
    samples = [Sample(image_path=Path(f"/bottles/{i:02d}.png")) for i in range(40)]
    model = SimpleNamespace(random_state=3, calibration_fraction=0.25)
    order, n_held = calibrators.held_out_order(samples, model, first=True)
    held = {samples[i].source for i in order[:n_held]}
    halves = [calibrators.held_out_order(part, model, first=False) for part in (samples[:20], samples[20:])]
    held_in_parts = {part[i].source for part, (o, n) in zip((samples[:20], samples[20:]), halves) for i in o[:n]}
    assert held == held_in_parts and 0 < n_held < 40
