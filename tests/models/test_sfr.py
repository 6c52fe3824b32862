import json
import math

import pytest
from conftest import assert_same_predictions
import torch

from flawmap.errors import FlawmapError
from flawmap.evaluate import evaluate
from flawmap.models import SFR, AnomalyModel
from flawmap.models import sfr
from flawmap.models.sfr import (
    reconstruction_residuals, self_expressive_codes, self_expressive_usage, subspace_bases, subspace_clustering,
    subspace_residuals, subspace_sample,
)
from flawmap.search import all_vectors, build_search

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
    search = build_search(atoms)
    s2 = float(atoms.square().sum(dim=1).mean())
    return reconstruction_residuals(queries, search, 16, 0.1, 0.1, s2, affine=0.0).norm(dim=1)  # linear subspaces


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
    search = build_search(atoms)
    far_distances = search.kneighbors(far_normal)[0][:, 0]
    off_distances = search.kneighbors(off_subspace)[0][:, 0]
    assert far_distances.min() > off_distances.max()  # nearest neighbour ranks them the wrong way round
    assert residual_norms(far_normal, atoms).max() < residual_norms(off_subspace, atoms).min()


def test_affine_codes_do_not_explain_rescaled_normal_features():
    """Eq. (2) with the affine term models an affine subspace: a normal feature scaled by 1.5 lies
    on the linear span of the atoms but off their affine hull, so only the affine codes flag it."""
    generator = torch.Generator().manual_seed(3)
    basis = torch.linalg.qr(torch.randn(AMBIENT_DIM, SUBSPACE_DIM + 1, generator=generator))[0]
    offset, span = basis[:, 0], basis[:, 1:]  # an affine subspace at distance 1 from the origin
    atoms, normal = offset + points_on(span, 300, generator, (0.0, 0.5)), offset + points_on(span, 50, generator, (0.0, 0.5))
    rescaled = 1.5 * (offset + points_on(span, 50, generator, (0.0, 0.5)))
    search, s2 = build_search(atoms), float(atoms.square().sum(dim=1).mean())

    def separated(affine: float) -> bool:
        normal_residuals = reconstruction_residuals(normal, search, 16, 0.1, 0.1, s2, affine=affine).norm(dim=1)
        rescaled_residuals = reconstruction_residuals(rescaled, search, 16, 0.1, 0.1, s2, affine=affine).norm(dim=1)
        return bool(rescaled_residuals.min() > 1.5 * normal_residuals.max())

    assert separated(affine=1.0)
    assert not separated(affine=0.0)


def test_sparse_sampling_keeps_atoms_of_every_subspace(union_of_subspaces):
    _, atoms = union_of_subspaces
    usage = self_expressive_usage(atoms, 16, 0.1, 0.1, affine=0.0)
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
    neighbors = sfr._nearest_other_atoms(atoms, 4, low_precision=None)
    assert neighbors.shape == (45, 4)
    assert not (neighbors == torch.arange(45).unsqueeze(1)).any()
    assert (neighbors[:5, 0] == torch.arange(40, 45)).all()  # the duplicate is the best other atom


def test_pool_neighbours_are_searched_within_shards_of_the_pool(monkeypatch):
    """Past one shard, each atom's neighbours are its shard's nearest other atoms (linear cost)."""
    monkeypatch.setattr(sfr, "NEIGHBOURHOOD_SHARD_ATOMS", 40)
    atoms = torch.randn(130, 6, generator=torch.Generator().manual_seed(0))
    neighbors = sfr._nearest_other_atoms(atoms, 3, low_precision=None)
    bounds = [0, 43, 87, 130]  # three shards of about 40 atoms
    for start, end in zip(bounds[:-1], bounds[1:]):
        distances = torch.cdist(atoms[start:end], atoms[start:end]).fill_diagonal_(math.inf)
        expected = distances.topk(3, largest=False).indices + start
        assert torch.equal(neighbors[start:end].sort(dim=1).values, expected.sort(dim=1).values)


