"""Tests for flawmap.models.students: the patch networks (receptive fields, dense evaluation
equal to patch-by-patch evaluation), the packaged teachers and the script that trains them, the
patch-teacher students (training, validation split, a synthetic defect), the backbone-teacher
variant (the students' grid, training, the standardised scores, a synthetic defect, resuming from
a checkpoint), older model directories (save/load and the estimator contract:
tests/models/test_contract.py)."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_dilation

from flawmap.data import open_dataset, read_image
from flawmap.errors import FlawmapError
from flawmap.models import AnomalyModel, UninformedStudents
from flawmap.models.students import (
    PATCH_SIZES, TEACHER_FILE, PatchNetwork, combine_terms, load_teachers, receptive_field, student_network,
)
from flawmap.models.students import StudentInputs
from flawmap.training import cache_batches, seeded_init

TINY = {"teacher": "backbone", "image_size": 64, "n_students": 2, "student_width": 8, "student_depth": 1, "train_batch_size": 4}
TINY_PATCH = {"teacher": "patch", "image_size": 64, "n_students": 2, "patch_sizes": (17, 33), "train_batch_size": 4}
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train_students_teacher.py"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: threads only add synchronisation


@pytest.fixture(scope="module")
def train_images(tiny_dataset) -> list[np.ndarray]:
    return [read_image(sample.image_path) for sample in open_dataset(tiny_dataset).train]


@pytest.fixture(scope="module")
def patch_trained(train_images) -> UninformedStudents:
    """Patch-teacher students trained briefly on brick texture (64 px, patch sizes 17 and 33)."""
    params = {**TINY_PATCH, "epochs": 6, "learning_rate": 5e-3}
    return UninformedStudents(**params).set_runtime(batch_size=4, num_workers=1).fit(train_images)


@pytest.fixture(scope="module")
def trained(train_images) -> UninformedStudents:
    """Students trained long enough to tell a defect from normal brick texture (64 px)."""
    params = {**TINY, "epochs": 8, "train_batch_size": 2, "learning_rate": 1e-2}
    return UninformedStudents(**params).set_runtime(batch_size=4, num_workers=1).fit(train_images)


@pytest.mark.parametrize("patch_size", PATCH_SIZES)
def test_patch_networks_see_exactly_their_patch(patch_size):
    network = PatchNetwork(patch_size, width=4, descriptor_dim=8)
    assert receptive_field(network.layers) == patch_size
    with torch.no_grad():
        assert network(torch.zeros(1, 3, patch_size, patch_size)).shape == (1, 8, 1, 1)


@pytest.mark.parametrize("patch_size", PATCH_SIZES)
def test_dense_evaluation_equals_the_network_on_every_patch(patch_size):
    """Fast dense evaluation (dilated layers, stride-1 pools) gives, at every pixel, the patch
    network's descriptor of the reflect-padded image's patch there; a larger window gives the
    dense map at the network's stride."""
    generator = torch.Generator().manual_seed(patch_size)
    with seeded_init(patch_size):
        network = PatchNetwork(patch_size, width=4, descriptor_dim=8).eval()
    image = torch.randn(2, 3, 37, 37, generator=generator)
    before = patch_size // 2
    padded = torch.nn.functional.pad(image, (before, patch_size - 1 - before) * 2, mode="reflect")
    with torch.no_grad():
        dense = network.dense(image)
        assert dense.shape == (2, 8, 37, 37)
        patches = [padded[:, :, row : row + patch_size, col : col + patch_size] for row in range(0, 37, 3) for col in range(0, 37, 4)]
        patches = torch.stack(patches, dim=1)
        one_by_one = network(patches.flatten(0, 1)).view(2, -1, 8)
        expected = dense[:, :, ::3, ::4].flatten(2).transpose(1, 2)
        torch.testing.assert_close(one_by_one, expected, rtol=1e-5, atol=1e-5)
        window = padded[:, :, : patch_size + 2 * network.stride, : patch_size + 2 * network.stride]
        torch.testing.assert_close(network(window), dense[:, :, : 3 * network.stride : network.stride, : 3 * network.stride : network.stride], rtol=1e-5, atol=1e-5)


def test_the_packaged_teachers_are_small_and_frozen():
    import flawmap

    path = Path(flawmap.__file__).parent / TEACHER_FILE
    assert path.stat().st_size < 2_000_000
    teachers = load_teachers(PATCH_SIZES)
    assert [teacher.patch_size for teacher in teachers] == list(PATCH_SIZES)
    assert not any(parameter.requires_grad for teacher in teachers for parameter in teacher.parameters())
    with torch.no_grad():  # trained: descriptors of different patches differ
        descriptors = teachers[0](torch.randn(4, 3, 17, 17, generator=torch.Generator().manual_seed(0))).flatten(1)
    assert descriptors.std(dim=0).mean() > 1e-3


