"""Tiling: the tile grid, blending and stitching (no model), then a tiled model end to end
(CLI fit and predict, save/load, calibration on whole images, ONNX parity)."""

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_same_predictions
from PIL import Image
from test_export import assert_parity
from test_onnx_model import with_metadata

import flawmap
from flawmap.calibration import CalibrationWarning
from flawmap.cli import _method_params, main
from flawmap.data import Sample
from flawmap.data.loader import DecodedImage, as_samples
from flawmap.errors import FlawmapError
from flawmap.tiling import Tiling, choose_tiling


def pixel_scorer(tiles, _images=None):
    """A fake model whose map is the tile's red channel and whose score is the tile's mean."""
    return tiles.mean(axis=(1, 2, 3)), tiles[:, 0].copy()


def score_image(tiling, pixels, scorer, batch_size):
    """The score and stitched map of one ``H x W x 3`` uint8 image."""
    image = DecodedImage(Sample(Path("one.png")), pixels, pixels.shape[:2], None)
    ((scored, score, stitched),) = tiling.score_images([image], scorer, batch_size)
    assert scored is image
    return score, stitched


@pytest.mark.parametrize("height, width", [(300, 200), (64, 64), (65, 250), (40, 100), (1, 7)])
def test_tiles_are_full_size_overlap_and_cover_the_image(height, width):
    tiling = Tiling(64, 16, 64)
    padded = tiling.pad(np.zeros((height, width, 3), dtype=np.uint8))
    assert padded.shape[:2] == (max(height, 64), max(width, 64))
    covered = np.zeros(padded.shape[:2], dtype=int)
    for top, left in tiling.boxes(*padded.shape[:2]):
        assert 0 <= top <= padded.shape[0] - 64 and 0 <= left <= padded.shape[1] - 64
        covered[top : top + 64, left : left + 64] += 1
    assert covered.min() >= 1
    for length in padded.shape[:2]:
        starts = tiling.starts(length)
        assert starts[-1] + 64 == length and all(later - earlier <= 64 - 16 for earlier, later in itertools.pairwise(starts))


def test_blend_weights_of_regular_neighbours_sum_to_one():
    tiling = Tiling(64, 16, 64)
    weights = tiling.weights()[0] / tiling.weights()[0].max()  # the 1-D ramp
    overlap = weights[-16:] + weights[:16]  # the right end of a tile over the left end of the next one
    np.testing.assert_allclose(overlap, 1.0, atol=1e-6)
    assert weights.min() > 0 and weights[16:-16].min() == 1.0


