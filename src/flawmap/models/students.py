"""Uninformed Students: Bergmann, Fauser, Sattlegger, Steger, "Uninformed Students: Student-Teacher
Anomaly Detection with Discriminative Latent Embeddings", CVPR 2020.

An ensemble of randomly initialised *students* learns to regress a pretrained *teacher*'s
descriptor of every image patch, on normal images only. Where the image looks like the training
images the students agree with the teacher and with each other; on a defect they were never
trained on, their mean misses the teacher (regression error) and they disagree (predictive
uncertainty).

1. Teacher (paper Sec. 3.1): the frozen packaged backbone's dense features, at each tapped stage
   (default the stride-8 and stride-16 stages), averaged over a 3x3 neighbourhood as PatchCore
   does, and standardised per channel with the mean and std of the training images (Sec. 3.2).
   *Choice*: the paper distils a fast patch-sized teacher from an ImageNet network because it
   needs a descriptor for every pixel of the image (stride 1, made dense by its fast dense
   evaluation) and a choice of patch sizes. Here the anomaly map lives on the backbone's stride-8
   grid like every flawmap method (the shared postprocess upsamples and smooths it), and the
   backbone already is a fast dense network; a distilled teacher would be a second, trained
   approximation of the same features (the paper's distillation targets the ImageNet network's
   descriptors) at the cost of another training run on this CPU. So the backbone is the teacher.
   Not measured here: a distilled teacher against the backbone's own features.
2. Scales (the paper's patch sizes p = 17, 33, 65): one teacher per tapped stage, whose receptive
   field grows with its stride, and one ensemble of students per scale.
3. Students (Sec. 3.2): ``n_students`` small randomly initialised CNNs per scale (each its own
   seeded initialisation), from the image (ImageNet-normalised like the teacher's input) to the
   teacher's grid and width: a patchify stem (``k x k`` convolution at stride ``k = min(4,
   stride)``, ``student_width / 2`` channels), then a 3x3 convolution, then 3x3 stride-2
   convolutions (``student_width`` channels from stride 8 on) each followed by ``student_depth``
   3x3 convolutions, leaky ReLU (slope 5e-3, as the paper's networks), and a 1x1 head to the
   teacher's channels. The students are not the teacher's architecture (an ImageNet network is
   far too slow to train from scratch three times per scale on a CPU); their grid matches the
   teacher's exactly (``ceil(S / stride)``, like the backbone's), and their receptive field
   (:func:`receptive_field`: 36 px at stride 8, 84 px at stride 16 with the defaults) is about
   the part of the teacher's that carries weight (its nominal one is 67 + 16 px and 339 + 32 px
   with the 3x3 average, but a deep network's effective receptive field is a small central part
   of its nominal one).
4. Training (:func:`flawmap.training.train`, Sec. 3.2 Eq. 3): every student minimises the squared
   distance ``||mu_s(x) - t(x)||^2`` (summed over channels, averaged over positions) between its
   prediction and the standardised teacher descriptor; the loss is summed over students and
   scales; Adam (learning rate 2e-3, batches of 8, 20 epochs by default). The weights after the
   last epoch are kept (``train_losses_`` records each epoch's mean training loss).
5. Scores (Sec. 3.3, Eq. 4-6): per position of a scale, the regression error
   ``e = ||mean_i mu_i - t||^2`` and the predictive uncertainty ``v = mean_channels(var_i mu_i)``
   (the students' variance, averaged over channels), each standardised by its mean and std over
   every position of the training images after training, and summed:
   ``(e - e_mean) / e_std + (v - v_mean) / v_std``. Coarser scales are upsampled bilinearly to the
   finest grid and the scales averaged. The shared pipeline then upsamples to the input size and
   smooths (sigma 4); the image score is the maximum of that map.

Measured (MVTec bottle, 256 px, 188 training images; a script with this module's students,
loss and score formula on cached teacher features, the defaults, masks compared at 256 px; on the
shared, heavily loaded 2-core machine): after 4 epochs image AUROC 0.975, pixel AUROC 0.963
(regression error alone 0.993 / 0.980, uncertainty alone 0.891 / 0.690; after 2 epochs 0.958 /
0.864). One epoch costs about 9 CPU-seconds (one thread, process time). The full 20-epoch CLI fit
was not measured in this session (the machine gave the run about a tenth of a core).

Calibration: trained networks cannot score their training images out of sample, so the threshold
comes from the held-out share ``calibration_fraction`` of the normal images (the base class).

Incremental fit (``partial_fit``), as RLR's: training continues from the current weights on the
new images only, ``epochs`` more epochs with a fresh optimiser; the teacher standardisation stays
that of the first fit, the score standardisation (step 5) is measured again on the new images.
The earlier images are not seen again, so the students can forget them: to learn several sets of
images equally, fit them together.

The students run under the runtime's precision (bfloat16 autocast where the hardware is fast at
it; weights and losses stay float32). With ``checkpoint_dir`` the training state is saved after
every epoch (``<checkpoint_dir>/fit-<n>``, safetensors + JSON, no pickle) and a fit with the same
hyper-parameters (``epochs`` aside) and training data resumes from the last finished epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple

import torch
from torch import nn

from flawmap import postprocess
from flawmap.backbones import Backbone
from flawmap.errors import FlawmapError
from flawmap.features import channel_statistics, local_average
from flawmap.models.base import PatchScores, Scorer, check_positive_odd, register_method
from flawmap.models.trained import TrainedModel
from flawmap.training import cache_batches, seeded_init

_LEAKY_SLOPE = 5e-3
"""Negative slope of the students' leaky ReLUs (the paper's networks use 5e-3)."""

_MIN_RELATIVE_STD = 0.05
"""Floor of the score standardisation's std, relative to the mean (step 5)."""

