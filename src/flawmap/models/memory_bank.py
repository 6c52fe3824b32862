"""The search hyper-parameters every method with a memory bank shares (PatchCore, SPADE, SFR).

``search`` chooses the backend of the bank's nearest-neighbour search (:mod:`flawmap.search`):
``"exact"`` is the torch backend, ``"faiss-flat"`` and ``"faiss-ivfpq"`` are those of
:mod:`flawmap.search_faiss` (the ``flawmap[faiss]`` extra). ``nlist``, ``nprobe`` and ``pq_m`` tune
faiss-ivfpq; None chooses them from the bank's size (:func:`flawmap.search_faiss.ivfpq_settings`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flawmap.errors import FlawmapError
from flawmap.models.base import AnomalyModel, PatchScores
from flawmap.search import SearchIndex, build_search
from flawmap.search_faiss import import_faiss

#: ``search`` hyper-parameter -> registered search backend.
SEARCHES = {"exact": "torch", "faiss-flat": "faiss-flat", "faiss-ivfpq": "faiss-ivfpq"}
#: Hyper-parameters that only faiss-ivfpq takes.
IVFPQ_SETTINGS = ("nlist", "nprobe", "pq_m")


@dataclass(kw_only=True, eq=False)
class MemoryBankModel(AnomalyModel):
    """An :class:`AnomalyModel` whose bank is searched by a chosen backend. Search hyper-parameters:

    Parameters
    ----------
    search : {"exact", "faiss-flat", "faiss-ivfpq"}
        Backend of the memory bank's search: exact torch search, faiss's exact brute force, or
        faiss IVF-PQ candidates re-ranked exactly (approximate; fast on large banks).
    nlist, nprobe, pq_m : int or None
        faiss-ivfpq only: inverted lists, lists visited per query, bytes per product-quantised
        row (must divide the feature dimension); None chooses from the bank's size.
    """

    search: str = "exact"
    nlist: int | None = None
    nprobe: int | None = None
    pq_m: int | None = None

    def _validate_params(self) -> None:
        super()._validate_params()
        if self.search not in SEARCHES:
            raise FlawmapError(f"search must be one of {', '.join(SEARCHES)}, got {self.search!r}")
        given = [name for name in IVFPQ_SETTINGS if getattr(self, name) is not None]
        if given and self.search != "faiss-ivfpq":
            raise FlawmapError(f"{given[0]} applies to search='faiss-ivfpq' only, not {self.search!r}")
        for name in given:
            if getattr(self, name) < 1:
                raise FlawmapError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.search != "exact":
            import_faiss(self.search)

    def _build_search(self, vectors: torch.Tensor, storage_dtype: torch.dtype = torch.float32) -> SearchIndex:
        """The bank's search over ``vectors`` (N, D), with the chosen backend and settings."""
        settings = {name: getattr(self, name) for name in IVFPQ_SETTINGS} if self.search == "faiss-ivfpq" else {}
        return build_search(vectors, backend=SEARCHES[self.search], storage_dtype=storage_dtype, **settings)

    def _scores_without_own_rows(self, features: torch.Tensor, image_ids: torch.Tensor, sources: torch.Tensor) -> PatchScores:
        """Cross-fitted scores: each training image (features B x C x h x w, ids (B,) or ranges
        (B, 2), :func:`left_out_bounds`) scored against the bank rows of the other training images
        only (``sources`` (N,): the training image of each bank row), as a new image of the same
        kind would be. Consecutive rows that leave out the same images (the tiles of one image)
        are searched together."""
        sources = sources.to(features.device)
        first, end = left_out_bounds(image_ids)
        _, run_lengths = torch.unique_consecutive(torch.stack([first, end], dim=1), dim=0, return_counts=True)
        scored, start = [], 0
        for length in run_lengths.tolist():
            low, high = int(first[start]), int(end[start])
            others = torch.nonzero((sources < low) | (sources >= high)).squeeze(1)
            scored.append(self.scorer_.score(features[start : start + length], among=others if others.numel() else None))
            start += length
        image_scores = None if scored[0].image_scores is None else torch.cat([s.image_scores for s in scored])
        return PatchScores(torch.cat([s.patch_scores for s in scored]), image_scores)


def left_out_bounds(image_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The training numbers to leave out of each scored row, ``first <= number < end`` (both
    (B,)): ``image_ids`` (B,) leaves one out (untiled: the image itself); (B, 2) gives the ranges
    (tiled: all tiles of the row's image, :mod:`flawmap.models.tiled`)."""
    if image_ids.ndim == 1:
        return image_ids, image_ids + 1
    return image_ids[:, 0], image_ids[:, 1]
