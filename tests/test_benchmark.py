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
