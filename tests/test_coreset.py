import pytest
import torch

from flawmap import coreset
from flawmap.coreset import StreamingCoreset, StreamingRandomSample, greedy_coreset


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
    stream = StreamingCoreset(0.1, projection_dim=32, shard_rows=256, generator=generator)
    reduced_shards = []
    original_greedy = coreset.greedy_coreset

    def spy(features, n_select, **kwargs):
        reduced_shards.append(features.shape)
        return original_greedy(features, n_select, **kwargs)

    coreset.greedy_coreset = spy
    try:
        for start in range(0, 1000, 64):
            stream.add(rows[start : start + 64])
        kept = stream.result()
    finally:
        coreset.greedy_coreset = original_greedy
    assert kept.shape == (100, 200)
    assert all(shape[0] <= 256 + 63 and shape[1] == 32 for shape in reduced_shards)
    # every kept row is an original row, unchanged
    assert bool((kept[:, None, :] == rows[None, :, :]).all(dim=2).any(dim=1).all())


def test_streaming_coreset_radius_close_to_global_greedy():
    generator = torch.Generator().manual_seed(4)
    rows = torch.randn(2000, 8, generator=generator)
    global_kept = rows[greedy_coreset(rows, 200, generator=generator)]
    stream = StreamingCoreset(0.1, shard_rows=500, generator=generator)
    stream.add(rows)
    streamed_kept = stream.result()

    def covering_radius(kept: torch.Tensor) -> float:
        return float(torch.cdist(rows, kept).min(dim=1).values.max())

    # sharding trades a little coverage for speed; it must stay in the same range
    assert covering_radius(streamed_kept) < 1.5 * covering_radius(global_kept)
    random_kept = rows[torch.randperm(2000, generator=generator)[:200]]
    assert covering_radius(streamed_kept) < covering_radius(random_kept)


def test_streaming_coreset_fraction_one_keeps_everything():
    rows = torch.arange(30.0).view(10, 3)
    stream = StreamingCoreset(1.0, shard_rows=4)
    for start in range(0, 10, 3):
        stream.add(rows[start : start + 3])
    assert torch.equal(stream.result(), rows)


def test_resumed_coreset_stream_equals_an_uninterrupted_one():
    """Saving after the first part and resuming gives the same kept rows as one stream, when the
    stop falls on a shard boundary (partial_fit's guarantee: it continues the same stream)."""
    generator_seed = 11
    rows = torch.randn(1200, 40, generator=torch.Generator().manual_seed(0))
    whole = StreamingCoreset(0.1, projection_dim=16, shard_rows=300, generator=torch.Generator().manual_seed(generator_seed))
    for start in range(0, 1200, 300):
        whole.add(rows[start : start + 300])
    first = StreamingCoreset(0.1, projection_dim=16, shard_rows=300, generator=torch.Generator().manual_seed(generator_seed))
    first.add(rows[:300])
    first.add(rows[300:600])
    kept, state = first.result(), first.state()
    resumed = StreamingCoreset.from_state(state, kept.clone(), 0.1, projection_dim=16, shard_rows=300)
    resumed.add(rows[600:900])
    resumed.add(rows[900:])
    assert torch.equal(resumed.result(), whole.result())
    assert int(resumed.state()["rows_seen"]) == 1200


def test_blocks_larger_than_a_shard_are_cut_into_whole_shards():
    """A block of 3.5 shards at once keeps the same rows as the same rows added shard by shard:
    shards have ``shard_rows`` rows whatever the size of the blocks added (a batch of images)."""
    rows = torch.randn(1050, 20, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(1050)
    samplers = [StreamingCoreset(0.1, projection_dim=8, shard_rows=300, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    samplers[0].add(rows, labels)
    for start in range(0, 1050, 150):
        samplers[1].add(rows[start : start + 150], labels[start : start + 150])
    assert torch.equal(samplers[0].result(), samplers[1].result()) and samplers[0].result().shape[0] == 105
    assert torch.equal(samplers[0].labels(), samplers[1].labels())
    first_shard_labels = samplers[0].labels()[:30]
    assert first_shard_labels.max() < 300  # the first shard's 30 kept rows came from its own 300 rows


def test_resumed_random_sample_keeps_the_fraction_of_all_rows():
    rows = torch.arange(3000.0).view(1000, 3)
    sample = StreamingRandomSample(0.05, generator=torch.Generator().manual_seed(1))
    sample.add(rows[:400])
    resumed = StreamingRandomSample.from_state(sample.state(), sample.result(), 0.05)
    resumed.add(rows[400:])
    kept = resumed.result()
    assert kept.shape == (50, 3)
    assert len(set(kept[:, 0].tolist())) == 50  # no row kept twice


def test_state_before_result_is_refused():
    stream = StreamingCoreset(0.5, shard_rows=100)
    stream.add(torch.randn(10, 4))
    with pytest.raises(ValueError, match="result"):
        stream.state()


@pytest.mark.parametrize("fraction, block_rows", [(0.1, 64), (0.3, 7)])
def test_streaming_random_sample_keeps_fraction(fraction, block_rows):
    rows = torch.arange(1000, dtype=torch.float32).unsqueeze(1).repeat(1, 3)
    sampler = StreamingRandomSample(fraction, generator=torch.Generator().manual_seed(6))
    for start in range(0, 1000, block_rows):  # the last block is a remainder
        sampler.add(rows[start : start + block_rows])
    kept = sampler.result()
    assert kept.shape == (round(fraction * 1000), 3)
    assert kept[:, 0].unique().numel() == kept.shape[0]  # distinct input rows
