"""The search hyper-parameters every method with a memory bank shares (PatchCore, SPADE, SFR).

``search`` names a registered search backend (:data:`flawmap.search.SEARCH_BACKENDS`) and
``search_options`` its options, which the backend declares and :func:`flawmap.search.check_search`
validates at fit time; this module knows no backend by name. Models saved before the two were
introduced named the torch backend ``"exact"`` and held faiss-ivfpq's options as hyper-parameters
of their own: :meth:`MemoryBankModel.upgrade_params` maps those saved names when loading.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from flawmap.models.base import AnomalyModel
from flawmap.models.scorer import PatchScores
from flawmap.search import DEFAULT_BACKEND, SearchIndex, build_search, check_search

#: Hyper-parameters of models saved before ``search_options`` that are now its options.
FORMER_OPTION_PARAMS = ("nlist", "nprobe", "pq_m")
#: ``search`` values of models saved before then -> the backend's registered name.
FORMER_SEARCH_NAMES = {"exact": "torch"}


@dataclass(kw_only=True, eq=False)
class MemoryBankModel(AnomalyModel):
    """An :class:`AnomalyModel` whose bank is searched by a chosen backend. Search hyper-parameters:

    Parameters
    ----------
    search : str
        Registered backend of the memory bank's search: ``"torch"`` (exact), ``"faiss-flat"``
        (faiss's exact brute force) or ``"faiss-ivfpq"`` (faiss IVF-PQ candidates re-ranked
        exactly: approximate, fast on large banks), or any backend registered since.
    search_options : dict or None
        The backend's options, e.g. ``{"nlist": 1024, "nprobe": 16}`` for faiss-ivfpq; those not
        given take the backend's defaults (``flawmap fit --help`` lists each backend's).

    Examples
    --------
    >>> PatchCore(search="faiss-ivfpq", search_options={"nlist": 64}).fit("bottle/")   # doctest: +SKIP
    """

    search: str = DEFAULT_BACKEND
    search_options: dict | None = None

    @classmethod
    def upgrade_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """Saved hyper-parameters under today's names: the former ``nlist``, ``nprobe`` and
        ``pq_m`` (None when not set) move into ``search_options``, ``search="exact"`` is ``"torch"``."""
        params = super().upgrade_params(params)
        former = {name: params.pop(name) for name in FORMER_OPTION_PARAMS if name in params}
        if former:
            options = {name: value for name, value in former.items() if value is not None}
            params.setdefault("search_options", options or None)
        if params.get("search") in FORMER_SEARCH_NAMES:
            params["search"] = FORMER_SEARCH_NAMES[params["search"]]
        return params

    def _validate_params(self) -> None:
        super()._validate_params()
        check_search(self.search, self.search_options)

    def _build_search(self, vectors: torch.Tensor, storage_dtype: torch.dtype = torch.float32) -> SearchIndex:
        """The bank's search over ``vectors`` (N, D), with the chosen backend and options."""
        return build_search(vectors, backend=self.search, options=self.search_options, storage_dtype=storage_dtype)

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
    (tiled: all tiles of the row's image, :class:`flawmap.models.calibrators.TiledCrossFit`)."""
    if image_ids.ndim == 1:
        return image_ids, image_ids + 1
    return image_ids[:, 0], image_ids[:, 1]
