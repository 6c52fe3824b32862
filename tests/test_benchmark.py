import json

import pytest

from flawmap.benchmark import TABLE_COLUMNS, directory_mb
from flawmap.cli import main


def test_benchmark_command_end_to_end(tiny_dataset, tmp_path, capsys):
    json_path = tmp_path / "bench.json"
    params = ["padim.image_size=64", "padim.n_features=16", "spade.image_size=64", "spade.image_neighbors=3"]
    argv = ["benchmark", str(tiny_dataset), "--methods", "padim,spade", "--json", str(json_path)]
    assert main(argv + [item for spec in params for item in ("--param", spec)]) == 0
    rows = json.loads(json_path.read_text())["rows"]
    assert [(row["dataset"], row["method"]) for row in rows] == [("brick", "padim"), ("brick", "spade")]
    for row in rows:
        assert set(TABLE_COLUMNS) <= set(row)
        assert 0.0 <= row["image_auroc"] <= 1.0 and 0.0 <= row["pixel_auroc"] <= 1.0
        assert row["model_mb"] > 0 and row["peak_rss_mb"] > 0 and row["fit_s"] > 0
        assert row["params"]["image_size"] == 64
    assert rows[0]["params"]["n_features"] == 16
    table = capsys.readouterr().out
    assert table.startswith("| " + " | ".join(TABLE_COLUMNS) + " |") and "| brick | spade |" in table


@pytest.mark.parametrize(
    "spec", ["padim.n_features", "n_features=3", "nope.n_features=3", "padim.image_neighbors=3", "padim.n_features=x"]
)
def test_bad_param_fails_before_running(tiny_dataset, spec, capsys):
    assert main(["benchmark", str(tiny_dataset), "--methods", "padim", "--param", spec]) == 2
    assert "--param" in capsys.readouterr().err


def test_unknown_method_or_dataset_fails_before_running(tiny_dataset, tmp_path, capsys):
    assert main(["benchmark", str(tiny_dataset), "--methods", "nope"]) == 2
    assert main(["benchmark", str(tmp_path / "missing"), "--methods", "padim"]) == 2
    assert "flawmap: error:" in capsys.readouterr().err


def test_directory_mb_counts_nested_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"x" * 2**19)
    (tmp_path / "sub" / "b.bin").write_bytes(b"x" * 2**19)
    assert directory_mb(tmp_path) == 1.0


def test_unified_model_rows_per_dataset_and_mean(tiny_dataset, tmp_path):
    from flawmap.benchmark import benchmark_unified, mean_row
    from flawmap.data import make_demo_data
    from flawmap.models import METHODS
    from flawmap.runtime import Runtime

    (gravel,) = make_demo_data(tmp_path, categories=("gravel",), image_size=64, n_train=6, n_test_good=2, n_test_defect=1)
    params = METHODS.get("padim").quick_params
    rows = benchmark_unified([str(tiny_dataset), str(gravel)], "padim", params, Runtime())
    assert [row["dataset"] for row in rows] == ["brick", "gravel"]
    assert rows[0]["fit_s"] == rows[1]["fit_s"] > 0  # one fit behind both rows
    assert set(TABLE_COLUMNS) <= set(rows[0])
    mean = mean_row([{"mode": "unified", **row} for row in rows], rows[0]["fit_s"])
    assert mean["dataset"] == "mean" and mean["mode"] == "unified"
    assert mean["pixel_auroc"] == (rows[0]["pixel_auroc"] + rows[1]["pixel_auroc"]) / 2


def test_unified_flag_reaches_the_benchmark(tiny_dataset, monkeypatch, capsys):
    import flawmap.benchmark

    calls = []

    def fake_benchmark(data_dirs, methods, **options):
        calls.append(options["unified"])
        return [{"mode": "unified", "dataset": "brick", "method": methods[0], "image_auroc": 1.0}]

    monkeypatch.setattr(flawmap.benchmark, "benchmark", fake_benchmark)
    assert main(["benchmark", str(tiny_dataset), "--methods", "padim", "--unified"]) == 0
    assert calls == [True]
    assert capsys.readouterr().out.startswith("| mode | dataset | method |")
