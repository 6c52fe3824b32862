
import pytest
import torch

from flawmap import search
from flawmap.errors import FlawmapError
from flawmap.search import (
    SEARCH_BACKENDS, SearchIndex, SearchOption, TorchSearch, build_search, register_search, search_from_state, search_state,
    squared_distances,
)


def brute_force(queries: torch.Tensor, bank: torch.Tensor, k: int):
    distances = torch.cdist(queries.double(), bank.double())
    return distances.topk(k, dim=1, largest=False)


def test_squared_distances_match_cdist():
    generator = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(13, 7, generator=generator), torch.randn(29, 7, generator=generator)
    expected = torch.cdist(queries.double(), bank.double()).square()
    torch.testing.assert_close(squared_distances(queries, bank).double(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("bank_block_rows", [7, 64])
def test_kneighbors_matches_brute_force_with_chunk_and_block_remainders(monkeypatch, k, bank_block_rows):
    generator = torch.Generator().manual_seed(1)
    bank = torch.randn(50, 16, generator=generator) + 100.0  # far from the origin: centring matters
    queries = torch.randn(23, 16, generator=generator) + 100.0
    # chunks of 3 queries: 7 full chunks and a remainder of 2; blocks of 7 rows: 7 full and a remainder of 1
    monkeypatch.setattr(search, "QUERY_CHUNK_ROWS", 3)
    monkeypatch.setattr(search, "BANK_BLOCK_ROWS", bank_block_rows)
    distances, indices = build_search(bank).kneighbors(queries, k=k)
    expected_distances, expected_indices = brute_force(queries, bank, k)
    assert distances.shape == (23, k) and indices.shape == (23, k)
    torch.testing.assert_close(distances.double(), expected_distances, atol=1e-3, rtol=1e-4)
    assert torch.equal(indices, expected_indices)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("n_among", [10, 40])  # gathered subset, and all rows with the others excluded
def test_blocked_search_among_a_subset_skips_excluded_rows_in_every_block(monkeypatch, k, n_among):
    generator = torch.Generator().manual_seed(2)
    bank = torch.randn(50, 8, generator=generator)
    queries = bank[torch.randperm(50, generator=generator)[:12]] + 0.01  # each query's nearest row is usually its own
    among = torch.randperm(50, generator=generator)[:n_among]
    monkeypatch.setattr(search, "BANK_BLOCK_ROWS", 6)
    distances, indices = build_search(bank).kneighbors(queries, k=k, among=among)
    expected_distances, expected_positions = brute_force(queries, bank[among], k)
    assert torch.equal(indices, among[expected_positions])
    torch.testing.assert_close(distances.double(), expected_distances, atol=1e-3, rtol=1e-4)


def test_row_chunks_cover_the_remainder_and_are_one_slice_while_exporting(monkeypatch):
    rows = torch.arange(10)
    assert [rows[chunk].tolist() for chunk in search.row_chunks(10, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    monkeypatch.setattr(search, "is_exporting", lambda: True)
    assert search.row_chunks(10, 4) == [slice(None)]


def test_kneighbors_rejects_bad_k():
    index = build_search(torch.zeros(3, 2))
    with pytest.raises(ValueError):
        index.kneighbors(torch.zeros(1, 2), k=4)


def test_empty_bank_is_a_clear_error():
    with pytest.raises(FlawmapError, match="non-empty"):
        build_search(torch.zeros(0, 4))


def test_principal_axes_keep_requested_variance():
    generator = torch.Generator().manual_seed(5)
    scales = torch.tensor([10.0, 5.0, 1.0, 0.1])
    rows = torch.randn(5000, 4, generator=generator) * scales
    rows -= rows.mean(dim=0)
    axes = search.principal_axes(rows, 0.95)
    assert axes.shape == (4, 2)  # 100 + 25 of 126.01 total variance > 95%
    torch.testing.assert_close(axes.T @ axes, torch.eye(2), atol=1e-5, rtol=0)
    assert search.principal_axes(rows, 1.0).shape == (4, 4)


@pytest.mark.parametrize("center_scale, min_recall, max_mean_excess", [(6.0, 0.9, 0.01), (10.0, 0.4, 0.05)])
def test_coarse_pass_recall_and_exact_distances(center_scale, min_recall, max_mean_excess):
    """bfloat16 coarse pass + float32 re-rank on clustered banks. Returned distances are always
    exact for the returned rows; the rows are the true nearest ones unless bfloat16 rounding of
    |q|^2 + |b|^2 swamps the neighbour distances: squared norms ~18x the squared neighbour
    distances (scale 6, like real PatchCore banks on MVTec bottle) keep recall high and the
    distance excess tiny, ~50x (scale 10) does not, which is why ``precision="float32"`` exists."""
    generator = torch.Generator().manual_seed(6)
    centers = torch.randn(20, 64, generator=generator) * center_scale
    bank = centers.repeat_interleave(100, dim=0) + torch.randn(2000, 64, generator=generator)
    queries = centers.repeat(10, 1) + torch.randn(200, 64, generator=generator)
    distances, indices = build_search(bank, low_precision=torch.bfloat16).kneighbors(queries)
    true_distances, true_indices = brute_force(queries, bank, 1)
    returned_rows = bank[indices[:, 0]]
    torch.testing.assert_close(distances[:, 0], (returned_rows - queries).norm(dim=1), atol=1e-3, rtol=1e-4)
    assert torch.all(distances.double() >= true_distances - 1e-3)
    assert (indices == true_indices).float().mean() >= min_recall
    assert float((distances.double() / true_distances - 1).mean()) < max_mean_excess
    exact_distances, exact_indices = build_search(bank).kneighbors(queries)
    assert torch.equal(exact_indices, true_indices)


@pytest.mark.parametrize("low_precision", [None, torch.bfloat16])
@pytest.mark.parametrize("storage_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n_among", [120, 390])  # rows gathered; most rows, the others masked out
def test_search_among_a_subset_returns_rows_of_the_whole_index(low_precision, storage_dtype, n_among):
    generator = torch.Generator().manual_seed(7)
    bank = torch.randn(400, 12, generator=generator)
    queries = torch.randn(9, 12, generator=generator)
    among = torch.randperm(400, generator=generator)[:n_among]
    index = build_search(bank, low_precision=low_precision, storage_dtype=storage_dtype)
    distances, rows = index.kneighbors(queries, k=3, among=among)
    stored = bank.to(storage_dtype).double()
    expected_distances, positions = brute_force(queries, stored[among], 3)
    assert set(rows.flatten().tolist()) <= set(among.tolist())
    assert torch.equal(rows, among[positions])
    torch.testing.assert_close(distances.double(), expected_distances, atol=2e-2 if storage_dtype == torch.float16 else 1e-3, rtol=1e-3)


def test_vectors_returns_the_stored_rows():
    bank = torch.randn(30, 5, generator=torch.Generator().manual_seed(8)) + 50.0
    index = build_search(bank)
    rows = torch.tensor([[3, 7], [0, 29]])
    torch.testing.assert_close(index.vectors(rows), bank[rows], atol=1e-4, rtol=0)
    assert len(index) == 30


def test_state_round_trip_is_exact_and_names_the_backend():
    bank = torch.randn(64, 6, generator=torch.Generator().manual_seed(9))
    index = build_search(bank)
    fitted, tensors = search_state(index, "bank")
    assert fitted == {} and all(name.startswith("bank.torch.") for name in tensors)
    restored = search_from_state({}, {**tensors, "other": torch.zeros(1)}, "bank")
    queries = torch.randn(10, 6)
    for first, second in zip(index.kneighbors(queries, k=2), restored.kneighbors(queries, k=2)):
        assert torch.equal(first, second)
    with pytest.raises(FlawmapError, match="search backend 'faiss9'"):
        search_from_state({}, {"bank.faiss9.vectors": bank}, "bank")


def test_precision_can_be_switched_after_building():
    """A loaded model's precision change must reach its searches: the coarse tensors come and go."""
    bank = torch.randn(500, 16, generator=torch.Generator().manual_seed(10))
    index = build_search(bank, low_precision=torch.bfloat16)
    assert index.coarse_bank is not None and index.coarse_bank.dtype == torch.bfloat16
    index.set_precision(None)
    assert index.coarse_bank is None
    queries = torch.randn(20, 16)
    assert torch.equal(index.kneighbors(queries)[1], brute_force(queries, bank, 1).indices)


def test_search_is_a_module_whose_buffers_move_with_it():
    index = build_search(torch.randn(10, 3))
    assert isinstance(index, TorchSearch)
    assert {name for name, _ in index.named_buffers()} >= {"centered", "center", "sq_norms"}
    assert set(index.state_dict()) == {"centered", "center"}  # derived buffers are not persistent


def _low_rank_bank(n_rows: int, generator: torch.Generator) -> torch.Tensor:
    """Clustered rows (n_rows, 24) whose variance lies mostly in 4 dimensions, as patch features' does."""
    centers = torch.randn(30, 4, generator=generator) * 8.0
    leading = centers[torch.randint(30, (n_rows,), generator=generator)] + torch.randn(n_rows, 4, generator=generator)
    return torch.cat([leading, 0.3 * torch.randn(n_rows, 20, generator=generator)], dim=1) @ torch.linalg.qr(torch.randn(24, 24, generator=generator))[0]


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("excluded", [False, True])
def test_pruned_search_is_exact_and_skips_blocks(monkeypatch, k, excluded):
    """Rows grouped by cluster, blocks skipped by the lower bound: the same rows as brute force,
    in the given row numbering, while most (query, block) pairs are never computed exactly."""
    generator = torch.Generator().manual_seed(3)
    bank = _low_rank_bank(3000, generator)
    queries = bank[torch.randperm(3000, generator=generator)[:200]] + 0.2 * torch.randn(200, 24, generator=generator)
    among = torch.randperm(3000, generator=generator)[:2500] if excluded else None
    monkeypatch.setattr(TorchSearch, "PRUNING_MIN_ROWS", 1000)
    monkeypatch.setattr(TorchSearch, "CLUSTER_ROWS", 25)
    monkeypatch.setattr(search, "BANK_BLOCK_ROWS", 100)
    monkeypatch.setattr(search, "QUERY_CHUNK_ROWS", 64)
    visits = []
    merge = search._Rows._merge_block
    monkeypatch.setattr(search._Rows, "_merge_block", lambda self, q, *args: visits.append(q.shape[0]) or merge(self, q, *args))
    index = build_search(bank)
    assert index.order is not None and not torch.equal(index.order, torch.arange(3000))  # rows were regrouped
    distances, indices = index.kneighbors(queries, k=k, among=among)
    candidates = bank if among is None else bank[among]
    expected_distances, expected_positions = brute_force(queries, candidates, k)
    assert torch.equal(indices, expected_positions if among is None else among[expected_positions])
    torch.testing.assert_close(distances.double(), expected_distances, atol=1e-3, rtol=1e-4)
    assert sum(visits) < 0.3 * 200 * 30  # of 200 queries x 30 blocks


def test_pruned_search_keeps_the_given_row_order_in_its_state_and_vectors(monkeypatch):
    generator = torch.Generator().manual_seed(4)
    bank = _low_rank_bank(2000, generator)
    monkeypatch.setattr(TorchSearch, "PRUNING_MIN_ROWS", 1000)
    index = build_search(bank)
    assert index.order is not None
    rows = torch.tensor([5, 0, 1999, 5])
    torch.testing.assert_close(index.vectors(rows), bank[rows], atol=1e-5, rtol=0)
    rebuilt = search_from_state(*search_state(index, "bank"), "bank")
    torch.testing.assert_close(rebuilt.state()[1]["centered"] + rebuilt.center, bank, atol=1e-5, rtol=0)
    assert torch.equal(rebuilt.order, index.order)


class ToySearch(SearchIndex):
    """A backend written outside flawmap: brute force over rows scaled by its one option, with
    that option in its saved JSON settings (the distances are those of the scaled rows)."""

    options = (SearchOption("scale", float, default=1.0, minimum=0.5),)

    def __init__(self, rows: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.register_buffer("rows", rows.float() * scale)
        self.scale = scale

    @classmethod
    def from_vectors(cls, vectors, options, *, low_precision=None, storage_dtype=torch.float32) -> "ToySearch":
        return cls(vectors, options["scale"])

    @classmethod
    def from_state(cls, settings, tensors) -> "ToySearch":
        return cls(tensors["rows"] / settings["scale"], settings["scale"])

    def state(self):
        return {"scale": self.scale}, {"rows": self.rows}

    def __len__(self) -> int:
        return self.rows.shape[0]

    def kneighbors(self, queries, k=1, among=None):
        candidates = torch.arange(len(self), device=self.rows.device) if among is None else among
        distances, positions = torch.cdist(queries.float() * self.scale, self.rows[candidates]).topk(k, dim=1, largest=False)
        return distances, candidates[positions]

    def vectors(self, rows):
        return self.rows[rows] / self.scale


@pytest.fixture
def toy_backend(monkeypatch):
    """``ToySearch`` registered as "toy" for one test (the registry is restored afterwards)."""
    monkeypatch.setattr(SEARCH_BACKENDS, "_entries", dict(SEARCH_BACKENDS._entries))
    register_search("toy")(ToySearch)
    return ToySearch


def test_a_backend_registered_elsewhere_fits_saves_and_loads_a_memory_bank_model(toy_backend, tiny_dataset, tiny_model, tmp_path):
    """Adding a backend is one registered class: PatchCore fits with it, checks its options,
    saves its JSON settings and tensors, and scores as the torch search does at scale 1."""
    from flawmap.models import AnomalyModel, PatchCore

    with pytest.raises(FlawmapError, match="search option scale of toy must be at least 0.5, got 0.1"):
        PatchCore(search="toy", search_options={"scale": 0.1}).fit(tiny_dataset)
    model = PatchCore(image_size=64, coreset_fraction=0.25, search="toy", search_options={"scale": 2.0})
    model.set_runtime(batch_size=8).fit(tiny_dataset)
    assert isinstance(model.scorer_.search, ToySearch) and "search" in dict(model.scorer_.named_children())
    loaded = AnomalyModel.load(model.save(tmp_path / "model"))
    assert isinstance(loaded.scorer_.search, ToySearch) and loaded.scorer_.search.scale == 2.0
    images = sorted(str(path) for path in (tiny_dataset / "test").rglob("*.png"))[:4]
    scores = [p.score for p in loaded.predict(images)]
    assert scores == pytest.approx([2.0 * p.score for p in tiny_model.predict(images)], rel=1e-4)
    assert scores == pytest.approx([p.score for p in model.predict(images)], rel=1e-6)
