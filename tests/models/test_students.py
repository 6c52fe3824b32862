"""Tests for flawmap.models.students: the students' grid, training, the standardised scores,
a synthetic defect, resuming from a checkpoint (save/load and the estimator contract:
tests/models/test_contract.py)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from flawmap.data import open_dataset, read_image
from flawmap.errors import FlawmapError
from flawmap.models import UninformedStudents
from flawmap.models.students import receptive_field, student_network
from flawmap.training import cache_batches

TINY = {"image_size": 64, "n_students": 2, "student_width": 8, "student_depth": 1, "train_batch_size": 4}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: threads only add synchronisation


@pytest.fixture(scope="module")
def train_images(tiny_dataset) -> list[np.ndarray]:
    return [read_image(sample.image_path) for sample in open_dataset(tiny_dataset).train]


@pytest.fixture(scope="module")
def trained(train_images) -> UninformedStudents:
    """Students trained long enough to tell a defect from normal brick texture (64 px)."""
    params = {**TINY, "epochs": 8, "train_batch_size": 2, "learning_rate": 1e-2}
    return UninformedStudents(**params).set_runtime(batch_size=4, num_workers=1).fit(train_images)


@pytest.mark.parametrize("size", [64, 72, 256])
@pytest.mark.parametrize("stride", [2, 4, 8, 16, 32])
def test_student_grid_is_the_backbones(size, stride):
    """A student's output grid is ceil(S / stride), as the backbone's tapped stages are."""
    network = student_network(5, stride, width=4, depth=1)
    with torch.no_grad():
        out = network(torch.zeros(1, 3, size, size))
    assert tuple(out.shape) == (1, 5, -(-size // stride), -(-size // stride))


def test_receptive_field_grows_with_stride_and_depth():
    assert receptive_field(student_network(5, 8, width=4, depth=1)) == 36
    assert receptive_field(student_network(5, 16, width=4, depth=1)) == 84
    assert receptive_field(student_network(5, 8, width=4, depth=2)) > 36


def test_non_power_of_two_stride_is_a_clear_error():
    with pytest.raises(FlawmapError, match="power-of-two"):
        student_network(5, 12, width=4, depth=1)


def test_fewer_than_two_students_are_rejected(train_images):
    with pytest.raises(FlawmapError, match="n_students must be at least 2"):
        UninformedStudents(**{**TINY, "n_students": 1}).fit(train_images)


def test_students_start_different_and_the_loss_falls(trained):
    first, second = trained.scorer_.ensembles[0].students
    assert not torch.equal(first[0].weight, second[0].weight)
    losses = trained.train_losses_
    assert len(losses) == 8 and losses[-1] < 0.85 * losses[0]
    assert sum(later < earlier for earlier, later in zip(losses, losses[1:])) >= 6


def test_score_statistics_standardise_the_data_they_were_measured_on(trained, train_images):
    """Step 5: measured in batches with a remainder (5 + 5 + 2 images), each scale's error and
    uncertainty have mean 0 and std 1 after standardisation on those images."""
    scorer = copy.deepcopy(trained.scorer_)
    images = torch.stack([torch.from_numpy(image[:64, :64]).permute(2, 0, 1) for image in train_images]).float() / 255.0
    with torch.inference_mode():
        inputs = scorer.embed(images)
    cached = cache_batches([[inputs.images, *inputs.teacher]])
    scorer.set_score_statistics(cached, batch_size=5)
    with torch.inference_mode():
        pixels = scorer.student_input(cached[0])
        for ensemble, descriptors in zip(scorer.ensembles, cached[1:]):
            error, uncertainty = ensemble.error_and_uncertainty(ensemble(pixels), descriptors.float())
            for values, mean, std in zip((error, uncertainty), ensemble.score_mean, ensemble.score_std):
                standardised = (values.double() - mean) / std
                assert standardised.mean().item() == pytest.approx(0.0, abs=1e-4)
                assert standardised.std(unbiased=False).item() == pytest.approx(1.0, rel=1e-4)


def test_a_synthetic_defect_scores_higher_than_its_clean_image(trained, train_images):
    clean = train_images[0]
    defect = clean.copy()
    size = clean.shape[0]
    top, left, side = size // 3, size // 2, size // 5
    defect[top : top + side, left : left + side] = (255, 0, 255)
    clean_result, defect_result = trained.predict([clean, defect])
    assert defect_result.score > clean_result.score + 1.0
    row, col = np.unravel_index(np.argmax(defect_result.anomaly_map), defect_result.anomaly_map.shape)
    margin = side // 2
    assert top - margin <= row < top + side + margin and left - margin <= col < left + side + margin


def test_resuming_a_checkpoint_gives_the_uninterrupted_fit(train_images, tmp_path):
    images = train_images[:4]
    straight = UninformedStudents(**TINY, epochs=2).set_runtime(batch_size=4, num_workers=1).fit(images)
    resumed = UninformedStudents(**TINY, epochs=1, checkpoint_dir=str(tmp_path)).set_runtime(batch_size=4, num_workers=1)
    resumed.fit(images)
    resumed.epochs = 2
    resumed.fit(images)
    assert resumed.train_losses_ == pytest.approx(straight.train_losses_, rel=1e-5)
    for (name, tensor), other in zip(straight.scorer_.ensembles.state_dict().items(), resumed.scorer_.ensembles.state_dict().values()):
        torch.testing.assert_close(tensor, other, rtol=1e-4, atol=1e-6, msg=name)


def test_partial_fit_continues_training(trained, train_images):
    model = copy.deepcopy(trained)
    model.epochs = 1
    before = model.scorer_.ensembles[0].students[0][0].weight.clone()
    model.partial_fit(train_images[:4])
    assert len(model.train_losses_) == len(trained.train_losses_) + 1
    assert not torch.equal(before, model.scorer_.ensembles[0].students[0][0].weight)
