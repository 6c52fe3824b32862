"""The faiss backends behind the search protocol: exactness of faiss-flat, recall of faiss-ivfpq,
``among``, saving as raw bytes, modules that move and export, the declared options (model
hyper-parameters, CLI flags, models saved with the former names) and the missing-faiss error."""

import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

import flawmap
from flawmap.cli import build_parser
from flawmap.errors import FlawmapError
from flawmap.models import PatchCore
from flawmap.search import TorchSearch, all_vectors, build_search, export_searches, search_from_state, search_state
from flawmap.search_faiss import FaissSearch, ivfpq_settings


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
    index = build_search(bank, backend="faiss-ivfpq", options={"nlist": 40, "nprobe": 1})
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
    fitted, tensors = search_state(ivfpq, "bank")
    assert fitted == {} and set(tensors) == {"bank.faiss-ivfpq.index", "bank.faiss-ivfpq.center"}
    assert tensors["bank.faiss-ivfpq.index"].dtype == torch.uint8
    restored = search_from_state({}, tensors, "bank")
    assert restored.settings == ivfpq.settings
    for first, second in zip(ivfpq.kneighbors(queries, k=2), restored.kneighbors(queries, k=2)):
        assert torch.equal(first, second)
    with pytest.raises(FlawmapError, match="not a faiss index"):
        search_from_state({}, {**tensors, "bank.faiss-ivfpq.index": torch.zeros(64, dtype=torch.uint8)}, "bank")


def test_export_swaps_faiss_for_an_exact_torch_search_found_in_the_module_tree(bank):
    holder, inner = torch.nn.Module(), torch.nn.Module()
    holder.inner = inner
    inner.search = build_search(bank, backend="faiss-flat")
    assert [name for name, _ in holder.named_modules()] == ["", "inner", "inner.search"]  # a submodule, not an attribute
    export_searches(holder)
    assert isinstance(inner.search, TorchSearch)
    torch.testing.assert_close(all_vectors(inner.search), bank, atol=1e-4, rtol=0)


def test_a_faiss_search_is_a_module_whose_centre_moves_and_whose_index_stays_on_the_cpu(bank, queries, ivfpq):
    """``.to()`` reaches the centre buffer (a float64 move stands in for a device move here);
    queries of the module's dtype and device are centred there and searched by faiss on the CPU."""
    assert {name for name, _ in ivfpq.named_buffers()} == {"center"}
    moved = search_from_state({}, search_state(ivfpq, "bank")[1], "bank").to(torch.float64)
    assert moved.center.dtype == torch.float64
    distances, rows = moved.kneighbors(queries.double(), k=2)
    expected_distances, expected_rows = ivfpq.kneighbors(queries, k=2)
    assert torch.equal(rows, expected_rows)
    torch.testing.assert_close(distances, expected_distances.double(), atol=1e-5, rtol=0)
    assert moved.vectors(rows[:, 0]).dtype == torch.float64


@pytest.fixture(scope="module")
def faiss_model_dir(tiny_model_dir, tmp_path_factory):
    """The session's tiny PatchCore with its bank re-indexed by faiss-ivfpq, saved."""
    model = flawmap.load(tiny_model_dir)
    model.search, model.search_options = "faiss-ivfpq", {"pq_m": 76}
    model.scorer_.search = model._build_search(all_vectors(model.scorer_.search))
    return model.save(tmp_path_factory.mktemp("faiss") / "model")


def test_save_and_load_through_a_model_directory(faiss_model_dir, tiny_model_dir, tiny_dataset):
    config = json.loads((faiss_model_dir / "config.json").read_text())
    assert config["params"]["search"] == "faiss-ivfpq" and config["params"]["search_options"] == {"pq_m": 76}
    files = sorted(path.name for path in faiss_model_dir.iterdir())
    assert len(files) == 3 and all(name == "config.json" or name.endswith(".safetensors") for name in files)
    tensors = load_file(faiss_model_dir / config["files"]["model"])  # safetensors: no pickle anywhere
    assert tensors["memory_bank.faiss-ivfpq.index"].dtype == torch.uint8
    loaded = flawmap.load(faiss_model_dir)
    assert isinstance(loaded.scorer_.search, FaissSearch) and loaded.scorer_.search.settings["pq_m"] == 76
    images = sorted(str(path) for path in (tiny_dataset / "test").rglob("*.png"))[:4]
    exact = flawmap.load(tiny_model_dir).predict(images)
    assert [p.score for p in loaded.predict(images)] == pytest.approx([p.score for p in exact], rel=1e-4)


def test_a_model_saved_with_the_former_search_parameters_loads_with_them_as_options(faiss_model_dir, tmp_path):
    """Models saved before ``search_options`` held faiss-ivfpq's options as hyper-parameters."""
    target = tmp_path / "former"
    shutil.copytree(faiss_model_dir, target)
    config = json.loads((target / "config.json").read_text())
    del config["params"]["search_options"]
    config["params"].update(nlist=None, nprobe=None, pq_m=76)
    (target / "config.json").write_text(json.dumps(config))
    loaded = flawmap.load(target)
    assert (loaded.search, loaded.search_options) == ("faiss-ivfpq", {"pq_m": 76})
    assert loaded.scorer_.search.settings["pq_m"] == 76