@pytest.mark.parametrize("affine", [0.0, 2.0])
def test_ridge_only_codes_match_the_closed_form(affine):
    """Without l1, Eq. (2) is least squares: (A A^T + lambda_2 s^2 I + lambda_a s^2 1 1^T) c = A x + lambda_a s^2 1."""
    generator = torch.Generator().manual_seed(4)
    atoms = torch.randn(60, 12, generator=generator)
    queries = torch.randn(7, 12, generator=generator)
    s2 = float(atoms.square().sum(dim=1).mean())
    search = build_search(atoms)
    residuals = reconstruction_residuals(queries, search, 5, 0.0, 0.5, s2, affine=affine, iterations=2000)
    _, neighbors = search.kneighbors(queries, k=5)
    local = atoms[neighbors]  # (Q, k, D)
    gram = local @ local.transpose(1, 2) + 0.5 * s2 * torch.eye(5) + affine * s2 * torch.ones(5, 5)
    codes = torch.linalg.solve(gram, local @ queries.unsqueeze(2) + affine * s2).squeeze(2)
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


# ---------------------------------------------------------------------------- subspaces
def true_subspaces() -> torch.Tensor:
    """The subspace each atom of ``union_of_subspaces`` was drawn from, (440,)."""
    return torch.repeat_interleave(torch.arange(len(SUBSPACE_SIZES)), torch.tensor(SUBSPACE_SIZES))


@pytest.fixture(scope="module")
def self_expression(union_of_subspaces):
    return self_expressive_codes(union_of_subspaces[1], 16, 0.1, 0.1, affine=0.0)


def test_self_expression_has_a_zero_diagonal_and_stays_in_the_subspace(self_expression):
    codes, neighbors = self_expression
    assert not (neighbors == torch.arange(neighbors.shape[0]).unsqueeze(1)).any()  # diag(C) = 0
    truth = true_subspaces()
    same = truth[neighbors] == truth.unsqueeze(1)
    assert codes.abs()[same].sum() > 0.99 * codes.abs().sum()  # subspace-preserving coefficients


def test_spectral_clustering_of_the_affinity_recovers_the_subspaces(self_expression):
    labels = subspace_clustering(*self_expression, n_subspaces=3, seed=0)
    truth = true_subspaces()
    contingency = torch.zeros(3, 3, dtype=torch.long).index_put_((truth, labels), torch.tensor(1), accumulate=True)
    assert ((contingency > 0).sum(dim=1) == 1).all() and ((contingency > 0).sum(dim=0) == 1).all(), contingency


# 30: d + 1 = 4 each at least, the rest by size: max(4, 30 n_l / 440 scaled to fill 30) = 20, 6, 4;
# 9: no room for d + 1 each, so M // L = 3 each
@pytest.mark.parametrize("n_bank, expected", [(30, [20, 6, 4]), (9, [3, 3, 3])])
def test_subspace_sampling_keeps_enough_atoms_to_span_every_subspace(n_bank, expected, self_expression):
    codes, neighbors = self_expression
    usage = sfr._row_norms(codes, neighbors, codes.shape[0])
    kept = subspace_sample(usage, true_subspaces(), n_bank, SUBSPACE_DIM)
    assert kept.shape == (n_bank,) and kept.unique().shape == (n_bank,)
    per_subspace = torch.bincount(true_subspaces()[kept], minlength=3)
    assert per_subspace.tolist() == expected


def test_subspace_basis_reconstructs_held_out_points_of_its_subspace_only(union_of_subspaces):
    bases, atoms = union_of_subspaces
    generator = torch.Generator().manual_seed(6)
    kept = torch.cat([torch.nonzero(true_subspaces() == label).squeeze(1)[:SUBSPACE_DIM + 1] for label in range(3)])
    fitted = subspace_bases(atoms[kept], true_subspaces()[kept], 3, SUBSPACE_DIM + 2)
    assert fitted.shape == (3, AMBIENT_DIM, SUBSPACE_DIM + 2)
    assert (fitted[:, :, SUBSPACE_DIM:] == 0).all()  # rank 3: the spare columns stay zero
    held_out = torch.cat([points_on(basis, 20, generator) for basis in bases])
    offsets = 0.3 * torch.randn(20, AMBIENT_DIM, generator=generator) / math.sqrt(AMBIENT_DIM)
    off_subspace = points_on(bases[2], 20, generator) + offsets
    assert subspace_residuals(held_out, fitted).norm(dim=1).max() < 1e-4
    assert subspace_residuals(off_subspace, fitted).norm(dim=1).min() > 0.1


