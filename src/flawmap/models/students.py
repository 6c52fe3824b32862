"""Uninformed Students: Bergmann, Fauser, Sattlegger, Steger, "Uninformed Students: Student-Teacher
Anomaly Detection with Discriminative Latent Embeddings", CVPR 2020.

An ensemble of randomly initialised *students* learns to regress a pretrained *teacher*'s
descriptor of every image patch, on normal images only. Where the image looks like the training
images the students agree with the teacher and with each other; on a defect they were never
trained on, their mean misses the teacher (regression error) and they disagree (predictive
uncertainty).

1. Teacher (Sec. 3.1, ``teacher="patch"``, the paper's): one patch network per patch size ``p`` in
   ``patch_sizes`` (17, 33, 65 px), :class:`PatchNetwork`, the paper's architectures (its
   supplementary material) trained once, category-agnostic, and shipped in the package
   (:data:`TEACHER_FILE`, 0.9 MB for the three). ``benchmarks/train_students_teacher.py``
   reproduces the file bit for bit from its seed; its docstring has the details. Differences
   from the paper, and why:

   - distilled from the default backbone (EfficientNet-Lite0, packaged ImageNet weights; its
     stride-8 and stride-16 stages averaged over the patch), not ResNet-18, whose ImageNet
     weights are not available offline; on random patches of scikit-image's photographs (17
     images), not ImageNet;
   - 8x narrower: 16 channels where the paper has 128, 32 where it has 256 (the descriptor keeps
     d = 128). Dense evaluation runs 4 networks per patch size at every pixel of a 256 px image
     on a CPU: at the paper's width that is tens of GFLOPs per network and image, here 0.14 /
     0.27 / 0.26 CPU-seconds (one thread, p = 17 / 33 / 65) per network and 256 px image;
   - the first convolution has a 6x6 kernel (and at p = 65 the third one 6x6) where the paper
     has 5x5, so that the receptive field is exactly ``p`` (the paper's layers see 32 and 60 px
     of their 33 and 65 px patches); no activation after the last layer (the descriptor);
   - the decorrelation loss sums the squared off-diagonal correlation coefficients (the plain
     sum is also minimised by anti-correlated channels), weighted 0.02; the triplet loss is an
     option of the script, off for the shipped teachers.

   The teachers' descriptors are standardised per channel with their mean and std over the
   training images (Sec. 3.2).
2. Students (Sec. 3.2): ``n_students`` (M = 3) networks of the teacher's architecture per patch
   size, each its own seeded random initialisation. Dense prediction (Sec. 3.1, Bailer et al.'s
   fast dense feature extraction) in its exact *a trous* form (:meth:`PatchNetwork.dense`):
   every max-pool at stride 1 and the later layers dilated, one descriptor per pixel of the
   reflect-padded image, equal to the network on each patch (a test checks it).
3. Training (:func:`flawmap.training.train`, Eq. 3): every student minimises the squared
   distance between its descriptor and the standardised teacher's, summed over channels,
   averaged over positions, summed over students and patch sizes; Adam (learning rate 2e-3,
   batches of 8 images, 40 epochs). *Choice*: each image of a batch gives one random window per
   patch size on which the strided network yields an 8 x 8 grid of patch descriptors (at stride
   1 / 4 / 8): the dense output at a random offset, sampled, as the network is
   translation-equivariant; a dense pass per step would cost 256 x 256 positions per image.
4. Validation (Sec. 3.3): ``validation_fraction`` (10%) of a fit's images, chosen by a seeded
   permutation, are not trained on; the error and uncertainty of every pixel of those images
   set their standardisation (mean and std). The images that calibrate the threshold
   (``calibration_fraction``, the base class) are a third, disjoint share.
5. Scores (Sec. 3.3, Eq. 4-6): per pixel and patch size, the regression error
   ``e = ||mean_i mu_i - t||^2`` and the predictive uncertainty ``v = mean_channels(var_i mu_i)``,
   standardised and summed, ``(e - e_mean) / e_std + (v - v_mean) / v_std`` (``score_terms``:
   or one of them); the patch sizes' maps averaged (Sec. 3.4). The shared pipeline smooths
   (sigma 4); the image score is the maximum of that map.

The backbone teacher (``teacher="backbone"``, the default, and how models saved before format 7
were fitted): the frozen backbone's features at the tapped stages (stride 8 and
16), averaged over 3x3, are the teacher; the students are small CNNs from the image to each
stage's grid (:func:`student_network`: a patchify stem, 3x3 convolutions, ``student_width``
channels, leaky ReLU), not the teacher's architecture; the maps live on the backbone's grids and
are upsampled.

*Default*: ``teacher="backbone"``. On the three real categories (below) the distilled patch
teachers lose to the backbone's features on the mean pixel AUROC (0.890 against 0.932) and AUPRO
(0.682 against 0.713) and on bottle's image AUROC (0.918 against 0.998), win the mean image AUROC
(0.758 against 0.645, screw's mostly), and their dense evaluation at every pixel costs 7-9 s per
256 px image on this CPU against about 0.1 s. The paper's teacher stays a tested option
(``--teacher patch``); what would make it win (wider teachers distilled from more than 17
photographs, more student windows per epoch) is not measured yet. The default on a quiet machine
(``flawmap benchmark`` on the three categories, benchmarks/results/students.json; image AUROC,
pixel AUROC, AUPRO, fit s, predict ms per image): bottle 0.998 / 0.982 / 0.908, 141 s, 50 ms;
screw 0.479 / 0.913 / 0.712, 15 s, 37 ms; capsules 0.567 / 0.907 / 0.526, 20 s, 34 ms.

Measured (MVTec AD bottle and screw, VisA capsules; 256 px; masks at their own resolution; fit
seconds are wall time on the shared, heavily loaded 2-core machine, one torch thread, about half
a core for the run; "auto" precision, which is bfloat16 autocast on this CPU). The patch teacher,
``flawmap benchmark DIR1 DIR2 DIR3 --methods students --param students.teacher=patch --batch-size 4
--num-workers 1`` (benchmarks/results/students_patch.json):

=========  ===========  ===========  =====  =====
category   image AUROC  pixel AUROC  AUPRO  fit s
=========  ===========  ===========  =====  =====
bottle     0.918        0.848        0.665  856
screw      0.713        0.935        0.794  167
capsules   0.642        0.888        0.586  143
mean       0.758        0.890        0.682
=========  ===========  ===========  =====  =====

Ablation (``benchmarks/bench_students.py``: one fit per category and teacher, its test split
scored once, the three scores from the same students; benchmarks/results/students_ablation.json).
Per metric: bottle, screw, capsules (mean); "-": not measured (no time left in this session). The
patch rows are one screw fit made before the benchmark's (see Spread) and one capsules fit, whose
e + v equals the benchmark's to the last digit (the fit is deterministic):

::

    teacher   score  image AUROC                 pixel AUROC                 AUPRO
    backbone  e + v  0.998 0.398 0.539 (0.645)  0.982 0.914 0.902 (0.932)  0.908 0.711 0.521 (0.713)
    backbone  e      0.999 0.338 0.607 (0.648)  0.984 0.922 0.928 (0.945)  0.920 0.746 0.540 (0.736)
    backbone  v      0.973 0.571 0.442 (0.662)  0.965 0.877 0.818 (0.887)  0.851 0.573 0.425 (0.616)
    patch     e + v    -   0.801 0.642            -   0.926 0.888            -   0.750 0.586
    patch     e        -   0.482 0.555            -   0.934 0.893            -   0.780 0.544
    patch     v        -   0.746 0.694            -   0.898 0.825            -   0.650 0.477

What the numbers say:

- The patch teacher does NOT beat the frozen backbone's features here: mean pixel AUROC 0.890
  against 0.932 and AUPRO 0.682 against 0.713; it wins the mean image AUROC (0.758 against
  0.645) and screw (pixel AUROC 0.935 / AUPRO 0.794 against 0.914 / 0.711), and loses bottle
  clearly (image AUROC 0.918, below the backbone's 0.998). Not verified causes: the teachers
  explain about half of the backbone descriptor's variance (distillation loss 68 / 70 / 82 of
  about 152 at the end of the 15 epochs for p = 17 / 33 / 65), and they are 8x narrower than
  the paper's; the students see one 8 x 8 window per image and patch size per epoch (40 epochs).
- e + v against e alone: with the backbone teacher e alone is better on every pixel metric (mean
  pixel AUROC 0.945 against 0.932, AUPRO 0.736 against 0.713), as before the held-out
  standardisation. With the patch teacher (screw and capsules; bottle not measured) the sum is
  about even with e on the pixel metrics (pixel AUROC 0.907 against 0.914, AUPRO 0.668 against
  0.662, means of the two) and much better on the image AUROC (0.722 against 0.518): the
  uncertainty, the weakest term alone, mostly helps the image score. The paper's combination
  holds here for the image score, not clearly for the pixel metrics.
- Spread: one screw fit before a change of the teacher standardisation in the 7th significant
  digit (population instead of sample std) gave image AUROC 0.801, pixel AUROC 0.926, AUPRO
  0.750; the benchmark's fit after it 0.713 / 0.935 / 0.794. Single runs carry that spread.
- Cost: a dense pass is 4 networks per patch size at every pixel, about 0.45 CPU-seconds per
  network set and 256 px image in bfloat16 (0.8 in float32), so prediction takes 7 to 9 s per
  image on the loaded machine; fitting bottle (209 images) took 856 s (under the 15 minutes, on
  the loaded machine), screw and capsules under 3 minutes; peak RSS 1.7 GB at batch 4. The
  backbone teacher fits in 279 / 58 / 61 s (bottle / screw / capsules). The teachers' one-off
  training (the script's defaults) took about 15 minutes of wall time on one thread here.

Calibration: trained networks cannot score their training images out of sample, so the threshold
comes from the held-out share ``calibration_fraction`` of the normal images (the base class).

Incremental fit (``partial_fit``), as RLR's: training continues from the current weights on the
new images only, ``epochs`` more epochs with a fresh optimiser; the teacher standardisation stays
that of the first fit, the score standardisation (step 5) is measured again on the new images'
validation share. The earlier images are not seen again, so the students can forget them: to
learn several sets of images equally, fit them together.

The students run under the runtime's precision (bfloat16 autocast where the hardware is fast at
it; weights and losses stay float32). With ``checkpoint_dir`` the training state is saved after
every epoch (``<checkpoint_dir>/fit-<n>``, safetensors + JSON, no pickle) and a fit with the same
hyper-parameters (``epochs`` aside) and training data resumes from the last finished epoch.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import torch
from safetensors import safe_open
from torch import nn

from flawmap import postprocess
from flawmap.backbones import Backbone
from flawmap.errors import FlawmapError
from flawmap.features import channel_statistics, local_average
from flawmap.models.base import check_positive_odd
from flawmap.models.methods import register_method
from flawmap.models.scorer import PatchScores, Scorer
from flawmap.models.trained import TrainedModel
from flawmap.training import seeded_init

_LEAKY_SLOPE = 5e-3
"""Negative slope of the students' leaky ReLUs (the paper's networks use 5e-3)."""

_MIN_RELATIVE_STD = 0.05
"""Floor of the score standardisation's std, relative to the mean (step 5)."""

