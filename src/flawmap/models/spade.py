"""SPADE: Cohen & Hoshen, "Sub-Image Anomaly Detection with Deep Pyramid Correspondences", 2020.

1. Image features: the deepest tapped level, global-average pooled, ``f_y``.
2. Image score (Sec. 3.1): the mean distance from ``f_y`` to its K nearest training image
   features, ``d(y) = 1/K sum_{f in N_K(f_y)} |f - f_y|``.
3. Pyramid patch features (Sec. 3.2): the tapped levels fused on the stride-8 grid, with no local
   aggregation, ``F(y, p)``.
4. Patch score (Eq. 1): the mean distance from ``F(y, p)`` to its kappa nearest features in the
   gallery ``G = {F(x_k, p') : x_k in N_K(y), every position p'}`` of all patch features of the K
   nearest training images only, ``d(y, p) = 1/kappa sum_{f in N_kappa(F(y, p))} |f - F(y, p)|``.

Two search indexes hold the training set: one over the pooled image features and one over every
training patch feature, stored in float16 (half the memory; distances are computed in float32).
Patch ``p`` of training image ``i`` is row ``i * h * w + p`` of the patch index, so an image's
gallery is a list of rows searched with ``among``.

Calibration (cross-fitting): a training image is scored leave-one-out by searching its K nearest
*other* training images; its own patches are then outside its gallery too.

Incremental fit (``partial_fit``): the new images' pooled and patch features are appended to the
old ones and both indexes are rebuilt. The float16 patch rows are stored relative to the mean of
all rows, so a rebuild re-rounds the old rows around the new mean (at most half a float16 step,
about 2.4e-4 relative, per update).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple

import torch

from flawmap.backbones import Backbone
from flawmap.errors import FlawmapError
from flawmap.features import flatten_patches, fuse_levels
from flawmap.models.base import MethodTraits
from flawmap.models.methods import register_method
from flawmap.models.scorer import PatchScores, Scorer
from flawmap.models.memory_bank import MemoryBankModel, left_out_bounds
from flawmap.search import SearchIndex, all_vectors, build_search, search_from_state, search_state

#: Storage type of the training patch features.
PATCH_BANK_DTYPE = torch.float16


class SpadeFeatures(NamedTuple):
    """What :meth:`SpadeScorer.embed` returns for B images."""

    pooled: torch.Tensor
    """(B, C_deep): the deepest tapped level, global-average pooled."""
    patches: torch.Tensor
    """(B, C, h, w): all tapped levels fused on the stride-8 grid."""


class SpadeScorer(Scorer):
    """Images -> kNN image scores (step 2) and K-image-gallery patch scores (step 4).

    ``image_search`` indexes the pooled training features (N, C_deep); ``patch_search`` every
    training patch feature (N * h * w, C), image-major. Both are None until fitted.
    """

    def __init__(self, backbone: Backbone, taps: tuple[str, ...], image_neighbors: int, patch_neighbors: int) -> None:
        super().__init__(backbone, taps)
        self.image_neighbors = image_neighbors
        self.patch_neighbors = patch_neighbors
        self.image_search: SearchIndex | None = None
        self.patch_search: SearchIndex | None = None

    def embed(self, images: torch.Tensor) -> SpadeFeatures:
        """Images (B, 3, S, S) -> pooled deepest level (B, C_deep) and fused patches (B, C, S/8, S/8).

        Taps are ordered from shallow to deep, so the last one is the deepest.
        """
        levels = self.levels(images)
        return SpadeFeatures(pooled=levels[-1].mean(dim=(2, 3)), patches=fuse_levels(levels))

    def score(self, features: SpadeFeatures, left_out: torch.Tensor | None = None) -> PatchScores:
        """Features of B images -> patch scores (B, h, w) and image scores (B,).

        K is capped at the training images and kappa at the gallery size. Each image is searched
        in its own gallery, one image at a time: a batched search would compare every query with
        every gallery, a ``B x h*w x K*h*w`` block, B times the work for B - 1 wasted galleries.
        ``left_out`` (B,) or (B, 2): for training images, their own row of the image index (or
        the range of rows of their image's tiles, :func:`left_out_bounds`), never used as
        neighbours (leave-one-out scores).
        """
        n_images, _, grid_h, grid_w = features.patches.shape
        n_positions = grid_h * grid_w
        if left_out is None:
            k = min(self.image_neighbors, len(self.image_search))
            image_distances, nearest_images = self.image_search.kneighbors(features.pooled, k=k)
        else:
            image_distances, nearest_images = self.other_images(features.pooled, left_out)
        image_scores = image_distances.mean(dim=1)  # d(y)
        positions = torch.arange(n_positions, device=nearest_images.device)
        galleries = (nearest_images.unsqueeze(2) * n_positions + positions).flatten(1)  # (B, K * h * w) rows
        kappa = min(self.patch_neighbors, galleries.shape[1])
        queries = flatten_patches(features.patches).view(n_images, n_positions, -1)
        patch_scores = torch.stack([
            self.patch_search.kneighbors(queries[image], kappa, among=galleries[image])[0].mean(dim=1)
            for image in range(n_images)
        ])  # d(y, p)
        return PatchScores(patch_scores.view(n_images, grid_h, grid_w), image_scores)

    def other_images(self, pooled: torch.Tensor, left_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Distances and rows (B, K) of the K nearest training images other than the rows
        ``left_out`` (:func:`left_out_bounds`)."""
        first, end = (bound.to(pooled.device).unsqueeze(1) for bound in left_out_bounds(left_out))
        n_left_out = int((end - first).max())
        k = min(self.image_neighbors, len(self.image_search) - n_left_out)
        distances, rows = self.image_search.kneighbors(pooled, k=k + n_left_out)
        # stable sort on "is a left-out row": the others keep their order, the left-out ones go last
        order = ((rows >= first) & (rows < end)).to(torch.uint8).argsort(dim=1, stable=True)[:, :k]
        return distances.gather(1, order), rows.gather(1, order)


@register_method("spade")
@dataclass(kw_only=True, eq=False)
class Spade(MemoryBankModel):
    """SPADE anomaly detector (see module docstring). Method hyper-parameters (and the patch
    bank's ``search`` and ``search_options``: :class:`flawmap.models.memory_bank.MemoryBankModel`;
    the small index of pooled image features is always searched exactly):

    Parameters
    ----------
    image_neighbors : int
        K: nearest training images for the image score and the patch gallery (the paper's 50);
        capped at the number of training images.
    patch_neighbors : int
        kappa: nearest gallery features averaged into a patch score (the paper's 1).

    Examples
    --------
    >>> model = Spade(image_neighbors=50).fit("bottle/")          # doctest: +SKIP
    >>> model.partial_fit("more_good_bottles/")                     # doctest: +SKIP
    >>> model.predict("bottle/test/broken_large")[0].score          # doctest: +SKIP
    """

    quick_params = {"image_size": 64, "image_neighbors": 3}
    traits = MethodTraits(cross_fits=True, partial_fit="exact", export_batch="fixed")

    image_neighbors: int = 50
    patch_neighbors: int = 1

    def _validate_method_params(self) -> None:
        if self.image_neighbors < 1:
            raise FlawmapError(f"image_neighbors must be at least 1, got {self.image_neighbors}")
        if self.patch_neighbors < 1:
            raise FlawmapError(f"patch_neighbors must be at least 1, got {self.patch_neighbors}")

    def _new_scorer(self, backbone: Backbone, taps: tuple[str, ...]) -> SpadeScorer:
        return SpadeScorer(backbone, taps, self.image_neighbors, self.patch_neighbors)

    def _learn(self, feature_batches: Iterable[SpadeFeatures]) -> None:
        pooled, patches = [], []
        if self.scorer_.image_search is not None:
            pooled.append(all_vectors(self.scorer_.image_search))
            patches.append(all_vectors(self.scorer_.patch_search))
        for batch in feature_batches:
            pooled.append(batch.pooled.cpu())
            patches.append(flatten_patches(batch.patches).to(device="cpu", dtype=PATCH_BANK_DTYPE))  # (B * h * w, C)
        self.scorer_.image_search = build_search(torch.cat(pooled))
        self.scorer_.patch_search = self._build_search(torch.cat(patches), storage_dtype=PATCH_BANK_DTYPE)

    def _left_out_scores(self, features: SpadeFeatures, image_ids: torch.Tensor) -> PatchScores:
        return self.scorer_.score(features, left_out=image_ids)

    def to_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        image_fitted, image_tensors = search_state(self.scorer_.image_search, "image_features")
        patch_fitted, patch_tensors = search_state(self.scorer_.patch_search, "patch_features")
        return {**image_fitted, **patch_fitted}, {**image_tensors, **patch_tensors}

    def from_state(self, fitted: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.scorer_.image_search = search_from_state(fitted, tensors, "image_features")
        self.scorer_.patch_search = search_from_state(fitted, tensors, "patch_features")
