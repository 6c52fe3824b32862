"""The faiss backends behind the search protocol: exactness of faiss-flat, recall of faiss-ivfpq,
``among``, saving as raw bytes, the model-level hyper-parameters and the missing-faiss error."""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

import flawmap
from flawmap.cli import build_parser
from flawmap.errors import FlawmapError
from flawmap.models import PatchCore
from flawmap.search import TorchSearch, all_vectors, build_search, search_from_state, search_state
from flawmap.search_faiss import FaissSearch, exact_torch_searches, ivfpq_settings


def clustered(seed: int, n_clusters: int, per_cluster: int, dim: int = 32, spread: float = 4.0) -> torch.Tensor:
    """Rows around ``n_clusters`` Gaussian centres, far from the origin (centring matters)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_clusters, dim, generator=generator) * spread + 30.0
    return centres.repeat_interleave(per_cluster, dim=0) + torch.randn(n_clusters * per_cluster, dim, generator=generator)


@pytest.fixture(scope="module")
def bank() -> torch.Tensor:
    return clustered(0, 40, 50)  # 2000 x 32


@pytest.fixture(scope="module")
def queries() -> torch.Tensor:
    return clustered(0, 40, 1)[:40] + torch.randn(40, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def ivfpq(bank) -> FaissSearch:
    return build_search(bank, backend="faiss-ivfpq")


@pytest.mark.parametrize("k", [1, 4])
def test_faiss_flat_equals_the_torch_search_on_random_data(k):
    generator = torch.Generator().manual_seed(2)
    bank, queries = torch.randn(700, 24, generator=generator) + 5.0, torch.randn(50, 24, generator=generator) + 5.0
    distances, rows = build_search(bank, backend="faiss-flat").kneighbors(queries, k=k)
    expected_distances, expected_rows = build_search(bank).kneighbors(queries, k=k)
    assert torch.equal(rows, expected_rows)
    torch.testing.assert_close(distances, expected_distances, atol=1e-4, rtol=1e-5)


def test_ivfpq_recall_on_a_clustered_bank_with_exact_distances(bank, queries, ivfpq):
    settings = ivfpq.settings
    assert settings["pq_m"] == 8 and 1 <= settings["nprobe"] <= settings["nlist"] < len(bank)
    distances, rows = ivfpq.kneighbors(queries, k=3)
    _, true_rows = build_search(bank).kneighbors(queries, k=1)
    assert (rows[:, 0] == true_rows[:, 0]).float().mean() >= 0.95
    torch.testing.assert_close(distances, (bank[rows] - queries[:, None]).norm(dim=2), atol=1e-3, rtol=1e-5)
    assert torch.all(distances[:, 1:] >= distances[:, :-1])


@pytest.mark.parametrize("backend", ["faiss-flat", "faiss-ivfpq"])
@pytest.mark.parametrize("n_among", [30, 1500])  # ivfpq: searched exactly / through a faiss ID selector
def test_among_restricts_the_rows(backend, n_among, bank, queries, ivfpq):
    index = ivfpq if backend == "faiss-ivfpq" else build_search(bank, backend=backend)
    among = torch.randperm(len(bank), generator=torch.Generator().manual_seed(3))[:n_among]
    distances, rows = index.kneighbors(queries, k=2, among=among)
    assert set(rows.flatten().tolist()) <= set(among.tolist())
    expected_distances, expected_rows = build_search(bank).kneighbors(queries, k=2, among=among)
    assert (rows == expected_rows).float().mean() >= (1.0 if backend == "faiss-flat" or n_among == 30 else 0.95)
    with pytest.raises(ValueError):
        index.kneighbors(queries, k=31, among=among[:30])


def test_queries_with_too_few_rows_found_fall_back_to_exact_search(bank, queries):
    """One list of 2000 probed out of 40: lists shorter than k leave faiss's -1 padding."""
    index = build_search(bank, backend="faiss-ivfpq", nlist=40, nprobe=1)
    _, rows = index.kneighbors(queries[:5], k=60)
    assert rows.min() >= 0 and torch.equal(rows[:, 0], build_search(bank).kneighbors(queries[:5])[1][:, 0])


def test_vectors_and_float16_storage(bank):
    rows = torch.tensor([[0, 1999], [7, 7]])
    for storage_dtype, tolerance in [(torch.float32, 1e-5), (torch.float16, 2e-2)]:
        index = build_search(bank, backend="faiss-flat", storage_dtype=storage_dtype)
        torch.testing.assert_close(index.vectors(rows), bank[rows], atol=tolerance, rtol=0)
    torch.testing.assert_close(all_vectors(index), bank, atol=2e-2, rtol=0)