def test_a_short_teacher_training_is_deterministic():
    """The teacher script gives the same weights twice from the same seed (a tiny run: few
    patches, one epoch, the triplet loss on), and other weights from another seed."""
    spec = importlib.util.spec_from_file_location("train_students_teacher", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    tiny = ["--patch-sizes", "17", "--width", "2", "--descriptor-dim", "4", "--patches", "48", "--epochs", "1", "--batch-size", "16", "--triplet-weight", "1"]
    first, second = (script.teacher_tensors(script.parse_args(tiny)) for _ in range(2))
    other = script.teacher_tensors(script.parse_args([*tiny, "--seed", "1"]))
    assert first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)
    assert not torch.equal(first["p17.layers.0.weight"], other["p17.layers.0.weight"])


def test_patch_students_learn_the_teacher_and_spot_a_defect(patch_trained, train_images):
    ensembles = patch_trained.scorer_.ensembles
    assert [ensemble.teacher.patch_size for ensemble in ensembles] == [17, 33]
    assert not torch.equal(ensembles[0].students[0].layers[0].weight, ensembles[0].students[1].layers[0].weight)
    losses = patch_trained.train_losses_
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0]
    clean = train_images[0]
    defect = clean.copy()
    top, left, side = 20, 30, 12
    defect[top : top + side, left : left + side] = (255, 0, 255)
    clean_result, defect_result = patch_trained.predict([clean, defect])
    assert defect_result.score > clean_result.score + 1.0
    scale = clean.shape[0] / 64  # the map on the defect is above 90% of the map away from it
    inside = np.zeros(defect_result.anomaly_map.shape, dtype=bool)
    inside[round(top * scale) : round((top + side) * scale), round(left * scale) : round((left + side) * scale)] = True
    away = ~binary_dilation(inside, iterations=round(side * scale))
    assert defect_result.anomaly_map[inside].mean() > np.quantile(defect_result.anomaly_map[away], 0.9)


def test_the_validation_images_are_not_the_training_images():
    model = UninformedStudents(validation_fraction=0.25, random_state=3)
    model.n_fits_ = 0
    training, validation = model._validation_split(10)
    assert len(validation) == 2 and set(training.tolist()).isdisjoint(validation.tolist())
    assert sorted([*training.tolist(), *validation.tolist()]) == list(range(10))
    model.validation_fraction = 0.0
    training, validation = model._validation_split(10)
    assert training.tolist() == list(range(10)) and len(validation) == 0


def test_score_terms_choose_eq_6_or_one_term():
    error, uncertainty = torch.rand(2, 3, 3), torch.rand(2, 3, 3)
    assert torch.equal(combine_terms(error, uncertainty, "error+uncertainty"), error + uncertainty)
    assert torch.equal(combine_terms(error, uncertainty, "error"), error)
    assert torch.equal(combine_terms(error, uncertainty, "uncertainty"), uncertainty)


@pytest.mark.parametrize(
    "params, message",
    [({"teacher": "resnet"}, "teacher must be one of"), ({"patch_sizes": (17, 20)}, "patch_sizes"),
     ({"score_terms": "sum"}, "score_terms"), ({"validation_fraction": 1.0}, "validation_fraction")],
)
def test_bad_hyper_parameters_are_clear_errors(params, message, train_images):
    with pytest.raises(FlawmapError, match=message):
        UninformedStudents(**{**TINY_PATCH, **params}).fit(train_images)


def test_older_students_directories_load_with_the_backbone_teacher(trained, tiny_dataset, tmp_path):
    """A model saved before the patch teacher (format 6, no teacher / patch_sizes /
    validation_fraction / score_terms) loads as it was fitted: backbone teacher, statistics of
    the training images."""
    former = copy.deepcopy(trained)
    former.validation_fraction = 0.0
    target = former.save(tmp_path / "students")
    config = json.loads((target / "config.json").read_text())
    for name in ("teacher", "patch_sizes", "validation_fraction", "score_terms"):
        del config["params"][name]
    config["format_version"] = 6
    (target / "config.json").write_text(json.dumps(config))
    loaded = AnomalyModel.load(target)
    assert (loaded.teacher, loaded.validation_fraction) == ("backbone", 0.0)
    image = sorted(tiny_dataset.glob("test/*/*.png"))[0]
    assert loaded.predict(image)[0].score == pytest.approx(former.predict(image)[0].score, rel=1e-5)


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
    """(Either teacher: the backbone one here.)"""
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
    batches = [StudentInputs(cached[0][start : start + 5], [level[start : start + 5] for level in cached[1:]]) for start in range(0, 12, 5)]
    scorer.set_score_statistics(batches)
    with torch.inference_mode():  # the same batches: convolutions round differently with the batch size
        terms = [scorer.scale_terms(batch) for batch in batches]
    for scale, ensemble in enumerate(scorer.ensembles):
        for term, mean, std in zip(range(2), ensemble.score_mean, ensemble.score_std):
            standardised = (torch.cat([batch_terms[scale][term] for batch_terms in terms]).double() - mean) / std
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
    model.partial_fit([np.ascontiguousarray(image[:, ::-1]) for image in train_images[:4]])  # new images: mirrored
    assert len(model.train_losses_) == len(trained.train_losses_) + 1
    assert not torch.equal(before, model.scorer_.ensembles[0].students[0][0].weight)


def test_patch_sizes_parse_as_integers_on_the_command_line():
    from flawmap.cli import _method_params

    assert _method_params(["students.patch_sizes=17, 65"]) == {"students": {"patch_sizes": (17, 65)}}