# ---------------------------------------------------------------------------- fitted models
BANK_FRACTION = 0.25
PATCHES_PER_IMAGE = 8 * 8  # at 64 px, stride 8


def quick_sfr(**params) -> SFR:
    return SFR(image_size=64, bank_fraction=BANK_FRACTION, **params).set_runtime(batch_size=8)


def bank(model: SFR) -> torch.Tensor:
    search = model.scorer_.search
    return all_vectors(search)


@pytest.fixture(scope="module")
def train_halves(tiny_dataset):
    """The 12 training images in two halves of 6."""
    images = sorted(tiny_dataset.glob("train/good/*.png"))
    return images[::2], images[1::2]


@pytest.fixture(scope="module")
def tiny_sfr(tiny_dataset) -> SFR:
    return quick_sfr().fit(tiny_dataset)


@pytest.fixture(scope="module")
def half_sfr(train_halves) -> SFR:
    return quick_sfr().fit(train_halves[0])


@pytest.fixture(scope="module")
def updated_sfr(half_sfr, train_halves, tmp_path_factory) -> SFR:
    """``half_sfr`` (through a save and load, so it is not modified) updated with the other half."""
    return AnomalyModel.load(half_sfr.save(tmp_path_factory.mktemp("half") / "sfr"), batch_size=8).partial_fit(train_halves[1])


@pytest.mark.parametrize("sampling", ["coreset", "random"])
def test_every_sampling_keeps_the_requested_bank_size(sampling, tiny_sfr, tiny_dataset):
    # 11 fit images (1 held out), 8 x 8 patches each at 64 px
    assert tiny_sfr.n_patches_ == tiny_sfr.n_train_images_ * PATCHES_PER_IMAGE
    assert bank(tiny_sfr).shape == (round(BANK_FRACTION * tiny_sfr.n_patches_), 40 + 112)
    assert tiny_sfr.pool_.shape == (round(2 * BANK_FRACTION * tiny_sfr.n_patches_), 40 + 112)
    baseline = quick_sfr(sampling=sampling).fit(tiny_dataset)
    assert bank(baseline).shape == bank(tiny_sfr).shape
    assert not hasattr(baseline, "pool_")  # the baselines' pool is their bank


def test_atom_sq_norm_is_a_scalar_buffer_of_the_bank(tiny_sfr):
    buffers = dict(tiny_sfr.scorer_.named_buffers())
    assert buffers["atom_sq_norm"].shape == ()
    torch.testing.assert_close(buffers["atom_sq_norm"], bank(tiny_sfr).square().sum(dim=1).mean())


def test_patch_scores_are_residual_norms(tiny_sfr):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        features = tiny_sfr.scorer_.embed(images)
        scored = tiny_sfr.scorer_.score(features)
        residuals = tiny_sfr.scorer_.reconstruction_residuals(features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]))
    assert scored.patch_scores.shape == (2, 8, 8)
    assert scored.image_scores is None  # the image score is the maximum of the smoothed map
    torch.testing.assert_close(scored.patch_scores.reshape(-1), residuals.norm(dim=1))


def test_detects_synthetic_defects(tiny_sfr, tiny_dataset):
    result = evaluate(tiny_sfr, tiny_dataset)
    assert result["image_auroc"] > 0.8
    assert result["pixel_auroc"] > 0.8  # chance is 0.5; 64 px and 11 training images


