"""An HTML report of a model on test images: ``flawmap report``, ``evaluate --report``, ``predict --report``.

One ``DIR/index.html`` with its pictures beside it (``DIR/images/``, ``DIR/figures/``); it needs
no network and no script to view. For a labelled dataset (MVTec layout) it shows:

- the metrics table (the ``evaluate`` result when given, else computed from the same pass);
- the image ROC curve, the pixel PRO curve up to FPR 0.3 and the histogram of normal and
  defective image scores, with the calibrated threshold marked (matplotlib PNGs);
- the confusion table at the calibrated threshold, and the detections per defect type;
- a gallery of every test image as ``original | overlay`` (:func:`flawmap.report.write_overlay`,
  the same picture as ``flawmap predict``) and the ground truth outlined, worst first: missed
  defects and false alarms on top, each ordered by how far its score is on the wrong side of the
  threshold, then the correct verdicts closest to it;
- the model card: method, hyper-parameters, backbone, tiling (and why), training images, fit time, threshold.

For images without labels (``predict --report``) the page has the score histogram, the gallery
(most anomalous first, without ground truth) and the model card. Needs matplotlib
(``flawmap[report]``); works with torch models and exported ones alike.
"""

from __future__ import annotations

import html
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from flawmap import io
from flawmap._version import __version__
from flawmap.data import Dataset, Sample, read_image
from flawmap.errors import FlawmapError
from flawmap.metrics import DEFAULT_FPR_LIMIT, image_metrics, pixel_metrics, pro_curve, roc_curve
from flawmap.outputs import check_replaceable, check_writable
from flawmap.prediction import Prediction, Predictor
from flawmap.report import outline, write_overlay

#: Largest side of a gallery picture (the ``original | overlay`` panel; the ground truth is half).
PANEL_SIDE = 1024
#: Most points drawn of a curve (they are subsampled evenly beyond that).
CURVE_POINTS = 2000
#: Colour of the ground-truth outline: magenta, outside the overlays' blue-to-red ramp.
TRUTH_COLOUR = np.array([255, 0, 255])


@dataclass(frozen=True)
class GalleryItem:
    """One scored image of the report and its pictures (paths relative to the report folder)."""

    sample: Sample
    score: float
    flagged: bool
    labelled: bool
    panel: str
    truth: str | None

    @property
    def outcome(self) -> str:
        """``"missed"``, ``"false alarm"``, ``"detected"``, ``"correct"``; unlabelled: the verdict."""
        if not self.labelled:
            return "anomalous" if self.flagged else "normal"
        if self.sample.is_anomalous:
            return "detected" if self.flagged else "missed"
        return "false alarm" if self.flagged else "correct"

    def wrongness(self, threshold: float) -> float:
        """How far the score lies on the wrong side of the threshold (negative when right);
        without labels, how far above it."""
        margin = self.score - threshold
        return -margin if self.labelled and self.sample.is_anomalous else margin


def write_report(
    model: Predictor,
    data: Dataset | Sequence[Sample],
    out_dir: str | Path,
    *,
    metrics: dict[str, Any] | None = None,
    skip_invalid: bool = False,
    force: bool = False,
) -> Path:
    """Score ``data`` with ``model`` and write ``out_dir/index.html``; returns its path.

    Parameters
    ----------
    model : any fitted Predictor (a torch model or an exported one)
    data : Dataset (its labelled test split is scored) or a sequence of unlabelled samples
    metrics : dict, optional
        The ``evaluate`` result to show; None computes the image and pixel metrics from this pass.
    skip_invalid : bool
        Leave out unreadable images with a warning instead of stopping.
    force : bool
        Replace an ``index.html`` in ``out_dir`` that flawmap did not write (:mod:`flawmap.outputs`).
    """
    out = Path(out_dir)
    check_report_target(out, force=force)
    labelled = isinstance(data, Dataset)
    samples = list(data.test) if labelled else list(data)
    if not samples:
        raise FlawmapError(f"{data.root if labelled else out}: no test images to report on")
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(exist_ok=True)
    for previous in [*out.glob("images/[0-9][0-9][0-9][0-9]_*.jpg"), *out.glob("figures/*.png")]:
        previous.unlink()  # an earlier report's pictures
    start = time.perf_counter()
    items, maps, masks = _score_and_draw(model, samples, labelled, skip_invalid, out)
    scores = np.array([item.score for item in items])
    labels = np.array([item.sample.is_anomalous for item in items])
    if labelled and metrics is None:
        metrics = {**image_metrics(scores, labels), **(pixel_metrics(maps, masks) if masks else {}), "n_images": len(items)}
    figures = _draw_figures(model.threshold_, scores, labels if labelled else None, maps, masks, metrics, out / "figures")
    sections = [
        _summary(model, items, metrics),
        _metrics_section(items, metrics) if labelled else "",
        _figures_section(figures),
        _gallery_section(model.threshold_, items),
        _model_card(model),
    ]
    name = data.name if labelled else samples[0].image_path.parent.name
    subtitle = (
        f"{model.method} model on {len(items)} {'test ' if labelled else ''}images · written "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by flawmap {__version__} in {time.perf_counter() - start:.0f} s"
    )
    page = _PAGE.format(title=_escape(f"flawmap report: {name}"), subtitle=_escape(subtitle), style=_STYLE, body="\n".join(sections))
    path = out / "index.html"
    io.write_atomically(path, page.encode("utf-8"))
    return path


