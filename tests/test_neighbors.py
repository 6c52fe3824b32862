import math

import pytest
import torch

from flawmap import neighbors
from flawmap.neighbors import NearestNeighbors, StreamingCoreset, greedy_coreset, squared_distances


def brute_force(queries: torch.Tensor, bank: torch.Tensor, k: int):
    distances = torch.cdist(queries.double(), bank.double())
    return distances.topk(k, dim=1, largest=False)


def test_squared_distances_match_cdist():
    generator = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(13, 7, generator=generator), torch.randn(29, 7, generator=generator)
    expected = torch.cdist(queries.double(), bank.double()).square()
    torch.testing.assert_close(squared_distances(queries, bank).double(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("k", [1, 4])
def test_kneighbors_matches_brute_force_with_chunk_remainder(monkeypatch, k):
    generator = torch.Generator().manual_seed(1)
    bank = torch.randn(50, 16, generator=generator) + 100.0  # far from the origin: centring matters
    queries = torch.randn(23, 16, generator=generator) + 100.0
    # 50 bank rows and a 150-element block -> chunks of 3 queries: 7 full chunks and a remainder of 2
    monkeypatch.setattr(neighbors, "DISTANCE_BLOCK_ELEMENTS", 150)
    distances, indices = NearestNeighbors(bank).kneighbors(queries, k=k)
    expected_distances, expected_indices = brute_force(queries, bank, k)
    assert distances.shape == (23, k) and indices.shape == (23, k)
    torch.testing.assert_close(distances.double(), expected_distances, atol=1e-3, rtol=1e-4)
    assert torch.equal(indices, expected_indices)


def test_kneighbors_rejects_bad_k():
    search = NearestNeighbors(torch.zeros(3, 2))
    with pytest.raises(ValueError):
        search.kneighbors(torch.zeros(1, 2), k=4)


def test_greedy_coreset_is_farthest_point_sequence():
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [5.0, 0.0], [10.0, 1.0]])
    generator = torch.Generator().manual_seed(0)
    chosen = greedy_coreset(points, 3, generator=generator).tolist()
    # Re-derive the farthest-point order from the definition, starting at the same first point.
    expected = [chosen[0]]
    while len(expected) < 3:
        gaps = torch.cdist(points, points[expected]).min(dim=1).values
        expected.append(int(gaps.argmax()))
    assert chosen == expected


def test_greedy_coreset_covers_every_cluster():
    generator = torch.Generator().manual_seed(2)
    centers = torch.randn(6, 8, generator=generator) * 50
    points = (centers.repeat_interleave(200, dim=0) + torch.randn(1200, 8, generator=generator))
    chosen = greedy_coreset(points, 6, generator=generator)
    assert sorted((chosen // 200).tolist()) == list(range(6))


def test_streaming_coreset_keeps_fraction_and_bounds_shards():
    generator = torch.Generator().manual_seed(3)
    rows = torch.randn(1000, 200, generator=generator)
    coreset = StreamingCoreset(0.1, projection_dim=32, shard_rows=256, generator=generator)
    reduced_shards = []
    original_greedy = neighbors.greedy_coreset

    def spy(features, n_select, **kwargs):
        reduced_shards.append(features.shape)
        return original_greedy(features, n_select, **kwargs)

    neighbors.greedy_coreset = spy
    try:
        for start in range(0, 1000, 64):
            coreset.add(rows[start : start + 64])
        kept = coreset.result()
    finally:
        neighbors.greedy_coreset = original_greedy
    assert kept.shape == (100, 200)
    assert all(shape[0] <= 256 + 63 and shape[1] == 32 for shape in reduced_shards)
    # every kept row is an original row, unchanged
    assert bool((kept[:, None, :] == rows[None, :, :]).all(dim=2).any(dim=1).all())


def test_streaming_coreset_radius_close_to_global_greedy():
    generator = torch.Generator().manual_seed(4)
    rows = torch.randn(2000, 8, generator=generator)
    global_kept = rows[greedy_coreset(rows, 200, generator=generator)]
    coreset = StreamingCoreset(0.1, shard_rows=500, generator=generator)
    coreset.add(rows)
    streamed_kept = coreset.result()

    def covering_radius(kept: torch.Tensor) -> float:
        return float(torch.cdist(rows, kept).min(dim=1).values.max())

    # sharding trades a little coverage for speed; it must stay in the same range
    assert covering_radius(streamed_kept) < 1.5 * covering_radius(global_kept)
    random_kept = rows[torch.randperm(2000, generator=generator)[:200]]
    assert covering_radius(streamed_kept) < covering_radius(random_kept)


def test_streaming_coreset_fraction_one_keeps_everything():
    rows = torch.arange(30.0).view(10, 3)
    coreset = StreamingCoreset(1.0, shard_rows=4)
    for start in range(0, 10, 3):
        coreset.add(rows[start : start + 3])
    assert torch.equal(coreset.result(), rows)


def test_principal_axes_keep_requested_variance():
    generator = torch.Generator().manual_seed(5)
    scales = torch.tensor([10.0, 5.0, 1.0, 0.1])
    rows = torch.randn(5000, 4, generator=generator) * scales
    rows -= rows.mean(dim=0)
    axes = neighbors.principal_axes(rows, 0.95)
    assert axes.shape == (4, 2)  # 100 + 25 of 126.01 total variance > 95%
    torch.testing.assert_close(axes.T @ axes, torch.eye(2), atol=1e-5, rtol=0)
    assert neighbors.principal_axes(rows, 1.0).shape == (4, 4)


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
    distances, indices = NearestNeighbors(bank, coarse_dtype=torch.bfloat16).kneighbors(queries)
    true_distances, true_indices = brute_force(queries, bank, 1)
    returned_rows = bank[indices[:, 0]]
    torch.testing.assert_close(distances[:, 0], (returned_rows - queries).norm(dim=1), atol=1e-3, rtol=1e-4)
    assert torch.all(distances.double() >= true_distances - 1e-3)
    assert (indices == true_indices).float().mean() >= min_recall
    assert float((distances.double() / true_distances - 1).mean()) < max_mean_excess
    exact_distances, exact_indices = NearestNeighbors(bank, coarse_dtype=None).kneighbors(queries)
    assert torch.equal(exact_indices, true_indices)