# ---------------------------------------------------------------------------- incremental fit
def test_partial_fit_grows_the_pool_and_the_bank(half_sfr, updated_sfr):
    assert updated_sfr.n_patches_ == updated_sfr.n_train_images_ * PATCHES_PER_IMAGE > half_sfr.n_patches_
    old_pool = half_sfr.pool_
    assert updated_sfr.pool_.shape[0] == round(2 * BANK_FRACTION * updated_sfr.n_patches_) > old_pool.shape[0]
    assert torch.equal(updated_sfr.pool_[: old_pool.shape[0]], old_pool)  # the stream kept its atoms
    assert bank(updated_sfr).shape[0] == round(BANK_FRACTION * updated_sfr.n_patches_) > bank(half_sfr).shape[0]


@pytest.mark.parametrize("sampling", ["coreset", "random"])
def test_partial_fit_grows_the_baseline_banks(sampling, train_halves):
    model = quick_sfr(sampling=sampling).fit(train_halves[0])
    old_bank = bank(model)
    model.partial_fit(train_halves[1])
    assert model.n_patches_ == model.n_train_images_ * PATCHES_PER_IMAGE
    assert bank(model).shape[0] == round(BANK_FRACTION * model.n_patches_) > old_bank.shape[0]
    torch.testing.assert_close(bank(model)[: old_bank.shape[0]], old_bank)


def test_partial_fit_after_load_equals_partial_fit_in_memory(updated_sfr, train_halves, tiny_dataset):
    """``updated_sfr`` was saved and loaded between its two fits: the pool sampler's state travels."""
    in_memory = quick_sfr().fit(train_halves[0]).partial_fit(train_halves[1])
    assert torch.equal(in_memory.pool_, updated_sfr.pool_)
    assert torch.equal(bank(in_memory), bank(updated_sfr))
    assert_same_predictions(in_memory, updated_sfr, sorted(tiny_dataset.glob("test/*/*.png"))[:3])


def test_save_load_after_partial_fit_round_trips(updated_sfr, tiny_dataset, tmp_path):
    loaded = AnomalyModel.load(updated_sfr.save(tmp_path / "sfr"))
    assert loaded.n_patches_ == updated_sfr.n_patches_ and loaded.n_fits_ == 2
    assert torch.equal(loaded.pool_, updated_sfr.pool_)
    assert torch.equal(bank(loaded), bank(updated_sfr))
    assert loaded.pool_sampler_state_.keys() == updated_sfr.pool_sampler_state_.keys()
    for name, tensor in updated_sfr.pool_sampler_state_.items():
        assert torch.equal(loaded.pool_sampler_state_[name], tensor)
    assert_same_predictions(updated_sfr, loaded, sorted(tiny_dataset.glob("test/*/*.png"))[:3])


def test_updated_model_detects_defects_like_a_full_fit(updated_sfr, tiny_sfr, tiny_dataset):
    """Fitted on half of the images, then updated with the rest: as good as one fit on all of them
    (measured: image AUROC 1.0 for both, pixel AUROC 0.896 against 0.895)."""
    updated, full = evaluate(updated_sfr, tiny_dataset), evaluate(tiny_sfr, tiny_dataset)
    assert updated["image_auroc"] >= full["image_auroc"] - 0.1  # 0.1: three of 32 good/defect pairs
    assert updated["pixel_auroc"] >= full["pixel_auroc"] - 0.02


# ---------------------------------------------------------------------------- the subspace variant
@pytest.fixture(scope="module")
def subspace_sfr(tiny_dataset) -> SFR:
    return quick_sfr(sampling="subspace", reconstruction="subspace", n_subspaces=4, subspace_dim=4).fit(tiny_dataset)


def test_subspace_model_labels_every_atom_and_detects_defects(subspace_sfr, tiny_dataset):
    scorer = subspace_sfr.scorer_
    assert scorer.atom_subspaces.shape == (len(scorer.search),) and scorer.bases.shape == (4, 40 + 112, 4)
    assert (torch.bincount(scorer.atom_subspaces, minlength=4) >= 5).all()  # d + 1 atoms per subspace
    result = evaluate(subspace_sfr, tiny_dataset)
    assert result["image_auroc"] > 0.8 and result["pixel_auroc"] > 0.8


