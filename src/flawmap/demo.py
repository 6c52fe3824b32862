"""``flawmap demo`` (``make demo``): demo data, a model per category, its metrics, overlays and a report.

:func:`run_demo` writes the built-in demo dataset (:func:`flawmap.data.make_demo_data`, unless
``OUT/data`` holds one already), fits one model per category (``OUT/models/<category>``),
evaluates it on the category's test split, draws the overlays of a few test images
(``OUT/overlays/<category>/``) and writes the HTML report of the first category (``OUT/report/``).
Needs torch (``flawmap[torch]``) and, for the report, matplotlib (``flawmap[report]``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from flawmap.data import make_demo_data, open_dataset
from flawmap.evaluate import evaluate
from flawmap.html_report import write_report
from flawmap.loading import load
from flawmap.model_card import model_card
from flawmap.outputs import check_writable
from flawmap.report import write_overlay
from flawmap.runtime import Runtime

#: Overlays drawn per category: this many defective test images, then one good one.
N_ANOMALOUS_OVERLAYS = 3


@dataclass(frozen=True)
class DemoResult:
    """What :func:`run_demo` wrote: the metrics of each category (``dataset`` and the
    :func:`flawmap.evaluate.evaluate` result), and the folders and report page."""

    rows: list[dict[str, Any]]
    models: Path
    overlays: Path
    report: Path


def run_demo(out: str | Path, *, method: str = "patchcore", runtime: Runtime = Runtime(), log: Callable[[str], None] = print) -> DemoResult:
    """Run the demo into the folder ``out``; ``log`` receives one line before each fit."""
    from flawmap.models import METHODS, create_model

    METHODS.get(method)  # an unknown method fails before any work, listing the choices
    root = Path(out)
    check_writable(root, folder=True)
    data_root = root / "data"
    folders = sorted(data_root.iterdir()) if data_root.is_dir() else make_demo_data(data_root)
    rows = []
    for folder in folders:
        dataset = open_dataset(folder)
        log(f"== {dataset.name}: fitting {method} on {len(dataset.train)} good images")
        model = create_model(method, runtime=runtime).fit(dataset)
        model.save(root / "models" / dataset.name)
        rows.append({"dataset": dataset.name, **evaluate(model, dataset)})
        anomalous = [sample for sample in dataset.test if sample.is_anomalous][:N_ANOMALOUS_OVERLAYS]
        normal = [sample for sample in dataset.test if not sample.is_anomalous][:1]
        for prediction, _ in model.iter_predictions(anomalous + normal):
            name = prediction.sample.key.replace("/", "_") + ".png"
            write_overlay(model, prediction, root / "overlays" / dataset.name / name)
    first = open_dataset(folders[0])
    model_dir = root / "models" / first.name
    model = load(model_dir, **dataclasses.asdict(runtime))
    report = write_report(model, first, root / "report", metrics=rows[0], card=model_card(model, model_dir))
    return DemoResult(rows, root / "models", root / "overlays", report)
