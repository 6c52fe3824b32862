"""The frozen-CNN contract every backbone follows, and the registry they live in.

A :class:`Backbone` takes ``B x 3 x H x W`` float images in [0, 1], normalises them itself (the
mean and std are buffers, so ONNX exports and every caller get the same preprocessing) and
returns feature maps at named stages. Subclasses only say how to run their stem, one stage and
the classifier head; the base class does tap validation, early stopping and memory layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from flawmap.errors import FlawmapError
from flawmap.registry import Registry

#: ``(position of the tap in the requested taps, its map) -> the map the next stage reads``.
TapHook = Callable[[int, Tensor], Tensor]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class FeatureInfo:
    """One stage's output: ``channels`` maps at 1/``stride`` of the input size."""

    name: str
    channels: int
    stride: int


def check_feature_info(feature_info: Sequence[FeatureInfo]) -> None:
    """Raise ValueError unless stage names are unique and strides never decrease.

    A violation is a bug in an architecture definition, not a user error.
    """
    names = [info.name for info in feature_info]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate stage names in {names}")
    strides = [info.stride for info in feature_info]
    if any(later < earlier for earlier, later in zip(strides, strides[1:])):
        raise ValueError(f"stage strides must not decrease, got {strides}")


class Backbone(nn.Module):
    """A frozen ImageNet CNN that exposes its stages as feature taps.

    Subclasses build their modules after calling ``super().__init__``, end their constructor
    with :meth:`_freeze`, and implement :meth:`_stem`, :meth:`_stage` and :meth:`_head`.

    A backbone is frozen from construction: parameters do not require grad and it is always in
    eval mode (``train()`` keeps eval), so batch-norm statistics never drift when a backbone
    sits inside a module that is put in training mode.

    Inputs are switched to channels-last memory format before the stem: on CPU (oneDNN) the
    convolutions then run without layout reorders, which made EfficientNet-Lite0 features of a
    16 x 3 x 256 x 256 batch about 1.5x faster on 2 cores (0.34 s instead of 0.56 s). Returned
    maps are channels-last strided too, so ``x.permute(0, 2, 3, 1).reshape(-1, C)`` (one row per
    patch) is free; ``view`` needs ``.contiguous()`` first.
    """

    def __init__(
        self,
        *,
        name: str,
        feature_info: Sequence[FeatureInfo],
        default_taps: tuple[str, str],
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        check_feature_info(feature_info)
        self.name = name
        self.feature_info: tuple[FeatureInfo, ...] = tuple(feature_info)
        self._stage_index = {info.name: index for index, info in enumerate(self.feature_info)}
        unknown = [tap for tap in default_taps if tap not in self._stage_index]
        if unknown:
            raise ValueError(f"default taps {unknown} are not stages of {name}")
        self.default_taps = default_taps
        # Not persistent: they are constants of the architecture, so checkpoints from other
        # libraries (which never contain them) load with a strict key check.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def _freeze(self) -> None:
        """Turn off gradients and training mode; the last step of every subclass constructor."""
        self.requires_grad_(False)
        super().train(False)

    def fold_batch_norms(self) -> Backbone:
        """Fold every batch norm into the convolution it normalises; idempotent; returns self.

        A frozen batch norm is a per-channel affine map, so ``BN(conv(x))`` is one convolution
        with scaled weights and a bias (``W' = W gamma / sqrt(var + eps)``, ``b' = beta - mean
        gamma / sqrt(var + eps)``); the batch norm becomes an identity. Features agree with the
        unfolded network to float32 rounding, and EfficientNet-Lite0 runs about 1.25x faster on
        CPU (one memory pass less per convolution). Every architecture here registers each batch
        norm right after the convolution whose output it normalises (a test checks the folded
        features of every registered backbone against the unfolded ones). The folded state dict
        has conv biases and no batch-norm entries: :func:`flawmap.backbones.create_backbone`
        recognises that form in a model directory's backbone file.
        """
        for parent in list(self.modules()):
            children = list(parent.named_children())
            for (_, conv), (norm_name, norm) in zip(children, children[1:]):
                if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                    conv.weight, conv.bias = fuse_conv_bn_weights(
                        conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias
                    )
                    setattr(parent, norm_name, nn.Identity())
        self.requires_grad_(False)
        return self

    # -- subclass hooks -------------------------------------------------------------------
    def _stem(self, x: Tensor) -> Tensor:
        """Normalised ``B x 3 x H x W`` -> input of the first stage."""
        raise NotImplementedError

    def _stage(self, index: int, x: Tensor) -> Tensor:
        """Run stage ``feature_info[index]`` on the previous stage's output."""
        raise NotImplementedError

    def _head(self, x: Tensor) -> Tensor:
        """Last stage's output -> ``B x 1000`` ImageNet logits."""
        raise NotImplementedError

    # -- public API -----------------------------------------------------------------------
    def train(self, mode: bool = True) -> Backbone:
        """Keep eval mode whatever ``mode`` says: a backbone is a frozen feature extractor."""
        return super().train(False)

    def tap_info(self, taps: Sequence[str]) -> list[FeatureInfo]:
        """The :class:`FeatureInfo` of each name in ``taps``; FlawmapError for unknown names."""
        if isinstance(taps, str) or len(taps) == 0:
            raise FlawmapError(f"backbone {self.name!r}: give a non-empty list of feature taps, got {taps!r}")
        unknown = [tap for tap in taps if tap not in self._stage_index]
        if unknown:
            choices = ", ".join(self._stage_index)
            raise FlawmapError(f"backbone {self.name!r} has no feature tap {unknown[0]!r}; choose from: {choices}")
        return [self.feature_info[self._stage_index[tap]] for tap in taps]

    def features(self, images: Tensor, taps: Sequence[str]) -> list[Tensor]:
        """Feature maps at ``taps``, in that order.

        ``images``: ``B x 3 x H x W`` float in [0, 1]. Returns one ``B x C_l x H_l x W_l`` map per
        tap with ``C_l = tap_info(taps)[l].channels`` and ``H_l = ceil(H / stride_l)`` (likewise
        ``W_l``). Stages after the deepest requested one are not computed.
        """
        return self.features_after(self._stem(self._prepare(images)), None, taps)

    def features_after(
        self, x: Tensor, stage: str | None, taps: Sequence[str], between: TapHook | None = None
    ) -> list[Tensor]:
        """:meth:`features` continued from ``x``, the output of ``stage`` (None: of the stem).

        Every tap must come after ``stage``. ``between(l, map)``, when given, replaces the map of
        ``taps[l]`` as it is tapped: the next stage reads what it returns, and so does the result
        (FYD's chained feature alignment).
        """
        self.tap_info(taps if stage is None else [*taps, stage])
        first = 0 if stage is None else self._stage_index[stage] + 1
        if min(self._stage_index[tap] for tap in taps) < first:
            raise ValueError(f"taps {list(taps)} do not all come after stage {stage!r}")
        position = {tap: index for index, tap in reversed(list(enumerate(taps)))}
        last = max(self._stage_index[tap] for tap in taps)
        found: dict[str, Tensor] = {}
        for index in range(first, last + 1):
            x = self._stage(index, x)
            name = self.feature_info[index].name
            if name in position:
                x = x if between is None else between(position[name], x)
                found[name] = x
        return [found[tap] for tap in taps]

    def forward(self, images: Tensor) -> Tensor:
        """ImageNet logits ``B x 1000`` for ``B x 3 x H x W`` images in [0, 1]."""
        x = self._stem(self._prepare(images))
        for index in range(len(self.feature_info)):
            x = self._stage(index, x)
        return self._head(x)

    def _prepare(self, images: Tensor) -> Tensor:
        """Check the shape, normalise with the buffers, switch to channels-last."""
        if images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape)
            raise FlawmapError(f"backbone {self.name!r} expects images of shape B x 3 x H x W, got {shape}")
        normalised = (images - self.mean) / self.std
        return normalised.contiguous(memory_format=torch.channels_last)


# Architecture name -> zero-argument factory of a randomly initialised, frozen backbone.
BACKBONES: Registry[Callable[[], Backbone]] = Registry("backbone")
