"""Deep SVDD: Ruff et al., "Deep One-Class Classification", ICML 2018 (authors' code:
github.com/lukasruff/Deep-SVDD-PyTorch); with ``init="pretrained"``, the pretrained-feature
variant of PANDA (Reiss et al., "PANDA: Adapting Pretrained Features for Anomaly Detection and
Segmentation", CVPR 2021).

A network ``phi`` maps normal data into a small hypersphere around a fixed centre ``c``; the
distance to ``c`` is the anomaly score.

1. Encoder (``init``):

   - ``"pretrained"`` (the default; PANDA's idea of starting from ImageNet features): the frozen
     backbone's stride-8 and stride-16 taps, each averaged over its 3x3 neighbourhood and fused
     on the stride-8 grid, standardised per channel with the first fit's mean and std, then a
     trained bias-free head of two 1x1 convolutions (``hidden_dim``, leaky ReLU 0.1, then
     ``rep_dim``): one embedding per stride-8 position.
   - ``"scratch"`` (the paper's): a LeNet-like network on the pixels, as in the authors' code:
     three blocks of a 5x5 convolution (32, 64, 128 channels), batch norm without affine
     parameters, leaky ReLU 0.1 and 2x2 max-pooling, then a 1x1 convolution to ``rep_dim``;
     one embedding per stride-8 position.

2. Centre (the paper's Sec. 3.3): ``c`` is the mean embedding of the first fit's training data
   after one forward pass of the initial network, and stays fixed; each coordinate closer to 0
   than ``eps = 0.1`` is moved to ``+-eps`` (the authors' guard: a coordinate of ``c`` at 0 is
   reached by zero weights).
3. One-class objective (Eq. 4): the mean squared distance ``||phi(x) - c||^2``, here of every
   position's embedding (the paper's is one embedding per image); Adam on the shared loop
   (:func:`flawmap.training.train`), the weights of the last epoch kept. The weight decay of the
   objective's regulariser is ``weight_decay`` (the authors use 1e-6).
4. Scores: the map is each position's squared distance to ``c`` (B x h x w, stride 8); the
   image score is the maximum of the smoothed map, as for every flawmap method. The original
   method is image-level only (one distance per image); the map is our addition.

Collapse guard (the paper's Propositions 2 and 3): a network with bias terms, or with bounded
activations, can map every input to ``c`` (zero weights and a bias equal to ``c``) and reach
the objective's minimum without learning anything. Every layer that learns is therefore
bias-free and the activations are unbounded (leaky ReLU); :func:`check_bias_free` refuses a
network with a bias, or a batch norm with affine parameters (its shift is a bias), and runs on
every encoder this module builds. In the pretrained variant the frozen backbone's biases do not
learn: they move the features, not towards ``c``, and standardisation removes their mean, so
the head's input has no constant channel through which it could build a bias.

Differences from the papers, and why:

- The soft-boundary objective (radius ``R`` and ``nu``) is not offered: the one-class objective
  is the paper's better variant on its benchmarks, and flawmap calibrates its threshold on
  held-out normal images instead of through ``nu``.
- PANDA fine-tunes the whole ImageNet network with the compactness loss (early stopping or EWC
  against the collapse of a network that has biases) and then scores by kNN distance to the
  training features. Here the backbone stays frozen and only the bias-free head trains, so
  nothing that learns has a bias, a fit takes about two minutes on a CPU (bottle), and the
  score stays Deep SVDD's distance to ``c``; the kNN score is PatchCore/SPADE, which flawmap has.
- The authors pretrain the scratch network as an autoencoder before setting ``c``; here it
  starts from its seeded random initialisation (shorter, and the pretrained variant is the
  default for the case where initialisation matters).

Measured (``flawmap benchmark``, defaults, one torch thread on a loaded 2-core machine): image /
pixel AUROC / AUPRO 0.998 / 0.981 / 0.911 on bottle (fit 140 s), 0.253 / 0.915 / 0.734 on screw,
0.595 / 0.918 / 0.464 on capsules (``benchmarks/results/deepsvdd.json``).

Calibration: the threshold comes from held-out normal images (``calibration_fraction``), as for
every trained method. Incremental fit (``partial_fit``): the network trains ``epochs`` more
epochs on the new images with the same ``c`` and standardisation (networks trained on the new
images only can forget the earlier ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from flawmap.backbones import Backbone
from flawmap.errors import FlawmapError
from flawmap.features import channel_statistics, locally_aware_patches
from flawmap.models.methods import register_method
from flawmap.models.scorer import PatchScores, Scorer
from flawmap.models.trained import TrainedModel
from flawmap.training import seeded_init

INITS = ("pretrained", "scratch")
"""Where Deep SVDD's encoder starts (``init``)."""