_STEM_STRIDE = 4
"""Largest stride of the students' patchify stem."""


TEACHER_FILE = "weights/students_teacher.safetensors"
"""The packaged teachers, inside the flawmap package (benchmarks/train_students_teacher.py makes it)."""

PATCH_SIZES = (17, 33, 65)
"""The paper's patch sizes ``p``: one teacher (and ensemble of students) per size."""

_ARCHITECTURES: dict[int, tuple[tuple[int, int] | None, ...]] = {
    17: ((6, 1), (5, 2), (5, 2), (4, 0)),
    33: ((6, 1), None, (5, 2), None, (2, 2), (4, 0)),
    65: ((6, 1), None, (5, 1), None, (6, 2), None, (4, 2), (1, 0)),
}
"""The paper's patch networks (its supplementary material), layer by layer: ``(kernel, width
multiple)`` of a convolution (multiple 0: the descriptor, the last layer) or ``None``, a 2x2
max-pool of stride 2. The first convolution's kernel (6 instead of 5) and, at ``p = 65``, the
third's make the receptive field exactly ``p`` (the paper's layers give 16 + 16 = 32 and 60)."""


class PatchNetwork(nn.Module):
    """The paper's descriptor network of a ``p x p`` patch (teacher and students share it).

    Plain convolutions (no padding) and 2x2 max-pools, leaky ReLU (slope 5e-3) after every
    convolution but the last, whose ``descriptor_dim`` channels are the patch descriptor.

    ``forward`` is the patch network itself: ``B x 3 x P x P`` -> ``B x d x 1 x 1``, or on a larger
    window ``B x 3 x (p + s(g - 1))`` -> ``B x d x g x g``, the descriptors of the patches at stride
    ``s`` (``stride``: 2 per pool). ``dense`` is the fast dense evaluation: every pool at stride 1 and
    the layers after it dilated by the product of the earlier strides (the *a trous* form of
    Bailer et al.'s fast dense feature extraction: the same values as running the network on every
    patch, in one pass).
    """

    def __init__(self, patch_size: int, width: int, descriptor_dim: int) -> None:
        super().__init__()
        if patch_size not in _ARCHITECTURES:
            raise FlawmapError(f"patch size must be one of {sorted(_ARCHITECTURES)}, got {patch_size}")
        self.patch_size, self.width, self.descriptor_dim = patch_size, width, descriptor_dim
        self.layers = nn.ModuleList()
        in_channels = 3
        for spec in _ARCHITECTURES[patch_size]:
            if spec is None:
                self.layers.append(nn.MaxPool2d(2))
                continue
            kernel, multiple = spec
            out_channels = multiple * width if multiple else descriptor_dim
            self.layers.append(nn.Conv2d(in_channels, out_channels, kernel))
            in_channels = out_channels
        self.stride = 2 ** sum(isinstance(layer, nn.MaxPool2d) for layer in self.layers)

    def same_architecture(self) -> "PatchNetwork":
        """A new network of this one's architecture, randomly initialised (a student)."""
        return PatchNetwork(self.patch_size, self.width, self.descriptor_dim)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised windows ``B x 3 x (p + s(g - 1)) x (p + s(g - 1))`` -> descriptors ``B x d x g x g``."""
        return self._run(pixels, dense=False)

    def dense(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised images ``B x 3 x S x S`` -> the descriptor of the patch centred on every
        pixel, ``B x d x S x S`` (the image reflect-padded by ``p // 2`` first)."""
        return self._run(_reflect_pad(pixels, self.patch_size), dense=True)

    def _run(self, x: torch.Tensor, *, dense: bool) -> torch.Tensor:
        dilation = 1
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            if isinstance(layer, nn.Conv2d):
                x = nn.functional.conv2d(x, layer.weight, layer.bias, dilation=dilation)
                if index < last:
                    x = nn.functional.leaky_relu(x, _LEAKY_SLOPE)
            elif dense:
                x = nn.functional.max_pool2d(x, 2, stride=1, dilation=dilation)
                dilation *= 2
            else:
                x = nn.functional.max_pool2d(x, 2)
        return x