def test_subspace_scores_among_atoms_are_those_of_a_bank_of_only_them(subspace_sfr):
    """Cross-fitting: the bases are rebuilt from the atoms ``among``, as if the bank held only them."""
    scorer = subspace_sfr.scorer_
    queries = torch.randn(10, 40 + 112, generator=torch.Generator().manual_seed(8)).abs()
    among = torch.nonzero(subspace_sfr.bank_sources_ != 0).squeeze(1)
    atoms = all_vectors(scorer.search)[among]
    expected = subspace_residuals(queries, subspace_bases(atoms, scorer.atom_subspaces[among], 4, 4))
    torch.testing.assert_close(scorer.reconstruction_residuals(queries, among), expected)
    assert not torch.allclose(scorer.reconstruction_residuals(queries), expected)


def test_subspace_model_save_load_round_trips(subspace_sfr, tiny_dataset, tmp_path):
    loaded = AnomalyModel.load(subspace_sfr.save(tmp_path / "sfr"))
    assert torch.equal(loaded.scorer_.atom_subspaces, subspace_sfr.scorer_.atom_subspaces)
    assert_same_predictions(subspace_sfr, loaded, sorted(tiny_dataset.glob("test/*/*.png"))[:3])


def test_subspace_model_partial_fit_reclusters_the_grown_pool(train_halves):
    model = quick_sfr(sampling="subspace", reconstruction="subspace", n_subspaces=4, subspace_dim=4).fit(train_halves[0])
    old_pool = model.pool_
    model.partial_fit(train_halves[1])
    assert torch.equal(model.pool_[: old_pool.shape[0]], old_pool)
    assert len(model.scorer_.search) == round(BANK_FRACTION * model.n_patches_)
    assert model.scorer_.atom_subspaces.shape == (len(model.scorer_.search),)


@pytest.mark.parametrize(
    "version, added_since", [(4, ("reconstruction", "n_subspaces", "subspace_dim", "affine")), (5, ("affine",))]
)
def test_older_sfr_directories_load_as_they_were_fitted(version, added_since, tiny_dataset, tmp_path):
    """An SFR saved before the subspace parameters (format 4) or the affine term (format 5)
    existed loads with the local reconstruction and linear codes (``affine = 0``), as it was fitted."""
    linear_sfr = quick_sfr(affine=0.0).fit(tiny_dataset)
    target = linear_sfr.save(tmp_path / "sfr")
    config = json.loads((target / "config.json").read_text())
    for name in added_since:
        del config["params"][name]
    config["format_version"] = version
    (target / "config.json").write_text(json.dumps(config))
    loaded = AnomalyModel.load(target)
    assert (loaded.sampling, loaded.reconstruction, loaded.affine) == ("sparse", "local", 0.0)
    assert_same_predictions(linear_sfr, loaded, sorted(tiny_dataset.glob("test/*/*.png"))[:2])


@pytest.mark.parametrize(
    "params, message",
    [
        ({"bank_fraction": 0.0}, "bank_fraction"),
        ({"dictionary_size": 0}, "dictionary_size"),
        ({"sparsity": 0.0, "ridge": 0.0}, "sparsity and ridge"),
        ({"sparsity": -1.0}, "sparsity and ridge"),
        ({"affine": -0.5}, "affine"),
        ({"sampling": "greedy"}, "sampling"),
        ({"pool_factor": 0.5}, "pool_factor"),
        ({"reconstruction": "global"}, "reconstruction"),
        ({"reconstruction": "subspace"}, "needs sampling='subspace'"),
        ({"n_subspaces": 0}, "n_subspaces"),
        ({"neighborhood_size": 2}, "neighborhood_size"),
        ({"projection_dim": 0}, "projection_dim"),
    ],
)
def test_invalid_hyper_parameters(params, message, tiny_dataset):
    with pytest.raises(FlawmapError, match=message):
        SFR(**params).fit(tiny_dataset)