CENTER_EPS = 0.1
"""Smallest magnitude of a coordinate of the centre ``c`` (the authors' ``eps``)."""

LEAKY_SLOPE = 0.1
"""Negative slope of every leaky ReLU (the authors' networks)."""

SCRATCH_WIDTHS = (32, 64, 128)
"""Channels of the scratch encoder's three 5x5 blocks (the authors' CIFAR-10 LeNet)."""


def check_bias_free(network: nn.Module) -> None:
    """FlawmapError if any layer of ``network`` that learns has a bias: a convolution or linear
    layer with ``bias``, or a normalisation with affine parameters (Deep SVDD's collapse guard)."""
    for name, module in network.named_modules():
        has_bias = getattr(module, "bias", None) is not None
        if has_bias or getattr(module, "affine", False):
            raise FlawmapError(
                f"deepsvdd networks must be bias-free (a bias lets them map every input to c): layer {name!r} has one"
            )


class PretrainedHead(nn.Module):
    """The head of ``init="pretrained"``: standardised features (B, C, h, w) -> (B, rep_dim, h, w)
    with two bias-free 1x1 convolutions; ``mean`` and ``std`` (C,) are the standardisation."""

    def __init__(self, channels: int, hidden_dim: int, rep_dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))
        self.layers = nn.Sequential(
            nn.Conv2d(channels, hidden_dim, 1, bias=False), nn.LeakyReLU(LEAKY_SLOPE), nn.Conv2d(hidden_dim, rep_dim, 1, bias=False)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        standardized = (features - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        return self.layers(standardized)


class ScratchEncoder(nn.Module):
    """The encoder of ``init="scratch"``: images (B, 3, S, S) -> (B, rep_dim, S/8, S/8), bias-free."""

    def __init__(self, rep_dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for width in SCRATCH_WIDTHS:
            layers += [
                nn.Conv2d(in_channels, width, 5, padding=2, bias=False),
                nn.BatchNorm2d(width, eps=1e-4, affine=False),
                nn.LeakyReLU(LEAKY_SLOPE),
                nn.MaxPool2d(2),
            ]
            in_channels = width
        layers.append(nn.Conv2d(in_channels, rep_dim, 1, bias=False))
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


class DeepSVDDScorer(Scorer):
    """Images -> squared distances of each position's embedding to the centre (see module docstring).

    ``embed`` gives what the encoder reads: the fused backbone features (B, C, h, w) for
    ``"pretrained"``, the images themselves for ``"scratch"``. ``encoder`` is the trained network
    and the buffer ``center`` (rep_dim,) is ``c``.
    """

    def __init__(self, backbone: Backbone, taps: tuple[str, ...], *, init: str, hidden_dim: int, rep_dim: int) -> None:
        super().__init__(backbone, taps)
        self.init = init
        if init == "pretrained":
            channels = sum(info.channels for info in backbone.tap_info(taps))
            self.encoder: nn.Module = PretrainedHead(channels, hidden_dim, rep_dim)
        else:
            self.encoder = ScratchEncoder(rep_dim)
        check_bias_free(self.encoder)
        self.register_buffer("center", torch.zeros(rep_dim))
        self.eval()

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) -> (B, C, S/8, S/8) fused features, or the images for ``"scratch"``."""
        if self.init == "scratch":
            return images
        return locally_aware_patches(self.levels(images))

    def embeddings(self, inputs: torch.Tensor) -> torch.Tensor:
        """What ``embed`` gave -> ``phi`` per position (B, rep_dim, h, w), float32."""
        with self.autocast(inputs.device):
            return self.encoder(inputs.float()).float()

    def distances(self, inputs: torch.Tensor) -> torch.Tensor:
        """What ``embed`` gave -> ``||phi - c||^2`` per position (B, h, w)."""
        return (self.embeddings(inputs) - self.center.view(1, -1, 1, 1)).pow(2).sum(dim=1)

    def score(self, inputs: torch.Tensor) -> PatchScores:
        return PatchScores(self.distances(inputs))

    def set_center(self, inputs: torch.Tensor) -> None:
        """``c``: the mean embedding of training inputs (N, ...) under the current network, each
        coordinate at least ``CENTER_EPS`` from 0 (the sign kept, 0 counted as positive)."""
        with torch.no_grad():
            total = torch.zeros_like(self.center)
            count = 0
            for chunk in inputs.split(16):
                embedded = self.embeddings(chunk.to(self.center.device))
                total += embedded.sum(dim=(0, 2, 3))
                count += embedded.shape[0] * embedded.shape[2] * embedded.shape[3]
            center = total / count
            small = center.abs() < CENTER_EPS
            center[small] = torch.where(center[small] < 0, -CENTER_EPS, CENTER_EPS)
            self.center.copy_(center)

    def set_standardization(self, features: torch.Tensor) -> None:
        """Set the pretrained head's per-channel mean and std from training features (N, C, h, w)."""
        mean, std = channel_statistics(features.float())
        self.encoder.mean.copy_(mean)
        self.encoder.std.copy_(std)

    def training_loss(self, batch: list[torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """The one-class objective of a batch of what ``embed`` gave: mean ``||phi - c||^2``."""
        return self.distances(batch[0]).mean()


@register_method("deepsvdd")
@dataclass(kw_only=True, eq=False)
class DeepSVDD(TrainedModel):
    """Deep SVDD, one-class objective (see module docstring). Method hyper-parameters:

    Parameters
    ----------
    init : {"pretrained", "scratch"}
        The frozen ImageNet backbone with a trained bias-free head (PANDA's pretrained features,
        the default), or the paper's LeNet-like network trained from a random start.
    hidden_dim : int
        Width of the pretrained head's hidden 1x1 convolution.
    rep_dim : int
        Dimension of the embedding space (the authors' 128 for CIFAR-10).

    and the training parameters of :class:`flawmap.models.trained.TrainedModel` (Adam; here 10
    epochs, learning rate 1e-4 and weight decay 1e-6 as in the authors' code).

    Examples
    --------
    >>> model = DeepSVDD().fit("bottle/")                        # doctest: +SKIP
    >>> model.predict("bottle/test/broken_large")[0].score       # doctest: +SKIP
    """

    quick_params = {"image_size": 64, "epochs": 1, "hidden_dim": 16, "rep_dim": 8, "train_batch_size": 4}

    init: str = "pretrained"
    hidden_dim: int = 256
    rep_dim: int = 128
    epochs: int = 10
    learning_rate: float = 1e-4
    weight_decay: float = 1e-6

    def _validate_method_params(self) -> None:
        if self.init not in INITS:
            raise FlawmapError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.hidden_dim < 1 or self.rep_dim < 1:
            raise FlawmapError(f"need hidden_dim >= 1 and rep_dim >= 1, got {self.hidden_dim} and {self.rep_dim}")

    def _new_scorer(self, backbone: Backbone, taps: tuple[str, ...]) -> DeepSVDDScorer:
        with seeded_init(self.random_state):  # the encoder's initial weights
            return DeepSVDDScorer(backbone, taps, init=self.init, hidden_dim=self.hidden_dim, rep_dim=self.rep_dim)

    def _learn(self, feature_batches: Iterable[torch.Tensor]) -> None:
        (inputs,) = self._cache((batch,) for batch in feature_batches)
        if self.n_fits_ == 0:  # first fit: standardisation and c from the initial network
            if self.init == "pretrained":
                self.scorer_.set_standardization(inputs)
            self.scorer_.set_center(inputs)
        self._train(self.scorer_.encoder, [inputs], self.scorer_.training_loss, "deepsvdd")

    def to_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        tensors = {f"encoder.{name}": tensor for name, tensor in self.scorer_.encoder.state_dict().items()}
        return {"train_losses_": self.train_losses_}, {**tensors, "center": self.scorer_.center}

    def from_state(self, fitted: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        prefix = "encoder."
        self.scorer_.encoder.load_state_dict({name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)})
        self.scorer_.center.copy_(tensors["center"])
        self.train_losses_ = list(fitted["train_losses_"])
