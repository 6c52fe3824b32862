"""Frozen ImageNet backbones: a registry of architectures and their weights.

Example::

    backbone = create_backbone("efficientnet_lite0")  # packaged ImageNet weights
    maps = backbone.features(images, backbone.default_taps)  # [B x 40 x S/8 x S/8, B x 112 x S/16 x S/16]

``images`` are ``B x 3 x S x S`` floats in [0, 1]; each backbone normalises them itself.
"""

from __future__ import annotations

from pathlib import Path

from flawmap.backbones import efficientnet_lite, resnet  # noqa: F401  (register architectures)
from flawmap.backbones.base import BACKBONES, Backbone, FeatureInfo
from flawmap.backbones.weights import load_state, packaged_weights_description, packaged_weights_file, read_state_dict
from flawmap.errors import FlawmapError

__all__ = ["BACKBONES", "Backbone", "FeatureInfo", "create_backbone", "list_backbones", "weights_source"]

# Architecture -> import name of its weights package; only EfficientNet-Lite has packaged weights.
PACKAGED_WEIGHTS = efficientnet_lite.PACKAGED_WEIGHTS


def list_backbones(pattern: str = "*") -> list[str]:
    """Sorted names of the registered backbones matching the shell-style ``pattern``."""
    return BACKBONES.names(pattern)


def create_backbone(name: str, weights: str | Path | None = None) -> Backbone:
    """Build backbone ``name`` with ImageNet weights, frozen and in eval mode.

    ``weights=None`` uses the weights packaged for ``name`` (FlawmapError if there are none);
    a path loads that local ``.pth``/``.pt``/``.bin``/``.safetensors`` checkpoint instead, in the
    architecture's own layout or in the batch-norm-folded one (:meth:`Backbone.fold_batch_norms`)
    that a saved model's backbone file holds. The backbone comes back folded.
    """
    factory = BACKBONES.get(name)
    path = _packaged_file(name) if weights is None else Path(weights).expanduser()
    model = factory()
    state = read_state_dict(path)
    if not any(key.endswith("running_var") for key in state):  # the folded form a saved model holds
        model.fold_batch_norms()
    load_state(model, state, path)
    return model.fold_batch_norms()


def weights_source(name: str, weights: str | Path | None = None) -> str:
    """A stable description of where ``create_backbone(name, weights)`` takes its weights,
    for model configs: ``package:<pip package>==<version>:<file>`` or ``file:<absolute path>``."""
    BACKBONES.get(name)
    if weights is None:
        _packaged_file(name)
        return f"package:{packaged_weights_description(PACKAGED_WEIGHTS[name])}"
    return f"file:{Path(weights).expanduser().resolve()}"


def _packaged_file(name: str) -> Path:
    if name not in PACKAGED_WEIGHTS:
        raise FlawmapError(f"backbone {name!r} has no packaged weights here; pass --weights PATH to a local checkpoint")
    return packaged_weights_file(PACKAGED_WEIGHTS[name])