def test_without_faiss_loading_names_the_extra(faiss_model_dir, tiny_dataset, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
    with pytest.raises(FlawmapError, match=r'config.json: the faiss-ivfpq search needs faiss .*pip install "flawmap\[faiss\]"'):
        flawmap.load(faiss_model_dir)
    with pytest.raises(FlawmapError, match=r'flawmap\[faiss\]'):
        PatchCore(search="faiss-flat").fit(tiny_dataset)  # before any image is read
    with pytest.raises(FlawmapError, match=r'the faiss-flat search needs faiss'):
        build_search(torch.zeros(3, 2), backend="faiss-flat")


@pytest.mark.parametrize("params, message", [
    ({"search": "annoy"}, "unknown search backend 'annoy'; choose one of: faiss-flat, faiss-ivfpq, torch"),
    ({"search": "faiss-flat", "search_options": {"nlist": 8}}, "search 'faiss-flat' has no option 'nlist'; it takes none"),
    ({"search_options": {"nlist": 8}}, "search 'torch' has no option 'nlist'"),
    ({"search": "faiss-ivfpq", "search_options": {"nlsit": 8}}, "has no option 'nlsit'; its options are nlist, nprobe, pq_m"),
    ({"search": "faiss-ivfpq", "search_options": {"nprobe": 0}}, "search option nprobe of faiss-ivfpq must be at least 1, got 0"),
    ({"search": "faiss-ivfpq", "search_options": {"nlist": "64"}}, "search option nlist of faiss-ivfpq must be int, got '64'"),
    ({"search": "faiss-ivfpq", "search_options": {"nlist": True}}, "must be int, got True"),
    ({"search": "faiss-ivfpq", "search_options": [("nlist", 8)]}, "search_options must be a dict"),
])
def test_invalid_search_hyper_parameters_are_one_line_errors_before_any_image_is_read(params, message, tmp_path):
    with pytest.raises(FlawmapError, match=message) as raised:
        PatchCore(**params).fit(tmp_path / "absent")
    assert "\n" not in str(raised.value)


def test_cli_search_options_are_typed_by_the_backend_and_listed_in_the_help():
    from flawmap import cli

    args = build_parser().parse_args(
        ["fit", "data", "--out", "m", "--method", "sfr", "--search", "faiss-ivfpq", "--search-option", "nlist=64", "--search-option", "pq_m=19"]
    )
    assert cli._given_hyperparameters(args, "sfr") == {"search": "faiss-ivfpq", "search_options": {"nlist": 64, "pq_m": 19}}
    for argv, message in [
        (["--search-option", "nlist=64"], "search 'torch' has no option 'nlist'"),
        (["--search", "faiss-ivfpq", "--search-option", "nlist=many"], "nlist of faiss-ivfpq must be int, got 'many'"),
        (["--search", "faiss-ivfpq", "--search-option", "nlist"], "expected NAME=VALUE"),
    ]:
        with pytest.raises(FlawmapError, match=message):
            cli._given_hyperparameters(build_parser().parse_args(["fit", "data", "--out", "m", *argv]), "patchcore")
    with pytest.raises(FlawmapError, match="--search-option does not apply to method 'padim'"):
        cli._given_hyperparameters(build_parser().parse_args(["fit", "data", "--out", "m", "--search-option", "nlist=1"]), "padim")
    help_text = " ".join(build_parser(method="patchcore")._subparsers._group_actions[0].choices["fit"].format_help().split())
    assert "--search TEXT default torch" in help_text
    assert "faiss-ivfpq: nlist INT >= 1 (inverted lists" in help_text and "torch: none" in help_text



def test_cli_fit_with_a_faiss_search_and_its_options(tiny_dataset, tmp_path, capsys):
    from conftest import one_error_line, run_cli

    out = tmp_path / "model"
    code, _, err = run_cli(
        capsys, "fit", tiny_dataset, "--out", out, "--image-size", "64", "--coreset-fraction", "0.25",
        "--search", "faiss-ivfpq", "--search-option", "nlist=4", "--quiet",
    )
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["params"]["search_options"] == {"nlist": 4}
    assert flawmap.load(out).scorer_.search.settings["nlist"] == 4
    code, _, err = run_cli(capsys, "fit", tiny_dataset, "--update", out, "--search-option", "nlist=8")
    assert "--search-option cannot be changed by --update" in one_error_line(code, err)
    code, _, err = run_cli(capsys, "fit", tiny_dataset, "--out", tmp_path / "other", "--search-option", "nlist=8")
    assert "search 'torch' has no option 'nlist'; it takes none" in one_error_line(code, err)
