"""The HTML report: its content, its order, the CLI paths to it, and that a browser shows it whole."""

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from flawmap.cli import main
from flawmap.data import make_demo_data, open_dataset
from flawmap.data.demo import DEFECT_TYPES
from flawmap.html_report import write_report

#: Runs in the browser after the report (in an iframe) has loaded: which pictures did not load.
CHECK_PAGE = """<!DOCTYPE html><html><body><iframe id="report" src="{report}" style="width:1400px;height:900px"></iframe>
<script>
window.addEventListener("load", () => {{
  const images = Array.from(document.getElementById("report").contentDocument.images);
  const broken = images.filter(image => !(image.complete && image.naturalWidth > 0)).map(image => image.getAttribute("src"));
  const result = document.createElement("pre");
  result.id = "result";
  result.textContent = JSON.stringify({{n_images: images.length, broken: broken}});
  document.body.appendChild(result);
}});
</script></body></html>
"""


@pytest.fixture(scope="module")
def report(tiny_model, tiny_dataset, tmp_path_factory) -> Path:
    return write_report(tiny_model, open_dataset(tiny_dataset), tmp_path_factory.mktemp("report"))


def gallery(page: str) -> list[tuple[str, str, float]]:
    """(outcome, name, score) of every gallery card, in page order."""
    found = re.findall(r'<span class="badge">([a-z ]+)</span> ([^<]+?) · score ([0-9.e+-]+)</figcaption>', page)
    return [(outcome, name, float(score)) for outcome, name, score in found]


def test_report_shows_metrics_curves_confusion_gallery_and_model_card(report, tiny_model, tiny_dataset):
    page = report.read_text(encoding="utf-8")
    dataset = open_dataset(tiny_dataset)
    for heading in ("Metrics, and verdicts at the calibrated threshold", "Curves and scores", "Gallery", "Model card"):
        assert f"<h2>{heading}</h2>" in page
    assert f"({html.escape(tiny_model.tiling_reason_)})</td></tr>" in page  # the card's tiling row: what auto chose, and why
    for figure in ("roc", "pro", "histogram"):
        assert f'src="figures/{figure}.png"' in page and (report.parent / "figures" / f"{figure}.png").stat().st_size > 1000
    assert "http://" not in page and "https://" not in page  # nothing fetched from the network
    cards = gallery(page)
    assert sorted(name for _, name, _ in cards) == sorted(sample.key for sample in dataset.test)
    threshold = tiny_model.threshold_
    wrongness = [(threshold - score) if not name.startswith("good/") else (score - threshold) for _, name, score in cards]
    assert wrongness == sorted(wrongness, reverse=True)  # worst first: missed defects and false alarms on top
    for outcome, name, score in cards:
        expected = {(True, True): "detected", (True, False): "missed", (False, True): "false alarm", (False, False): "correct"}
        assert outcome == expected[(not name.startswith("good/"), score > threshold)]
    n_false_alarms = sum(outcome == "false alarm" for outcome, _, _ in cards)
    n_good = sum(name.startswith("good/") for _, name, _ in cards)
    assert f'<td class="bad">{n_false_alarms}</td>' in page and f"normal ({n_good})" in page
    assert page.count("_truth.jpg\"><img") == len(dataset.test) and page.count("_overlay.jpg\"><img") == len(dataset.test)
    assert "<th>training images</th><td>" + str(tiny_model.n_train_images_) in page
    assert "<th>coreset_fraction</th><td>0.25</td>" in page


def test_evaluate_and_predict_write_reports(capsys, tiny_model_dir, tiny_dataset, tmp_path):
    metrics_path, evaluated = tmp_path / "metrics.json", tmp_path / "evaluated"
    assert main(["evaluate", str(tiny_model_dir), str(tiny_dataset), "--json", str(metrics_path), "--report", str(evaluated)]) == 0
    assert f"report: {evaluated / 'index.html'}" in capsys.readouterr().out
    page = (evaluated / "index.html").read_text(encoding="utf-8")
    for key, value in json.loads(metrics_path.read_text()).items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        assert f"<tr><th>{key}</th><td>{shown}</td></tr>" in page

    images = sorted((tiny_dataset / "test" / "good").glob("*.png")) + sorted((tiny_dataset / "test" / "spot").glob("*.png"))
    predicted = tmp_path / "predicted"
    assert main(["predict", str(tiny_model_dir), *map(str, images), "--out", str(tmp_path / "out"), "--report", str(predicted)]) == 0
    page = (predicted / "index.html").read_text(encoding="utf-8")
    assert "ground truth" not in page and "figures/roc.png" not in page and "figures/histogram.png" in page
    scores = [score for _, _, score in gallery(page)]
    assert len(scores) == len(images) and scores == sorted(scores, reverse=True)  # most anomalous first
    assert not list(predicted.glob("images/*_truth.jpg"))


def browser_check(report: Path, folder: Path) -> tuple[dict, list[str]]:
    """Open ``report`` in headless Chromium: (which images loaded, console messages)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (.ci/run installs it)")
    folder.mkdir(exist_ok=True)
    check_page = folder / "check.html"
    check_page.write_text(CHECK_PAGE.format(report=report.resolve().as_uri()), encoding="utf-8")
    result = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files", "--enable-logging=stderr",
         "--v=0", "--virtual-time-budget=10000", f"--user-data-dir={folder / 'profile'}", "--dump-dom", check_page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    found = re.search(r'<pre id="result">(.*?)</pre>', result.stdout)
    assert found, result.stderr[-2000:]
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    return json.loads(found.group(1).replace("&quot;", '"')), console


def test_report_loads_in_a_browser_without_errors(report, tmp_path):
    loaded, console = browser_check(report, tmp_path)
    n_pictures = len(list(report.parent.glob("images/*.jpg"))) + len(list(report.parent.glob("figures/*.png")))
    assert loaded == {"n_images": n_pictures, "broken": []}
    assert console == []

    damaged = tmp_path / "damaged"  # the check can fail: a missing picture and a console error
    shutil.copytree(report.parent, damaged)
    next(damaged.glob("images/*_overlay.jpg")).unlink()
    page = (damaged / "index.html").read_text(encoding="utf-8").replace("</main>", "<script>console.error('broken');</script></main>")
    (damaged / "index.html").write_text(page, encoding="utf-8")
    loaded, console = browser_check(damaged / "index.html", tmp_path / "second")
    assert len(loaded["broken"]) == 1 and len(console) == 1


def test_demo_ends_with_the_report(capsys, tmp_path):
    make_demo_data(tmp_path / "data", categories=("brick",), image_size=64, n_train=4, n_test_good=2, n_test_defect=1)
    assert main(["demo", "--out", str(tmp_path), "--batch-size", "8"]) == 0
    report = tmp_path / "report" / "index.html"
    assert capsys.readouterr().out.rstrip().endswith(f"report: {report}")
    page = report.read_text(encoding="utf-8")
    assert "flawmap report: brick" in page and len(gallery(page)) == 2 + len(DEFECT_TYPES)