@pytest.mark.parametrize("height, width, overlap", [(300, 200, 16), (150, 333, 32), (64, 64, 0), (40, 50, 8)])
def test_stitching_puts_every_tile_map_back_where_it_came_from(height, width, overlap):
    """Tile maps equal to the tiles' pixels stitch back into the image itself (any overlap, border
    tiles shifted inward, images smaller than a tile), so blending weights are normalised and
    every tile lands at its place; the image score is the largest tile score."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    tiling = Tiling(64, overlap, 64)
    score, stitched = score_image(tiling, image, pixel_scorer, batch_size=5)
    assert stitched.shape == (height, width)
    np.testing.assert_allclose(stitched, image[:, :, 0] / 255.0, atol=1e-5)
    padded = tiling.pad(image)
    tile_means = [padded[t : t + 64, l : l + 64].mean() / 255.0 for t, l in tiling.boxes(*padded.shape[:2])]
    assert score == pytest.approx(max(tile_means), rel=1e-5)


def test_constant_tile_maps_stitch_to_a_constant_map():
    constant = lambda tiles, _: (np.zeros(len(tiles)), np.full((len(tiles), 32, 32), 2.5, dtype=np.float32))
    _, stitched = score_image(Tiling(64, 16, 32), np.zeros((200, 130, 3), dtype=np.uint8), constant, batch_size=3)
    np.testing.assert_allclose(stitched, 2.5, rtol=1e-6)


def test_tiles_are_resized_when_the_network_size_differs():
    gradient = np.broadcast_to(np.linspace(0, 255, 200)[None, :, None], (120, 200, 3)).astype(np.uint8)
    _, stitched = score_image(Tiling(64, 16, 32), gradient, pixel_scorer, batch_size=4)
    np.testing.assert_allclose(stitched, gradient[:, :, 0] / 255.0, atol=0.02)


def test_bad_tiling_parameters_are_clear_errors():
    with pytest.raises(FlawmapError, match="tile_overlap must be in"):
        flawmap.PatchCore(tile_size=64, tile_overlap=40).fit(np.zeros((2, 80, 80, 3), dtype=np.uint8))
    with pytest.raises(FlawmapError, match="tile_size must be at least 32"):
        Tiling(16, 0, 64)


# ---------------------------------------------------------------------------- a tiled model
#: float32 as the `tiled` fixture predicts: "auto" is bfloat16 on a CPU with AVX512-BF16 or AMX, and
#: the calibration scores are compared with predictions to 1e-5.
TILED = ["--tile-size", "64", "--tile-overlap", "16", "--coreset-fraction", "0.25", "--batch-size", "8", "--precision", "float32"]


@pytest.fixture(scope="module")
def tiled_dir(tiny_dataset, tmp_path_factory):
    """A tiled PatchCore fitted by the CLI on the 96 px demo images (64 px tiles: 4 per image;
    ``--tile-size`` alone makes the network size the tile size)."""
    model_dir = tmp_path_factory.mktemp("tiled") / "model"
    assert main(["fit", str(tiny_dataset), "--method", "patchcore", "--out", str(model_dir), "--quiet", *TILED]) == 0
    return model_dir


@pytest.fixture(scope="module")
def tiled(tiled_dir):
    return flawmap.load(tiled_dir, precision="float32", batch_size=8, num_workers=1)


def test_cli_predict_with_a_tiled_model_keeps_the_native_size(tiled_dir, tiny_dataset, tmp_path, capsys):
    config = json.loads((tiled_dir / "config.json").read_text())
    assert (config["params"]["tile_size"], config["params"]["tile_overlap"], config["params"]["image_size"]) == (64, 16, 64)
    image = tmp_path / "wide.png"
    with Image.open(next((tiny_dataset / "test" / "good").glob("*.png"))) as source:
        source.convert("RGB").resize((150, 90)).save(image)
    assert main(["predict", str(tiled_dir), str(image), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    (record,) = [json.loads(line) for line in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    with Image.open(tmp_path / "out" / record["overlay"]) as overlay:
        assert overlay.width == 2 * 150  # the image and its map side by side, at the image's own size


def test_training_learns_every_tile_and_calibrates_on_every_whole_training_image(tiled, tiny_dataset):
    train = sorted((tiny_dataset / "train" / "good").glob("*.png"))
    assert tiled.n_train_images_ == 4 * len(train) and len(tiled.calibration_scores_) == len(train)  # 2 x 2 tiles of 96 px
    assert tiled.calibration_images_.shape[1:] == (3, 64, 64) and "tiled and scored whole with all its tiles left out" in tiled.calibration_.source
    assert (tiled.tile_size_, tiled.tiling_reason_) == (64, "tiles of 64 px as given")


@pytest.mark.parametrize("method, params", [("patchcore", {"coreset_fraction": 1.0}), ("spade", {})])
def test_a_left_out_score_is_the_score_of_the_model_fitted_without_that_image(method, params, tiny_dataset):
    """Cross-fitted tiled calibration: each training image's normal score (and map maximum) is
    exactly what a model fitted on the other images gives it as a new image, all of its tiles
    left out (a bank of all patches, so the two models hold the same rows)."""
    images = []
    for path in sorted((tiny_dataset / "train" / "good").glob("*.png"))[:4]:
        with Image.open(path) as source:
            images.append(np.asarray(source.convert("RGB").resize((150, 80))))  # 2 x 3 tiles of 64 px
    settings = {"image_size": 64, "tile_size": 64, "tile_overlap": 16, **params}
    model = flawmap.create_model(method, **settings).set_runtime(precision="float32", num_workers=1, progress=False)
    with pytest.warns(CalibrationWarning, match="only 4 normal images"):  # the untiled models' warning
        model.fit(images)
    assert model.n_train_images_ == 4 * 6 and len(model.calibration_scores_) == 4
    for i, image in enumerate(images):
        without = flawmap.create_model(method, **settings).set_runtime(precision="float32", num_workers=1, progress=False)
        with pytest.warns(CalibrationWarning):
            without.fit(images[:i] + images[i + 1 :])
        (prediction,) = without.predict(image)
        assert model.calibration_scores_[i] == pytest.approx(prediction.score, rel=1e-4)
        assert model.calibration_map_maxima_[i] == pytest.approx(float(prediction.anomaly_map.max()), rel=1e-4)


def test_a_defect_in_one_tile_appears_at_its_place(tiled, tiny_dataset):
    with Image.open(next((tiny_dataset / "test" / "good").glob("*.png"))) as source:
        clean = np.asarray(source.convert("RGB").resize((160, 120)))
    damaged = clean.copy()
    damaged[80:92, 120:132] = (255, 0, 255)
    before, after = tiled.predict([clean, damaged])
    peak = np.unravel_index(after.anomaly_map.argmax(), after.anomaly_map.shape)
    assert 74 <= peak[0] < 98 and 114 <= peak[1] < 138
    assert after.score > before.score


def test_save_and_load_keep_the_tiling(tiled, tmp_path, tiny_dataset):
    again = flawmap.load(tiled.save(tmp_path / "again"), precision="float32", batch_size=8, num_workers=1)
    assert (again.tile_size, again.tile_overlap, again.tiling()) == (64, 16, Tiling(64, 16, 64))
    assert_same_predictions(tiled, again, sorted((tiny_dataset / "test").glob("*/*.png"))[:2])


def test_an_exported_model_tiles_and_stitches_identically(tiny_model_dir, tiny_onnx, tiny_dataset, tmp_path):
    """The graph scores tiles either way; a tiled export (``tile_size`` in its params) is cut and
    stitched by the same Predictor code as the torch model."""
    reference = flawmap.load(tiny_model_dir, precision="float32", num_workers=1)
    params = {**reference.get_params(), "tile_size": 64, "tile_overlap": 16}
    reference.tile_size_, reference.tile_overlap = 64, 16
    tiled_onnx = with_metadata(tiny_onnx, tmp_path / "tiled.onnx", params=json.dumps(params))
    exported = flawmap.load(tiled_onnx, num_workers=1)
    assert exported.tiling() == reference.tiling() == Tiling(64, 16, 64)
    images = []
    for path, size in zip(sorted((tiny_dataset / "test").glob("*/*.png"))[:2], [(170, 100), (96, 96)]):
        with Image.open(path) as source:
            images.append(np.asarray(source.convert("RGB").resize(size)))
    assert_parity(exported, reference, images, batch_size=3)


# ---------------------------------------------------------------------------- tile_size="auto"
def test_auto_tiles_when_resizing_would_shrink_the_shorter_side_more_than_the_factor(tmp_path):
    large, small = np.zeros((200, 300, 3), dtype=np.uint8), np.zeros((120, 300, 3), dtype=np.uint8)
    size, reason = choose_tiling("auto", as_samples([large, large]), 64)
    assert size == 64 and reason.startswith("auto: tiles of 64 px") and "(200 px) 3.1x, more than 2x" in reason
    size, reason = choose_tiling("auto", as_samples([small]), 64)
    assert size is None and reason.startswith("auto: resized whole") and "(120 px)" in reason
    Image.fromarray(large).save(tmp_path / "large.png")
    assert choose_tiling("auto", [Sample(tmp_path / "large.png"), Sample(tmp_path / "missing.png")], 64)[0] == 64  # headers
    # mixed sizes: the median shorter side decides, and the reason says so
    size, reason = choose_tiling("auto", as_samples([small, small, large]), 64)
    assert size is None and "median of 3 sizes from 120 to 200 px" in reason
    assert choose_tiling(96, as_samples([small]), 64) == (96, "tiles of 96 px as given")
    assert choose_tiling(None, as_samples([large]), 64) == (None, "resized whole (tile_size=None as given)")


def test_auto_is_the_default_and_the_small_test_images_stay_untiled(tiny_model):
    assert flawmap.PatchCore().tile_size == "auto"
    assert tiny_model.tile_size_ is None and tiny_model.tiling_reason_.startswith("auto: resized whole")


def test_cli_tile_size_auto_and_none_and_info_says_which_and_why(tiny_dataset, tmp_path, capsys):
    """96 px images at a 32 px network input: auto tiles (3x), none resizes; info shows the choice."""
    common = ["--method", "padim", "--image-size", "32", "--tile-overlap", "8", "--quiet", "--precision", "float32"]
    for flag, expected in (("auto", 32), ("none", None)):
        model_dir = tmp_path / flag
        assert main(["fit", str(tiny_dataset), "--out", str(model_dir), "--tile-size", flag, *common]) == 0
        model = flawmap.load(model_dir)
        assert (model.tile_size, model.tile_size_) == ({"auto": "auto", "none": None}[flag], expected)
        capsys.readouterr()
        assert main(["info", str(model_dir)]) == 0
        (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("tiling: ")]
        assert line.endswith(f" ({model.tiling_reason_})") and ("3.0x" in line if flag == "auto" else "as given" in line)
        assert line.startswith("tiling: 32 px tiles" if expected else "tiling: none: each image is resized")
    assert main(["fit", str(tiny_dataset), "--out", str(tmp_path / "bad"), "--tile-size", "big"]) != 0
    assert "expected a number of pixels, auto or none" in capsys.readouterr().err
    specs = ["patchcore.tile_size=none", "padim.tile_size=auto", "spade.tile_size=512"]  # benchmark --param
    assert _method_params(specs) == {"patchcore": {"tile_size": None}, "padim": {"tile_size": "auto"}, "spade": {"tile_size": 512}}


def test_a_model_saved_before_auto_tiles_as_its_parameter_says(tiled_dir, tmp_path):
    """Models saved before ``tile_size_`` existed (same format version) tile as ``tile_size`` says."""
    target = tmp_path / "older"
    shutil.copytree(tiled_dir, target)
    config = json.loads((target / "config.json").read_text())
    del config["fitted"]["tile_size_"], config["fitted"]["tiling_reason_"]
    (target / "config.json").write_text(json.dumps(config))
    older = flawmap.load(target)
    assert (older.tile_size_, older.tiling_reason_) == (64, "tiles of 64 px as given")
