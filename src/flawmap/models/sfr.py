"""SFR: Hotta, Zhang, Hagihara & Akashi, "Subspace-Guided Feature Reconstruction for Unsupervised
Anomaly Localization", arXiv 2309.13904 (IET Image Processing 2025).

Memory-bank methods (PatchCore, SPADE) score a patch by its distance to the nearest stored normal
feature, so a normal feature that the bank happens not to hold looks anomalous. SFR instead
reconstructs each target feature as a linear combination of the normal features of its
low-dimensional subspace (the self-expressive model of subspace clustering): a normal feature
that was never stored is still "mimicked" by its neighbours in the subspace, and the residual,
the feature dimensions that no normal combination explains, is the anomaly evidence. The
sparsity of the self-expressive coefficients then tells which few normal features the
reconstructions depend on, and only those are kept.

The paper does not spell out every step; where it is silent this module takes the standard
choices of the sparse subspace clustering literature, with every code restricted to ``k`` nearest
atoms so that time and memory stay linear in the number of patches (docs/sfr.md has the
derivation and the measurements behind each default). Notation: ``x`` (D,) a patch feature,
``A`` (k, D) the ``k`` atoms it is coded on, ``c`` (k,) their coefficients, ``s^2`` the mean squared
norm of the atoms (it makes the penalty weights ``lambda_1 = sparsity``, ``lambda_2 = ridge`` and
``lambda_a = affine`` independent of the feature scale).

1. Features: PatchCore's locally aware patch features (:func:`flawmap.features.locally_aware_patches`).
2. Pool: the training patches reduced by greedy k-center coreset (PatchCore Alg. 1) to
   ``pool_factor`` times the bank size. The pool keeps every rare normal pattern within reach
   (the coefficient ranking below alone favours dense regions) and makes step 3 cheap.
3. Self-expression of the pool ``X``, each atom coded on its ``k`` nearest other atoms
   (``diag(C) = 0``; searched within the atom's shard of the pool, 16k to 32k atoms, so that this
   step stays linear in the number of training images), with a row-sparse penalty (SMRS; Elhamifar, Sapiro & Vidal, CVPR 2012)::

       min_C  sum_i 1/2 |x_i - A_i^T c_i|^2 + lambda_a s^2 / 2 |1 - 1^T C|^2
              + lambda_2 s^2 / 2 |C|_F^2 + lambda_1 s^2 sum_j |C^j|_2                               (1)

   ``C^j`` is row ``j`` of ``C``: every coefficient with which atom ``j`` helps express another
   atom. The row norm vanishes for atoms that no other atom needs. The affine term is SMRS's (and
   SSC's, for affine subspaces) constraint ``1^T C = 1^T``, imposed softly: a code's weights
   (nearly) sum to one, an affine combination of its atoms, so the model is a union of *affine*
   subspaces, the penalties shrink codes toward the neighbours' mean instead of toward 0, and a
   feature is not explained by merely rescaling normal ones (``affine = 0``: linear subspaces; the
   projection (5) below stays linear, affine bases measured no better). Solved by FISTA with a
   row-wise group soft-threshold.
4. Sparse sampling: the bank keeps the ``round(bank_fraction * N)`` pool atoms (``N`` training
   patches) with the largest ``|C^j|_2``, the atoms the reconstruction of the others depends on most.
   With ``sampling="subspace"`` the pool is first split into ``L`` subspaces (sparse subspace
   clustering: the affinity ``W = |C| + |C|^T`` (3), spectral clustering (4)) and the ranking runs
   within each subspace, every subspace keeping at least ``d + 1`` atoms (when the bank has room)
   and the rest in proportion to its size (:func:`subspace_sample`).
5. Target reconstruction, ``reconstruction="local"``: a test feature is one more column of (1).
   For a single column the row norms are absolute values, so its code is the elastic net over its
   ``k`` nearest bank atoms::

       c*(x) = argmin_c 1/2 |x - A^T c|^2 + lambda_a s^2 / 2 (1 - 1^T c)^2
                        + lambda_1 s^2 |c|_1 + lambda_2 s^2 / 2 |c|^2                              (2)

   solved by FISTA, in batches of queries. ``reconstruction="subspace"``: each subspace ``l`` has
   an orthonormal basis ``U_l`` (D, d) of its bank atoms (leading right singular vectors); a test
   feature is assigned to the subspace that reconstructs it best and projected onto it::

       l*(x) = argmin_l |x - U_l U_l^T x|,   r(x) = x - U_l* U_l*^T x                           (5)

   the least-squares combination of the subspace's basis vectors (Eq. (2) restricted to the
   atoms of one subspace, without penalties, truncated to rank ``d``).
6. Patch score: the norm of the per-dimension residual ``r(x) = x - A^T c*(x)`` (or Eq. (5); the
   poorly reconstructed feature dimensions are the anomaly evidence), upsampled and smoothed like
   every method's; image score: the maximum of the smoothed map.

Calibration (cross-fitting): every pool and bank atom remembers the training image it came from,
so a training image is coded over the other images' atoms only (``among`` in the search; for the
subspace reconstruction the bases are rebuilt from the other images' atoms).

Incremental fit (``partial_fit``): the pool of step 2 is a stream over the training patches
(:class:`flawmap.coreset.StreamingCoreset`); the model keeps the pool and the stream's state, new
images continue the stream (the pool keeps its atoms and gains the coreset share of the new
patches), and steps 3-4 run again over the whole pool for a bank of ``round(bank_fraction * N)``
atoms, ``N`` now counting every patch seen. The baseline samplings continue their own stream,
whose kept rows are the bank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import scipy.cluster.vq
import scipy.sparse
import scipy.sparse.linalg
import torch
from tqdm import tqdm

from flawmap.backbones import Backbone
from flawmap.coreset import StreamingCoreset, StreamingRandomSample
from flawmap.errors import FlawmapError
from flawmap.features import flatten_patches, locally_aware_patches
from flawmap.models.base import MethodTraits, check_positive_odd
from flawmap.models.methods import register_method
from flawmap.models.scorer import PatchScores, Scorer
from flawmap.models.memory_bank import MemoryBankModel
from flawmap.search import SearchIndex, all_vectors, build_search, row_chunks, search_from_state, search_state

#: How the bank is sampled from the training patches: ``"sparse"`` (steps 2-4), or, for
#: comparison, a greedy coreset or a uniform random sample of the same size.
SAMPLINGS = ("sparse", "subspace", "coreset", "random")
#: The samplings that code a coreset pool (steps 2-4); for the others the bank is the pool.
POOLED_SAMPLINGS = ("sparse", "subspace")
#: How a target feature is reconstructed: ``"local"`` (Eq. 2 over its ``k`` nearest bank atoms) or
#: ``"subspace"`` (projection onto the basis of its subspace, Eq. 5; needs ``sampling="subspace"``).
RECONSTRUCTIONS = ("local", "subspace")
#: FISTA iterations for the target codes (2). On MVTec bottle (defaults) the residual norms are then
#: within 0.3% (median) and 3.4% (99th percentile) of those after 2000 iterations; 300 iterations
#: move no mean metric of docs/sfr.md's grid by more than 0.0001.
TARGET_ITERATIONS = 50
#: FISTA iterations for the pool codes (1), which share one (smaller) step size. On MVTec bottle the
#: bank they select shares 99.8% of its atoms with the one selected after 2000 iterations.
POOL_ITERATIONS = 200
#: Relative tolerance of the spectral embedding's eigen-solver (Lanczos, ``scipy.sparse.linalg.eigsh``).
SPECTRAL_TOLERANCE = 1e-4
#: Lloyd iterations of the k-means on the spectral embedding.
KMEANS_ITERATIONS = 50
#: Queries coded together; bounds the gathered atoms (rows x k x D floats) to tens of MiB.
CODING_CHUNK_ROWS = 2048
#: Pool atoms per block of the atoms' neighbourhood search (:func:`_nearest_other_atoms`).
NEIGHBOURHOOD_SHARD_ATOMS = 16_384

Prox = Callable[[torch.Tensor, torch.Tensor | float], torch.Tensor]
PoolSampler = StreamingCoreset | StreamingRandomSample


class SFRScorer(Scorer):
    """Images -> norms of the residuals of their reconstructions from the bank (steps 1, 5, 6).

    ``search`` indexes the bank of atoms and ``atom_sq_norm`` is the 0-d buffer ``s^2``, the mean
    squared norm of the atoms; both are None until fitted. For ``reconstruction="subspace"`` the
    buffers ``atom_subspaces`` (M,) (the subspace of each bank atom) and ``bases`` (L, D, d) (an
    orthonormal basis of each subspace, zero-padded to ``d`` columns) hold the subspaces.
    """

    def __init__(
        self, backbone: Backbone, taps: tuple[str, ...], neighborhood_size: int, dictionary_size: int,
        sparsity: float, ridge: float, affine: float, reconstruction: str, subspace_dim: int,
    ) -> None:
        super().__init__(backbone, taps)
        self.neighborhood_size = neighborhood_size
        self.dictionary_size = dictionary_size
        self.sparsity = sparsity
        self.ridge = ridge
        self.affine = affine
        self.reconstruction = reconstruction
        self.subspace_dim = subspace_dim
        self.search: SearchIndex | None = None
        self.register_buffer("atom_sq_norm", None)
        self.register_buffer("atom_subspaces", None)
        self.register_buffer("bases", None)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) -> locally aware patch features (B, C, S/8, S/8)."""
        return locally_aware_patches(self.levels(images), self.neighborhood_size)

    def score(self, features: torch.Tensor, among: torch.Tensor | None = None) -> PatchScores:
        """Features (B, C, h, w) -> residual norms (B, h, w), reconstructed from the whole bank or its rows ``among``."""
        n_images, _, grid_h, grid_w = features.shape
        residuals = self.reconstruction_residuals(flatten_patches(features), among)
        return PatchScores(torch.linalg.vector_norm(residuals, dim=1).view(n_images, grid_h, grid_w))

    def reconstruction_residuals(self, queries: torch.Tensor, among: torch.Tensor | None = None) -> torch.Tensor:
        """Per-dimension residuals ``r(x)`` (Q, D) of features (Q, D): Eq. (2) or Eq. (5)."""
        if self.reconstruction == "subspace":
            bases = self.bases
            if among is not None:
                atoms = self.search.vectors(among).float()
                bases = subspace_bases(atoms, self.atom_subspaces[among], self.bases.shape[0], self.subspace_dim)
            return subspace_residuals(queries, bases)
        return reconstruction_residuals(
            queries, self.search, self.dictionary_size, self.sparsity, self.ridge, self.atom_sq_norm,
            affine=self.affine, among=among,
        )

    def set_bank(self, bank: torch.Tensor, search: SearchIndex, subspaces: torch.Tensor | None = None,
                 n_subspaces: int = 0) -> None:
        """Score against ``bank`` (M, D), indexed by ``search``, from now on; ``subspaces`` (M,)
        labels each atom with one of ``n_subspaces`` subspaces (``reconstruction="subspace"``)."""
        self.search = search
        self.atom_sq_norm = bank.float().square().sum(dim=1).mean()  # s^2 of Eq. (2)
        self.atom_subspaces = subspaces
        if subspaces is not None:
            self.bases = subspace_bases(bank.float(), subspaces, n_subspaces, self.subspace_dim)