SCORE_TERMS = ("error+uncertainty", "error", "uncertainty")
"""What a scale's anomaly score is: Eq. 6's sum of the standardised terms, or one of them."""

TEACHERS = ("patch", "backbone")
"""The teacher: the packaged patch networks (the paper's), or the frozen backbone's features."""

_CROP_GRID = 8
"""Side of the grid of patch descriptors in one training window of a patch-network student."""


class StudentInputs(NamedTuple):
    """What the students and the backbone teacher see of a batch: ``images`` B x 3 x S x S in
    [0, 1] and ``teacher``, the teacher's descriptors at each scale, B x C_l x h_l x w_l, finest first."""

    images: torch.Tensor
    teacher: list[torch.Tensor]


class StudentEnsemble(nn.Module):
    """One scale's students (step 3), with the teacher's and the scores' standardisation.

    Parameters
    ----------
    channels : int
        The teacher's descriptor width ``C`` at this scale.
    students : list of nn.Module
        The ``M`` students (each its own initialisation).
    teacher : PatchNetwork, optional
        The scale's frozen patch-network teacher; None when the teacher is the backbone.
    """

    def __init__(self, channels: int, students: list[nn.Module], teacher: PatchNetwork | None = None) -> None:
        super().__init__()
        self.register_buffer("teacher_mean", torch.zeros(channels))
        self.register_buffer("teacher_std", torch.ones(channels))
        self.register_buffer("score_mean", torch.zeros(2))  # regression error, uncertainty
        self.register_buffer("score_std", torch.ones(2))
        self.students = nn.ModuleList(students)
        self.teacher = teacher.requires_grad_(False) if teacher is not None else None

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised images or windows B x 3 x H x W -> every student's descriptors M x B x C x h x w."""
        return torch.stack([student(pixels) for student in self.students])

    def set_standardization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """The per-channel mean and std (C each) of the training images' teacher descriptors."""
        self.teacher_mean.copy_(mean)
        self.teacher_std.copy_(std)

    def standardize(self, descriptors: torch.Tensor) -> torch.Tensor:
        """Teacher descriptors B x C x h x w -> standardised per channel (the students' targets)."""
        return (descriptors - self.teacher_mean.view(-1, 1, 1)) / self.teacher_std.view(-1, 1, 1)

    def regression_loss(self, predictions: torch.Tensor, descriptors: torch.Tensor) -> torch.Tensor:
        """Eq. 3 (students' loss): predictions M x B x C x h x w against the teacher's B x C x h x w:
        squared error summed over channels, averaged over positions and images, summed over students."""
        target = self.standardize(descriptors.float())
        return (predictions.float() - target).square().sum(dim=2).mean(dim=(1, 2, 3)).sum()

    def error_and_uncertainty(self, predictions: torch.Tensor, descriptors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions M x B x C x h x w and teacher descriptors B x C x h x w -> Eq. 4's regression
        error ``||mean_i mu_i - t||^2`` and Eq. 5's uncertainty ``mean_c var_i mu_i``, B x h x w each."""
        error = (predictions.mean(dim=0) - self.standardize(descriptors)).square().sum(dim=1)
        uncertainty = predictions.var(dim=0, unbiased=False).mean(dim=1)
        return error, uncertainty

    def set_score_statistics(self, moments: torch.Tensor) -> None:
        """Step 5's mean and std of the error and the uncertainty from their moments over the
        positions of the normal images they were measured on (2 x 3): rows (error, uncertainty),
        columns (count, sum, sum of squares).

        The std is at least :data:`_MIN_RELATIVE_STD` of the mean: a term that hardly varies
        over normal positions (untrained students' uncertainty is nearly their constant
        disagreement) carries no information, and dividing by its tiny std would only amplify
        float noise (batch-dependent convolution rounding) into the map."""
        count, total, squares = moments.unbind(dim=1)
        mean = total / count
        variance = (squares / count - mean.square()).clamp_min(0.0)
        self.score_mean.copy_(mean)
        self.score_std.copy_(variance.sqrt().maximum(_MIN_RELATIVE_STD * mean.abs()).clamp_min(1e-12))

    def standardized_terms(self, error: torch.Tensor, uncertainty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 6's terms ``(e - e_mean) / e_std`` and ``(v - v_mean) / v_std``, B x h x w each."""
        return (error - self.score_mean[0]) / self.score_std[0], (uncertainty - self.score_mean[1]) / self.score_std[1]


class StudentsScorer(Scorer):
    """What both teachers share: the scale maps from the standardised error and uncertainty
    (step 5) and the measurement of their standardisation. A subclass says how it gets every
    scale's error and uncertainty (:meth:`scale_terms`).

    ``ensembles`` holds one :class:`StudentEnsemble` per scale, finest first; they score once trained.
    """

    def __init__(self, backbone: Backbone, taps: tuple[str, ...], ensembles: list[StudentEnsemble], score_terms: str) -> None:
        super().__init__(backbone, taps)
        self.ensembles = nn.ModuleList(ensembles)
        self.score_terms = score_terms

    def scale_terms(self, features: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Embedded images -> every scale's (error, uncertainty), B x h_l x w_l each."""
        raise NotImplementedError

    def score(self, features: Any) -> PatchScores:
        """Step 5: the mean over scales of each scale's score (``score_terms`` of Eq. 6), B x h_0 x w_0."""
        scale_maps = [
            combine_terms(*ensemble.standardized_terms(error, uncertainty), self.score_terms)
            for ensemble, (error, uncertainty) in zip(self.ensembles, self.scale_terms(features))
        ]
        finest_grid = tuple(scale_maps[0].shape[-2:])
        scale_maps = [
            scale_map if tuple(scale_map.shape[-2:]) == finest_grid else postprocess.upsample(scale_map, finest_grid)  # bilinear
            for scale_map in scale_maps
        ]
        return PatchScores(torch.stack(scale_maps).mean(dim=0))

    def student_input(self, images: torch.Tensor) -> torch.Tensor:
        """Images B x 3 x S x S in [0, 1] -> normalised as the teacher's input (the backbone's mean and std)."""
        return (images.float() - self.backbone.mean) / self.backbone.std

    def set_score_statistics(self, feature_batches: Iterable[Any]) -> None:
        """Measure step 5's standardisation on embedded normal images (each batch as ``scale_terms`` takes it)."""
        moments = torch.zeros(len(self.ensembles), 2, 3, dtype=torch.float64)  # scale, (e, v), (n, sum, sum of squares)
        with torch.inference_mode():
            for features in feature_batches:
                for scale, (error, uncertainty) in enumerate(self.scale_terms(features)):
                    moments[scale, 0] += _moments(error)
                    moments[scale, 1] += _moments(uncertainty)
        for ensemble, scale_moments in zip(self.ensembles, moments):
            ensemble.set_score_statistics(scale_moments)


class PatchStudentsScorer(StudentsScorer):
    """The paper's students (``teacher="patch"``): images -> every scale's patch-network teacher
    and students, evaluated densely at every pixel (step 5's maps are B x S x S)."""

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images B x 3 x S x S in [0, 1], as they are (the networks run in :meth:`scale_terms`)."""
        return images

    def scale_terms(self, features: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Images B x 3 x S x S -> every scale's Eq. 4 error and Eq. 5 uncertainty at every pixel,
        B x S x S (memory: the M + 1 dense descriptor maps, ``4 (M + 1) d S^2`` bytes per image)."""
        pixels = self.student_input(features)
        terms = []
        for ensemble in self.ensembles:
            with self.autocast(pixels.device):
                descriptors = ensemble.teacher.dense(pixels)
                predictions = torch.stack([student.dense(pixels) for student in ensemble.students])
            terms.append(ensemble.error_and_uncertainty(predictions.float(), descriptors.float()))
        return terms

    def teacher_descriptors(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images B x 3 x S x S -> each teacher's descriptors of the patches at its stride, B x C x h x w
        (the reflect-padded image through the strided network: the dense map subsampled)."""
        pixels = self.student_input(images)
        result = []
        with torch.inference_mode():
            for ensemble in self.ensembles:
                size = ensemble.teacher.patch_size
                result.append(ensemble.teacher(_reflect_pad(pixels, size)))
        return result

    def training_loss(self, batch: list[torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """Step 4 on one batch ``[images B x 3 x S x S]``: per scale one random window per image
        (patches at the network's stride on a :data:`_CROP_GRID` grid, anywhere in the
        reflect-padded image), the students' regression loss against the teacher there, summed
        over scales. Windows sample the dense output: a strided network's outputs are the dense
        map at the window's offset plus multiples of the stride."""
        pixels = self.student_input(batch[0])
        total = torch.zeros((), device=pixels.device)
        for ensemble in self.ensembles:
            windows = _random_windows(_reflect_pad(pixels, ensemble.teacher.patch_size), ensemble.teacher, generator)
            with torch.no_grad():
                descriptors = ensemble.teacher(windows)
            with self.autocast(pixels.device):
                predictions = ensemble(windows)
            total = total + ensemble.regression_loss(predictions, descriptors)
        return total


class BackboneStudentsScorer(StudentsScorer):
    """``teacher="backbone"``: images -> the frozen backbone's descriptors (step 1 of the
    backbone variant) -> the students' scores on the backbone's grids."""

    def __init__(self, backbone: Backbone, taps: tuple[str, ...], ensembles: list[StudentEnsemble], score_terms: str, neighborhood_size: int) -> None:
        super().__init__(backbone, taps, ensembles, score_terms)
        self.neighborhood_size = neighborhood_size

    def embed(self, images: torch.Tensor) -> StudentInputs:
        """Images B x 3 x S x S -> the images and the locally averaged levels B x C_l x h_l x w_l."""
        return StudentInputs(images, [local_average(level, self.neighborhood_size) for level in self.levels(images)])

    def scale_terms(self, features: StudentInputs) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every scale's Eq. 4 error and Eq. 5 uncertainty on its grid, B x h_l x w_l."""
        pixels = self.student_input(features.images)
        terms = []
        for ensemble, descriptors in zip(self.ensembles, features.teacher):
            with self.autocast(pixels.device):
                predictions = ensemble(pixels)
            terms.append(ensemble.error_and_uncertainty(predictions.float(), descriptors.float()))
        return terms

    def training_loss(self, batch: list[torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """Step 4 on one cached batch ``[images, teacher level 0, ...]``, summed over scales
        (``generator`` unused: no noise)."""
        pixels = self.student_input(batch[0])
        total = torch.zeros((), device=pixels.device)
        for ensemble, descriptors in zip(self.ensembles, batch[1:]):
            with self.autocast(pixels.device):
                predictions = ensemble(pixels)
            total = total + ensemble.regression_loss(predictions, descriptors)
        return total


def combine_terms(error: torch.Tensor, uncertainty: torch.Tensor, score_terms: str) -> torch.Tensor:
    """A scale's score from its standardised terms: Eq. 6's sum, or one term (``score_terms``)."""
    if score_terms == "error":
        return error
    if score_terms == "uncertainty":
        return uncertainty
    return error + uncertainty


def load_teachers(patch_sizes: Iterable[int]) -> list[PatchNetwork]:
    """The packaged teachers (:data:`TEACHER_FILE`) of ``patch_sizes``, frozen, in that order."""
    path = Path(str(importlib.resources.files("flawmap") / TEACHER_FILE))
    if not path.is_file():
        raise FlawmapError(f"the packaged students teacher {path} is missing; reinstall flawmap or run benchmarks/train_students_teacher.py")
    with safe_open(str(path), framework="pt") as weights:
        metadata = weights.metadata() or {}
        tensors = {name: weights.get_tensor(name) for name in weights.keys()}
    teachers = []
    for size in patch_sizes:
        teacher = PatchNetwork(size, int(metadata.get("width", 0)), int(metadata.get("descriptor_dim", 0)))
        prefix = f"p{size}."
        try:
            teacher.load_state_dict({name[len(prefix):]: value for name, value in tensors.items() if name.startswith(prefix)})
        except RuntimeError as error:
            raise FlawmapError(f"{path}: no matching teacher for patch size {size} ({str(error).splitlines()[0]})") from None
        teachers.append(teacher.eval().requires_grad_(False))
    return teachers


def _reflect_pad(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """B x 3 x S x S -> B x 3 x (S + p - 1) x (S + p - 1): every pixel's patch lies inside."""
    before = patch_size // 2
    return nn.functional.pad(pixels, (before, patch_size - 1 - before) * 2, mode="reflect")


def _random_windows(padded: torch.Tensor, network: PatchNetwork, generator: torch.Generator) -> torch.Tensor:
    """One random training window per image of a padded batch B x 3 x P x P: B x 3 x W x W with
    ``W = p + stride (g - 1)``, ``g`` the :data:`_CROP_GRID` or less where the image is smaller."""
    side = padded.shape[-1]
    grid = min(_CROP_GRID, (side - network.patch_size) // network.stride + 1)
    window = network.patch_size + network.stride * (grid - 1)
    corners = torch.randint(side - window + 1, (padded.shape[0], 2), generator=generator).tolist()
    return torch.stack([image[:, top : top + window, left : left + window] for image, (top, left) in zip(padded, corners)])


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


def receptive_field(layers: Iterable[nn.Module]) -> int:
    """Side in input pixels of the receptive field of one output position of a plain stack of
    convolutions and max-pools (and element-wise layers)."""
    size, jump = 1, 1
    for layer in layers:
        if isinstance(layer, nn.Conv2d):
            size += (layer.kernel_size[0] - 1) * layer.dilation[0] * jump
            jump *= layer.stride[0]
        elif isinstance(layer, nn.MaxPool2d):
            size += (layer.kernel_size - 1) * jump
            jump *= layer.stride
    return size


def _moments(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Count, sum and sum of squares of ``values``, float64 on the CPU: (3,) over all of them, or
    (3, n) over ``dim`` of a 2-d tensor (one column per row of the other dimension)."""
    values = values.detach().double().cpu()
    if dim is None:
        values, dim = values.flatten(), 0
    count = torch.full_like(values.sum(dim=dim), values.shape[dim])
    return torch.stack([count, values.sum(dim=dim), values.square().sum(dim=dim)])


def _activation() -> nn.LeakyReLU:
    return nn.LeakyReLU(_LEAKY_SLOPE)


@register_method("students")
@dataclass(kw_only=True, eq=False)
class UninformedStudents(TrainedModel):
    """Uninformed Students student-teacher anomaly detector (see module docstring). Method
    hyper-parameters:

    Parameters
    ----------
    teacher : {"patch", "backbone"}
        The packaged patch-network teachers (the paper's), or the frozen backbone's (default)
        features at the tapped stages (the former stand-in, kept for the ablation).
    patch_sizes : tuple of int
        ``teacher="patch"``: the patch sizes, one teacher and ensemble each (from 17, 33, 65).
    n_students : int
        Students per scale, ``M`` (at least 2: the uncertainty is their variance).
    validation_fraction : float
        Share of a fit's images the students do not train on, whose error and uncertainty set
        step 5's standardisation (the paper's validation set); 0: the training images set it.
    score_terms : {"error+uncertainty", "error", "uncertainty"}
        A scale's score: Eq. 6's sum of the standardised terms, or one of them.
    neighborhood_size : int
        ``teacher="backbone"``: local averaging window of the backbone's descriptors (odd).
    student_width, student_depth : int
        ``teacher="backbone"``: the students' channels from stride 8 on, and 3x3 convolutions
        after each halving (:func:`student_network`).

    and the training parameters of :class:`flawmap.models.trained.TrainedModel` (Adam; here
    ``learning_rate`` 2e-3 and 40 epochs).

    Examples
    --------
    >>> model = UninformedStudents().fit("bottle/")           # doctest: +SKIP
    >>> model.predict("bottle/test/broken_large")[0].score     # doctest: +SKIP
    """

    quick_params = {"image_size": 64, "epochs": 2, "n_students": 2, "patch_sizes": (17,), "student_width": 8, "student_depth": 1}
    former_params = {7: {"teacher": "backbone", "validation_fraction": 0.0}}  # format 6 and before

    teacher: str = "backbone"
    patch_sizes: tuple[int, ...] = PATCH_SIZES
    n_students: int = 3
    validation_fraction: float = 0.1
    score_terms: str = "error+uncertainty"
    neighborhood_size: int = 3
    student_width: int = 32
    student_depth: int = 1
    epochs: int = 40
    learning_rate: float = 2e-3

    def _validate_method_params(self) -> None:
        check_positive_odd("neighborhood_size", self.neighborhood_size)
        for name, value, choices in (("teacher", self.teacher, TEACHERS), ("score_terms", self.score_terms, SCORE_TERMS)):
            if value not in choices:
                raise FlawmapError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
        if not self.patch_sizes or any(size not in PATCH_SIZES for size in self.patch_sizes) or len(set(self.patch_sizes)) < len(self.patch_sizes):
            raise FlawmapError(f"patch_sizes must be distinct values from {PATCH_SIZES}, got {self.patch_sizes}")
        if self.n_students < 2:
            raise FlawmapError(f"n_students must be at least 2 (the uncertainty is their variance), got {self.n_students}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise FlawmapError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.student_width < 2 or self.student_depth < 0:
            raise FlawmapError(
                f"need student_width >= 2 and student_depth >= 0, got {self.student_width} and {self.student_depth}"
            )

    def _new_scorer(self, backbone: Backbone, taps: tuple[str, ...]) -> StudentsScorer:
        if self.teacher == "patch":
            teachers = load_teachers(sorted(self.patch_sizes))
            with seeded_init(self.random_state):  # every student's initial weights, one after another
                ensembles = [
                    StudentEnsemble(teacher.descriptor_dim, [teacher.same_architecture() for _ in range(self.n_students)], teacher)
                    for teacher in teachers
                ]
            return PatchStudentsScorer(backbone, taps, ensembles, self.score_terms)
        with seeded_init(self.random_state):
            ensembles = [
                StudentEnsemble(info.channels, [student_network(info.channels, info.stride, self.student_width, self.student_depth) for _ in range(self.n_students)])
                for info in backbone.tap_info(taps)
            ]
        return BackboneStudentsScorer(backbone, taps, ensembles, self.score_terms, self.neighborhood_size)

    def _learn(self, feature_batches: Iterable[Any]) -> None:
        scorer = self.scorer_
        patch = isinstance(scorer, PatchStudentsScorer)
        cached = self._cache([inputs] if patch else [inputs.images, *inputs.teacher] for inputs in feature_batches)
        training, validation = self._validation_split(cached[0].shape[0])
        if self.n_fits_ == 0:  # first fit: standardise the teacher with its descriptors of the training images
            statistics = self._teacher_statistics(cached, training) if patch else [channel_statistics(level[training]) for level in cached[1:]]
            for ensemble, (mean, std) in zip(scorer.ensembles, statistics):
                ensemble.set_standardization(mean, std)
        self._train(scorer.ensembles, [tensor[training] for tensor in cached], scorer.training_loss, "students")
        device, size = self.runtime.torch_device, self.runtime.batch_size
        rows = validation if len(validation) else training
        batches = ([tensor[rows[start : start + size]].to(device) for tensor in cached] for start in range(0, len(rows), size))
        scorer.set_score_statistics(batch[0] if patch else StudentInputs(batch[0], batch[1:]) for batch in batches)

    def _validation_split(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices of a fit's images the students train on, and of those that set step 5's
        standardisation (``validation_fraction`` of them, at least one, by a seeded permutation)."""
        if self.validation_fraction == 0.0:
            return torch.arange(count), torch.arange(0)
        if count < 2:
            raise FlawmapError(f"need at least 2 images to train the students and hold out validation images, got {count}")
        order = torch.randperm(count, generator=torch.Generator().manual_seed(self.random_state + self.n_fits_))
        n_validation = min(max(round(self.validation_fraction * count), 1), count - 1)
        return order[n_validation:].sort().values, order[:n_validation].sort().values

    def _teacher_statistics(self, cached: list[torch.Tensor], rows: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each patch teacher's per-channel mean and std (C each) over its descriptors of the images
        ``rows`` (at its stride), accumulated batch by batch (at stride 1 they would not fit in memory)."""
        device, size = self.runtime.torch_device, self.runtime.batch_size
        moments: list[torch.Tensor] = []
        for start in range(0, len(rows), size):
            levels = self.scorer_.teacher_descriptors(cached[0][rows[start : start + size]].to(device))
            batch_moments = [_moments(level.transpose(0, 1).flatten(1), dim=1) for level in levels]
            moments = [total + batch for total, batch in zip(moments, batch_moments)] if moments else batch_moments
        statistics = []
        for count, total, squares in moments:
            mean = total / count
            statistics.append((mean, (squares / count - mean.square()).clamp_min(0.0).sqrt().clamp_min(1e-6)))
        return statistics

    def to_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"train_losses_": self.train_losses_}, dict(self.scorer_.ensembles.state_dict())

    def from_state(self, fitted: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.scorer_.ensembles.load_state_dict(tensors)
        self.train_losses_ = list(fitted["train_losses_"])
