"""The estimator contract, checked for every registered method (a new method gets these by registering).

Each method is fitted once per module at 64 px with its ``quick_params`` on the tiny demo category.
"""

import json
import pickle

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp

from conftest import assert_same_predictions
from flawmap.data import open_dataset
from flawmap.errors import FlawmapError
from flawmap.models import METHODS, AnomalyModel, PatchCore, PatchScores, Scorer, create_model, load_model
from flawmap.models.base import MethodTraits

ALL_METHODS = METHODS.names()


def quick_model(method: str, **params) -> AnomalyModel:
    return create_model(method, **METHODS.get(method).quick_params, **params).set_runtime(batch_size=4, num_workers=1)


def n_held_out(model: AnomalyModel) -> int:
    """Normal images the model did not learn from (cross-fitted methods hold none out)."""
    return 0 if model.traits.cross_fits else model.calibration_images_.shape[0]


@pytest.fixture(scope="module")
def fitted(tiny_dataset):
    """method -> a model fitted on the tiny category (fitted lazily, once per method)."""
    cache = {}

    def get(method: str) -> AnomalyModel:
        if method not in cache:
            cache[method] = quick_model(method).fit(tiny_dataset)
        return cache[method]

    return get


@pytest.fixture(scope="module")
def test_images(tiny_dataset):
    return sorted((tiny_dataset / "test").glob("*/*.png"))[:5]


@pytest.mark.parametrize("method", ALL_METHODS)
def test_quick_params_are_hyper_parameters(method):
    model = quick_model(method)
    assert set(METHODS.get(method).quick_params) <= set(model.get_params())
    assert model.get_params()["image_size"] == 64


@pytest.mark.parametrize("method", ALL_METHODS)
def test_fit_returns_self_and_sets_fitted_state(method, tiny_dataset):
    model = quick_model(method)
    assert not model.is_fitted()
    assert model.fit(tiny_dataset) is model
    assert model.is_fitted() and isinstance(model.scorer_, Scorer)
    assert model.n_fits_ == 1 and model.n_train_images_ + n_held_out(model) == 12
    assert len(model.calibration_scores_) == (12 if model.traits.cross_fits else n_held_out(model))
    assert model.calibration_.n_scores == len(model.calibration_scores_) and model.calibration_.threshold == model.threshold_


@pytest.mark.parametrize("method", ALL_METHODS)
def test_predict_and_save_before_fit_are_clear_errors(method, tmp_path):
    model = quick_model(method)
    with pytest.raises(FlawmapError, match="not fitted"):
        model.predict(np.zeros((64, 64, 3), dtype=np.uint8))
    with pytest.raises(FlawmapError, match="not fitted"):
        model.save(tmp_path / "m")