@register_method("sfr")
@dataclass(kw_only=True, eq=False)
class SFR(MemoryBankModel):
    """Subspace-guided feature reconstruction (see module docstring). Method hyper-parameters (and
    the bank's ``search`` and ``search_options``: :class:`flawmap.models.memory_bank.MemoryBankModel`):

    Parameters
    ----------
    bank_fraction : float
        Share of the training patches kept in the bank, in (0, 1].
    dictionary_size : int
        ``k``: atoms each feature is coded on, its ``k`` nearest (excluding itself in the pool).
    sparsity : float
        ``lambda_1``: weight of the l1 (pool: row-group) penalty, relative to ``s^2``.
    ridge : float
        ``lambda_2``: weight of the squared l2 penalty, relative to ``s^2``.
    affine : float
        ``lambda_a``: weight of the affine term ``(1 - 1^T c)^2`` (codes sum to one), relative to
        ``s^2``; 0 models linear instead of affine subspaces.
    sampling : {"sparse", "subspace", "coreset", "random"}
        Bank sampling rule (:data:`SAMPLINGS`): SMRS row norms over the pool, the same within each
        subspace of the pool, or the baselines of the same size.
    reconstruction : {"local", "subspace"}
        How a target is reconstructed (:data:`RECONSTRUCTIONS`): elastic net over its ``k``
        nearest bank atoms (Eq. 2), or projection onto the basis of its subspace (Eq. 5; needs
        ``sampling="subspace"``).
    n_subspaces : int
        ``L``: subspaces the pool is clustered into (``sampling="subspace"``).
    subspace_dim : int
        ``d``: dimension of each subspace's basis, and the fewest atoms the subspace sampling keeps
        per subspace (``d + 1``, when the bank has room).
    pool_factor : float
        Coreset pool size for ``"sparse"`` and ``"subspace"`` sampling, in multiples of the bank
        size (at least 1).
    neighborhood_size : int
        Local aggregation window ``p`` of the patch features (PatchCore Eq. 2).
    projection_dim : int
        Dimension of the random projection used by the coreset selection.

    Attributes
    ----------
    n_patches_ : int
        Training patches seen by every fit so far (``N``).
    pool_ : Tensor of shape (P, D)
        The pool of step 2 (``"sparse"`` and ``"subspace"``; for the baselines the bank is the pool).
    pool_sampler_state_ : dict of str to Tensor
        What the pool's stream needs to resume (:meth:`StreamingCoreset.state`).
    bank_sources_ : Tensor of shape (M,)
        The training image number of each bank atom (for the left-out calibration scores).

    Examples
    --------
    >>> model = SFR(bank_fraction=0.025).fit("bottle/")              # doctest: +SKIP
    >>> model.partial_fit("more_good_bottles/")                     # doctest: +SKIP
    >>> model.predict("bottle/test/broken_large")[0].score          # doctest: +SKIP
    """

    quick_params = {"image_size": 64, "bank_fraction": 0.25}
    traits = MethodTraits(cross_fits=True, partial_fit="approximate")
    former_params = {6: {"affine": 0.0}}  # format 5 and before: linear subspaces

    bank_fraction: float = 0.025
    dictionary_size: int = 16
    sparsity: float = 0.1
    ridge: float = 0.1
    affine: float = 1.0
    sampling: str = "sparse"
    reconstruction: str = "local"
    n_subspaces: int = 16
    subspace_dim: int = 8
    pool_factor: float = 2.0
    neighborhood_size: int = 3
    projection_dim: int = 128

    def _validate_method_params(self) -> None:
        if not 0.0 < self.bank_fraction <= 1.0:
            raise FlawmapError(f"bank_fraction must be in (0, 1], got {self.bank_fraction}")
        if self.dictionary_size < 1:
            raise FlawmapError(f"dictionary_size must be at least 1, got {self.dictionary_size}")
        if self.sparsity < 0.0 or self.ridge < 0.0 or self.sparsity + self.ridge == 0.0:
            raise FlawmapError(f"sparsity and ridge must be >= 0, not both 0; got {self.sparsity} and {self.ridge}")
        if self.affine < 0.0:
            raise FlawmapError(f"affine must be >= 0, got {self.affine}")
        if self.sampling not in SAMPLINGS:
            raise FlawmapError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {self.sampling!r}")
        if self.reconstruction not in RECONSTRUCTIONS:
            raise FlawmapError(f"reconstruction must be one of {', '.join(RECONSTRUCTIONS)}, got {self.reconstruction!r}")
        if self.reconstruction == "subspace" and self.sampling != "subspace":
            raise FlawmapError(f"reconstruction='subspace' needs sampling='subspace', got {self.sampling!r}")
        if self.n_subspaces < 1 or self.subspace_dim < 1:
            raise FlawmapError(f"n_subspaces and subspace_dim must be at least 1, got {self.n_subspaces} and {self.subspace_dim}")
        if self.pool_factor < 1.0:
            raise FlawmapError(f"pool_factor must be at least 1, got {self.pool_factor}")
        check_positive_odd("neighborhood_size", self.neighborhood_size)
        if self.projection_dim < 1:
            raise FlawmapError(f"projection_dim must be at least 1, got {self.projection_dim}")

    def _new_scorer(self, backbone: Backbone, taps: tuple[str, ...]) -> SFRScorer:
        return SFRScorer(
            backbone, taps, self.neighborhood_size, self.dictionary_size, self.sparsity, self.ridge, self.affine,
            self.reconstruction, self.subspace_dim,
        )

    def _learn(self, feature_batches: Iterable[torch.Tensor]) -> None:
        sampler = self._pool_sampler()
        n_patches = self.n_patches_ if self.scorer_.search is not None else 0
        next_image = self.n_train_images_
        for batch in feature_batches:
            rows = flatten_patches(batch).cpu()
            sources = torch.arange(next_image, next_image + batch.shape[0]).repeat_interleave(rows.shape[0] // batch.shape[0])
            sampler.add(rows, sources)
            n_patches += rows.shape[0]
            next_image += batch.shape[0]
        pool, pool_sources = sampler.result(), sampler.labels()
        self.n_patches_ = n_patches
        self.pool_sampler_state_ = sampler.state()
        subspaces = None
        if self.sampling in POOLED_SAMPLINGS:
            self.pool_ = pool
            n_bank = max(1, round(self.bank_fraction * n_patches))
            if n_bank < pool.shape[0] or self.sampling == "subspace":
                kept, subspaces = self._sample(pool, n_bank)
                pool, pool_sources = pool[kept], pool_sources[kept]
        self.scorer_.set_bank(pool, self._build_search(pool), subspaces, self.n_subspaces)
        self.bank_sources_ = pool_sources

    def _sample(self, pool: torch.Tensor, n_bank: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Steps 3-4: the rows of ``pool`` (P, D) kept in the bank (M,), and for ``"subspace"``
        sampling the subspace of each kept row (M,) (None for ``"sparse"``)."""
        codes, neighbors = self_expressive_codes(
            pool.to(self.runtime.torch_device), self.dictionary_size, self.sparsity, self.ridge, affine=self.affine,
            low_precision=self.runtime.low_precision_dtype(), progress=self.runtime.progress,
        )
        usage = _row_norms(codes, neighbors, pool.shape[0]).cpu()
        if self.sampling == "sparse":
            return usage.topk(n_bank).indices, None
        subspaces = subspace_clustering(codes.cpu(), neighbors.cpu(), self.n_subspaces, self.random_state)
        kept = subspace_sample(usage, subspaces, n_bank, self.subspace_dim)
        return kept, subspaces[kept]

    def _left_out_scores(self, features: torch.Tensor, image_ids: torch.Tensor) -> PatchScores:
        """Each image coded over the bank atoms of the other training images only."""
        return self._scores_without_own_rows(features, image_ids, self.bank_sources_)

    def _pool_sampler(self) -> PoolSampler:
        """Step 2's stream (for the baselines: the bank's): new, or resumed from the fitted pool."""
        pooled = self.sampling in POOLED_SAMPLINGS
        fraction = min(1.0, self.pool_factor * self.bank_fraction) if pooled else self.bank_fraction
        progress = "coreset selection" if self.runtime.progress else None
        if self.scorer_.search is None:
            generator = torch.Generator().manual_seed(self.random_state)
            if self.sampling == "random":
                return StreamingRandomSample(fraction, generator=generator)
            return StreamingCoreset(fraction, projection_dim=self.projection_dim, generator=generator, progress=progress)
        if self.sampling == "random":
            return StreamingRandomSample.from_state(self.pool_sampler_state_, self._pool(), fraction)
        return StreamingCoreset.from_state(
            self.pool_sampler_state_, self._pool(), fraction, projection_dim=self.projection_dim, progress=progress
        )

    def _pool(self) -> torch.Tensor:
        """The fitted pool (P, D) on the CPU: ``pool_``, or for the baselines the bank itself."""
        if self.sampling in POOLED_SAMPLINGS:
            return self.pool_
        return all_vectors(self.scorer_.search)

    def to_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        search_fitted, search_tensors = search_state(self.scorer_.search, "bank")
        tensors = {
            **search_tensors,
            "atom_sq_norm": self.scorer_.atom_sq_norm,
            "bank_sources": self.bank_sources_,
            **{f"pool_sampler.{name}": tensor for name, tensor in self.pool_sampler_state_.items()},
        }
        if self.sampling in POOLED_SAMPLINGS:
            tensors["pool"] = self.pool_
        if self.sampling == "subspace":
            tensors["atom_subspaces"] = self.scorer_.atom_subspaces
        return {"n_patches_": self.n_patches_, **search_fitted}, tensors

    def from_state(self, fitted: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.scorer_.search = search_from_state(fitted, tensors, "bank")
        self.scorer_.atom_sq_norm = tensors["atom_sq_norm"]
        self.bank_sources_ = tensors["bank_sources"].long()
        if self.bank_sources_.shape != (len(self.scorer_.search),):
            raise RuntimeError(f"{self.bank_sources_.shape[0]} bank sources for {len(self.scorer_.search)} atoms")
        self.n_patches_ = fitted["n_patches_"]
        prefix = "pool_sampler."
        self.pool_sampler_state_ = {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}
        if self.sampling in POOLED_SAMPLINGS:
            self.pool_ = tensors["pool"]
        if self.sampling == "subspace":
            self.scorer_.set_bank(all_vectors(self.scorer_.search), self.scorer_.search,
                                  tensors["atom_subspaces"].long(), self.n_subspaces)


# ---------------------------------------------------------------------------- the two codings
def self_expressive_usage(atoms: torch.Tensor, n_neighbors: int, sparsity: float, ridge: float, **options: Any) -> torch.Tensor:
    """How much the self-expression (1) of ``atoms`` (N, D) relies on each atom: the row norms
    ``|C^j|_2`` (N,), zero for atoms no other atom uses. Arguments as :func:`self_expressive_codes`."""
    codes, neighbors = self_expressive_codes(atoms, n_neighbors, sparsity, ridge, **options)
    return _row_norms(codes, neighbors, atoms.shape[0])


def self_expressive_codes(
    atoms: torch.Tensor,
    n_neighbors: int,
    sparsity: float,
    ridge: float,
    *,
    affine: float,
    iterations: int = POOL_ITERATIONS,
    low_precision: torch.dtype | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The row-sparse self-expression (1) of ``atoms``: ``X ~ X C`` with ``diag(C) = 0``.

    Parameters
    ----------
    atoms : Tensor of shape (N, D)
        The pool ``X``; needs ``N >= 2``.
    n_neighbors : int
        ``k``; capped at ``N - 1``.
    sparsity, ridge : float
        ``lambda_1`` and ``lambda_2`` of Eq. (1), relative to the atoms' mean squared norm.
    affine : float
        ``lambda_a`` of Eq. (1), relative to the same; 0 drops the affine term (linear subspaces).
    iterations : int
        FISTA iterations.
    low_precision : torch.dtype or None
        Low-precision candidate pass of the neighbour search (see :func:`flawmap.search.build_search`).
    progress : bool
        Show a progress bar over the iterations.

    Returns
    -------
    codes : Tensor of shape (N, k)
        Column ``i`` of ``C`` on its support: ``codes[i, t] = C[neighbors[i, t], i]``.
    neighbors : LongTensor of shape (N, k)
        The ``k`` nearest other atoms of each atom (never the atom itself).
    """
    n_atoms = atoms.shape[0]
    k = min(n_neighbors, n_atoms - 1)
    neighbors = _nearest_other_atoms(atoms, k, low_precision)  # (N, k), diag(C) = 0
    sq_norm = float(atoms.square().sum(dim=1).mean())  # s^2
    gram = atoms.new_empty(n_atoms, k, k)
    correlations = atoms.new_empty(n_atoms, k)
    for start in range(0, n_atoms, CODING_CHUNK_ROWS):
        rows = slice(start, start + CODING_CHUNK_ROWS)
        gram[rows], correlations[rows] = _normal_equations(
            atoms[rows], atoms[neighbors[rows]], ridge * sq_norm, affine * sq_norm
        )
    # one step size for all columns, because the row penalty couples them: 1 / max_i L_i
    shared_step = 1.0 / float(gram.diagonal(dim1=1, dim2=2).sum(dim=1).max())

    def row_group_shrink(values: torch.Tensor, step: torch.Tensor | float) -> torch.Tensor:
        """Proximal map of ``step * lambda_1 s^2 sum_j |C^j|_2``: shrink every row norm."""
        row_norms = _row_norms(values, neighbors, n_atoms)
        scale = (1.0 - step * sparsity * sq_norm / row_norms.clamp_min(1e-12)).clamp_min(0.0)
        return values * scale[neighbors]

    steps = tqdm(range(iterations), desc="self-expressive coding", disable=not progress, leave=False)
    return _fista(gram, correlations, row_group_shrink, shared_step, steps), neighbors


def reconstruction_residuals(
    queries: torch.Tensor,
    search: SearchIndex,
    n_neighbors: int,
    sparsity: float,
    ridge: float,
    atom_sq_norm: torch.Tensor | float,
    *,
    affine: float,
    iterations: int = TARGET_ITERATIONS,
    among: torch.Tensor | None = None,
) -> torch.Tensor:
    """Residuals of the elastic-net codes (2) of ``queries`` over their nearest atoms in ``search``.

    Parameters
    ----------
    queries : Tensor of shape (Q, D)
    search : SearchIndex
        A search over the bank of atoms (N, D).
    n_neighbors : int
        ``k``; capped at ``N``.
    sparsity, ridge : float
        ``lambda_1`` and ``lambda_2`` of Eq. (2), relative to ``atom_sq_norm``.
    atom_sq_norm : float or 0-d Tensor
        ``s^2``, the mean squared norm of the atoms.
    affine : float
        ``lambda_a`` of Eq. (2), relative to ``atom_sq_norm``; 0 drops the affine term.
    iterations : int
        FISTA iterations.
    among : LongTensor of shape (M,), optional
        Code over these atoms only (a training image's left-out score: the other images' atoms).

    Returns
    -------
    Tensor of shape (Q, D)
        ``x - A^T c*(x)`` for every query ``x``.
    """
    k = min(n_neighbors, len(search) if among is None else among.shape[0])
    _, neighbors = search.kneighbors(queries, k=k, among=among)  # (Q, k)
    threshold = sparsity * atom_sq_norm

    def soft_threshold(values: torch.Tensor, step: torch.Tensor | float) -> torch.Tensor:
        """Proximal map of ``step * lambda_1 s^2 |c|_1``."""
        return values.sign() * (values.abs() - step * threshold).clamp_min(0.0)

    residuals = []
    for rows in row_chunks(queries.shape[0], CODING_CHUNK_ROWS):  # one chunk while exporting
        chunk, local_atoms = queries[rows].float(), search.vectors(neighbors[rows])  # (n, D), (n, k, D)
        gram, correlations = _normal_equations(chunk, local_atoms, ridge * atom_sq_norm, affine * atom_sq_norm)
        step = 1.0 / gram.diagonal(dim1=1, dim2=2).sum(dim=1, keepdim=True)  # 1 / trace <= 1 / L per query
        codes = _fista(gram, correlations, soft_threshold, step, range(iterations))
        residuals.append(chunk - torch.einsum("qk,qkd->qd", codes, local_atoms))
    return torch.cat(residuals)


# ---------------------------------------------------------------------------- subspaces
def subspace_clustering(codes: torch.Tensor, neighbors: torch.Tensor, n_subspaces: int, seed: int) -> torch.Tensor:
    """Sparse subspace clustering (Elhamifar & Vidal, TPAMI 2013) of the atoms coded by (1).

    The affinity ``W = |C| + |C|^T`` (Eq. 3) links atoms that express each other; spectral
    clustering (Ng, Jordan & Weiss 2001) splits it into subspaces: the ``L`` leading eigenvectors
    of ``D^-1/2 W D^-1/2`` (``D`` the degrees), rows normalised to unit length, then k-means.

    Parameters
    ----------
    codes, neighbors : Tensor of shape (N, k)
        The self-expression of :func:`self_expressive_codes` (on the CPU).
    n_subspaces : int
        ``L``; capped at ``N - 1``.
    seed : int
        Seeds the eigen-solver's start vector and the k-means.

    Returns
    -------
    LongTensor of shape (N,)
        The subspace of every atom, in ``0 .. L - 1`` (a subspace may end up empty).
    """
    n_atoms = codes.shape[0]
    n_subspaces = min(n_subspaces, n_atoms - 1)
    if n_subspaces < 2:
        return torch.zeros(n_atoms, dtype=torch.long)
    columns = torch.arange(n_atoms).repeat_interleave(neighbors.shape[1]).numpy()
    weights = codes.abs().double().reshape(-1).numpy()
    affinity = scipy.sparse.coo_matrix((weights, (neighbors.reshape(-1).numpy(), columns)), shape=(n_atoms, n_atoms))
    affinity = (affinity + affinity.T).tocsr()
    inverse_root_degree = scipy.sparse.diags(1.0 / np.sqrt(np.asarray(affinity.sum(axis=1)).ravel() + 1e-12))
    rng = np.random.default_rng(seed)
    _, embedding = scipy.sparse.linalg.eigsh(
        inverse_root_degree @ affinity @ inverse_root_degree, k=n_subspaces, which="LA",
        tol=SPECTRAL_TOLERANCE, v0=rng.standard_normal(n_atoms),
    )
    embedding /= np.linalg.norm(embedding, axis=1, keepdims=True) + 1e-12
    _, labels = scipy.cluster.vq.kmeans2(embedding, n_subspaces, iter=KMEANS_ITERATIONS, minit="++", seed=rng)
    return torch.from_numpy(labels).long()


def subspace_sample(usage: torch.Tensor, subspaces: torch.Tensor, n_bank: int, subspace_dim: int) -> torch.Tensor:
    """Step 4 per subspace: SMRS within each subspace, with room for each to span itself.

    Within subspace ``l`` (``n_l`` atoms) the atoms are ranked by their row norm ``|C^j|_2``.
    Each subspace keeps its ``min(n_l, d + 1, M // L)`` best atoms whatever happens (``d + 1``
    atoms span a ``d``-dimensional basis with one to spare, ``L`` the non-empty subspaces); the
    rest of the bank goes to the atoms of lowest within-subspace rank quantile ``(rank + 1) / n_l``,
    so a subspace keeps about ``max(its guaranteed atoms, q n_l)`` atoms, ``q`` the same for all.

    Parameters
    ----------
    usage : Tensor of shape (N,)
        ``|C^j|_2`` of every atom.
    subspaces : LongTensor of shape (N,)
        The subspace of every atom.
    n_bank : int
        ``M``, the bank size; all ``N`` atoms are kept when ``M >= N``.
    subspace_dim : int
        ``d``.

    Returns
    -------
    LongTensor of shape (min(M, N),)
        The kept atoms.
    """
    n_atoms = usage.shape[0]
    if n_bank >= n_atoms:
        return torch.arange(n_atoms)
    order = torch.argsort(usage, descending=True, stable=True)
    ordered_subspaces = subspaces[order]
    sizes = torch.bincount(subspaces)
    # rank of each atom within its subspace, in the usage order: position minus the subspace's first position
    by_subspace = torch.argsort(ordered_subspaces, stable=True)
    starts = torch.cumsum(sizes, 0) - sizes
    ranks = torch.empty(n_atoms, dtype=torch.long)
    ranks[by_subspace] = torch.arange(n_atoms) - starts[ordered_subspaces[by_subspace]]
    n_present = int((sizes > 0).sum())
    guaranteed = torch.clamp(sizes, max=min(subspace_dim + 1, n_bank // n_present))
    priority = (ranks + 1).double() / sizes[ordered_subspaces].double()
    priority[ranks < guaranteed[ordered_subspaces]] = -1.0
    return order[torch.argsort(priority, stable=True)[:n_bank]]


def subspace_bases(atoms: torch.Tensor, subspaces: torch.Tensor, n_subspaces: int, subspace_dim: int) -> torch.Tensor:
    """An orthonormal basis of each subspace: the leading right singular vectors of its atoms.

    Parameters
    ----------
    atoms : Tensor of shape (M, D)
    subspaces : LongTensor of shape (M,)
        The subspace of every atom, in ``0 .. n_subspaces - 1``.
    n_subspaces : int
        ``L``.
    subspace_dim : int
        ``d``: columns per basis; a subspace of rank below ``d`` (few atoms) gets zero columns,
        and an empty one an all-zero basis (its residual is the whole feature, never the smallest).

    Returns
    -------
    Tensor of shape (L, D, d)
        ``U_l`` with ``U_l^T U_l`` the identity on its non-zero columns.
    """
    bases = atoms.new_zeros(n_subspaces, atoms.shape[1], subspace_dim)
    for label in range(n_subspaces):
        members = atoms[subspaces == label]
        if members.shape[0] == 0:
            continue
        _, singular_values, right = torch.linalg.svd(members, full_matrices=False)
        rank = min(subspace_dim, int((singular_values > singular_values[0] * 1e-5).sum()))
        bases[label, :, :rank] = right[:rank].T
    return bases


def subspace_residuals(queries: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """Residuals (Q, D) of features (Q, D) projected onto their own subspace (Eq. 5).

    A target is assigned to the subspace with the smallest projection residual,
    ``l*(x) = argmin_l |x - U_l U_l^T x|``, and ``r(x) = x - U_l* U_l*^T x``. The bases are
    orthonormal, so ``|x - U_l U_l^T x|^2 = |x|^2 - |U_l^T x|^2``: the assignment needs only the
    ``L x d`` coefficients of each query. ``bases`` (L, D, d) as from :func:`subspace_bases`.
    """
    residuals = []
    for rows in row_chunks(queries.shape[0], CODING_CHUNK_ROWS):  # one chunk while exporting
        chunk = queries[rows].float()
        coefficients = torch.einsum("qd,ldc->qlc", chunk, bases)  # U_l^T x, (n, L, d)
        best = coefficients.square().sum(dim=2).argmax(dim=1)  # largest |U_l^T x|: smallest residual
        own = coefficients[torch.arange(chunk.shape[0], device=chunk.device), best]  # (n, d)
        residuals.append(chunk - torch.einsum("qc,qdc->qd", own, bases[best]))
    return torch.cat(residuals)


# ---------------------------------------------------------------------------- shared pieces
def _nearest_other_atoms(atoms: torch.Tensor, k: int, low_precision: torch.dtype | None) -> torch.Tensor:
    """Indices (N, k) of each atom's ``k`` nearest atoms, never the atom itself, searched within
    its shard: consecutive blocks of about :data:`NEIGHBOURHOOD_SHARD_ATOMS` atoms (the pool
    arrives in stream order from the streaming coreset), so the cost is linear in ``N`` instead of
    quadratic. A pool of one shard (every fit of up to a few hundred images) is searched whole.
    ``k`` must be below the smallest shard."""
    n_atoms = atoms.shape[0]
    n_shards = max(1, n_atoms // NEIGHBOURHOOD_SHARD_ATOMS)
    bounds = [round(i * n_atoms / n_shards) for i in range(n_shards + 1)]
    return torch.cat([_nearest_other_atoms_in(atoms[start:end], k, low_precision) + start
                      for start, end in zip(bounds[:-1], bounds[1:])])


def _nearest_other_atoms_in(atoms: torch.Tensor, k: int, low_precision: torch.dtype | None) -> torch.Tensor:
    """Indices (N, k) of each atom's ``k`` nearest atoms in ``atoms`` (N, D), never the atom itself."""
    n_atoms = atoms.shape[0]
    _, nearest = build_search(atoms, low_precision=low_precision).kneighbors(atoms, k=k + 1)
    is_self = nearest == torch.arange(n_atoms, device=nearest.device).unsqueeze(1)
    # Usually column 0 is the atom itself; with exact duplicates it may come later or not at all,
    # and then the farthest candidate is dropped instead.
    keep = ~is_self
    keep[~is_self.any(dim=1), -1] = False
    return nearest[keep].view(n_atoms, k)


def _normal_equations(
    targets: torch.Tensor, local_atoms: torch.Tensor, ridge_weight: torch.Tensor | float,
    affine_weight: torch.Tensor | float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k x k`` normal equations of each target's coding problem (the smooth part of Eqs. 1-2).

    Parameters
    ----------
    targets : Tensor of shape (n, D)
    local_atoms : Tensor of shape (n, k, D)
        ``A`` for each target: the atoms it is coded on.
    ridge_weight : float or 0-d Tensor
        ``lambda_2 s^2``, added to the diagonal.
    affine_weight : float or 0-d Tensor
        ``lambda_a s^2``, the weight of the affine term ``1/2 (1 - 1^T c)^2``: added to every
        entry of the Hessian and of ``A x`` (the same as appending the coordinate
        ``sqrt(lambda_a) s`` to the target and to every atom).

    Returns
    -------
    gram : Tensor of shape (n, k, k)
        ``A A^T + lambda_2 s^2 I + lambda_a s^2 1 1^T``, the Hessian of the smooth part.
    correlations : Tensor of shape (n, k)
        ``A x + lambda_a s^2 1``.
    """
    identity = torch.eye(local_atoms.shape[1], dtype=local_atoms.dtype, device=local_atoms.device)
    gram = torch.bmm(local_atoms, local_atoms.transpose(1, 2)) + ridge_weight * identity + affine_weight  # no in-place: exports
    return gram, torch.bmm(local_atoms, targets.unsqueeze(2)).squeeze(2) + affine_weight


def _fista(
    gram: torch.Tensor, correlations: torch.Tensor, prox: Prox, step: torch.Tensor | float, steps: Iterable[int]
) -> torch.Tensor:
    """FISTA (Beck & Teboulle 2009) for ``min_c 1/2 c^T H c - b^T c + g(c)``, batched over columns.

    Parameters
    ----------
    gram : Tensor of shape (n, k, k)
        ``H``, symmetric positive semi-definite.
    correlations : Tensor of shape (n, k)
        ``b``.
    prox : callable (values, step) -> values
        Proximal map of ``step * g``.
    step : float or Tensor of shape (n, 1)
        At most ``1 / L``, with ``L`` the largest eigenvalue of ``H``.
    steps : iterable
        One item per iteration (a range, or a progress bar over one).

    Returns
    -------
    Tensor of shape (n, k)
        The codes ``c``, started from 0.
    """
    codes = torch.zeros_like(correlations)
    extrapolated = codes
    momentum = 1.0
    for _ in steps:
        gradient = torch.bmm(gram, extrapolated.unsqueeze(2)).squeeze(2) - correlations
        next_codes = prox(extrapolated - step * gradient, step)
        next_momentum = (1.0 + math.sqrt(1.0 + 4.0 * momentum**2)) / 2.0
        extrapolated = next_codes + ((momentum - 1.0) / next_momentum) * (next_codes - codes)
        codes, momentum = next_codes, next_momentum
    return codes


def _row_norms(values: torch.Tensor, neighbors: torch.Tensor, n_atoms: int) -> torch.Tensor:
    """``|C^j|_2`` for every atom ``j``, with ``values[i, t]`` the entry ``C[neighbors[i, t], i]``; (N,)."""
    squares = values.new_zeros(n_atoms).index_add_(0, neighbors.reshape(-1), values.reshape(-1).square())
    return squares.sqrt_()

