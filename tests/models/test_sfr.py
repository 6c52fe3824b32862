import math

import pytest
from conftest import assert_same_predictions
import torch

from flawmap.errors import FlawmapError
from flawmap.evaluate import evaluate
from flawmap.models import SFR, AnomalyModel
from flawmap.models import sfr
from flawmap.models.sfr import reconstruction_residuals, self_expressive_usage
from flawmap.neighbors import NearestNeighbors, StreamingRandomSample

AMBIENT_DIM, SUBSPACE_DIM = 32, 3
SUBSPACE_SIZES = (300, 100, 40)  # unequal on purpose: sampling must not drop the small subspace


def points_on(basis: torch.Tensor, n: int, generator: torch.Generator, radius=(0.5, 1.0)) -> torch.Tensor:
    """``n`` points of the subspace spanned by ``basis`` (D, d), with norms uniform in ``radius``."""
    directions = torch.randn(n, basis.shape[1], generator=generator)
    directions /= directions.norm(dim=1, keepdim=True)
    norms = radius[0] + (radius[1] - radius[0]) * torch.rand(n, 1, generator=generator)
    return (directions * norms) @ basis.T


@pytest.fixture(scope="module")
def union_of_subspaces():
    """Orthonormal bases (3 x (32, 3)) and atoms drawn from each subspace, concatenated in order."""
    generator = torch.Generator().manual_seed(0)
    bases = [torch.linalg.qr(torch.randn(AMBIENT_DIM, SUBSPACE_DIM, generator=generator))[0] for _ in SUBSPACE_SIZES]
    atoms = torch.cat([points_on(basis, n, generator) for basis, n in zip(bases, SUBSPACE_SIZES)])
    return bases, atoms