def check_report_target(out: Path, *, force: bool = False) -> None:
    """FlawmapError, before any work, unless ``out`` can receive a report: a writable folder whose
    ``index.html``, if any, is a report flawmap wrote (or ``force``)."""
    check_writable(out, folder=True)
    check_replaceable(out / "index.html", folder=False, force=force, ours=_is_report_page, what="a report flawmap wrote")


def _is_report_page(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as page:
            head = page.read(4096)
    except OSError:
        return False
    return REPORT_MARK in head or "<title>flawmap report: " in head  # the title: reports written before the mark


# ---------------------------------------------------------------- scoring and pictures
def _score_and_draw(
    model: Predictor, samples: list[Sample], labelled: bool, skip_invalid: bool, out: Path
) -> tuple[list[GalleryItem], list[np.ndarray], list[np.ndarray]]:
    """One pass: gallery pictures for every sample; maps and masks (labelled data only) for the curves."""
    items, maps, masks = [], [], []
    with tempfile.TemporaryDirectory(prefix="flawmap-report-") as scratch:
        for index, (prediction, mask) in enumerate(model.iter_predictions(samples, load_masks=labelled, skip_invalid=skip_invalid)):
            stem = f"{index:04d}_{prediction.sample.image_path.stem}"
            panel = _panel_picture(model, prediction, Path(scratch) / "panel.bmp", out / "images" / f"{stem}_overlay.jpg")
            truth = None
            if labelled and mask is not None:
                truth = _truth_picture(prediction.sample.image_path, mask, out / "images" / f"{stem}_truth.jpg")
                maps.append(prediction.anomaly_map)
                masks.append(mask)
            items.append(GalleryItem(prediction.sample, prediction.score, bool(prediction.is_anomalous), labelled, panel, truth))
    return items, maps, masks


def _panel_picture(model: Predictor, prediction: Prediction, scratch: Path, target: Path) -> str:
    """``flawmap predict``'s overlay picture of ``prediction``, shrunk to PANEL_SIDE as a JPEG
    (drawn into an uncompressed ``scratch`` file first: quicker than a PNG)."""
    write_overlay(model, prediction, scratch)
    with Image.open(scratch) as picture:
        _save_small(picture.convert("RGB"), target, PANEL_SIDE)
    return f"images/{target.name}"


def _truth_picture(image_path: Path, mask: np.ndarray, target: Path) -> str:
    """The image with its ground-truth mask (H x W bool) tinted and outlined, as a JPEG."""
    image = read_image(image_path).astype(np.float32)
    image[mask] = 0.7 * image[mask] + 0.3 * TRUTH_COLOUR
    image[outline(mask)] = TRUTH_COLOUR
    _save_small(Image.fromarray(image.round().astype(np.uint8)), target, PANEL_SIDE // 2)
    return f"images/{target.name}"


def _save_small(picture: Image.Image, target: Path, side: int) -> None:
    picture.thumbnail((side, side), Image.LANCZOS)
    picture.save(target, format="JPEG", quality=88)


# ---------------------------------------------------------------- figures
def _draw_figures(
    threshold: float, scores: np.ndarray, labels: np.ndarray | None, maps: list, masks: list,
    metrics: dict[str, Any] | None, folder: Path,
) -> list[tuple[str, str]]:
    """The report's plots as PNGs in ``folder``: (relative path, caption) each; ``metrics`` label the curves."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError as error:
        raise FlawmapError(f'the HTML report needs matplotlib ({error}): pip install "flawmap[report]"') from None
    figures = [("histogram", _draw_histogram(pyplot, threshold, scores, labels))]
    if labels is not None:
        figures.insert(0, ("roc", _draw_roc(pyplot, threshold, scores, labels, metrics["image_auroc"])))
        if masks:
            figures.insert(1, ("pro", _draw_pro(pyplot, maps, masks, metrics["aupro"])))
    written = []
    for name, (figure, caption) in figures:
        figure.savefig(folder / f"{name}.png", dpi=110)
        pyplot.close(figure)
        written.append((f"figures/{name}.png", caption))
    return written


def _draw_roc(pyplot, threshold: float, scores: np.ndarray, labels: np.ndarray, auroc: float):
    fpr, tpr = roc_curve(scores, labels)
    flagged = scores > threshold
    figure, axes = pyplot.subplots(figsize=(4.6, 4.0), layout="constrained")
    axes.plot(fpr, tpr, color="#1f5fa8", linewidth=2, label=f"image AUROC {auroc:.3f}")
    axes.plot([0, 1], [0, 1], color="#bbbbbb", linestyle=":", linewidth=1)
    axes.plot(flagged[~labels].mean(), flagged[labels].mean(), "o", color="#d62728", label="at the threshold")
    axes.set(xlabel="false-positive rate (normal images flagged)", ylabel="true-positive rate (defects found)", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    axes.legend(loc="lower right")
    return figure, "Image ROC curve; the dot is the calibrated threshold."


def _draw_pro(pyplot, maps: list, masks: list, aupro: float):
    fpr, pro = pro_curve(maps, masks)
    inside = fpr <= DEFAULT_FPR_LIMIT
    fpr_shown, pro_shown = _thinned(np.append(fpr[inside], DEFAULT_FPR_LIMIT), np.append(pro[inside], np.interp(DEFAULT_FPR_LIMIT, fpr, pro)))
    figure, axes = pyplot.subplots(figsize=(4.6, 4.0), layout="constrained")
    axes.plot(fpr_shown, pro_shown, color="#2a8a4a", linewidth=2, label=f"AUPRO (FPR <= {DEFAULT_FPR_LIMIT:g}) {aupro:.3f}")
    axes.set(xlabel="pixel false-positive rate", ylabel="per-region overlap", xlim=(0, DEFAULT_FPR_LIMIT), ylim=(-0.02, 1.02))
    axes.legend(loc="lower right")
    return figure, f"Per-region overlap against pixel false-positive rate, up to {DEFAULT_FPR_LIMIT:g}."


def _draw_histogram(pyplot, threshold: float, scores: np.ndarray, labels: np.ndarray | None):
    bins = np.linspace(min(scores.min(), threshold), max(scores.max(), threshold), 31)
    figure, axes = pyplot.subplots(figsize=(4.6, 4.0), layout="constrained")
    if labels is None:
        axes.hist(scores, bins=bins, color="#1f5fa8", alpha=0.8, label="images")
    else:
        axes.hist(scores[~labels], bins=bins, color="#2a8a4a", alpha=0.65, label=f"normal ({(~labels).sum()})")
        axes.hist(scores[labels], bins=bins, color="#d62728", alpha=0.55, label=f"defective ({labels.sum()})")
    axes.axvline(threshold, color="black", linestyle="--", linewidth=1.5, label=f"threshold {threshold:.3g}")
    axes.set(xlabel="image anomaly score", ylabel="images")
    axes.legend(loc="upper right")
    return figure, "Image scores; right of the dashed line is flagged anomalous."


def _thinned(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """At most CURVE_POINTS evenly spread points of a curve, its ends kept."""
    keep = np.unique(np.linspace(0, len(x) - 1, min(len(x), CURVE_POINTS)).round().astype(int))
    return x[keep], y[keep]


# ---------------------------------------------------------------- page sections
def _summary(model: Predictor, items: list[GalleryItem], metrics: dict[str, Any] | None) -> str:
    """Headline numbers."""
    outcomes = [item.outcome for item in items]
    if metrics is None:
        tiles = [("images", len(items)), ("flagged anomalous", outcomes.count("anomalous")), ("threshold", f"{model.threshold_:.4g}")]
        return _tiles(tiles)
    n_defective = sum(item.sample.is_anomalous for item in items)
    tiles = [
        ("image AUROC", _number(metrics.get("image_auroc"))),
        ("pixel AUROC", _number(metrics.get("pixel_auroc"))),
        ("AUPRO", _number(metrics.get("aupro"))),
        ("defects missed", f"{outcomes.count('missed')} / {n_defective}"),
        ("false alarms", f"{outcomes.count('false alarm')} / {len(items) - n_defective}"),
    ]
    return _tiles(tiles)


def _tiles(tiles: list[tuple[str, Any]]) -> str:
    cells = "".join(f'<div class="tile"><div class="value">{_escape(str(value))}</div><div class="label">{_escape(label)}</div></div>' for label, value in tiles)
    return f'<section class="tiles">{cells}</section>'


def _figures_section(figures: list[tuple[str, str]]) -> str:
    cells = "".join(
        f'<figure class="plot"><img src="{path}" alt="{_escape(caption)}"><figcaption>{_escape(caption)}</figcaption></figure>'
        for path, caption in figures
    )
    return f'<section><h2>Curves and scores</h2><div class="plots">{cells}</div></section>'


def _metrics_section(items: list[GalleryItem], metrics: dict[str, Any]) -> str:
    """The metrics table, the confusion table at the calibrated threshold, and detections per defect type."""
    rows = "".join(f"<tr><th>{_escape(key)}</th><td>{_escape(_number(value))}</td></tr>" for key, value in metrics.items())
    metrics_table = f'<table class="metrics"><tr><th colspan="2">metrics</th></tr>{rows}</table>'
    count = {outcome: sum(item.outcome == outcome for item in items) for outcome in ("correct", "false alarm", "missed", "detected")}
    n_normal, n_defective = count["correct"] + count["false alarm"], count["missed"] + count["detected"]
    confusion = (
        '<table class="confusion"><tr><th></th><th>predicted normal</th><th>predicted anomalous</th><th>rate</th></tr>'
        f'<tr><th>normal ({n_normal})</th><td class="ok">{count["correct"]}</td><td class="bad">{count["false alarm"]}</td>'
        f'<td>false-alarm rate {_ratio(count["false alarm"], n_normal)}</td></tr>'
        f'<tr><th>defective ({n_defective})</th><td class="bad">{count["missed"]}</td><td class="ok">{count["detected"]}</td>'
        f'<td>recall {_ratio(count["detected"], n_defective)}</td></tr></table>'
    )
    per_type = ['<table class="types"><tr><th>type</th><th>images</th><th>flagged anomalous</th><th>median score</th><th>max score</th></tr>']
    for defect_type in sorted({item.sample.defect_type for item in items}, key=lambda name: (name != "good", name)):
        scores = [item.score for item in items if item.sample.defect_type == defect_type]
        flagged = sum(item.flagged for item in items if item.sample.defect_type == defect_type)
        per_type.append(
            f"<tr><th>{_escape(defect_type)}</th><td>{len(scores)}</td><td>{flagged} ({_ratio(flagged, len(scores))})</td>"
            f"<td>{np.median(scores):.4g}</td><td>{max(scores):.4g}</td></tr>"
        )
    per_type.append("</table>")
    verdicts = f'<div class="stack">{confusion}{"".join(per_type)}</div>'
    return f'<section><h2>Metrics, and verdicts at the calibrated threshold</h2><div class="pair">{metrics_table}{verdicts}</div></section>'


def _gallery_section(threshold: float, items: list[GalleryItem]) -> str:
    ordered = sorted(items, key=lambda item: -item.wrongness(threshold))
    labelled = items[0].labelled
    what = "original | overlay | ground truth" if labelled else "original | overlay"
    order = "missed defects and false alarms first, then the closest calls" if labelled else "most anomalous first"
    cards = []
    for item in ordered:
        outcome = item.outcome
        pictures = f'<a href="{item.panel}"><img src="{item.panel}" alt="overlay of {_escape(item.sample.key)}"></a>'
        if item.truth is not None:
            pictures += f'<a href="{item.truth}"><img src="{item.truth}" alt="ground truth of {_escape(item.sample.key)}"></a>'
        name = item.sample.key if labelled else item.sample.image_path.name
        cards.append(
            f'<figure class="card {outcome.replace(" ", "-")}"><div class="pictures">{pictures}</div>'
            f'<figcaption><span class="badge">{outcome}</span> {_escape(name)} · score {item.score:.4g}</figcaption></figure>'
        )
    return (
        f'<section><h2>Gallery</h2><p class="note">{len(items)} images, {what}; {order}. '
        f'Threshold {threshold:.4g}. Click a picture for its full size.</p><div class="gallery">{"".join(cards)}</div></section>'
    )


def _model_card(model: Predictor) -> str:
    params = model.get_params()
    fit_seconds = getattr(model, "fit_seconds_", None)
    facts = [
        ("method", model.method),
        ("backbone", params.get("backbone", "")),
        ("image size", f"{model.image_size} x {model.image_size}"),
        ("tiling", getattr(model, "tiling_reason_", f"tiles of {model.tile_size_} px" if model.tile_size_ else "resized whole")),
        ("threshold", f"{model.threshold_:.6g} (calibrated on normal images)"),
        ("training images", getattr(model, "n_train_images_", "not recorded in an exported model")),
        ("calibration images", len(getattr(model, "calibration_scores_", [])) or "not recorded in an exported model"),
        ("fits", getattr(model, "n_fits_", "not recorded in an exported model")),
        ("fit time", f"{sum(fit_seconds.values()):.1f} s" if fit_seconds else "not recorded in an exported model"),
        ("kind", f"exported ONNX model {model.path}" if hasattr(model, "metadata") else "model directory (torch)"),
    ]
    rows = "".join(f"<tr><th>{_escape(key)}</th><td>{_escape(str(value))}</td></tr>" for key, value in facts)
    param_rows = "".join(f"<tr><th>{_escape(key)}</th><td>{_escape(str(value))}</td></tr>" for key, value in params.items())
    return (
        '<section><h2>Model card</h2><div class="pair">'
        f'<table class="card-table">{rows}</table><table class="card-table"><tr><th colspan="2">hyper-parameters</th></tr>{param_rows}</table>'
        "</div></section>"
    )


def _escape(text: str) -> str:
    return html.escape(text, quote=True)


def _number(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _ratio(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "n/a"


#: How a report page names its writer (checked before replacing an index.html).
REPORT_MARK = '<meta name="generator" content="flawmap">'
_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<meta name="generator" content="flawmap">
<style>{style}</style>
</head>
<body>
<header><h1>{title}</h1><p>{subtitle}</p></header>
<main>
{body}
</main>
</body>
</html>
"""

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1d2330; background: #f4f5f7; }
header { background: #1d2330; color: #fff; padding: 18px 32px; }
header h1 { margin: 0; font-size: 22px; }
header p { margin: 4px 0 0; color: #c5cad6; font-size: 13px; }
main { padding: 8px 32px 40px; }
section { margin-top: 24px; }
h2 { font-size: 17px; border-bottom: 2px solid #dde1e8; padding-bottom: 4px; }
.tiles { display: flex; gap: 12px; flex-wrap: wrap; }
.tile { background: #fff; border-radius: 8px; padding: 12px 18px; min-width: 120px; box-shadow: 0 1px 2px rgba(0,0,0,.08); }
.tile .value { font-size: 24px; font-weight: 600; }
.tile .label { font-size: 12px; color: #5b6475; text-transform: uppercase; letter-spacing: .04em; }
table { border-collapse: collapse; background: #fff; font-size: 14px; box-shadow: 0 1px 2px rgba(0,0,0,.08); }
th, td { padding: 6px 12px; border-bottom: 1px solid #eceef2; text-align: left; }
td { font-variant-numeric: tabular-nums; }
.confusion td.ok { background: #e3f4e6; font-weight: 600; }
.confusion td.bad { background: #fbe4e2; font-weight: 600; }
.pair { display: flex; gap: 24px; flex-wrap: wrap; align-items: flex-start; }
.stack { display: flex; flex-direction: column; gap: 16px; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(320px, 1fr)); gap: 16px; max-width: 1500px; }
.plot { margin: 0; background: #fff; padding: 8px; border-radius: 8px; box-shadow: 0 1px 2px rgba(0,0,0,.08); }
.plot img { display: block; width: 100%; }
.plot figcaption, .note { font-size: 13px; color: #5b6475; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(460px, 1fr)); gap: 14px; }
.card { margin: 0; background: #fff; border-radius: 8px; padding: 8px; border-left: 6px solid #9aa3b2; box-shadow: 0 1px 2px rgba(0,0,0,.08); }
.card .pictures { display: flex; gap: 4px; }
.card .pictures a:first-child { flex: 2; }
.card .pictures a:nth-child(2) { flex: 1; }
.card img { display: block; width: 100%; height: auto; }
.card figcaption { font-size: 13px; margin-top: 6px; word-break: break-all; }
.badge { display: inline-block; border-radius: 4px; padding: 1px 6px; font-size: 12px; font-weight: 600; color: #fff; background: #5b6475; }
.card.missed, .card.false-alarm { border-left-color: #d62728; }
.card.missed .badge, .card.false-alarm .badge, .card.anomalous .badge { background: #d62728; }
.card.detected, .card.correct { border-left-color: #2a8a4a; }
.card.detected .badge, .card.correct .badge, .card.normal .badge { background: #2a8a4a; }
"""
