"""SPADE: Cohen & Hoshen, "Sub-Image Anomaly Detection with Deep Pyramid Correspondences", 2020.

1. Image features: the deepest tapped level, global-average pooled, ``f_y``.
2. Image score (Sec. 3.1): the mean distance from ``f_y`` to its K nearest training image
   features, ``d(y) = 1/K sum_{f in N_K(f_y)} |f - f_y|``.
3. Pyramid patch features (Sec. 3.2): the tapped levels fused on the stride-8 grid, with no local
   aggregation, ``F(y, p)``.
4. Patch score (Eq. 1): the mean distance from ``F(y, p)`` to its kappa nearest features in the
   gallery ``G = {F(x_k, p') : x_k in N_K(y), every position p'}`` of all patch features of the K
   nearest training images only, ``d(y, p) = 1/kappa sum_{f in N_kappa(F(y, p))} |f - F(y, p)|``.

The training patch features are stored in float16 (half the memory; distances are computed in
float32). Scoring an image is one chunked search in its own K-image gallery.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, NamedTuple

import torch

from flawmap.errors import FlawmapError
from flawmap.features import flatten_patches, fuse_levels
from flawmap.models.base import AnomalyModel, PatchScores, register_method
from flawmap.neighbors import NearestNeighbors

#: Storage type of the training patch features.
PATCH_BANK_DTYPE = torch.float16


class SpadeFeatures(NamedTuple):
    """What :meth:`Spade._embed` returns for B images."""

    pooled: torch.Tensor
    """(B, C_deep): the deepest tapped level, global-average pooled."""
    patches: torch.Tensor
    """(B, C, h, w): all tapped levels fused on the stride-8 grid."""


def gallery_distances(
    queries: torch.Tensor,
    patch_bank: torch.Tensor,
    image_indices: torch.Tensor,
    k: int,
    coarse_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Mean distance of each query to its ``k`` nearest patch features of the chosen images.

    Parameters
    ----------
    queries : Tensor of shape (Q, C)
        Patch features of one test image.
    patch_bank : Tensor of shape (N, h, w, C)
        Patch features of the N training images.
    image_indices : Tensor of shape (K,)
        Which training images form the gallery.
    k : int
        Neighbours per query (kappa), at most ``K * h * w``.
    coarse_dtype : torch.dtype or None
        Low-precision first pass of the search (see :class:`NearestNeighbors`); None for none.

    Returns
    -------
    Tensor of shape (Q,)
    """
    gallery = patch_bank[image_indices].flatten(0, 2).float()  # (K * h * w, C)
    distances, _ = NearestNeighbors(gallery, coarse_dtype=coarse_dtype).kneighbors(queries, k=k)
    return distances.mean(dim=1)


@register_method("spade")
@dataclass(kw_only=True, eq=False)
class Spade(AnomalyModel):
    """SPADE anomaly detector (see module docstring). Method hyper-parameters:

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
    >>> model.predict("bottle/test/broken_large")[0].score          # doctest: +SKIP
    """

    image_neighbors: int = 50
    patch_neighbors: int = 1

    def _validate_method_params(self) -> None:
        if self.image_neighbors < 1:
            raise FlawmapError(f"image_neighbors must be at least 1, got {self.image_neighbors}")
        if self.patch_neighbors < 1:
            raise FlawmapError(f"patch_neighbors must be at least 1, got {self.patch_neighbors}")

    def _embed(self, images: torch.Tensor) -> SpadeFeatures:
        """Images (B, 3, S, S) -> pooled deepest level (B, C_deep) and fused patches (B, C, S/8, S/8).

        Taps are ordered from shallow to deep, so the last one is the deepest.
        """
        levels = self._backbone_features(images)
        return SpadeFeatures(pooled=levels[-1].mean(dim=(2, 3)), patches=fuse_levels(levels))

    def _fit(self, feature_batches: Iterable[SpadeFeatures]) -> None:
        pooled, patches = [], []
        for batch in feature_batches:
            pooled.append(batch.pooled)
            patches.append(batch.patches.permute(0, 2, 3, 1).to(PATCH_BANK_DTYPE))  # (B, h, w, C)
        self._set_state({"pooled_bank": torch.cat(pooled), "patch_bank": torch.cat(patches)})

    def _score(self, features: SpadeFeatures) -> PatchScores:
        n_images, _, grid_h, grid_w = features.patches.shape
        n_train = self.pooled_bank_.shape[0]
        image_distances, nearest_images = self.image_search_.kneighbors(
            features.pooled, k=min(self.image_neighbors, n_train)
        )
        image_scores = image_distances.mean(dim=1)  # d(y)
        gallery_rows = nearest_images.shape[1] * grid_h * grid_w
        kappa = min(self.patch_neighbors, gallery_rows)
        coarse_dtype = self._low_precision_dtype()
        patch_scores = torch.stack([
            gallery_distances(
                flatten_patches(features.patches[image : image + 1]),
                self.patch_bank_,
                nearest_images[image],
                kappa,
                coarse_dtype,
            )
            for image in range(n_images)
        ])  # d(y, p)
        return PatchScores(patch_scores.view(n_images, grid_h, grid_w), image_scores)

    def _state(self) -> dict[str, torch.Tensor]:
        return {"pooled_bank": self.pooled_bank_, "patch_bank": self.patch_bank_}

    def _set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.pooled_bank_ = tensors["pooled_bank"].float().contiguous()
        self.patch_bank_ = tensors["patch_bank"].to(PATCH_BANK_DTYPE).contiguous()
        self.image_search_ = NearestNeighbors(self.pooled_bank_, coarse_dtype=self._low_precision_dtype())