_STEM_STRIDE = 4
"""Largest stride of the students' patchify stem."""


class StudentInputs(NamedTuple):
    """What the students and the teacher see of a batch: ``images`` (B, 3, S, S) in [0, 1] and
    ``teacher``, the teacher's descriptors at each scale, (B, C_l, h_l, w_l), finest first."""

    images: torch.Tensor
    teacher: list[torch.Tensor]


class StudentsScorer(Scorer):
    """Images -> teacher descriptors (step 1) -> the students' scores (step 5).

    ``ensembles`` holds one :class:`StudentEnsemble` per tapped stage; they score once trained.
    """

    def __init__(
        self,
        backbone: Backbone,
        taps: tuple[str, ...],
        *,
        neighborhood_size: int,
        n_students: int,
        width: int,
        depth: int,
    ) -> None:
        super().__init__(backbone, taps)
        self.neighborhood_size = neighborhood_size
        self.ensembles = nn.ModuleList(
            StudentEnsemble(info.channels, info.stride, n_students, width, depth) for info in backbone.tap_info(taps)
        )

    def embed(self, images: torch.Tensor) -> StudentInputs:
        """Images (B, 3, S, S) -> the images and the locally averaged levels (B, C_l, h_l, w_l)."""
        return StudentInputs(images, [local_average(level, self.neighborhood_size) for level in self.levels(images)])

    def score(self, features: StudentInputs) -> PatchScores:
        """Step 5: the mean over scales of the standardised error plus uncertainty, (B, h_0, w_0)."""
        pixels = self.student_input(features.images)
        finest_grid = tuple(features.teacher[0].shape[-2:])
        scale_maps = []
        for ensemble, descriptors in zip(self.ensembles, features.teacher):
            with self.autocast(pixels.device):
                predictions = ensemble(pixels)
            error, uncertainty = ensemble.error_and_uncertainty(predictions.float(), descriptors)
            scale_map = ensemble.standardized_score(error, uncertainty)
            if tuple(scale_map.shape[-2:]) != finest_grid:
                scale_map = postprocess.upsample(scale_map, finest_grid)  # bilinear, to the finest grid
            scale_maps.append(scale_map)
        return PatchScores(torch.stack(scale_maps).mean(dim=0))

    def student_input(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) in [0, 1] -> normalised as the teacher's input (the backbone's mean and std)."""
        return (images.float() - self.backbone.mean) / self.backbone.std

    def training_loss(self, batch: list[torch.Tensor]) -> torch.Tensor:
        """Step 4 on one cached batch ``[images, teacher level 0, ...]``: the students' squared
        regression errors, summed over channels, averaged over positions and images, summed
        over students and scales."""
        pixels = self.student_input(batch[0])
        total = torch.zeros((), device=pixels.device)
        for ensemble, descriptors in zip(self.ensembles, batch[1:]):
            with self.autocast(pixels.device):
                predictions = ensemble(pixels)
            target = ensemble.standardize(descriptors.float())
            total = total + (predictions.float() - target).square().sum(dim=2).mean(dim=(1, 2, 3)).sum()
        return total

    def set_score_statistics(self, cached: list[torch.Tensor], batch_size: int) -> None:
        """Measure step 5's standardisation on cached training data ``[images, level 0, ...]``
        (rows on the CPU, fed ``batch_size`` at a time to the scorer's device)."""
        device = self.backbone.mean.device
        moments = torch.zeros(len(self.ensembles), 2, 3, dtype=torch.float64)  # scale, (e, v), (n, sum, sum of squares)
        with torch.inference_mode():
            for start in range(0, cached[0].shape[0], batch_size):
                rows = [tensor[start : start + batch_size].to(device) for tensor in cached]
                pixels = self.student_input(rows[0])
                for scale, (ensemble, descriptors) in enumerate(zip(self.ensembles, rows[1:])):
                    with self.autocast(device):
                        predictions = ensemble(pixels)
                    error, uncertainty = ensemble.error_and_uncertainty(predictions.float(), descriptors.float())
                    moments[scale, 0] += _moments(error)
                    moments[scale, 1] += _moments(uncertainty)
        for ensemble, scale_moments in zip(self.ensembles, moments):
            ensemble.set_score_statistics(scale_moments)


class StudentEnsemble(nn.Module):
    """One scale's students (step 3), with the teacher's and the scores' standardisation.

    Parameters
    ----------
    channels, stride : int
        The teacher's descriptor width ``C`` and grid stride at this scale.
    n_students, width, depth : int
        Ensemble size and each student's width and depth (:func:`student_network`).
    """

    def __init__(self, channels: int, stride: int, n_students: int, width: int, depth: int) -> None:
        super().__init__()
        self.register_buffer("teacher_mean", torch.zeros(channels))
        self.register_buffer("teacher_std", torch.ones(channels))
        self.register_buffer("score_mean", torch.zeros(2))  # regression error, uncertainty
        self.register_buffer("score_std", torch.ones(2))
        self.students = nn.ModuleList(student_network(channels, stride, width, depth) for _ in range(n_students))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, S, S) -> every student's descriptors (M, B, C, h, w)."""
        return torch.stack([student(pixels) for student in self.students])

    def set_standardization(self, descriptors: torch.Tensor) -> None:
        """Per-channel mean and std of the training images' teacher descriptors (N, C, h, w)."""
        mean, std = channel_statistics(descriptors)
        self.teacher_mean.copy_(mean)
        self.teacher_std.copy_(std)

    def standardize(self, descriptors: torch.Tensor) -> torch.Tensor:
        """Teacher descriptors (B, C, h, w) -> standardised per channel (the students' targets)."""
        return (descriptors - self.teacher_mean.view(-1, 1, 1)) / self.teacher_std.view(-1, 1, 1)

    def error_and_uncertainty(self, predictions: torch.Tensor, descriptors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions (M, B, C, h, w) and teacher descriptors (B, C, h, w) -> Eq. 4's regression
        error ``||mean_i mu_i - t||^2`` and Eq. 5's uncertainty ``mean_c var_i mu_i``, (B, h, w) each."""
        error = (predictions.mean(dim=0) - self.standardize(descriptors)).square().sum(dim=1)
        uncertainty = predictions.var(dim=0, unbiased=False).mean(dim=1)
        return error, uncertainty

    def set_score_statistics(self, moments: torch.Tensor) -> None:
        """Step 5's mean and std of the error and the uncertainty from their moments over the
        training positions (2, 3): rows (error, uncertainty), columns (count, sum, sum of squares).

        The std is at least :data:`_MIN_RELATIVE_STD` of the mean: a term that hardly varies
        over normal positions (untrained students' uncertainty is nearly their constant
        disagreement) carries no information, and dividing by its tiny std would only amplify
        float noise (batch-dependent convolution rounding) into the map."""
        count, total, squares = moments.unbind(dim=1)
        mean = total / count
        variance = (squares / count - mean.square()).clamp_min(0.0)
        self.score_mean.copy_(mean)
        self.score_std.copy_(variance.sqrt().maximum(_MIN_RELATIVE_STD * mean.abs()).clamp_min(1e-12))

    def standardized_score(self, error: torch.Tensor, uncertainty: torch.Tensor) -> torch.Tensor:
        """Eq. 6: ``(e - e_mean) / e_std + (v - v_mean) / v_std``, (B, h, w)."""
        return (error - self.score_mean[0]) / self.score_std[0] + (uncertainty - self.score_mean[1]) / self.score_std[1]


def student_network(channels: int, stride: int, width: int, depth: int) -> nn.Sequential:
    """A student: images (B, 3, S, S) -> descriptors (B, channels, ceil(S / stride), ceil(S / stride)).

    Patchify stem (``k x k`` at stride ``k = min(4, stride)``) with ``width // 2`` channels and a
    3x3 convolution; then per halving of the grid a 3x3 stride-2 convolution (``width`` channels
    once at stride 8 or more) and ``depth`` 3x3 convolutions; leaky ReLUs; a 1x1 head. ``S`` must
    be a multiple of the stem stride (image sizes are multiples of 8); stride-2 convolutions
    round up, as the backbone's do.
    """
    if stride & (stride - 1):
        raise FlawmapError(f"students need a power-of-two teacher stride, got {stride}")
    stem = min(stride, _STEM_STRIDE)
    stem_channels = max(width // 2, 1)
    layers: list[nn.Module] = [nn.Conv2d(3, stem_channels, stem, stride=stem), _activation()]
    layers += [nn.Conv2d(stem_channels, stem_channels, 3, padding=1), _activation()]
    current, in_channels = stem, stem_channels
    while current < stride:
        current *= 2
        out_channels = width if current >= 8 else stem_channels
        layers += [nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1), _activation()]
        for _ in range(depth):
            layers += [nn.Conv2d(out_channels, out_channels, 3, padding=1), _activation()]
        in_channels = out_channels
    layers.append(nn.Conv2d(in_channels, channels, 1))
    return nn.Sequential(*layers)


def receptive_field(network: nn.Sequential) -> int:
    """Side in input pixels of the receptive field of one output position of a plain stack of
    convolutions (and element-wise layers)."""
    size, jump = 1, 1
    for layer in network:
        if isinstance(layer, nn.Conv2d):
            size += (layer.kernel_size[0] - 1) * layer.dilation[0] * jump
            jump *= layer.stride[0]
    return size


def _moments(values: torch.Tensor) -> torch.Tensor:
    """Count, sum and sum of squares of ``values`` (any shape), float64 on the CPU, (3,)."""
    values = values.detach().double().flatten().cpu()
    return torch.stack([torch.tensor(float(values.numel()), dtype=torch.float64), values.sum(), values.square().sum()])


def _activation() -> nn.LeakyReLU:
    return nn.LeakyReLU(_LEAKY_SLOPE)


@register_method("students")
@dataclass(kw_only=True, eq=False)
class UninformedStudents(TrainedModel):
    """Uninformed Students student-teacher anomaly detector (see module docstring). Method
    hyper-parameters:

    Parameters
    ----------
    neighborhood_size : int
        Local averaging window of the teacher's descriptors (odd).
    n_students : int
        Students per scale, ``M`` (at least 2: the uncertainty is their variance).
    student_width, student_depth : int
        Channels of the students from stride 8 on, and 3x3 convolutions after each halving.

    and the training parameters of :class:`flawmap.models.trained.TrainedModel` (Adam on the
    cached images and descriptors; here ``learning_rate`` 2e-3).

    Examples
    --------
    >>> model = UninformedStudents().fit("bottle/")           # doctest: +SKIP
    >>> model.predict("bottle/test/broken_large")[0].score     # doctest: +SKIP
    """

    quick_params = {"image_size": 64, "epochs": 2, "n_students": 2, "student_width": 8, "student_depth": 1}

    neighborhood_size: int = 3
    n_students: int = 3
    student_width: int = 32
    student_depth: int = 1
    learning_rate: float = 2e-3

    def _validate_method_params(self) -> None:
        check_positive_odd("neighborhood_size", self.neighborhood_size)
        if self.n_students < 2:
            raise FlawmapError(f"n_students must be at least 2 (the uncertainty is their variance), got {self.n_students}")
        if self.student_width < 2 or self.student_depth < 0:
            raise FlawmapError(
                f"need student_width >= 2 and student_depth >= 0, got {self.student_width} and {self.student_depth}"
            )

    def _new_scorer(self, backbone: Backbone, taps: tuple[str, ...]) -> StudentsScorer:
        with seeded_init(self.random_state):  # every student's initial weights, one after another
            return StudentsScorer(
                backbone,
                taps,
                neighborhood_size=self.neighborhood_size,
                n_students=self.n_students,
                width=self.student_width,
                depth=self.student_depth,
            )

    def _learn(self, feature_batches: Iterable[StudentInputs]) -> None:
        cached = cache_batches([inputs.images, *inputs.teacher] for inputs in feature_batches)
        if self.n_fits_ == 0:  # first fit: standardise the teacher with its descriptors
            for ensemble, descriptors in zip(self.scorer_.ensembles, cached[1:]):
                ensemble.set_standardization(descriptors)
        self._train(self.scorer_.ensembles, cached, lambda batch, generator: self.scorer_.training_loss(batch), "students")
        self.scorer_.set_score_statistics(cached, self.runtime.batch_size)

    def to_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"train_losses_": self.train_losses_}, dict(self.scorer_.ensembles.state_dict())

    def from_state(self, fitted: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.scorer_.ensembles.load_state_dict(tensors)
        self.train_losses_ = list(fitted["train_losses_"])