def residual_norms(queries: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    search = NearestNeighbors(atoms, coarse_dtype=None)
    s2 = float(atoms.square().sum(dim=1).mean())
    return reconstruction_residuals(queries, search, 16, 0.1, 0.1, s2).norm(dim=1)


def test_subspace_points_reconstruct_well_and_off_subspace_points_do_not(union_of_subspaces):
    bases, atoms = union_of_subspaces
    generator = torch.Generator().manual_seed(1)
    normal = torch.cat([points_on(basis, 50, generator) for basis in bases])
    # a normal-looking point pushed off its subspace by a random offset of norm about 0.5
    offsets = 0.5 * torch.randn(50, AMBIENT_DIM, generator=generator) / math.sqrt(AMBIENT_DIM)
    off_subspace = points_on(bases[0], 50, generator) + offsets
    normal_residuals, off_residuals = residual_norms(normal, atoms), residual_norms(off_subspace, atoms)
    assert normal_residuals.max() < 0.25 * normal.norm(dim=1).median()
    assert off_residuals.min() > normal_residuals.max()


def test_unseen_normal_point_far_from_every_atom_is_mimicked(union_of_subspaces):
    """The point of SFR: nearest-neighbour distance calls it anomalous, the residual does not."""
    bases, atoms = union_of_subspaces
    generator = torch.Generator().manual_seed(2)
    # on the subspaces, but twice as far out as any stored atom
    far_normal = torch.cat([points_on(basis, 30, generator, radius=(2.0, 2.5)) for basis in bases])
    offsets = 0.5 * torch.randn(30, AMBIENT_DIM, generator=generator) / math.sqrt(AMBIENT_DIM)
    off_subspace = points_on(bases[1], 30, generator) + offsets
    search = NearestNeighbors(atoms, coarse_dtype=None)
    far_distances = search.kneighbors(far_normal)[0][:, 0]
    off_distances = search.kneighbors(off_subspace)[0][:, 0]
    assert far_distances.min() > off_distances.max()  # nearest neighbour ranks them the wrong way round
    assert residual_norms(far_normal, atoms).max() < residual_norms(off_subspace, atoms).min()


def test_sparse_sampling_keeps_atoms_of_every_subspace(union_of_subspaces):
    _, atoms = union_of_subspaces
    usage = self_expressive_usage(atoms, 16, 0.1, 0.1, coarse_dtype=None)
    kept = usage.topk(round(0.1 * atoms.shape[0])).indices
    subspace_of_atom = torch.repeat_interleave(torch.arange(len(SUBSPACE_SIZES)), torch.tensor(SUBSPACE_SIZES))
    kept_per_subspace = torch.bincount(subspace_of_atom[kept], minlength=len(SUBSPACE_SIZES))
    assert (kept_per_subspace >= 5).all(), kept_per_subspace.tolist()
    assert (usage == 0).any()  # the row-sparse penalty makes some atoms unused


def test_pool_codes_never_use_the_atom_itself():
    """diag(C) = 0 even when an atom has an exact duplicate that ties with it."""
    generator = torch.Generator().manual_seed(3)
    atoms = torch.randn(40, 8, generator=generator)
    atoms = torch.cat([atoms, atoms[:5]])  # rows 40..44 duplicate rows 0..4
    neighbors = sfr._nearest_other_atoms(atoms, 4, coarse_dtype=None)
    assert neighbors.shape == (45, 4)
    assert not (neighbors == torch.arange(45).unsqueeze(1)).any()
    assert (neighbors[:5, 0] == torch.arange(40, 45)).all()  # the duplicate is the best other atom


def test_ridge_only_codes_match_the_closed_form():
    generator = torch.Generator().manual_seed(4)
    atoms = torch.randn(60, 12, generator=generator)
    queries = torch.randn(7, 12, generator=generator)
    s2 = float(atoms.square().sum(dim=1).mean())
    search = NearestNeighbors(atoms, coarse_dtype=None)
    residuals = reconstruction_residuals(queries, search, 5, 0.0, 0.5, s2, iterations=500)
    _, neighbors = search.kneighbors(queries, k=5)
    local = atoms[neighbors]  # (Q, k, D)
    gram = local @ local.transpose(1, 2) + 0.5 * s2 * torch.eye(5)
    codes = torch.linalg.solve(gram, local @ queries.unsqueeze(2)).squeeze(2)
    expected = queries - torch.einsum("qk,qkd->qd", codes, local)
    torch.testing.assert_close(residuals, expected, atol=1e-4, rtol=1e-4)


def test_elastic_net_codes_satisfy_optimality_conditions():
    """KKT of Eq. (2): gradient + l1 * sign(c) = 0 where c != 0, |gradient| <= l1 where c = 0."""
    generator = torch.Generator().manual_seed(5)
    local = torch.randn(20, 6, 10, generator=generator)
    targets = torch.randn(20, 10, generator=generator)
    gram = local @ local.transpose(1, 2) + 0.1 * torch.eye(6)
    correlations = (local @ targets.unsqueeze(2)).squeeze(2)
    l1 = 0.5

    def soft_threshold(values, step):
        return values.sign() * (values.abs() - step * l1).clamp_min(0.0)

    step = 1.0 / gram.diagonal(dim1=1, dim2=2).sum(dim=1, keepdim=True)
    codes = sfr._fista(gram, correlations, soft_threshold, step, range(3000))
    gradient = torch.bmm(gram, codes.unsqueeze(2)).squeeze(2) - correlations
    active = codes != 0
    assert active.any() and (~active).any()
    torch.testing.assert_close(gradient[active], -l1 * codes[active].sign(), atol=1e-3, rtol=0)
    assert (gradient[~active].abs() <= l1 + 1e-3).all()


@pytest.mark.parametrize("fraction, block_rows", [(0.1, 64), (0.3, 7)])
def test_streaming_random_sample_keeps_fraction(fraction, block_rows):
    rows = torch.arange(1000, dtype=torch.float32).unsqueeze(1).repeat(1, 3)
    sampler = StreamingRandomSample(fraction, generator=torch.Generator().manual_seed(6))
    for start in range(0, 1000, block_rows):  # the last block is a remainder
        sampler.add(rows[start : start + block_rows])
    kept = sampler.result()
    assert kept.shape == (round(fraction * 1000), 3)
    assert kept[:, 0].unique().numel() == kept.shape[0]  # distinct input rows


# ---------------------------------------------------------------------------- fitted models
@pytest.fixture(scope="module")
def tiny_sfr(tiny_dataset) -> SFR:
    return SFR(image_size=64, bank_fraction=0.25, batch_size=8).fit(tiny_dataset)


@pytest.mark.parametrize("sampling", ["coreset", "random"])
def test_every_sampling_keeps_the_requested_bank_size(sampling, tiny_sfr, tiny_dataset):
    # 11 fit images (1 held out), 8 x 8 patches each at 64 px
    n_patches = tiny_sfr.n_train_images_ * 8 * 8
    assert tiny_sfr.bank_.shape == (round(0.25 * n_patches), 40 + 112)
    baseline = SFR(image_size=64, bank_fraction=0.25, batch_size=8, sampling=sampling).fit(tiny_dataset)
    assert baseline.bank_.shape == tiny_sfr.bank_.shape


def test_patch_scores_are_residual_norms(tiny_sfr):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        features = tiny_sfr._embed(images)
        scored = tiny_sfr._score(features)
        residuals = tiny_sfr.reconstruction_residuals(features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]))
    assert scored.patch_scores.shape == (2, 8, 8)
    assert scored.image_scores is None  # the image score is the maximum of the smoothed map
    torch.testing.assert_close(scored.patch_scores.reshape(-1), residuals.norm(dim=1))


def test_detects_synthetic_defects(tiny_sfr, tiny_dataset):
    result = evaluate(tiny_sfr, tiny_dataset)
    assert result["image_auroc"] > 0.8
    assert result["pixel_auroc"] > 0.8  # chance is 0.5; 64 px and 11 training images


def test_save_load_round_trip(tiny_sfr, tiny_dataset, tmp_path):
    loaded = AnomalyModel.load(tiny_sfr.save(tmp_path / "sfr"))
    assert isinstance(loaded, SFR) and loaded.get_params() == tiny_sfr.get_params()
    assert torch.equal(loaded.bank_, tiny_sfr.bank_)
    samples = sorted(tiny_dataset.glob("test/*/*.png"))[:3]
    assert_same_predictions(tiny_sfr, loaded, samples)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"bank_fraction": 0.0}, "bank_fraction"),
        ({"dictionary_size": 0}, "dictionary_size"),
        ({"sparsity": 0.0, "ridge": 0.0}, "sparsity and ridge"),
        ({"sparsity": -1.0}, "sparsity and ridge"),
        ({"sampling": "greedy"}, "sampling"),
        ({"pool_factor": 0.5}, "pool_factor"),
        ({"neighborhood_size": 2}, "neighborhood_size"),
    ],
)
def test_invalid_hyper_parameters(params, message, tiny_dataset):
    with pytest.raises(FlawmapError, match=message):
        SFR(**params).fit(tiny_dataset)
