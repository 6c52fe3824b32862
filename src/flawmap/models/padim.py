"""PaDiM: Defard et al., "PaDiM: a Patch Distribution Modeling Framework for Anomaly Detection
and Localization", ICPR 2020.

1. Patch embeddings (Sec. 3.1): the tapped levels are fused on the stride-8 grid without local
   aggregation, then reduced to a random subset of ``n_features`` channels (the paper finds random
   selection as good as PCA).
2. One Gaussian per grid position (Sec. 3.2): over the N training images, the mean ``mu_ij`` and
   the regularised covariance ``Sigma_ij = 1/(N-1) sum_k (x_ij^k - mu_ij)(x_ij^k - mu_ij)^T + eps I``.
   Sums and outer products are accumulated batch by batch in float64, so the training features
   are never held at once.
3. Patch score (Eq. 2): the Mahalanobis distance
   ``M(x_ij) = sqrt((x_ij - mu_ij)^T Sigma_ij^-1 (x_ij - mu_ij))``.
4. Image score: the maximum of the smoothed anomaly map.

Calibration (cross-fitting, leave-one-out moments): removing training image ``i`` from the
moments is a rank-one downdate of each position's covariance, so by the Sherman-Morrison formula
its Mahalanobis distance to the Gaussian fitted without it (N - 1 images, ``Sigma_{-i} + eps I``)
follows from its distance ``a`` to the Gaussian of all N images regularised with
``eps' = eps (N - 2) / (N - 1)``::

    M_{-i}^2 = (N / (N - 1))^2 (N - 2) / (N - 1) a^2 / (1 - N a^2 / (N - 1)^2)

exact for any ``eps`` (:func:`left_out_distances`). It is computed in float64 from the moments,
not from the float32 inverse the scorer uses: with fewer images than dimensions (N <= d) the
training deviations span an (N - 1)-dimensional subspace in which each of them is extreme, so
``N a^2 / (N - 1)^2`` is within 1e-2 to 1e-4 of 1 and the float32 denominator cancels to noise
(VisA capsules, 20 images: leave-one-out image scores 7x those of exact refits and of test images).

Incremental fit (``partial_fit``): the streamed moments (count, sums, outer sums) are the fitted
state; new images add their moments, and ``mu`` and ``(Sigma + eps I)^-1`` are recomputed from
the totals, so fitting in several parts gives the model of one fit on all images (up to float64
summation order). The model file holds the moments only (the upper triangle of the symmetric
outer sums); loading derives ``mu`` and the inverses from them exactly as fitting does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch

from flawmap.backbones import Backbone
from flawmap.errors import FlawmapError
from flawmap.features import flatten_positions, fuse_levels
from flawmap.models.base import AnomalyModel, MethodTraits
from flawmap.models.methods import register_method
from flawmap.models.scorer import PatchScores, Scorer


class GaussianAccumulator:
    """Streaming per-position mean and covariance of feature vectors, in float64.

    Observations arrive in batches of shape (B, P, D): B samples at each of P positions. The
    symmetric outer sums are kept as their upper triangles, (P, D (D + 1) / 2), which halves the
    memory and makes the rebuilt matrices exactly symmetric.
    """

    def __init__(self) -> None:
        self.count = 0
        self._sums: torch.Tensor | None = None  # (P, D): sum_k x^k
        self._outer_sums: torch.Tensor | None = None  # (P, D (D + 1) / 2): upper triangle of sum_k x^k x^kT

    def add(self, samples: torch.Tensor) -> None:
        """Add a batch of observations of shape (B, P, D)."""
        position_major = samples.transpose(0, 1).to(device="cpu", dtype=torch.float64).contiguous()  # (P, B, D)
        outer = torch.bmm(position_major.transpose(1, 2), position_major)  # (P, D, D)
        upper = outer.flatten(1).index_select(1, _upper_triangle(position_major.shape[2]))
        self._add_moments(samples.shape[0], position_major.sum(dim=1), upper)

    def update(self, other: "GaussianAccumulator") -> None:
        """Add the observations that ``other`` accumulated."""
        if other._sums is not None:
            self._add_moments(other.count, other._sums, other._outer_sums)

    def mean(self) -> torch.Tensor:
        """Per-position means, shape (P, D), float64."""
        if self._sums is None:
            raise ValueError("no observations were added")
        return self._sums / self.count

    def covariance(self) -> torch.Tensor:
        """Unbiased per-position covariances, shape (P, D, D), float64; needs two observations."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 observations, got {self.count}")
        mean = self.mean()
        n_positions, n_dims = mean.shape
        outer_sums = torch.zeros(n_positions, n_dims * n_dims, dtype=torch.float64)
        outer_sums[:, _upper_triangle(n_dims)] = self._outer_sums
        outer_sums = outer_sums.view(n_positions, n_dims, n_dims)
        outer_sums = outer_sums + outer_sums.triu(1).transpose(1, 2)
        # sum_k (x^k - mu)(x^k - mu)^T = sum_k x^k x^kT - N mu mu^T
        scatter = outer_sums - self.count * (mean.unsqueeze(2) * mean.unsqueeze(1))
        return scatter / (self.count - 1)

    def state(self) -> dict[str, torch.Tensor]:
        """The moments: ``count`` (0-d int64), ``sums`` (P, D), ``outer_sums_upper`` (P, D (D + 1) / 2)."""
        if self._sums is None:
            raise ValueError("no observations were added")
        return {"count": torch.tensor(self.count), "sums": self._sums, "outer_sums_upper": self._outer_sums}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "GaussianAccumulator":
        """The accumulator whose :meth:`state` was ``state``."""
        accumulator = cls()
        sums, outer_sums = state["sums"].to(torch.float64), state["outer_sums_upper"].to(torch.float64)
        if sums.ndim != 2 or outer_sums.shape != (sums.shape[0], sums.shape[1] * (sums.shape[1] + 1) // 2):
            raise RuntimeError(f"moment shapes {tuple(sums.shape)} and {tuple(outer_sums.shape)} do not match")
        accumulator._add_moments(int(state["count"]), sums, outer_sums)
        return accumulator

    def _add_moments(self, count: int, sums: torch.Tensor, outer_sums: torch.Tensor) -> None:
        if self._sums is None:
            self._sums, self._outer_sums = torch.zeros_like(sums), torch.zeros_like(outer_sums)
        self._sums += sums
        self._outer_sums += outer_sums
        self.count += count


def _upper_triangle(n_dims: int) -> torch.Tensor:
    """Positions (D (D + 1) / 2,) of the upper triangle in a flattened D x D matrix, row-major."""
    rows, columns = torch.triu_indices(n_dims, n_dims)
    return rows * n_dims + columns


def regularised_cholesky(covariances: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Lower Cholesky factors (P, D, D) of ``Sigma + epsilon I`` for a stack of covariances (P, D, D)."""
    identity = torch.eye(covariances.shape[-1], dtype=covariances.dtype)
    return torch.linalg.cholesky(covariances + epsilon * identity)


def regularised_inverse(covariances: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``(Sigma + epsilon I)^-1`` for a stack of covariances (P, D, D), via Cholesky factors."""
    return torch.cholesky_inverse(regularised_cholesky(covariances, epsilon))


def mahalanobis_distances(
    samples: torch.Tensor, means: torch.Tensor, inverse_covariances: torch.Tensor
) -> torch.Tensor:
    """Mahalanobis distance of every sample to its position's Gaussian (PaDiM Eq. 2).

    Parameters
    ----------
    samples : Tensor of shape (B, P, D)
    means : Tensor of shape (P, D)
    inverse_covariances : Tensor of shape (P, D, D)

    Returns
    -------
    Tensor of shape (B, P)
        ``sqrt((x - mu)^T Sigma^-1 (x - mu))`` per sample and position.
    """
    deviations = (samples.to(means.dtype) - means).transpose(0, 1).contiguous()  # (P, B, D), rows of D
    squared = (torch.bmm(deviations, inverse_covariances) * deviations).sum(dim=2)  # (P, B)
    return squared.clamp_min_(0).sqrt_().T


def left_out_factors(gaussians: GaussianAccumulator, epsilon: float) -> torch.Tensor:
    """What :func:`left_out_distances` needs of the Gaussians of all N samples: the Cholesky
    factors (P, D, D), float64, of their covariances regularised with ``eps (N - 2) / (N - 1)``
    (module docstring; with N < 3, with ``eps``)."""
    n = gaussians.count
    return regularised_cholesky(gaussians.covariance(), epsilon * (n - 2) / (n - 1) if n >= 3 else epsilon)


def left_out_distances(samples: torch.Tensor, gaussians: GaussianAccumulator, factors: torch.Tensor) -> torch.Tensor:
    """Mahalanobis distance of each training sample to its position's Gaussian fitted without it
    (module docstring), in float64.

    Parameters
    ----------
    samples : Tensor of shape (B, P, D)
        Samples that ``gaussians`` accumulated.
    gaussians : GaussianAccumulator
        Moments of all N training samples. With N < 3 left-out covariances do not exist, and the
        distances to the Gaussians of all N are returned.
    factors : Tensor of shape (P, D, D)
        :func:`left_out_factors` of ``gaussians`` and the regularisation ``eps``.

    Returns
    -------
    Tensor of shape (B, P), float64
    """
    deviations = (samples.to(torch.float64) - gaussians.mean()).permute(1, 2, 0)  # (P, D, B)
    squared = torch.linalg.solve_triangular(factors, deviations, upper=False).square().sum(dim=1).T  # a^2, (B, P)
    n = gaussians.count
    if n < 3:
        return squared.sqrt()
    # 1 - leverage > 0 exactly: it is a ratio of determinants of positive definite matrices
    leverage = (n / (n - 1) ** 2 * squared).clamp_max(1.0 - torch.finfo(torch.float64).eps)
    return ((n / (n - 1)) ** 2 * (n - 2) / (n - 1) * squared / (1.0 - leverage)).sqrt()


class PadimScorer(Scorer):
    """Images -> Mahalanobis distance of each patch to its position's Gaussian (steps 1, 3).

    Buffers: ``channel_indices`` (d,) the selected channels; ``means`` (P, d) and
    ``inverse_covariances`` (P, d, d), float32, None until fitted.
    """

    def __init__(self, backbone: Backbone, taps: tuple[str, ...], channel_indices: torch.Tensor) -> None:
        super().__init__(backbone, taps)
        self.register_buffer("channel_indices", channel_indices)
        self.register_buffer("means", None)
        self.register_buffer("inverse_covariances", None)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) -> selected patch features (B, d, S/8, S/8)."""
        return fuse_levels(self.levels(images)).index_select(1, self.channel_indices)

    def score(self, features: torch.Tensor) -> PatchScores:
        """Features (B, d, h, w) -> Mahalanobis distances (B, h, w); no image score of its own."""
        n_images, _, grid_h, grid_w = features.shape
        distances = mahalanobis_distances(flatten_positions(features), self.means, self.inverse_covariances)
        return PatchScores(distances.view(n_images, grid_h, grid_w))


@register_method("padim")
@dataclass(kw_only=True, eq=False)
class Padim(AnomalyModel):
    """PaDiM anomaly detector (see module docstring). Method hyper-parameters:

    Parameters
    ----------
    n_features : int
        Channels kept by the random selection; values above the tapped channel count keep all.
        The default 100 is the paper's d for ResNet-18, two thirds of EfficientNet-Lite0's 152
        default channels. The model holds one d x d matrix per position, so its size grows as d^2:
        on MVTec bottle at 256 px, d = 64 / 100 / 152 gave pixel AUROC 0.975 / 0.976 / 0.980 for
        models of 18 / 42 / 97 MB. 100 meets the paper's accuracy at under half the size of 152.
    epsilon : float
        Covariance regularisation ``eps`` (the paper's 0.01).

    Examples
    --------
    >>> model = Padim(n_features=100).fit("bottle/")               # doctest: +SKIP
    >>> model.partial_fit("more_good_bottles/")                     # doctest: +SKIP
    >>> model.predict("bottle/test/broken_large")[0].score          # doctest: +SKIP
    """

    quick_params = {"image_size": 64, "n_features": 24}
    traits = MethodTraits(cross_fits=True, partial_fit="exact")

    n_features: int = 100
    epsilon: float = 0.01

    def _validate_method_params(self) -> None:
        if self.n_features < 1:
            raise FlawmapError(f"n_features must be at least 1, got {self.n_features}")
        if self.epsilon <= 0:
            raise FlawmapError(f"epsilon must be positive, got {self.epsilon}")

    def _new_scorer(self, backbone: Backbone, taps: tuple[str, ...]) -> PadimScorer:
        return PadimScorer(backbone, taps, self._channel_indices(backbone, taps))

    def _channel_indices(self, backbone: Backbone, taps: tuple[str, ...]) -> torch.Tensor:
        """``n_features`` of the tapped channels (d,), drawn from ``random_state``, sorted."""
        n_channels = sum(info.channels for info in backbone.tap_info(taps))
        generator = torch.Generator().manual_seed(self.random_state)
        return torch.randperm(n_channels, generator=generator)[: self.n_features].sort().values

    def _learn(self, feature_batches: Iterable[torch.Tensor]) -> None:
        gaussians = GaussianAccumulator()
        if self.scorer_.means is not None:
            gaussians.update(self.gaussians_)
        new = GaussianAccumulator()
        for batch in feature_batches:
            new.add(flatten_positions(batch))
        gaussians.update(new)  # the model changes only once every new batch was read
        if gaussians.count < 2:
            raise FlawmapError(f"{self.method} needs at least 2 training images, got {gaussians.count}")
        self._set_gaussians(gaussians)

    def _left_out_scores(self, features: torch.Tensor, image_ids: torch.Tensor) -> PatchScores:
        return PatchScores(self._left_out_grid(features))

    def _left_out_grid(self, features: torch.Tensor) -> torch.Tensor:
        """Features (B, d, h, w) of images in the moments -> their :func:`left_out_distances`
        (B, h, w), float32 on the features' device."""
        if self._left_out_factors is None:  # once per fit: the covariances' factors are the costly part
            self._left_out_factors = left_out_factors(self.gaussians_, self.epsilon)
        n_images, _, grid_h, grid_w = features.shape
        distances = left_out_distances(flatten_positions(features).cpu(), self.gaussians_, self._left_out_factors)
        return distances.float().view(n_images, grid_h, grid_w).to(features.device)

    def _set_gaussians(self, gaussians: GaussianAccumulator) -> None:
        """Keep ``gaussians`` as the fitted moments; derive the scorer's means and inverses."""
        self.gaussians_ = gaussians
        self._left_out_factors: torch.Tensor | None = None  # (P, d, d) float64, made on first use
        self.scorer_.means = gaussians.mean().float()
        self.scorer_.inverse_covariances = regularised_inverse(gaussians.covariance(), self.epsilon).float()

    def to_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        moments = {f"moments.{name}": tensor for name, tensor in self.gaussians_.state().items()}
        return {}, {"channel_indices": self.scorer_.channel_indices, **moments}

    def from_state(self, fitted: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        channel_indices = tensors["channel_indices"].long()
        prefix = "moments."
        moments = {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}
        gaussians = GaussianAccumulator.from_state(moments)
        if gaussians.mean().shape[1] != channel_indices.shape[0]:
            raise RuntimeError(f"{channel_indices.shape[0]} channels but moments of dimension {gaussians.mean().shape[1]}")
        self.scorer_.channel_indices = channel_indices
        self._set_gaussians(gaussians)
