"""Calibrating tiled models: every normal score is a whole image's, the maximum over its tiles.

A tiled model (:mod:`flawmap.tiling`) learns from tiles but flags images, so its threshold must
be a quantile of *whole-image* scores of images it did not learn from, each image cut, scored
and stitched exactly as in prediction. The two calibrations of untiled models carry over:

- Methods that cross-fit (``traits.cross_fits``) score each training image with *all of its
  tiles* left out (:func:`left_out_whole_images`). Its neighbouring tiles overlap it and hold the
  same pixels, so leaving only the scored tile out would leave near-copies of its patches in the
  model and the scores would be too low; the method is given, for every tile, the range of
  training numbers of its image's tiles (``_left_out_scores(features, image_ids)`` with
  ``image_ids`` of shape (B, 2): first and end, exclusive). Every training image (up to
  :data:`~flawmap.models.base.CROSS_FIT_MAX_IMAGES`) gives a score, as for an untiled model,
  where holding out ``calibration_fraction`` left 3 of screw's 40 images to place a 1 % quantile
  (docs/tiling.md).
- Methods that hold out (trained networks) hold out ``calibration_fraction`` of the images and
  score them whole after learning (:meth:`flawmap.models.base.AnomalyModel._score_held_out_whole`).

Either way the scores go to :func:`flawmap.calibration.calibrate_threshold`: the same
estimator, bootstrap interval and few-images warning as for untiled models.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from flawmap.data import Sample
from flawmap.data.loader import DecodedImage, InvalidImageWarning

if TYPE_CHECKING:
    from flawmap.models.base import AnomalyModel

#: Progress bar of the calibration pass of a tiled cross-fitted model.
LEFT_OUT_TILED_PROGRESS = "calibrating: leave-one-image-out, tiled"


def left_out_whole_images(
    model: AnomalyModel, samples: Sequence[Sample | np.ndarray], scored: set[str], numbers: dict[str, int], skip_invalid: bool
) -> Iterator[tuple[float, np.ndarray]]:
    """``(score, stitched map H x W)`` of each training image whose key is in ``scored``, scored by
    the fitted tiled ``model`` with all of its tiles left out.

    ``samples`` are the fit's training samples in the order they were learned (their keys, the
    data loader's names, are those of ``numbers``); ``numbers`` maps each image's key to the
    training number of its *last* tile (its tiles were numbered consecutively while learning),
    so its tiles are numbers ``last - n_tiles + 1 .. last``. Images skipped while learning are
    skipped again (they were reported).
    """
    tiling = model.tiling()

    def score_left_out(tiles: np.ndarray, images: list[DecodedImage]) -> tuple[np.ndarray, np.ndarray]:
        ends = torch.tensor([numbers[str(image.sample.image_path)] + 1 for image in images])
        counts = torch.tensor([tiling.tile_count(*image.original_hw) for image in images])
        device = model.runtime.torch_device
        with torch.inference_mode():
            features = model.scorer_.embed(torch.from_numpy(tiles).to(device))
            return model._postprocess(model._left_out_scores(features, torch.stack([ends - counts, ends], dim=1)))

    decoded = model._images(samples, skip_invalid, LEFT_OUT_TILED_PROGRESS)
    wanted = (image for image in decoded if str(image.sample.image_path) in scored and str(image.sample.image_path) in numbers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InvalidImageWarning)  # reported while learning
        for _, score, anomaly_map in tiling.score_images(wanted, score_left_out, model.runtime.batch_size):
            yield score, anomaly_map
