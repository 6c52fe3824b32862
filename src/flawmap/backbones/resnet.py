"""ResNet-18/50 and Wide-ResNet-50-2 (He et al., CVPR 2016; Zagoruyko & Komodakis, BMVC 2016).

The parameter layout is torchvision's (``conv1``, ``bn1``, ``layer1`` .. ``layer4``, ``fc``;
bottleneck stride on the 3x3 convolution, "ResNet v1.5"), so a torchvision ImageNet checkpoint
loads with ``create_backbone(name, weights=path)``. No weights are packaged. Stages are
``layer1`` .. ``layer4`` at strides 4, 8, 16 and 32; inputs use ImageNet mean/std.
"""

from __future__ import annotations

import operator
from itertools import accumulate

from torch import Tensor, nn

from flawmap.backbones.base import BACKBONES, IMAGENET_MEAN, IMAGENET_STD, Backbone, FeatureInfo

_STEM_CHANNELS = 64
_STAGE_PLANES = (64, 128, 256, 512)
_STAGE_STRIDES = (1, 2, 2, 2)
_STEM_STRIDE = 4  # 7x7 stride-2 convolution, then 3x3 stride-2 max pool


def _downsample(in_channels: int, out_channels: int, stride: int) -> nn.Sequential | None:
    """1x1 projection of the identity path when the block changes shape, else None."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class _ResidualBlock(nn.Module):
    """``relu(residual branch + identity)``; subclasses build ``relu``, ``downsample`` and the branch."""

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self._residual(x) + identity)

    def _residual(self, x: Tensor) -> Tensor:
        raise NotImplementedError


class _BasicBlock(_ResidualBlock):
    """Two 3x3 convolutions plus identity. ``B x C_in x H x W`` -> ``B x planes x H/s x W/s``."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int, width_per_group: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_channels, planes, stride)

    def _residual(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))


class _Bottleneck(_ResidualBlock):
    """1x1 reduce, 3x3 (strided), 1x1 expand, plus identity.

    ``B x C_in x H x W`` -> ``B x 4 planes x H/s x W/s``; the inner width is
    ``planes * width_per_group / 64`` (twice ``planes`` for the wide variant).
    """

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int, width_per_group: int) -> None:
        super().__init__()
        width = planes * width_per_group // 64
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_channels, out_channels, stride)

    def _residual(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


class ResNet(Backbone):
    """A ResNet with ``depths[i]`` blocks of type ``block`` in stage ``layer{i+1}``."""

    def __init__(
        self,
        *,
        name: str,
        block: type[_BasicBlock] | type[_Bottleneck],
        depths: tuple[int, int, int, int],
        width_per_group: int = 64,
    ) -> None:
        strides = [_STEM_STRIDE * total for total in accumulate(_STAGE_STRIDES, operator.mul)]
        super().__init__(
            name=name,
            feature_info=[FeatureInfo(f"layer{index + 1}", planes * block.expansion, stride)
                          for index, (planes, stride) in enumerate(zip(_STAGE_PLANES, strides))],
            default_taps=("layer2", "layer3"),
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        )
        self.conv1 = nn.Conv2d(3, _STEM_CHANNELS, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(_STEM_CHANNELS)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = _STEM_CHANNELS
        for index, (planes, stride, depth) in enumerate(zip(_STAGE_PLANES, _STAGE_STRIDES, depths)):
            blocks = []
            for repeat in range(depth):
                blocks.append(block(in_channels, planes, stride if repeat == 0 else 1, width_per_group))
                in_channels = planes * block.expansion
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(in_channels, 1000)
        self._freeze()

    def _stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def _stage(self, index: int, x: Tensor) -> Tensor:
        return self.get_submodule(f"layer{index + 1}")(x)

    def _head(self, x: Tensor) -> Tensor:
        return self.fc(x.mean(dim=(2, 3)))


@BACKBONES.register("resnet18")
def resnet18() -> ResNet:
    """ResNet-18: 11.7 M parameters."""
    return ResNet(name="resnet18", block=_BasicBlock, depths=(2, 2, 2, 2))


@BACKBONES.register("resnet50")
def resnet50() -> ResNet:
    """ResNet-50: 25.6 M parameters."""
    return ResNet(name="resnet50", block=_Bottleneck, depths=(3, 4, 6, 3))


@BACKBONES.register("wide_resnet50_2")
def wide_resnet50_2() -> ResNet:
    """Wide-ResNet-50-2 (bottleneck width doubled): 68.9 M parameters; PatchCore's default."""
    return ResNet(name="wide_resnet50_2", block=_Bottleneck, depths=(3, 4, 6, 3), width_per_group=128)