def test_default_settings():
    assert ivfpq_settings(100_000, 152)["pq_m"] == 38  # largest divisor of 152 <= 152 / 4
    assert ivfpq_settings(100_000, 100)["pq_m"] == 25 and ivfpq_settings(100_000, 7)["pq_m"] == 1
    assert ivfpq_settings(10_000, 152)["nlist"] == 256  # N / 39 caps 4 sqrt(N) = 400
    assert ivfpq_settings(1_000_000, 152) == {"nlist": 4000, "nprobe": 250, "pq_m": 38, "nbits": 8}
    assert ivfpq_settings(20, 4) == {"nlist": 1, "nprobe": 1, "pq_m": 1, "nbits": 1}
    assert ivfpq_settings(2000, 32)["nbits"] == 5  # 2^5 codes of 39+ rows each
    with pytest.raises(FlawmapError, match="pq_m must divide the feature dimension 152"):
        ivfpq_settings(1000, 152, pq_m=10)
    with pytest.raises(FlawmapError, match="nprobe must be in"):
        ivfpq_settings(1000, 152, nlist=10, nprobe=11)


def test_state_is_the_serialised_index_and_round_trips(ivfpq, queries):
    tensors = search_state(ivfpq, "bank")
    assert set(tensors) == {"bank.faiss-ivfpq.index", "bank.faiss-ivfpq.center"}
    assert tensors["bank.faiss-ivfpq.index"].dtype == torch.uint8
    restored = search_from_state(tensors, "bank")
    assert restored.settings == ivfpq.settings
    for first, second in zip(ivfpq.kneighbors(queries, k=2), restored.kneighbors(queries, k=2)):
        assert torch.equal(first, second)
    with pytest.raises(FlawmapError, match="not a faiss index"):
        search_from_state({**tensors, "bank.faiss-ivfpq.index": torch.zeros(64, dtype=torch.uint8)}, "bank")


def test_export_swaps_faiss_for_an_exact_torch_search(bank):
    holder = torch.nn.Module()
    holder.search = build_search(bank, backend="faiss-flat")
    exact_torch_searches(holder)
    assert isinstance(holder.search, TorchSearch)
    torch.testing.assert_close(all_vectors(holder.search), bank, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def faiss_model_dir(tiny_model_dir, tmp_path_factory):
    """The session's tiny PatchCore with its bank re-indexed by faiss-ivfpq, saved."""
    model = flawmap.load(tiny_model_dir)
    model.search, model.pq_m = "faiss-ivfpq", 76
    bank = all_vectors(model.scorer_.search)
    del model.scorer_.search  # a torch submodule, replaced by a plain attribute
    model.scorer_.search = model._build_search(bank)
    return model.save(tmp_path_factory.mktemp("faiss") / "model")


def test_save_and_load_through_a_model_directory(faiss_model_dir, tiny_model_dir, tiny_dataset):
    config = json.loads((faiss_model_dir / "config.json").read_text())
    assert config["params"]["search"] == "faiss-ivfpq" and config["params"]["pq_m"] == 76
    files = sorted(path.name for path in faiss_model_dir.iterdir())
    assert len(files) == 3 and all(name == "config.json" or name.endswith(".safetensors") for name in files)
    tensors = load_file(faiss_model_dir / config["files"]["model"])  # safetensors: no pickle anywhere
    assert tensors["memory_bank.faiss-ivfpq.index"].dtype == torch.uint8
    loaded = flawmap.load(faiss_model_dir)
    assert isinstance(loaded.scorer_.search, FaissSearch) and loaded.scorer_.search.settings["pq_m"] == 76
    images = sorted(str(path) for path in (tiny_dataset / "test").rglob("*.png"))[:4]
    exact = flawmap.load(tiny_model_dir).predict(images)
    assert [p.score for p in loaded.predict(images)] == pytest.approx([p.score for p in exact], rel=1e-4)


def test_without_faiss_loading_names_the_extra(faiss_model_dir, tiny_dataset, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
    with pytest.raises(FlawmapError, match=r'config.json: the faiss-ivfpq search needs faiss .*pip install "flawmap\[faiss\]"'):
        flawmap.load(faiss_model_dir)
    with pytest.raises(FlawmapError, match=r'flawmap\[faiss\]'):
        PatchCore(search="faiss-flat").fit(tiny_dataset)  # before any image is read
    with pytest.raises(FlawmapError, match=r'the faiss-flat search needs faiss'):
        build_search(torch.zeros(3, 2), backend="faiss-flat")


@pytest.mark.parametrize("params, message", [
    ({"search": "annoy"}, "search must be one of exact, faiss-flat, faiss-ivfpq"),
    ({"nlist": 8}, "nlist applies to search='faiss-ivfpq' only"),
    ({"search": "faiss-ivfpq", "nprobe": 0}, "nprobe must be at least 1"),
])
def test_invalid_search_hyper_parameters(params, message, tiny_dataset):
    with pytest.raises(FlawmapError, match=message):
        PatchCore(**params).fit(tiny_dataset)


def test_cli_flags_reach_every_memory_bank_method():
    args = build_parser().parse_args(["fit", "data", "--out", "m", "--search", "faiss-ivfpq", "--nlist", "64", "--pq-m", "19"])
    assert (args.param_search, args.param_nlist, args.param_pq_m, args.param_nprobe) == ("faiss-ivfpq", 64, 19, None)
    help_text = build_parser()._subparsers._group_actions[0].choices["fit"].format_help()
    assert "[patchcore, sfr, spade] default exact" in " ".join(help_text.split())
