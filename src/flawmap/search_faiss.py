"""faiss search backends behind the search protocol of :mod:`flawmap.search`.

- ``"faiss-flat"``: faiss's brute force over every stored vector (exact, like ``"torch"``, on
  faiss's own CPU kernels).
- ``"faiss-ivfpq"``: an inverted file of ``nlist`` lists whose rows are product-quantised to
  ``pq_m`` bytes (faiss ``IndexIVFPQ``); a query visits its ``nprobe`` nearest lists, ranks their
  rows by the quantised distances, and the best ``k * RERANK_FACTOR`` candidates are re-ranked
  by their exact distances to the stored vectors (faiss ``IndexRefine``). Approximate: a true
  neighbour is missed when its list is not visited or its quantised distance ranks it outside
  the candidates.

Both store the vectors centred on their mean (as :class:`flawmap.search.TorchSearch` does),
float32 or float16 (``storage_dtype``); faiss-ivfpq keeps them as its re-rank store, so it
needs the memory of the vectors plus ``pq_m`` bytes and an 8-byte id per row, and pays off in
speed, not memory (``benchmarks/bench_search.py`` also shows a 10-million-row bank re-ranked
from a file on disk). Every returned distance is recomputed exactly from the stored vectors.

``among`` (search only these rows): a subset no larger than the rows one query visits anyway
(every row for faiss-flat, about ``N nprobe / nlist`` for faiss-ivfpq) is searched exactly among
its stored vectors; a larger one is a faiss ID selector. Queries for which faiss finds fewer
than ``k`` rows (lists too short) are searched exactly too. ``set_precision`` does nothing: faiss computes in
float32.

Both are ``nn.Module`` s whose ``center`` is a buffer; the faiss index itself always stays on the
CPU (faiss-cpu): after ``.to("cuda")`` queries are centred on the GPU, copied to the CPU for
faiss and the answers copied back (no faiss GPU index is used). A faiss index cannot be traced:
:meth:`FaissSearch.for_export` is an exact torch search over the same stored vectors, which
:func:`flawmap.search.export_searches` puts in its place before an ONNX export.

Options (declared in :attr:`FaissIvfPqSearch.options`, checked by :func:`flawmap.search.check_search`):
faiss-ivfpq takes ``nlist``, ``nprobe`` and ``pq_m`` (None: chosen from the bank, see
:func:`ivfpq_settings`); faiss-flat takes none. Saved state: no settings (the index holds
them) and the tensors ``index``, the index serialised by ``faiss.serialize_index`` as a uint8
tensor, and ``center`` (D,); restored with ``faiss.deserialize_index`` (no pickle). faiss is
the optional extra ``flawmap[faiss]``, imported only when a faiss index is built or restored.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from flawmap.errors import FlawmapError
from flawmap.search import SearchIndex, SearchOption, TorchSearch, all_vectors, register_search, row_chunks

#: Inverted lists per square root of the bank's rows (``nlist`` default, see :func:`ivfpq_settings`).
LISTS_PER_SQRT_ROW = 4
#: Fewest training rows per k-means centroid (inverted lists, product-quantiser codes) that the
#: default settings allow; faiss warns below 39.
MIN_ROWS_PER_CENTROID = 39
#: Share of the inverted lists a query visits by default (``nprobe``).
PROBED_SHARE = 1 / 16
#: Fewest lists a query visits by default.
MIN_PROBES = 8
#: Vector dimensions per product-quantiser byte aimed at by the default ``pq_m``.
DIMS_PER_PQ_BYTE = 4
#: Candidates re-ranked exactly per requested neighbour.
RERANK_FACTOR = 16
#: Upper bound on the elements of one ``queries x k x D`` block of re-ranked rows (64 MiB of float32).
DISTANCE_BLOCK_ELEMENTS = 16 * 1024 * 1024
#: Rows the IVF and product quantisers are trained on: a seeded sample of at most this many or
#: ``TRAINING_ROWS_PER_LIST`` per inverted list, whichever is more (faiss's k-means would sample
#: 256 rows per centroid itself, after computing the residuals of all rows).
MAX_TRAINING_ROWS = 65536
TRAINING_ROWS_PER_LIST = 256
#: Faiss index-factory description of the exact store, per storage dtype.
STORES = {torch.float32: "Flat", torch.float16: "SQfp16"}


def import_faiss(backend: str) -> Any:
    """The faiss module, or a FlawmapError naming the extra to install."""
    try:
        import faiss
    except ImportError as error:
        raise FlawmapError(f'the {backend} search needs faiss ({error}): pip install "flawmap[faiss]"') from None
    return faiss


def ivfpq_settings(
    n_rows: int, dim: int, *, nlist: int | None = None, nprobe: int | None = None, pq_m: int | None = None
) -> dict[str, int]:
    """The IVF-PQ settings for ``n_rows`` vectors of ``dim`` dimensions; None chooses:

    - ``nlist = 4 sqrt(N)``, at most ``N / 39`` (enough rows to train each list's centroid);
    - ``nprobe = nlist / 16``, at least 8 (at most ``nlist``);
    - ``pq_m``: the largest divisor of ``dim`` at most ``dim / 4`` (faiss needs ``dim % pq_m == 0``),
      e.g. 38 bytes per row for 152 dimensions;
    - ``nbits`` (bits per code, not a hyper-parameter): 8, fewer for banks under 39 * 256 rows
      (so that, like the lists, each quantiser's 2^nbits centroids have 39 training rows).

    Given values are checked: a FlawmapError names the one out of range.
    """
    if nlist is None:
        nlist = max(1, min(round(LISTS_PER_SQRT_ROW * math.sqrt(n_rows)), n_rows // MIN_ROWS_PER_CENTROID))
    if not 1 <= nlist <= n_rows:
        raise FlawmapError(f"nlist must be in [1, {n_rows}] (the bank's rows), got {nlist}")
    if nprobe is None:
        nprobe = min(nlist, max(MIN_PROBES, round(nlist * PROBED_SHARE)))
    if not 1 <= nprobe <= nlist:
        raise FlawmapError(f"nprobe must be in [1, nlist={nlist}], got {nprobe}")
    if pq_m is None:
        pq_m = max(m for m in range(1, max(1, dim // DIMS_PER_PQ_BYTE) + 1) if dim % m == 0)
    if pq_m < 1 or dim % pq_m:
        raise FlawmapError(f"pq_m must divide the feature dimension {dim}, got {pq_m}")
    nbits = min(8, max(1, int(math.log2(max(1, n_rows // MIN_ROWS_PER_CENTROID)))))
    return {"nlist": nlist, "nprobe": nprobe, "pq_m": pq_m, "nbits": nbits}


class FaissSearch(SearchIndex):
    """A faiss index over centred vectors, behind the :class:`flawmap.search.SearchIndex` protocol.

    ``index`` is a faiss ``IndexFlatL2`` / ``IndexScalarQuantizer`` (faiss-flat) or an
    ``IndexRefine`` of an ``IndexIVFPQ`` over such a store (faiss-ivfpq), on the CPU; buffer
    ``center`` (D,) float32, on the module's device.
    """

    def __init__(self, index: Any, center: torch.Tensor) -> None:
        super().__init__()
        self.faiss = import_faiss(self.backend)
        if index.ntotal == 0 or index.d != center.shape[0]:
            raise FlawmapError(f"a {self.backend} index of {index.ntotal} rows of {index.d} dims does not fit a {tuple(center.shape)} centre")
        self.index = index
        self.register_buffer("center", center.float().contiguous())

    @classmethod
    def check_available(cls) -> None:
        import_faiss(cls.backend)

    @classmethod
    def from_vectors(
        cls,
        vectors: torch.Tensor,
        options: dict[str, Any],
        *,
        low_precision: torch.dtype | None = None,
        storage_dtype: torch.dtype = torch.float32,
    ) -> "FaissSearch":
        """An index over ``vectors`` (N, D); ``low_precision`` is ignored (faiss computes in float32)."""
        if vectors.ndim != 2 or vectors.shape[0] == 0:
            raise FlawmapError(f"a search needs a non-empty N x D matrix, got shape {tuple(vectors.shape)}")
        if storage_dtype not in STORES:
            raise FlawmapError(f"a {cls.backend} search stores float32 or float16 vectors, not {storage_dtype}")
        faiss = import_faiss(cls.backend)
        center = vectors.float().mean(dim=0)
        centered = (vectors.float() - center).cpu().numpy()
        index = cls._new_index(faiss, *centered.shape, STORES[storage_dtype], options)
        index.train(_training_sample(centered, cls._training_rows(faiss, index)))
        index.add(centered)
        return cls(index, center)

    @classmethod
    def from_state(cls, settings: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "FaissSearch":
        faiss = import_faiss(cls.backend)
        try:
            serialized, center = tensors["index"], tensors["center"]
        except KeyError as error:
            raise FlawmapError(f"saved {cls.backend} search lacks tensor {error}") from None
        if serialized.dtype != torch.uint8 or serialized.ndim != 1:
            raise FlawmapError(f"saved {cls.backend} index must be a 1-d uint8 tensor, got {serialized.dtype} {tuple(serialized.shape)}")
        try:
            index = faiss.deserialize_index(serialized.numpy())
        except RuntimeError as error:
            raise FlawmapError(f"saved {cls.backend} index is not a faiss index ({str(error).splitlines()[0]})") from None
        return cls(index, center)

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {}, {"index": torch.from_numpy(self.faiss.serialize_index(self.index)), "center": self.center.cpu()}

    def __len__(self) -> int:
        return self.index.ntotal

    def vectors(self, rows: torch.Tensor) -> torch.Tensor:
        return self._stored(rows.cpu()).to(self.center.device) + self.center

    def for_export(self) -> TorchSearch:
        """An exact torch search over the stored vectors (faiss-ivfpq keeps them for its re-rank)."""
        return TorchSearch.from_vectors(all_vectors(self)).to(self.center.device)

    def kneighbors(
        self, queries: torch.Tensor, k: int = 1, among: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` nearest stored vectors of each query (see :meth:`flawmap.search.TorchSearch.kneighbors`):
        distances (Q, k), ascending, and row indices (Q, k), on the queries' device."""
        n_rows = len(self) if among is None else among.shape[0]
        if not 1 <= k <= n_rows:
            raise ValueError(f"k must be in [1, {n_rows}], got {k}")
        centered = (queries.detach().float() - self.center).cpu().contiguous()
        among = None if among is None else among.cpu()
        if among is not None and n_rows <= self._rows_scanned():
            distances, rows = self._search_exactly(centered, k, among)
        else:
            distances, rows = self._search_index(centered, k, among)
        return distances.to(queries.device), rows.to(queries.device)

    def _search_index(
        self, centered: torch.Tensor, k: int, among: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """faiss's ``k`` rows for each centred query (Q, D), with exact distances, re-sorted;
        queries for which it found fewer than ``k`` rows are searched exactly."""
        parameters = self._search_parameters(among)
        chunk_rows = max(1, DISTANCE_BLOCK_ELEMENTS // (k * centered.shape[1]))
        distance_chunks, found_chunks = [], []
        for chunk in row_chunks(centered.shape[0], chunk_rows):
            _, found = self.index.search(centered[chunk].numpy(), k, params=parameters)
            found = torch.from_numpy(found)  # (q, k), -1 where faiss found too few rows
            found_chunks.append(found)
            differences = self._stored(found.clamp_min(0)) - centered[chunk].unsqueeze(1)  # (q, k, D)
            distance_chunks.append(torch.linalg.vector_norm(differences, dim=2))
        distances, order = torch.cat(distance_chunks).sort(dim=1)
        rows = torch.cat(found_chunks).gather(1, order)
        missed = torch.nonzero((rows < 0).any(dim=1)).squeeze(1)
        if missed.numel():
            distances[missed], rows[missed] = self._search_exactly(centered[missed], k, among)
        return distances, rows

    def _search_exactly(
        self, centered: torch.Tensor, k: int, among: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact search of centred queries (Q, D) among the stored vectors of ``among`` (all rows when None)."""
        candidates = torch.arange(len(self)) if among is None else among
        distances, positions = TorchSearch(self._stored(candidates), torch.zeros(centered.shape[1])).kneighbors(centered, k)
        return distances, candidates[positions]

    def _stored(self, rows: torch.Tensor) -> torch.Tensor:
        """The stored centred vectors of CPU ``rows`` (any shape), float32, shape ``rows.shape + (D,)``."""
        flat = rows.reshape(-1).numpy().astype(np.int64)
        return torch.from_numpy(self._store().reconstruct_batch(flat)).view(*rows.shape, -1)

    def _store(self) -> Any:
        """The faiss index that holds the (centred) vectors."""
        return self.index

    def _rows_scanned(self) -> int:
        """Rows one query's search visits: ``among`` subsets up to this size are searched exactly."""
        return len(self)

    def _search_parameters(self, among: torch.Tensor | None) -> Any:
        """faiss search parameters for a search restricted to ``among`` (None: every row); None
        uses the index's own. (faiss-flat never gets an ``among``: it is searched exactly.)"""
        return None

    @classmethod
    def _training_rows(cls, faiss: Any, index: Any) -> int:
        """Rows a new index of this backend is trained on, at most."""
        return MAX_TRAINING_ROWS

    @classmethod
    def _new_index(cls, faiss: Any, n_rows: int, dim: int, store: str, options: dict[str, Any]) -> Any:
        """A new, untrained faiss index of this backend with its checked ``options`` for
        ``n_rows`` vectors of ``dim`` dimensions, holding them in ``store`` (an index-factory description)."""
        raise NotImplementedError


@register_search("faiss-flat")
class FaissFlatSearch(FaissSearch):
    """Exact search with faiss's brute force (see the module docstring); no options."""

    @classmethod
    def _new_index(cls, faiss: Any, n_rows: int, dim: int, store: str, options: dict[str, Any]) -> Any:
        return faiss.index_factory(dim, store)


@register_search("faiss-ivfpq")
class FaissIvfPqSearch(FaissSearch):
    """IVF-PQ candidates re-ranked exactly (see the module docstring and :func:`ivfpq_settings`)."""

    options = (
        SearchOption("nlist", int, minimum=1, help="inverted lists; default 4 sqrt(N), at most N / 39"),
        SearchOption("nprobe", int, minimum=1, help="lists a query visits, at most nlist; default nlist / 16, at least 8"),
        SearchOption("pq_m", int, minimum=1, help="bytes per quantised row, dividing the feature dimension; default about D / 4"),
    )

    @classmethod
    def _new_index(cls, faiss: Any, n_rows: int, dim: int, store: str, options: dict[str, Any]) -> Any:
        return new_ivfpq_index(n_rows, dim, store, **options)

    @classmethod
    def _training_rows(cls, faiss: Any, index: Any) -> int:
        return max(MAX_TRAINING_ROWS, TRAINING_ROWS_PER_LIST * faiss.extract_index_ivf(index).nlist)

    def _store(self) -> Any:
        return self.faiss.downcast_index(self.index.refine_index)

    def _rows_scanned(self) -> int:
        settings = self.settings
        return math.ceil(len(self) * settings["nprobe"] / settings["nlist"])

    def _search_parameters(self, among: torch.Tensor | None) -> Any:
        """The probes, the re-rank factor (faiss does not take them from the index when
        parameters are given) and a faiss ID selector of the rows ``among``."""
        selector = None if among is None else self.faiss.IDSelectorBatch(among.numpy().astype(np.int64))
        probes = self.faiss.SearchParametersIVF(nprobe=self.faiss.extract_index_ivf(self.index).nprobe, sel=selector)
        return self.faiss.IndexRefineSearchParameters(k_factor=self.index.k_factor, base_index_params=probes)

    @property
    def settings(self) -> dict[str, int]:
        """``nlist``, ``nprobe``, ``pq_m`` and ``nbits`` of the index."""
        ivf = self.faiss.extract_index_ivf(self.index)
        quantizer = self.faiss.downcast_index(ivf).pq
        return {"nlist": ivf.nlist, "nprobe": ivf.nprobe, "pq_m": quantizer.M, "nbits": quantizer.nbits}


def new_ivfpq_index(n_rows: int, dim: int, store: str, **settings: int | None) -> Any:
    """A new, untrained faiss ``IndexRefine`` of an IVF-PQ index over the re-rank ``store`` (an
    index-factory description: ``"Flat"``, ``"SQfp16"``) for ``n_rows`` vectors of ``dim``
    dimensions, with the :func:`ivfpq_settings` (``settings``: ``nlist``, ``nprobe``, ``pq_m``;
    None chooses), its probes and re-rank factor set, and without polysemous code training (the
    index factory's default: minutes of simulated annealing for Hamming filters never used here).
    """
    faiss = import_faiss("faiss-ivfpq")
    chosen = ivfpq_settings(n_rows, dim, **settings)
    index = faiss.index_factory(dim, f"IVF{chosen['nlist']},PQ{chosen['pq_m']}x{chosen['nbits']},Refine({store})")
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.do_polysemous_training = False
    ivf.nprobe = chosen["nprobe"]
    index.k_factor = RERANK_FACTOR
    return index


def _training_sample(rows: np.ndarray, n_sample: int) -> np.ndarray:
    """At most ``n_sample`` of ``rows`` (N, D), a seeded random sample in row order."""
    if rows.shape[0] <= n_sample:
        return rows
    chosen = np.random.default_rng(0).choice(rows.shape[0], n_sample, replace=False)
    return rows[np.sort(chosen)]
