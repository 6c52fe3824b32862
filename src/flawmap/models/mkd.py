"""Multiresolution Knowledge Distillation (MKD): Salehi, Sadjadi, Baselizadeh, Rohban, Rabiee,
"Multiresolution Knowledge Distillation for Anomaly Detection", CVPR 2021 (arXiv 2011.11108);
the authors' code: github.com/rohban-lab/Knowledge_Distillation_AD.

A small *cloner* network learns, on normal images only, to reproduce what the frozen ImageNet
*source* network computes at several intermediate layers. On normal images it succeeds; on
anomalies, which it never saw, its outputs drift from the source's, and that discrepancy is the
anomaly score.

1. Source: the frozen packaged backbone. Its outputs at four taps, by default the deepest stage of
   each of the backbone's four coarsest strides (EfficientNet-Lite0: ``stage2``, ``stage3``,
   ``stage5``, ``stage7`` at strides 4, 8, 16, 32, with 24, 40, 112 and 320 channels), as the
   authors' code taps the ends of VGG-16's blocks 2 to 5 (strides 4 to 32). Each tap's channels are
   standardised with their mean and std over the first fit's training images (an addition to the
   paper: the taps' RMS values on bottle range from 2.8 to 12, which would let the finest layers
   dominate the squared distances).
2. Cloner: VGG-like and much thinner than the source, as the paper's (whose cloner has 16-channel
   3x3 convolutions and a wide convolution per block): a stride-2 3x3 convolution and a 3x3
   convolution of ``width // 2`` channels; then for each tap, 2x2 max-pooling down to its stride,
   ``depth`` 3x3 convolutions of ``width`` channels (batch norm, ReLU) and a linear 3x3
   convolution to the tap's channels, whose output is the cloner's version of that tap and the
   input of the next block. At the defaults 0.2 M parameters, against the 3.0 M of EfficientNet-Lite0
   up to stage7.
3. Loss, the paper's form (its eq. 3), per image and summed over the taps ``l``:
   ``L = sum_l L_val(l) + lambda * sum_l L_dir(l)`` with ``L_val`` the mean squared distance of
   the cloner's and the source's (standardised) outputs (eq. 1) and ``L_dir = 1 - cos`` of the
   two outputs flattened to vectors (eq. 2); ``lambda = direction_weight = 0.5``. The authors'
   code puts its ``lamda`` (0.5 for MVTec AD) on ``L_val`` instead: ``sum L_dir + 0.5 sum L_val``,
   which is the paper's form with ``lambda = 2`` times 1/2 (a factor that changes neither Adam's
   steps, up to its epsilon, nor the ranking of scores). ``lambda`` was chosen on the mean of the
   three categories below: 0.125, 0.5 and 2 (the authors' code) give a mean AUPRO of the default
   map of 0.870, 0.872 and 0.861. Training: Adam, learning rate 1e-3 as in the authors' code, on
   :func:`flawmap.training.train` (seeded, checkpoint and resume, loss bar); the weights of the
   last epoch are kept.
4. Image score: the loss ``L`` of the image itself, summed over the ``scored_taps`` coarsest taps.
   The authors train on their 4 taps but score and draw maps with the 3 coarsest; here that
   costs the default map 0.058 mean AUPRO (table below) for an equal image AUROC, so every tap
   is scored by default (``scored_taps=4``).
5. Localization (``localization``):

   - ``"discrepancy"`` (the default): the loss per position, ``mean_c (cloner - source)^2 +
     lambda (1 - cos)`` over the channels at each position of each scored tap, upsampled
     bilinearly to the finest scored tap's grid and summed over the taps; plain inference,
     exportable to ONNX. Not one of the paper's maps; chosen because it is the best map on each
     of the three categories (table below), at a third of the gradients' cost.
   - ``"gradient"`` (the paper's): the gradient of ``L`` with respect to the input image,
     ``sum_RGB |dL/dx|`` per pixel.
   - ``"smoothgrad"`` (Smilkov et al. 2017, in the authors' code): that saliency averaged over
     ``smoothgrad_samples`` copies of the image with Gaussian noise. The noise std is 5% of the
     image's value range, the SmoothGrad paper's definition with the authors' multiplier 0.05;
     their code divides 0.05 by the range and squares it (a std of 0.25% of the range for their
     [0, 1] images, under one grey level: their SmoothGrad is nearly the plain gradient). They
     average 50 copies; 10, the default, do as well (0.577 mean AUPRO against 0.579, table
     below) at a fifth of the time. The noise draws are the same for every image
     (:data:`SMOOTHGRAD_SEED`), so a map is a pure function of its image.
   - ``"guided"`` (guided backpropagation, Springenberg et al. 2015, the authors' default
     ``gbp``): the saliency with every rectifier of both networks passing only positive gradients
     where its input was positive (:class:`GuidedRectifiers`). The authors hook the cloner's
     ReLUs only; with this source that map is the plain gradient's to 0.012 AUPRO on each category
     (the source's Jacobian dominates the input gradient), while guiding both networks gains
     0.086 mean AUPRO over it.

   The three attributions get a grey-scale morphological opening with the 3x3 elliptic
   (cross-shaped) element of the authors' evaluation, then the shared Gaussian smoothing
   (``sigma``, 4 px as in the authors' code). The authors smooth first and open the thresholded
   maps afterwards; a 3-pixel opening of a map already smoothed at 4 px changes almost nothing,
   so it is applied first, where it removes the isolated one-pixel peaks of raw input gradients.
   The authors also rescale each attribution by its own minimum and 99th percentile (and, for
   SmoothGrad and guided backpropagation, by its minimum and maximum); that is left out, since
   it makes maps of different images incomparable (a normal image's map would peak as high as a
   defect's) while flawmap calibrates one threshold on normal images. The attributions need
   autograd in the scorer, so they cannot be exported to ONNX (:meth:`MKDScorer.export_error`).

Measured on bottle, screw and capsules (256 px, 15 epochs, one fit per category and ``lambda``,
seed 0, every map drawn from the same fitted cloner, ``benchmarks/bench_mkd.py``; the "cloner
only" rows with the guided context around the cloner alone; one thread of a shared 2-core
machine, so times are loaded): pixel AUROC / AUPRO per category, their mean, and ``predict`` ms
per image (mean of the three). The image AUROC does not depend on the map: 0.997 / 0.019 / 0.702 (mean
0.573) with the 4 taps, 0.997 / 0.021 / 0.698 (0.572) with 3.

=============================  =============  =============  =============  =============  =====
map (``lambda`` 0.5), taps     bottle         screw          capsules       mean           ms
=============================  =============  =============  =============  =============  =====
discrepancy, 4 (default)       0.984 / 0.936  0.952 / 0.836  0.979 / 0.843  0.972 / 0.872     93
discrepancy, 3                 0.983 / 0.922  0.942 / 0.808  0.967 / 0.713  0.964 / 0.814     98
gradient, 4                    0.946 / 0.795  0.791 / 0.346  0.514 / 0.107  0.750 / 0.416    280
gradient, 3 (the authors')     0.945 / 0.793  0.790 / 0.341  0.515 / 0.107  0.750 / 0.414    301
smoothgrad (10 copies), 4      0.935 / 0.835  0.896 / 0.653  0.622 / 0.243  0.818 / 0.577   1847
smoothgrad (50, authors'), 4   0.938 / 0.842  0.896 / 0.645  0.626 / 0.250  0.820 / 0.579   7778
guided, 4                      0.887 / 0.579  0.878 / 0.620  0.793 / 0.296  0.853 / 0.498    319
guided, cloner only, 4         0.946 / 0.795  0.773 / 0.334  0.512 / 0.107  0.744 / 0.412    286
guided, cloner only, 3         0.945 / 0.794  0.772 / 0.329  0.513 / 0.106  0.743 / 0.410    285
=============================  =============  =============  =============  =============  =====

``lambda`` with the discrepancy map and 4 taps (image AUROC mean; pixel AUROC / AUPRO mean):
0.125: 0.574, 0.969 / 0.870; 0.5: 0.573, 0.972 / 0.872; 2 (the authors' code): 0.566,
0.973 / 0.861. With the gradient map the AUPRO means are 0.403, 0.416 and 0.440.

Screw's image AUROC of 0.02 is a real inversion, not noise: the mean loss of its 21 good test
images (2.52) is above that of 10 training images (1.94) and of every defect type (2.02 to
2.10), so this subset's good test images differ from its training images in a way the
whole-image loss measures and the map does not (pixel AUROC 0.95). Fit time, default settings:
71 s for bottle (209 images), 17 s for screw, 27 s for capsules (``flawmap benchmark``, loaded).
The gradient maps hardly depend on the training: on the tests' synthetic defect, a cloner
trained 30 epochs and one left at its initialisation give gradient maps of the same contrast
(defect over the rest: 1.87 and 1.89), while the trained cloner's discrepancy map rises 1.5x
more over the clean image's (``test_a_trained_cloner_locates_the_defect_better_than_an_untrained_one``).

Incremental fit (``partial_fit``): the cloner trains ``epochs`` more epochs on the new images only
(fresh optimiser, standardisation of the first fit), with the forgetting RLR describes. The
threshold comes from held-out normal images (``calibration_fraction``), as for every trained
method.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from flawmap import postprocess
from flawmap.backbones import Backbone, FeatureInfo
from flawmap.errors import FlawmapError
from flawmap.features import channel_statistics
from flawmap.models.methods import register_method
from flawmap.models.scorer import PatchScores, Scorer
from flawmap.models.trained import TrainedModel
from flawmap.training import seeded_init

LOCALIZATIONS = ("gradient", "smoothgrad", "guided", "discrepancy")
"""The anomaly maps MKD offers (``localization``); the first three are input attributions."""

SMOOTHGRAD_NOISE = 0.05
"""Standard deviation of SmoothGrad's noise, as a fraction of each image's value range (the
authors' multiplier)."""

SMOOTHGRAD_SEED = 0
"""Seed of SmoothGrad's noise: every image gets the same draws, so its map is a pure function of
the image."""

N_DEFAULT_TAPS = 4
"""Taps used when none are given: the deepest stage of each of the four coarsest strides."""

GRADIENT_CHUNK = 1
"""Images per backward pass of the gradient map. One: every image's map then comes from the same
computation whatever its batch (with more, the convolutions' algorithms and rounding change
with the batch size, and the input gradients by 0.1%), and autograd, which keeps every
activation of both networks, holds one image's (about 0.1 GB at 256 px)."""


class MKDScorer(Scorer):
    """Images -> the loss of the cloner against the source (image scores) and an anomaly map.

    ``embed`` is the identity: both networks read the images, and the attributions differentiate
    with respect to them. ``learned`` holds what fitting sets: the cloner and each tap's
    standardisation (buffers ``mean`` and ``std``, ``C_l`` each). The score and the maps use the
    ``scored_taps`` coarsest taps; training uses all of them.
    """

    def __init__(
        self,
        backbone: Backbone,
        taps: tuple[str, ...],
        *,
        width: int,
        depth: int,
        direction_weight: float,
        scored_taps: int,
        localization: str,
        smoothgrad_samples: int,
    ) -> None:
        super().__init__(backbone, taps)
        tap_info = backbone.tap_info(taps)
        standardizations = nn.ModuleList(_Standardization(info.channels) for info in tap_info)
        self.learned = nn.ModuleDict({"cloner": Cloner(tap_info, width, depth), "standardization": standardizations})
        if not 1 <= scored_taps <= len(taps):
            raise FlawmapError(f"scored_taps must be between 1 and the {len(taps)} taps, got {scored_taps}")
        self.direction_weight = direction_weight
        self.scored_taps = scored_taps
        self.localization = localization
        self.smoothgrad_samples = smoothgrad_samples
        self.eval()  # batch norm of the cloner: running statistics except while training

    @property
    def cloner(self) -> Cloner:
        return self.learned["cloner"]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) -> the same images: MKD's networks and attribution read pixels."""
        return images

    def score(self, images: torch.Tensor) -> PatchScores:
        """Images (B, 3, S, S) -> map (B, S, S) for the attributions, (B, h, w) for
        ``"discrepancy"`` (the finest scored tap's grid); image scores: the loss (B,)."""
        if self.localization == "discrepancy":
            source, cloned = self.scored(*self.outputs(images))
            return PatchScores(self._discrepancy_map(source, cloned), self.image_losses(source, cloned))
        if self.localization == "smoothgrad":
            losses = self.image_losses(*self.scored(*self.outputs(images)))
            return PatchScores(grey_opening(torch.cat([self._smoothgrad(image) for image in images])), losses)
        losses, saliencies = [], []
        for chunk in images.split(GRADIENT_CHUNK):
            chunk_losses, saliency = self._saliency(chunk, guided=self.localization == "guided")
            losses.append(chunk_losses)
            saliencies.append(saliency)
        return PatchScores(grey_opening(torch.cat(saliencies)), torch.cat(losses))

    def source_levels(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The source's standardised tap outputs (B, C_l, h_l, w_l), finest first, float32."""
        with self.autocast(images.device):
            levels = self.backbone.features(images, self.taps)
        return self.standardized(levels)

    def standardized(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        """Raw source outputs (B, C_l, h_l, w_l) -> standardised per channel, float32."""
        return [standardize(level.float()) for standardize, level in zip(self.learned["standardization"], levels)]

    def cloned_levels(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The cloner's outputs (B, C_l, h_l, w_l) for each tap, float32."""
        with self.autocast(images.device):
            levels = self.cloner(images)
        return [level.float() for level in levels]

    def outputs(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(source levels, cloner levels) of images (B, 3, S, S)."""
        return self.source_levels(images), self.cloned_levels(images)

    def scored(
        self, source: list[torch.Tensor], cloned: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The levels of the ``scored_taps`` coarsest taps of both networks."""
        first = len(source) - self.scored_taps
        return source[first:], cloned[first:]

    def image_losses(self, source: list[torch.Tensor], cloned: list[torch.Tensor]) -> torch.Tensor:
        """Step 3 per image: ``sum_l MSE_l + lambda sum_l (1 - cos_l)`` (B,) over the levels given."""
        total = torch.zeros(source[0].shape[0], device=source[0].device)
        for target, prediction in zip(source, cloned):
            squared = (prediction - target).pow(2).flatten(1).mean(dim=1)  # L_val, the paper's eq. 1
            direction = 1.0 - F.cosine_similarity(prediction.flatten(1), target.flatten(1), dim=1)  # L_dir, eq. 2
            total = total + squared + self.direction_weight * direction  # L_total, eq. 3
        return total

    def export_error(self) -> str | None:
        """The attribution maps need autograd, which an ONNX graph cannot hold."""
        if self.localization != "discrepancy":
            return (
                f'mkd with localization="{self.localization}" cannot be exported to ONNX (its map is a gradient '
                'computed with autograd); fit it with localization="discrepancy" to export'
            )
        return None

    def _saliency(self, images: torch.Tensor, *, guided: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, S, S) -> their losses (B,) and ``sum_RGB |dL/dx|`` (B, S, S), the
        paper's attribution (``dL_total / dx``).

        Runs autograd even when called in inference mode (as ``predict`` does), on a copy of the
        images that requires grad. The images of a batch do not interact (eval-mode batch norm),
        so the gradient of the summed loss is each image's own. ``guided``: guided
        backpropagation through the rectifiers of both networks (:class:`GuidedRectifiers`); it
        changes the backward pass only, so the losses are the same.
        """
        with torch.inference_mode(False), torch.enable_grad():
            inputs = images.detach().clone().requires_grad_(True)
            with GuidedRectifiers() if guided else nullcontext():
                losses = self.image_losses(*self.scored(*self.outputs(inputs)))
            (gradient,) = torch.autograd.grad(losses.sum(), inputs)
        return losses.detach(), gradient.abs().sum(dim=1)

    def _smoothgrad(self, image: torch.Tensor) -> torch.Tensor:
        """One image (3, S, S) -> SmoothGrad (1, S, S): the mean of :meth:`_saliency` over
        ``smoothgrad_samples`` copies with Gaussian noise of std ``SMOOTHGRAD_NOISE`` x its range."""
        generator = torch.Generator().manual_seed(SMOOTHGRAD_SEED)
        spread = SMOOTHGRAD_NOISE * (image.max() - image.min())
        total = torch.zeros(1, *image.shape[-2:], device=image.device)
        for _ in range(self.smoothgrad_samples):
            noise = torch.randn(image.shape, generator=generator).to(image.device)
            total = total + self._saliency((image + spread * noise).unsqueeze(0))[1]
        return total / self.smoothgrad_samples

    def _discrepancy_map(self, source: list[torch.Tensor], cloned: list[torch.Tensor]) -> torch.Tensor:
        """Step 5, ``"discrepancy"``: per-position loss of each level given, upsampled to the
        first (finest) level's grid and summed: (B, h_0, w_0)."""
        grid = tuple(source[0].shape[-2:])
        total = torch.zeros(source[0].shape[0], *grid, device=source[0].device)
        for target, prediction in zip(source, cloned):
            squared = (prediction - target).pow(2).mean(dim=1)
            direction = 1.0 - F.cosine_similarity(prediction, target, dim=1)
            level_map = squared + self.direction_weight * direction  # (B, h_l, w_l)
            if tuple(level_map.shape[-2:]) != grid:
                level_map = postprocess.upsample(level_map, grid)
            total = total + level_map
        return total

    def training_loss(self, batch: list[torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """Mean loss of a training batch over all taps: images (B, 3, S, S) stored as float16, then
        the raw source levels (B, C_l, h_l, w_l) (float16, cached); ``generator`` is unused."""
        images, *levels = batch
        return self.image_losses(self.standardized(levels), self.cloned_levels(images.float())).mean()


class GuidedRectifiers(TorchFunctionMode):
    """Within this context, ``F.relu`` and ``F.relu6`` (hence ``nn.ReLU``) backpropagate as in
    guided backpropagation (Springenberg et al. 2015, the authors' ``GuidedBackprop``): only
    positive gradients, and only where the rectifier passed its input. Forward values are
    unchanged. A torch function mode: nothing outside the ``with`` block is affected."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is F.relu or func is F.relu6:
            return _GuidedRectifier.apply(args[0], 6.0 if func is F.relu6 else math.inf)
        return func(*args, **(kwargs or {}))


class _GuidedRectifier(torch.autograd.Function):
    """``clamp(x, 0, upper)`` whose backward passes ``max(g, 0)`` where ``0 < x < upper``."""

    @staticmethod
    def forward(ctx: Any, inputs: torch.Tensor, upper: float) -> torch.Tensor:
        ctx.save_for_backward((inputs > 0) & (inputs < upper))
        return inputs.clamp(0.0, upper)

    @staticmethod
    def backward(ctx: Any, gradient: torch.Tensor) -> tuple[torch.Tensor, None]:
        (passed,) = ctx.saved_tensors
        return gradient.clamp(min=0.0) * passed, None


class Cloner(nn.Module):
    """The cloner (step 2): images (B, 3, S, S) -> one map (B, C_l, ceil(S / s_l), ...) per tap.

    Parameters
    ----------
    tap_info : list of FeatureInfo
        The taps to imitate, strides non-decreasing, each at least 2 and a power of 2 apart.
    width : int
        Channels of the hidden convolutions, at least 2 (the stem has ``width // 2``).
    depth : int
        Hidden 3x3 convolutions per tap block.
    """

    def __init__(self, tap_info: list[FeatureInfo], width: int, depth: int) -> None:
        super().__init__()
        stem_width = width // 2
        self.stem = nn.Sequential(
            *_conv_bn_relu(3, stem_width, stride=2), *_conv_bn_relu(stem_width, stem_width)
        )  # stride 2
        blocks, in_channels, stride = [], stem_width, 2
        for info in tap_info:
            factor = info.stride // stride
            if info.stride < stride or factor * stride != info.stride or factor & (factor - 1):
                raise FlawmapError(
                    f"tap {info.name!r} (stride {info.stride}) cannot follow stride {stride}: mkd taps need strides of at "
                    "least 2, in increasing order, each a power of 2 times the previous one"
                )
            layers: list[nn.Module] = [nn.MaxPool2d(2, ceil_mode=True) for _ in range(factor.bit_length() - 1)]
            for index in range(depth):
                layers += _conv_bn_relu(in_channels if index == 0 else width, width)
            layers.append(nn.Conv2d(width, info.channels, 3, padding=1))
            blocks.append(nn.Sequential(*layers))
            in_channels, stride = info.channels, info.stride
        self.blocks = nn.ModuleList(blocks)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(images)
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return outputs


class _Standardization(nn.Module):
    """Per-channel ``(x - mean) / std`` of one tap; ``mean`` and ``std`` (C,) are buffers."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))

    def set_from(self, levels: torch.Tensor) -> None:
        """Set mean and std from training outputs (N, C, h, w)."""
        mean, std = channel_statistics(levels)
        self.mean.copy_(mean)
        self.std.copy_(std)

    def forward(self, levels: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> standardised (B, C, h, w)."""
        return (levels - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)


@register_method("mkd")
@dataclass(kw_only=True, eq=False)
class MKD(TrainedModel):
    """Multiresolution knowledge distillation (see module docstring). Method hyper-parameters:

    Parameters
    ----------
    localization : {"discrepancy", "gradient", "smoothgrad", "guided"}
        The anomaly map (step 5): the per-position loss (the default, exportable), or one of the
        authors' three input attributions.
    width : int
        Hidden channels of the cloner (its stem has half).
    depth : int
        Hidden 3x3 convolutions per tap in the cloner.
    direction_weight : float
        ``lambda``, the weight of the direction loss ``1 - cos`` against the squared distance.
    scored_taps : int
        How many of the coarsest taps the image score and the maps sum (training uses every
        tap); the authors score 3 of their 4.
    smoothgrad_samples : int
        Noisy copies averaged by ``localization="smoothgrad"`` (the authors use 50).

    and the training parameters of :class:`flawmap.models.trained.TrainedModel` (Adam training
    of the cloner; here ``epochs`` 15). ``taps`` (shared parameter): None taps the deepest stage
    of each of the backbone's four coarsest strides.

    Examples
    --------
    >>> model = MKD().fit("bottle/")                             # doctest: +SKIP
    >>> model.predict("bottle/test/broken_large")[0].score       # doctest: +SKIP
    """

    quick_params = {"image_size": 64, "epochs": 1, "width": 8, "depth": 1, "train_batch_size": 4}

    localization: str = "discrepancy"
    width: int = 32
    depth: int = 1
    direction_weight: float = 0.5
    scored_taps: int = 4
    smoothgrad_samples: int = 10
    epochs: int = 15

    def _validate_method_params(self) -> None:
        if self.localization not in LOCALIZATIONS:
            raise FlawmapError(f"localization must be one of {', '.join(LOCALIZATIONS)}, got {self.localization!r}")
        if self.width < 2 or self.depth < 1:
            raise FlawmapError(f"need width >= 2 and depth >= 1, got width={self.width}, depth={self.depth}")
        if not self.direction_weight >= 0.0:
            raise FlawmapError(f"need direction_weight >= 0, got {self.direction_weight}")
        if self.smoothgrad_samples < 1:
            raise FlawmapError(f"need smoothgrad_samples >= 1, got {self.smoothgrad_samples}")

    def _default_taps(self, backbone: Backbone) -> tuple[str, ...]:
        """The deepest stage of each of the backbone's four coarsest strides."""
        deepest = {info.stride: info.name for info in backbone.feature_info}  # later stages overwrite
        return tuple(deepest[stride] for stride in sorted(deepest)[-N_DEFAULT_TAPS:])

    def _new_scorer(self, backbone: Backbone, taps: tuple[str, ...]) -> MKDScorer:
        with seeded_init(self.random_state):  # the cloner's initial weights
            return MKDScorer(
                backbone,
                taps,
                width=self.width,
                depth=self.depth,
                direction_weight=self.direction_weight,
                scored_taps=self.scored_taps,
                localization=self.localization,
                smoothgrad_samples=self.smoothgrad_samples,
            )

    def _learn(self, feature_batches: Iterable[torch.Tensor]) -> None:
        images, levels = self._training_data(feature_batches)
        if self.n_fits_ == 0:  # first fit: standardise with its outputs
            for standardization, level in zip(self.scorer_.learned["standardization"], levels):
                standardization.set_from(level)
        self._train(self.scorer_.cloner, [images, *levels], self.scorer_.training_loss, "mkd")

    def _training_data(self, image_batches: Iterable[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The training images (N, 3, S, S) and the source's raw tap outputs (N, C_l, h_l, w_l),
        cached on the CPU (float16, or float32 with ``float32_training``): the source runs once
        per fit, not once per epoch."""
        images, *levels = self._cache((batch, *self._source_outputs(batch)) for batch in image_batches)
        return images, levels

    def _source_outputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The source's raw tap outputs of images (B, 3, S, S)."""
        with torch.no_grad(), self.scorer_.autocast(images.device):
            return self.scorer_.backbone.features(images, self.scorer_.taps)

    def to_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"train_losses_": self.train_losses_}, dict(self.scorer_.learned.state_dict())

    def from_state(self, fitted: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.scorer_.learned.load_state_dict(tensors)
        self.train_losses_ = list(fitted["train_losses_"])


def grey_opening(maps: torch.Tensor) -> torch.Tensor:
    """Grey-scale opening of maps (B, H, W) with the 3x3 cross (OpenCV's 3x3 ellipse): the
    minimum over each pixel's cross, then the maximum over the cross of that (B, H, W)."""
    return _cross_max(-_cross_max(-maps))


def _cross_max(maps: torch.Tensor) -> torch.Tensor:
    """Maximum over each pixel and its 4 neighbours (inside the map): (B, H, W) -> (B, H, W)."""
    planes = maps.unsqueeze(1)
    across = F.max_pool2d(planes, (1, 3), stride=1, padding=(0, 1))
    down = F.max_pool2d(planes, (3, 1), stride=1, padding=(1, 0))
    return torch.maximum(across, down).squeeze(1)


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> list[nn.Module]:
    """3x3 convolution (output ``ceil(size / stride)``), batch norm, ReLU."""
    return [
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]
