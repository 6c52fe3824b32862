"""PatchCore: Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022.

1. Locally aware patch features: each tapped level is averaged over a 3x3 neighbourhood
   (Eq. 2), the deeper level is upsampled to the stride-8 grid and the levels are concatenated.
2. Memory bank: all training patch features, reduced by greedy k-center coreset selection on a
   random projection (Alg. 1) to ``coreset_fraction`` of the patches.
3. Patch score: distance of each test patch to its nearest bank feature,
   ``s(m_test) = min_{m in M} |m_test - m|``.
4. Image score (Eq. 7): with ``m_test*`` the patch of maximal score ``s*`` and ``m*`` its nearest
   bank feature, ``s = (1 - exp|m_test* - m*| / sum_{m in N_b(m*)} exp|m_test* - m|) * s*`` where
   ``N_b(m*)`` are the ``b`` nearest bank features of ``m*``. The weight grows when ``m*`` lies in a
   sparse part of the bank, i.e. when the nearest match is itself unusual.

Calibration (cross-fitting): each bank row remembers the training image it came from, so a
training image is scored against the bank without its own rows, as a new image of the same kind
would be, at the cost of one more scoring pass over the training images.

Incremental fit (``partial_fit``): the coreset is a stream over shards of training patches
(:class:`flawmap.coreset.StreamingCoreset`); the bank is what it kept, and new images continue
the stream, so the bank after an update is the coreset of the kept bank plus the new patches, of
``coreset_fraction`` of all patches seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch

from flawmap.backbones import Backbone
from flawmap.coreset import StreamingCoreset
from flawmap.errors import FlawmapError
from flawmap.features import flatten_patches, locally_aware_patches
from flawmap.models.base import MethodTraits, check_positive_odd
from flawmap.models.methods import register_method
from flawmap.models.scorer import PatchScores, Scorer
from flawmap.models.memory_bank import MemoryBankModel
from flawmap.search import SearchIndex, all_vectors, search_from_state, search_state


class PatchCoreScorer(Scorer):
    """Images -> nearest-bank-feature distances (steps 1, 3) and Eq. 7 image scores (step 4).

    ``search`` indexes the memory bank; None until fitted.
    """

    def __init__(self, backbone: Backbone, taps: tuple[str, ...], neighborhood_size: int, reweighting_neighbors: int) -> None:
        super().__init__(backbone, taps)
        self.neighborhood_size = neighborhood_size
        self.reweighting_neighbors = reweighting_neighbors
        self.search: SearchIndex | None = None

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) -> locally aware patch features (B, C, S/8, S/8)."""
        return locally_aware_patches(self.levels(images), self.neighborhood_size)

    def score(self, features: torch.Tensor, among: torch.Tensor | None = None) -> PatchScores:
        """Features (B, C, h, w) -> patch scores (B, h, w) and Eq. 7 image scores (B,), against
        the whole bank or only its rows ``among`` (M,)."""
        queries = flatten_patches(features)
        distances, nearest = self.search.kneighbors(queries, k=1, among=among)
        return self.scores_from_nearest(features.shape, queries, distances[:, 0], nearest[:, 0], among)

    def scores_from_nearest(
        self,
        shape: torch.Size,
        queries: torch.Tensor,
        distances: torch.Tensor,
        nearest: torch.Tensor,
        among: torch.Tensor | None = None,
    ) -> PatchScores:
        """Each query's distance (B*h*w,) to its nearest bank row ``nearest`` (B*h*w,) -> patch
        scores (B, h, w) and Eq. 7 image scores (B,); ``shape`` is the features' (B, C, h, w)."""
        n_images, _, grid_h, grid_w = shape
        patch_scores = distances.view(n_images, grid_h * grid_w)
        # Eq. 7: re-weight each image's maximal patch score by how sparse the bank is around m*.
        max_scores, worst_patch = patch_scores.max(dim=1)
        worst_rows = torch.arange(n_images, device=worst_patch.device) * grid_h * grid_w + worst_patch
        image_scores = max_scores * self.reweighting(queries[worst_rows], nearest[worst_rows], among)
        return PatchScores(patch_scores.view(n_images, grid_h, grid_w), image_scores)

    def reweighting(
        self, worst_queries: torch.Tensor, matched_rows: torch.Tensor, among: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``1 - softmax`` weight of Eq. 7 for each image's worst patch; shape (B,)."""
        b = min(self.reweighting_neighbors, len(self.search) if among is None else among.shape[0])
        if b == 1:
            return torch.ones(worst_queries.shape[0], device=worst_queries.device)
        matched = self.search.vectors(matched_rows)  # m*, (B, D)
        _, support_rows = self.search.kneighbors(matched, k=b, among=among)  # N_b(m*), m* first
        support_distances = torch.linalg.vector_norm(self.search.vectors(support_rows) - worst_queries.unsqueeze(1), dim=2)
        matched_distances = torch.linalg.vector_norm(matched - worst_queries, dim=1)
        return 1.0 - torch.exp(matched_distances - torch.logsumexp(support_distances, dim=1))


@register_method("patchcore")
@dataclass(kw_only=True, eq=False)
class PatchCore(MemoryBankModel):
    """PatchCore anomaly detector (see module docstring). Method hyper-parameters (and the bank's
    ``search`` and ``search_options``: :class:`flawmap.models.memory_bank.MemoryBankModel`):

    Parameters
    ----------
    coreset_fraction : float
        Share of training patches kept in the memory bank, in (0, 1].
    neighborhood_size : int
        Local aggregation window ``p`` (Eq. 2).
    reweighting_neighbors : int
        ``b`` in Eq. 7; 1 disables the re-weighting (image score = max patch score).
    projection_dim : int
        Dimension of the random projection used by the coreset selection.

    Examples
    --------
    >>> model = PatchCore(coreset_fraction=0.1).fit("bottle/")     # doctest: +SKIP
    >>> model.partial_fit("more_good_bottles/")                     # doctest: +SKIP
    >>> model.predict("bottle/test/broken_large")[0].score          # doctest: +SKIP
    """

    quick_params = {"image_size": 64, "coreset_fraction": 0.25}
    traits = MethodTraits(cross_fits=True, partial_fit="approximate")

    coreset_fraction: float = 0.1
    neighborhood_size: int = 3
    reweighting_neighbors: int = 9
    projection_dim: int = 128

    def _validate_method_params(self) -> None:
        if not 0.0 < self.coreset_fraction <= 1.0:
            raise FlawmapError(f"coreset_fraction must be in (0, 1], got {self.coreset_fraction}")
        check_positive_odd("neighborhood_size", self.neighborhood_size)
        if self.reweighting_neighbors < 1:
            raise FlawmapError(f"reweighting_neighbors must be at least 1, got {self.reweighting_neighbors}")
        if self.projection_dim < 1:
            raise FlawmapError(f"projection_dim must be at least 1, got {self.projection_dim}")

    def _new_scorer(self, backbone: Backbone, taps: tuple[str, ...]) -> PatchCoreScorer:
        return PatchCoreScorer(backbone, taps, self.neighborhood_size, self.reweighting_neighbors)

    def _learn(self, feature_batches: Iterable[torch.Tensor]) -> None:
        coreset = self._coreset()
        next_image = self.n_train_images_
        for batch in feature_batches:
            n_images, _, grid_h, grid_w = batch.shape
            sources = torch.arange(next_image, next_image + n_images).repeat_interleave(grid_h * grid_w)
            coreset.add(flatten_patches(batch).cpu(), sources)
            next_image += n_images
        self.scorer_.search = self._build_search(coreset.result())
        self.coreset_state_ = coreset.state()

    def _left_out_scores(self, features: torch.Tensor, image_ids: torch.Tensor) -> PatchScores:
        """Each image against the bank rows of the other training images (its own rows, labelled
        by the coreset, left out)."""
        return self._scores_without_own_rows(features, image_ids, self.coreset_state_["labels"])

    def _coreset(self) -> StreamingCoreset:
        """A new coreset stream, or the one that kept the current bank."""
        progress = "coreset selection" if self.runtime.progress else None
        if self.scorer_.search is None:
            generator = torch.Generator().manual_seed(self.random_state)
            return StreamingCoreset(self.coreset_fraction, projection_dim=self.projection_dim, generator=generator, progress=progress)
        bank = all_vectors(self.scorer_.search)
        return StreamingCoreset.from_state(
            self.coreset_state_, bank, self.coreset_fraction, projection_dim=self.projection_dim, progress=progress
        )

    def to_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        coreset = {f"coreset.{name}": tensor for name, tensor in self.coreset_state_.items()}
        search_fitted, search_tensors = search_state(self.scorer_.search, "memory_bank")
        return search_fitted, {**search_tensors, **coreset}

    def from_state(self, fitted: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.scorer_.search = search_from_state(fitted, tensors, "memory_bank")
        prefix = "coreset."
        self.coreset_state_ = {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}