@pytest.mark.parametrize("method", ALL_METHODS)
def test_scores_are_pure(method, fitted, test_images):
    """One image's result depends only on the fitted state and that image, not on its batch mates."""
    model = fitted(method)
    together = model.predict(test_images)
    alone = [model.predict(path)[0] for path in test_images]
    for batched, single in zip(together, alone):
        assert batched.score == pytest.approx(single.score, rel=1e-4, abs=1e-6)
        np.testing.assert_allclose(batched.anomaly_map, single.anomaly_map, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_scorer_is_the_one_inference_path(method, fitted):
    """predict's scores come from the scorer module alone, plus the shared postprocessing."""
    model = fitted(method)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        scored = model.scorer_(images)
    assert isinstance(scored, PatchScores)
    n_images, height, width = scored.patch_scores.shape  # a square grid, at most one score per pixel
    assert n_images == 2 and height == width and 64 % height == 0 and torch.isfinite(scored.patch_scores).all()
    image_scores, maps = model.score_images(images.numpy())
    assert image_scores.dtype == maps.dtype == np.float32 and maps.shape == (2, 64, 64)
    expected = maps.max(axis=(1, 2)) if scored.image_scores is None else scored.image_scores.float().numpy()
    np.testing.assert_allclose(image_scores, expected, rtol=1e-6)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_save_load_round_trip(method, fitted, test_images, tmp_path):
    model = fitted(method)
    loaded = load_model(model.save(tmp_path / "model"), batch_size=4, num_workers=1)
    assert type(loaded) is type(model) and loaded.get_params() == model.get_params()
    assert loaded.threshold_ == model.threshold_
    assert_same_predictions(model, loaded, test_images, rel=1e-6)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_loading_never_unpickles(method, fitted, tmp_path, monkeypatch):
    target = fitted(method).save(tmp_path / "model")

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while loading a model")

    for name in ("loads", "load", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    load_model(target)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_model_from_another_device_loads_here(method, fitted, test_images, tmp_path):
    model = fitted(method)
    target = model.save(tmp_path / "model")
    config = json.loads((target / "config.json").read_text())
    config["saved_with"]["device"] = "cuda:0"
    (target / "config.json").write_text(json.dumps(config))
    loaded = load_model(target, device="cpu", batch_size=4, num_workers=1)
    assert all(buffer.device.type == "cpu" for buffer in loaded.scorer_.buffers())
    assert_same_predictions(model, loaded, test_images, rel=1e-6)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_bad_parameters_are_rejected_clearly(method, tiny_dataset):
    with pytest.raises(FlawmapError, match="image_size"):
        create_model(method, image_size=60).fit(tiny_dataset)
    with pytest.raises(FlawmapError, match="calibration_fraction"):
        create_model(method, calibration_fraction=0.0).fit(tiny_dataset)
    with pytest.raises(FlawmapError, match="no hyper-parameter 'colour'.*image_size"):
        create_model(method, colour="red")
    with pytest.raises(FlawmapError, match="precision"):
        create_model(method).set_runtime(precision="float16")


@pytest.mark.parametrize("method", ALL_METHODS)
def test_partial_fit_as_declared(method, fitted, tiny_dataset, test_images, tmp_path):
    model = fitted(method)
    if model.traits.partial_fit == "none":
        with pytest.raises(FlawmapError, match="cannot learn from more images"):
            model.partial_fit(tiny_dataset)
        return
    train = list(open_dataset(tiny_dataset).train)
    updated = quick_model(method).fit(train[:6])
    assert updated.partial_fit(train[6:]) is updated
    assert updated.n_fits_ == 2
    assert updated.n_train_images_ + n_held_out(updated) == 12
    assert len(updated.calibration_scores_) == (12 if updated.traits.cross_fits else n_held_out(updated))
    assert all(np.isfinite(prediction.score) for prediction in updated.predict(test_images))
    reloaded = load_model(updated.save(tmp_path / "updated"), batch_size=4, num_workers=1)
    assert_same_predictions(updated, reloaded, test_images, rel=1e-6)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_traits_match_what_the_method_does(method, fitted):
    """Each method declares its traits, and they are true of its fitted model: it trains
    networks exactly when it says so, and calibrates as declared."""
    traits = METHODS.get(method).traits
    assert isinstance(traits, MethodTraits)
    model = fitted(method)
    trained_parameters = sum(p.numel() for p in model.scorer_.parameters() if p.requires_grad)
    assert (trained_parameters > 0) == traits.trains_on_fit_images
    assert (not model._calibrator_class().holds_out) == traits.cross_fits


def test_a_method_that_trains_on_its_fit_images_cannot_cross_fit():
    with pytest.raises(FlawmapError, match="cannot cross-fit"):
        MethodTraits(cross_fits=True, trains_on_fit_images=True)
    with pytest.raises(FlawmapError, match="partial_fit must be one of"):
        MethodTraits(partial_fit="sometimes")


def test_a_method_that_declares_no_partial_fit_says_so(tiny_model):
    class FrozenPatchCore(PatchCore):
        traits = MethodTraits(cross_fits=True, partial_fit="none")

    frozen = FrozenPatchCore(**tiny_model.get_params())
    frozen.__dict__.update({name: value for name, value in vars(tiny_model).items() if name.endswith("_")})
    with pytest.raises(FlawmapError, match="cannot learn from more images"):
        frozen.partial_fit(np.zeros((64, 64, 3), dtype=np.uint8))


@pytest.mark.parametrize("method", ALL_METHODS)
def test_refit_forgets_and_is_reproducible(method, fitted, tiny_dataset, test_images):
    model = fitted(method)
    again = quick_model(method).fit([np.full((64, 64, 3), value, dtype=np.uint8) for value in (0, 85, 170, 255)])
    again.fit(tiny_dataset)
    assert again.n_fits_ == 1
    assert_same_predictions(model, again, test_images, rel=1e-5)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_calibration_scores_are_out_of_sample(method, fitted, tiny_dataset):
    """The threshold's normal scores are not in-sample: a cross-fitted training image scores at
    least as high left out as when the model scores it with its own contribution."""
    model = fitted(method)
    if not model.traits.cross_fits:
        assert model.calibration_images_.shape[0] >= 1 and len(model.calibration_scores_) == model.calibration_images_.shape[0]
        return
    train = list(open_dataset(tiny_dataset).train)
    in_sample = np.array([prediction.score for prediction in model.predict([s.image_path for s in train])])
    left_out = np.array(model.calibration_scores_)
    assert left_out.shape == in_sample.shape
    assert (left_out >= in_sample - 1e-4 * np.abs(in_sample)).all() and (left_out > in_sample).mean() > 0.5


@pytest.mark.parametrize("method", ALL_METHODS)
def test_calibration_scores_match_the_scores_of_unseen_good_images(method, fitted, tiny_dataset, new_good_images):
    """Out of sample means what it says: the normal scores the threshold is calibrated on and the
    scores of good images the model never saw come from one distribution (two-sided
    Kolmogorov-Smirnov test at level 0.01; on real categories: benchmarks/bench_few_images.py).
    Methods that hold out hold out half of the images here, so that both samples are several."""
    if METHODS.get(method).traits.cross_fits:
        model = fitted(method)  # 12 training images, fewer than PaDiM's 24 features: n <= d
    else:
        model = quick_model(method, calibration_fraction=0.5).fit(tiny_dataset)
    unseen = [prediction.score for prediction in model.predict(sorted(new_good_images.glob("*.png")))]
    assert len(model.calibration_scores_) >= 4
    assert ks_2samp(model.calibration_scores_, unseen).pvalue >= 0.01


def test_skip_invalid_never_aborts_because_the_held_out_images_were_skipped(tiny_dataset, tmp_path):
    """A method calibrated on a hold-out: when every image the hash holds out is unreadable,
    ``skip_invalid`` holds out the next valid ones instead of failing."""
    import shutil

    from flawmap.models.calibrators import uniform_hash

    class HeldOutPatchCore(PatchCore):
        traits = MethodTraits(partial_fit="approximate")

    dataset = shutil.copytree(tiny_dataset, tmp_path / "data")
    model = HeldOutPatchCore(image_size=64, coreset_fraction=0.25).set_runtime(batch_size=4, num_workers=1)
    train = list(open_dataset(dataset).train)
    held_out = [s.image_path for s in train if uniform_hash(model.random_state, s) < model.calibration_fraction]
    held_out = held_out or [min(train, key=lambda s: uniform_hash(model.random_state, s)).image_path]
    for path in held_out:
        path.write_bytes(b"not an image any more")
    with pytest.warns(UserWarning, match="skipping"):
        model.fit(dataset, skip_invalid=True)
    assert model.calibration_images_.shape[0] >= 1 and len(model.calibration_scores_) >= 1
    assert model.n_train_images_ + model.calibration_images_.shape[0] == 12 - len(held_out)
