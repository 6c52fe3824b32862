"""How a model runs, as opposed to what it has learned.

Device, arithmetic precision, batch size, decoding threads and progress bars change how fast a
model runs on one machine, never what it computes beyond rounding, so they are not
hyper-parameters: they are never saved with a model. ``flawmap.load(directory, device="cuda")``
or ``model.set_runtime(precision="float32")`` choose them for the machine at hand.

This module imports torch only where a setting is turned into torch objects, so that exported
models (:mod:`flawmap.onnx_model`) share it without torch; the device is checked then too.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flawmap.errors import FlawmapError

if TYPE_CHECKING:
    import torch
    from tqdm import tqdm

PRECISIONS = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class Runtime:
    """Where and how a model runs.

    Parameters
    ----------
    device : str
        ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or any other torch device; an exported model runs on
        ``"cpu"`` or ``"cuda[:N]"`` (onnxruntime's CPU or CUDA provider).
    precision : {"auto", "float32", "bfloat16"}
        Arithmetic of the backbone pass, of trained networks and of nearest-neighbour searches.
        ``"auto"`` uses bfloat16 where the hardware computes it natively (GPUs, CPUs with
        AVX512-BF16 or AMX): about 3x faster backbone and 2.5x faster search (bfloat16
        candidates, exact float32 re-rank; see :class:`flawmap.search.TorchSearch`).
        ``"float32"`` gives exact arithmetic everywhere. An exported model has the precision
        it was exported with; only ``"auto"`` applies to it.
    batch_size : int
        Images per backbone pass.
    num_workers : int
        Image-decoding threads.
    progress : bool
        Show progress bars on long steps (on stderr).
    """

    device: str = "cpu"
    precision: str = "auto"
    batch_size: int = 16
    num_workers: int = 2
    progress: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise FlawmapError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.batch_size < 1 or self.num_workers < 1:
            raise FlawmapError(f"batch_size and num_workers must be at least 1, got {self.batch_size} and {self.num_workers}")

    def replace(self, **settings: object) -> "Runtime":
        """A copy with ``settings`` changed (``None`` values are ignored); unknown names are errors."""
        names = {field.name for field in dataclasses.fields(self)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise FlawmapError(f"unknown runtime setting {unknown[0]!r}; choose from: {', '.join(sorted(names))}")
        return dataclasses.replace(self, **{name: value for name, value in settings.items() if value is not None})

    @property
    def torch_device(self) -> torch.device:
        """``device`` as a torch device; FlawmapError if it is none, or is a GPU this torch lacks."""
        import torch

        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as error:
            raise FlawmapError(f"device {self.device!r} is not a torch device ({error})") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise FlawmapError(f"device {self.device!r} asked for, but this torch has no usable CUDA device; use --device cpu")
        return device

    def low_precision_dtype(self) -> torch.dtype | None:
        """bfloat16 when ``precision`` asks for it (or ``"auto"`` finds it fast here), else None."""
        import torch

        if self.precision == "auto":
            return fast_low_precision_dtype(self.torch_device)
        return torch.bfloat16 if self.precision == "bfloat16" else None


def progress_bar(progress: str | None, total: int | None = None, unit: str = "it") -> tqdm:
    """A progress bar described by ``progress`` (on stderr, drawn at most twice a second and
    cleared when closed), or a disabled one for None: how a long step shows that it advances."""
    from tqdm import tqdm

    return tqdm(total=total, desc=progress, disable=progress is None, unit=unit, leave=False, mininterval=0.5, file=sys.stderr)


def autocast(device: torch.device, low_precision: torch.dtype | None) -> torch.autocast:
    """Network arithmetic on ``device``: autocast to ``low_precision``, or plain float32 for None."""
    import torch

    return torch.autocast(device.type, dtype=low_precision or torch.float32, enabled=low_precision is not None)


def fast_low_precision_dtype(device: torch.device) -> torch.dtype | None:
    """bfloat16 where matrix products in it are fast (CUDA, CPUs with AVX512-BF16 or AMX), else None."""
    import torch

    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if _cpu_has_native_bfloat16() else None


@functools.cache
def _cpu_has_native_bfloat16() -> bool:
    try:
        cpu_flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in cpu_flags or "amx_bf16" in cpu_flags
