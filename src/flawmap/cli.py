"""The ``flawmap`` command. Thin: parses arguments, calls the Python API, prints.

Method hyper-parameters become flags automatically: every field of every registered method
(``coreset_fraction`` -> ``--coreset-fraction``; a boolean ``align`` has ``--no-align`` too) is a
flag, and giving one to a method that does not have it is an error. User mistakes end in one
``flawmap: error: ...`` line and exit code 2.

Without the torch extra (``pip install "flawmap[runtime]"``) the parser is built without torch:
``predict``, ``evaluate``, ``info``, ``report``, ``serve`` and ``score`` run exported ``.onnx``
models, and the commands that need torch (``fit``, ``export``, ``demo``, ...) end in one error line
naming the extra to install.

The workflows are library functions (:func:`flawmap.prediction_folder.write_predictions`,
:func:`flawmap.demo.run_demo`, :func:`flawmap.model_card.model_card`, ...); each function here
imports what it uses when it runs, so listing the commands imports nothing heavy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from flawmap import io
from flawmap._version import __version__
from flawmap.deprecation import warn_renamed
from flawmap.errors import FlawmapError
from flawmap.outputs import check_writable

if typing.TYPE_CHECKING:
    from flawmap.model_card import ModelCard
    from flawmap.models import AnomalyModel
    from flawmap.prediction import Predictor
    from flawmap.registry import Registry
    from flawmap.runtime import Runtime

#: What each command does (its help line; the list of commands needs nothing else).
COMMAND_HELP = {
    "fit": "learn normality from good images and save a model",
    "evaluate": "compute metrics of a model on a dataset's test split",
    "predict": "score images and write heat-map overlays",
    "info": "describe a saved model (its model card): method, parameters, training, threshold and its calibration",
    "calibrate": "re-calibrate a model's threshold on new good images, without refitting",
    "export": "write a fitted model as one ONNX graph (images -> maps, scores)",
    "demo": "make demo data, fit, evaluate and draw overlays",
    "demo-data": "write the built-in demo dataset (MVTec layout)",
    "benchmark": "fit and evaluate methods on datasets, one fresh process each",
    "serve": "answer HTTP prediction requests (micro-batched; API description at /openapi.json)",
    "report": "score a dataset's test images and write an HTML report",
    "score": "score many images into one Parquet table, here or on a Ray cluster",
}


def _methods() -> Registry | None:
    """The method registry, or None without torch. Imported when a command needs it (torch takes
    seconds), never at import time: each function imports what it uses when it runs, so listing
    the commands stays fast and a test may patch any function where it is defined."""
    try:
        from flawmap.models import METHODS
    except ImportError:  # the torch-free install: the commands that need torch say so when run
        return None
    return METHODS


#: Fields the CLI sets itself (``random_state`` from ``--seed``, ``search_options`` from the
#: repeatable ``--search-option NAME=VALUE``): no flags of their own.
_DEDICATED_FIELDS = {"random_state", "search_options"}
EXIT_USER_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    warnings.formatwarning = _one_line_warning
    # image decoding refuses such images with an error of its own; Pillow's warning would repeat it
    warnings.filterwarnings("ignore", message=".*decompression bomb", module="PIL")
    arguments = sys.argv[1:] if argv is None else argv
    parser = build_parser(commands=_command_in(arguments), method=_fit_method_in(arguments))
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown and args.handler not in _NEEDS_TORCH.values():
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        return args.handler(args) or 0
    except FlawmapError as error:
        print(f"flawmap: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as error:  # the file system refused (full disk, permissions changed mid-run): one line too
        where = f"{error.filename}: " if error.filename else ""
        print(f"flawmap: error: {where}{error.strerror or error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("flawmap: interrupted", file=sys.stderr)
        return 130


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as ``flawmap: warning: ...`` lines, without source lines; while a progress bar is
    drawn (its line has no newline yet) the warning starts on a new line."""
    from tqdm import tqdm

    bar_drawn = any(not bar.disable for bar in list(getattr(tqdm, "_instances", ())))
    return f"{chr(10) if bar_drawn else ''}flawmap: warning: {message}\n"


class _Parser(argparse.ArgumentParser):
    """argparse with flawmap's one error line (``flawmap: error: fit: argument --x: ...``, exit 2)
    instead of a usage block and a second error format."""

    def error(self, message: str) -> typing.NoReturn:
        command = self.prog.removeprefix("flawmap").strip()
        where = f"{command}: " if command else ""
        raise FlawmapError(f"{where}{' '.join(message.split())} (see: {self.prog} --help)")


def _command_in(argv: Sequence[str]) -> bool:
    """Whether ``argv`` names a command (the top level has no option that takes a value)."""
    return any(not str(arg).startswith("-") for arg in argv)


def _fit_method_in(argv: Sequence[str]) -> str | None:
    """The value of ``fit --method X`` (or ``--method=X``) in ``argv``, if any, read before
    parsing: ``fit --method X --help`` then lists X's hyper-parameters with X's defaults."""
    arguments = [str(arg) for arg in argv]
    if "fit" not in arguments:
        return None
    for i, arg in enumerate(arguments):
        if arg == "--method" and i + 1 < len(arguments):
            return arguments[i + 1]
        if arg.startswith("--method="):
            return arg.partition("=")[2]
    return None


def build_parser(commands: bool = True, method: str | None = None) -> argparse.ArgumentParser:
    """The ``flawmap`` parser; with ``commands=False`` the commands without their flags (enough
    for ``--help``, ``--version`` and a missing command, and fast: nothing heavy is imported).
    With ``method`` (a registered one), ``fit --help`` lists only that method's hyper-parameters,
    with its defaults; the others' flags still parse (and are refused by name for it)."""
    parser = _Parser(prog="flawmap", description="Unsupervised visual anomaly detection.")
    parser.add_argument("--version", action="version", version=f"flawmap {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if not commands:
        for name in COMMAND_HELP:
            _command(subparsers, name, None)
        return parser
    _add_commands(subparsers, method)
    return parser


def _add_commands(commands, method: str | None = None) -> None:
    methods = _methods()
    if methods is None:
        _add_runtime_only_commands(commands)
    else:
        _add_torch_commands(commands, method if method in methods else None)
    _add_info_command(commands)
    _add_serve_command(commands)
    _add_report_command(commands)
    _add_score_command(commands)


def _add_torch_commands(commands, method: str | None = None) -> None:
    """Every command, with its flags (method hyper-parameters included; ``method``: see
    :func:`build_parser`)."""
    from flawmap.calibration import MIN_CALIBRATION_IMAGES
    from flawmap.onnx_model import INPUT_DTYPES, WEIGHT_DTYPES

    names = ", ".join(_methods().names())
    fit = _command(commands, "fit", run_fit)
    fit.add_argument("data", nargs="+", type=Path, metavar="DATA_DIR", help="dataset or image folder(s); several train one model")
    fit.add_argument(
        "--method", default=None,
        help=f"one of: {names} (default patchcore); `fit --method X --help` lists X's hyper-parameters",
    )
    fit.add_argument("--out", type=Path, metavar="MODEL_DIR", help="where to save the model (default with --update: that model)")
    fit.add_argument(
        "--update", type=Path, metavar="MODEL_DIR",
        help="add DATA_DIR's good images to this fitted model (partial_fit) instead of fitting a new one",
    )
    fit.add_argument("--force", action="store_true", help="replace the model already in --out")
    fit.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    fit.add_argument(
        "--preset", default=None, metavar="NAME",
        help="a named set of the method's hyper-parameters, e.g. rlr's 'paper'; explicit flags override it",
    )
    fit.add_argument("--skip-invalid", action="store_true", help="skip unreadable images with a warning instead of stopping")
    _add_runtime_flags(fit)
    _add_hyperparameter_flags(fit, method)

    _add_prediction_commands(commands)

    calibrate = _command(commands, "calibrate", run_calibrate)
    calibrate.add_argument("model", type=Path, metavar="MODEL_DIR", help="updated in place unless --out is given")
    calibrate.add_argument(
        "good", nargs="*", type=Path, metavar="GOOD_DIR",
        help=f"folders or files of at least {MIN_CALIBRATION_IMAGES} normal images the model never learned from",
    )
    calibrate.add_argument("--out", type=Path, metavar="MODEL_DIR", help="write the re-calibrated model here instead (MODEL_DIR is left as it is)")
    calibrate.add_argument("--force", action="store_true", help="replace the model already in --out")
    calibrate.add_argument(
        "--restore", action="store_true",
        help="instead of calibrating: put back the calibration the last `calibrate` replaced (`info` lists them)",
    )
    calibrate.add_argument(
        "--allow-training-images", action="store_true",
        help="accept the model's own training images (their scores are in-sample: the threshold comes out too low); `info` says so",
    )
    calibrate.add_argument(
        "--false-alarm-rate", type=float, default=None, metavar="R",
        help="target share of normal images flagged, in (0, 1) (default: the model's)",
    )
    calibrate.add_argument("--skip-invalid", action="store_true", help="skip unreadable images with a warning")
    _add_runtime_flags(calibrate)

    export = _command(commands, "export", run_export)
    export.add_argument("model", type=Path, metavar="MODEL_DIR")
    export.add_argument(
        "--out", type=Path, metavar="FILE",
        help="the .onnx file to write (default MODEL_DIR/model.onnx, which --backend onnx runs)",
    )
    export.add_argument("--force", action="store_true", help="replace --out even if it is not a graph flawmap exported")
    export.add_argument("--opset", type=int, default=None, metavar="INT", help="ONNX opset, at least 18 (default: the exporter's)")
    export.add_argument(
        "--batch", type=_parse_batch, default="dynamic", metavar="dynamic|INT",
        help="any batch size (default), or a graph for exactly INT images",
    )
    export.add_argument(
        "--weight-dtype", default="float32", choices=WEIGHT_DTYPES,
        help="how weights and banks are stored: float16 at half the size; arithmetic stays float32 (default float32)",
    )
    _add_renamed_flag(export, "--precision", "--weight-dtype", choices=WEIGHT_DTYPES)
    export.add_argument(
        "--input-dtype", default="float32", choices=INPUT_DTYPES,
        help="graph input: float32 RGB in [0, 1] (default) or uint8 RGB in [0, 255]",
    )
    _add_quiet_flag(export)

    demo = _command(commands, "demo", run_demo)
    demo.add_argument("--out", type=Path, default=Path("flawmap-demo"), metavar="DIR", help="default ./flawmap-demo")
    demo.add_argument("--method", default="patchcore", help=f"one of: {names}")
    _add_runtime_flags(demo)

    demo_data = _command(commands, "demo-data", run_demo_data)
    demo_data.add_argument("out", type=Path, metavar="OUT_DIR")

    bench = _command(commands, "benchmark", run_benchmark)
    bench.add_argument("data", nargs="+", type=Path, metavar="DATA_DIR", help="MVTec-layout dataset folder(s)")
    bench.add_argument("--methods", default=",".join(_methods().names()), metavar="A,B", help="comma-separated (default: all)")
    bench.add_argument("--json", type=Path, metavar="FILE", help="write the rows as JSON")
    bench.add_argument(
        "--unified", action="store_true",
        help="also fit each method once on all datasets together; rows per mode (unified, per-category) and means",
    )
    bench.add_argument(
        "--param", action="append", default=[], metavar="METHOD.NAME=VALUE",
        help="a method hyper-parameter, e.g. padim.n_features=64 (repeatable)",
    )
    _add_runtime_flags(bench)


def _add_prediction_commands(commands) -> None:
    """``evaluate`` and ``predict``: with torch or without, for model directories or .onnx files."""
    model_help = "a model directory, or an exported .onnx file (runs with onnxruntime, no torch needed)"
    evaluate = _command(commands, "evaluate", run_evaluate)
    evaluate.add_argument("model", type=Path, metavar="MODEL", help=model_help)
    evaluate.add_argument("data", type=Path, metavar="DATA_DIR")
    evaluate.add_argument("--json", type=Path, metavar="FILE", help="write the metrics as JSON ('-': to stdout)")
    evaluate.add_argument("--maps-dir", type=Path, metavar="DIR", help="write each anomaly map (.npy) and scores.json")
    _add_backend_choice(evaluate)
    evaluate.add_argument("--report", type=Path, metavar="DIR", help="also write the HTML report (DIR/index.html)")
    _add_runtime_flags(evaluate)

    predict = _command(commands, "predict", run_predict)
    predict.add_argument("model", type=Path, metavar="MODEL", help=model_help)
    predict.add_argument("images", nargs="+", type=Path, metavar="IMAGE_OR_DIR")
    predict.add_argument(
        "--out", required=True, type=Path, metavar="DIR",
        help="overlays and scores.jsonl go here (replaced as a whole when the run succeeds)",
    )
    predict.add_argument("--force", action="store_true", help="replace --out (and --report) even if they hold files flawmap did not write")
    predict.add_argument("--skip-invalid", action="store_true", help="skip unreadable images with a warning")
    predict.add_argument("--recursive", action="store_true", help="also take images in subfolders of IMAGE_OR_DIR")
    predict.add_argument(
        "--threshold", type=float, default=None, metavar="X", help="flag scores above X (default: the calibrated threshold)"
    )
    _add_backend_choice(predict)
    predict.add_argument("--report", type=Path, metavar="DIR", help="also write the HTML report (DIR/index.html)")
    _add_runtime_flags(predict)


def _add_backend_choice(parser: argparse.ArgumentParser) -> None:
    """``--backend``: the engine that runs a saved model (evaluate, predict, report, serve, score)."""
    from flawmap.loading import BACKENDS

    parser.add_argument(
        "--backend", default="auto", choices=BACKENDS,
        help="torch or onnx (onnxruntime, no torch needed: the .onnx file, or MODEL/model.onnx written by "
        "`flawmap export MODEL`); default auto: torch for a model directory, onnx for a .onnx file",
    )
    _add_renamed_flag(parser, "--runtime", "--backend", choices=BACKENDS)


class _RenamedFlag(argparse.Action):
    """A flag's former spelling, accepted for one release (:mod:`flawmap.deprecation`): a
    ``flawmap: warning:`` line names the new flag, and the value goes where the new flag's would."""

    def __init__(self, option_strings: list[str], dest: str, new_flag: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)
        self.new_flag = new_flag

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        warn_renamed(option_string, self.new_flag)
        setattr(namespace, self.dest, values)


def _add_renamed_flag(parser: argparse.ArgumentParser, old: str, new: str, **options: Any) -> None:
    """Accept ``old``, the former name of flag ``new``, with a deprecation warning (hidden from --help)."""
    parser.add_argument(old, dest=new.removeprefix("--").replace("-", "_"), action=_RenamedFlag, new_flag=new, **options)


def _add_runtime_only_commands(commands) -> None:
    """Without torch: ``evaluate`` and ``predict``, and a stub for each command that needs torch."""
    _add_prediction_commands(commands)
    for name, handler in _NEEDS_TORCH.items():
        _command(commands, name, handler, 'needs the torch extra: pip install "flawmap[torch]"')


def _needs_torch(name: str) -> Callable[[argparse.Namespace], None]:
    def handler(args: argparse.Namespace) -> None:
        from flawmap.loading import require_torch

        require_torch(f"flawmap {name}")

    return handler


def _parse_batch(text: str) -> int | str:
    if text == "dynamic":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'dynamic' or an integer, got {text!r}") from None


def _command(commands, name: str, handler: Callable[[argparse.Namespace], int | None] | None, help_text: str | None = None):
    help_text = help_text or COMMAND_HELP[name]
    sub = commands.add_parser(name, help=help_text, description=help_text)
    sub.set_defaults(handler=handler)
    return sub


# ---------------------------------------------------------------- runtime and hyper-parameter flags
def _add_runtime_flags(parser: argparse.ArgumentParser) -> None:
    from flawmap.runtime import PRECISIONS, Runtime

    group = parser.add_argument_group("runtime (how the model runs here; never saved with it)")
    defaults = Runtime()
    group.add_argument("--device", default=None, help=f"cpu, cuda, cuda:1, ... (default {defaults.device})")
    group.add_argument("--precision", default=None, choices=PRECISIONS, help=f"arithmetic (default {defaults.precision})")
    group.add_argument("--batch-size", type=int, default=None, metavar="INT", help=f"images per backbone pass (default {defaults.batch_size})")
    group.add_argument("--num-workers", type=int, default=None, metavar="INT", help=f"image-decoding threads (default {defaults.num_workers})")
    _add_quiet_flag(group)


def _add_quiet_flag(parser, help_text: str = "no progress bars (also: environment variable TQDM_DISABLE=1)") -> None:
    parser.add_argument("--quiet", action="store_true", help=help_text)


def _progress(args: argparse.Namespace) -> bool:
    """Progress bars, unless ``--quiet`` or the environment variable ``TQDM_DISABLE``."""
    return not args.quiet and os.environ.get("TQDM_DISABLE", "").lower() in ("", "0", "false")


def _runtime(args: argparse.Namespace) -> Runtime:
    """The runtime the flags ask for, with progress bars unless ``--quiet`` or ``TQDM_DISABLE``."""
    from flawmap.runtime import Runtime

    return Runtime(progress=_progress(args)).replace(
        device=args.device, precision=args.precision, batch_size=args.batch_size, num_workers=args.num_workers
    )


def _hyperparameter_fields() -> dict[str, tuple[Any, list[str]]]:
    """Every init field of every method: name -> (type hint, methods that have it)."""
    fields: dict[str, tuple[Any, list[str]]] = {}
    methods = _methods()
    for method in methods.names():
        model_class = methods.get(method)
        hints = typing.get_type_hints(model_class)
        for field in dataclasses.fields(model_class):
            if field.init and field.name not in _DEDICATED_FIELDS:
                fields.setdefault(field.name, (hints[field.name], []))[1].append(method)
    return fields


def _add_hyperparameter_flags(parser: argparse.ArgumentParser, method: str | None = None) -> None:
    """A flag per hyper-parameter: each names the methods it applies to and their defaults; with
    ``method``, only that method's flags are listed, with its defaults (the others are hidden)."""
    title = f"hyper-parameters of {method}" if method else "hyper-parameters (each applies to the methods named)"
    group = parser.add_argument_group(title)
    for name, (hint, methods) in _hyperparameter_fields().items():
        if method is None:
            help_text = f"[{_scope(methods)}] {_defaults_text(name, methods)}"
        else:
            help_text = f"default {_field_default(name, method)}" if method in methods else argparse.SUPPRESS
        if name == "calibration_fraction":
            help_text = _calibration_fraction_help(method)
        if name == "tile_size" and help_text is not argparse.SUPPRESS:
            from flawmap.tiling import AUTO_TILE_FACTOR

            help_text += (": auto tiles by --image-size when resizing would shrink the training images' shorter side "
                          f"more than {AUTO_TILE_FACTOR:g}x, none always resizes, a number sets the tiles' side (docs/tiling.md)")
        metavar = "INT|auto|none" if name == "tile_size" else _metavar(hint)
        group.add_argument(_flag(name), dest=f"param_{name}", type=_value_parser(name, hint), default=None, metavar=metavar, help=help_text)
        if _parser_for(hint) is _parse_bool:  # --no-align is --align false
            group.add_argument(
                "--no-" + name.replace("_", "-"), dest=f"param_{name}", action="store_const", const=False,
                help=argparse.SUPPRESS if help_text is argparse.SUPPRESS else f"the same as {_flag(name)} false",
            )
    from flawmap.search import describe_search_options

    searching = _methods_with("search_options")
    help_text = f"an option of the --search backend (repeatable); each backend's: {describe_search_options()}"
    if method is None:
        help_text = f"[{_scope(searching)}] {help_text}"
    group.add_argument(
        "--search-option", dest="search_options", action="append", default=None, metavar="NAME=VALUE",
        help=help_text if method is None or method in searching else argparse.SUPPRESS,
    )


def _methods_with(name: str) -> list[str]:
    """The methods that have the hyper-parameter ``name``."""
    methods = _methods()
    return [method for method in methods.names() if any(f.name == name for f in dataclasses.fields(methods.get(method)))]


def _calibration_fraction_help(method: str | None) -> str:
    """Which methods ``--calibration-fraction`` changes, and why giving it to another is an error."""
    methods = _methods()
    default = _field_default("calibration_fraction", methods.names()[0])
    holding = [name for name in methods.names() if methods.get(name).holds_out()]
    cross_fitting = ", ".join(name for name in methods.names() if name not in holding)
    reason = (
        f"share of the training images held out to calibrate the threshold, default {default}. The cross-fitting "
        f"methods ({cross_fitting}) hold none out: they score every training image leave-one-out, so for them it "
        "is an error (it would change nothing), tiled or not"
    )
    if method is None:
        return f"[{', '.join(holding)}] {reason}"
    return reason


def _check_calibration_fraction(method: str, params: dict[str, Any], flag: str) -> None:
    """FlawmapError if ``params`` set ``calibration_fraction`` for a fit of ``method`` that holds
    no image out (a cross-fitting method)."""
    if "calibration_fraction" in params and not _methods().get(method).holds_out():
        raise FlawmapError(
            f"{flag} does not apply to method {method!r}: it cross-fits (every training image, tiled or not, "
            "is scored leave-one-out to calibrate the threshold) and holds no image out"
        )


def _scope(methods: list[str]) -> str:
    """``all methods`` or the methods named."""
    return "all methods" if methods == _methods().names() else ", ".join(methods)


def _defaults_text(name: str, methods: list[str]) -> str:
    """``default 20 (mkd 15, rlr 12)``: the default most of ``methods`` share (the first
    method's on a tie), then each method whose default differs."""
    defaults = {method: _field_default(name, method) for method in methods}
    values = list(defaults.values())
    common = max(values, key=values.count)
    others = [f"{method} {value}" for method, value in defaults.items() if value != common]
    return f"default {common}" + (f" ({', '.join(others)})" if others else "")


def _flag(name: str) -> str:
    """The flag of hyper-parameter ``name``: ``coreset_fraction`` -> ``--coreset-fraction``."""
    return "--" + name.replace("_", "-")


def _field_default(name: str, method: str) -> Any:
    field = next(f for f in dataclasses.fields(_methods().get(method)) if f.name == name)
    return field.default


def _parser_for(hint: Any) -> Callable[[str], Any]:
    """A string-to-value converter for a field's type hint."""
    unions = (typing.Union, types.UnionType)
    base = next(arg for arg in typing.get_args(hint) if arg is not type(None)) if typing.get_origin(hint) in unions else hint
    if base is bool:
        return _parse_bool
    if typing.get_origin(base) is tuple:
        element = typing.get_args(base)[0]
        return lambda text: tuple(element(part.strip()) for part in text.split(",") if part.strip())
    return base


def _metavar(hint: Any) -> str:
    parse = _parser_for(hint)
    if parse is _parse_bool:
        return "BOOL"
    return {int: "INT", float: "FLOAT", str: "TEXT"}.get(parse, "A,B")


def _value_parser(name: str, hint: Any) -> Callable[[str], Any]:
    """The converter of hyper-parameter ``name``'s flag and ``--param`` value."""
    return _parse_tile_size if name == "tile_size" else _parser_for(hint)


def _parse_tile_size(text: str) -> int | str:
    """``--tile-size``: pixels, ``auto`` or ``none`` (kept as the text ``"none"``: a flag's None
    means "not given"; :func:`_as_hyperparameter` turns it into None)."""
    lowered = text.lower()
    if lowered in ("auto", "none"):
        return lowered
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of pixels, auto or none, got {text!r}") from None


def _as_hyperparameter(name: str, value: Any) -> Any:
    """A parsed flag or ``--param`` value as the hyper-parameter takes it (``tile_size`` "none": None)."""
    return None if name == "tile_size" and value == "none" else value


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _given_hyperparameters(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """The hyper-parameter flags the user gave; error for flags the method does not have."""
    fields = _hyperparameter_fields()
    given = {name: _as_hyperparameter(name, getattr(args, f"param_{name}")) for name in fields if getattr(args, f"param_{name}") is not None}
    for name in given:
        if method not in fields[name][1]:
            raise FlawmapError(f"{_flag(name)} does not apply to method {method!r} (it applies to: {', '.join(fields[name][1])})")
    _check_calibration_fraction(method, given, "--calibration-fraction")
    if args.search_options is not None:
        from flawmap.search import parse_search_options

        searching = _methods_with("search_options")
        if method not in searching:
            raise FlawmapError(f"--search-option does not apply to method {method!r} (it applies to: {', '.join(searching)})")
        given["search_options"] = parse_search_options(given.get("search", _field_default("search", method)), args.search_options)
    return given


def _preset(method: str, name: str | None) -> dict[str, Any]:
    """The hyper-parameters of ``--preset NAME`` for ``method`` (empty without the flag)."""
    if name is None:
        return {}
    presets = _methods().get(method).presets
    if name not in presets:
        choices = f"its presets are: {', '.join(presets)}" if presets else "it has no presets"
        raise FlawmapError(f"--preset {name}: unknown for method {method!r}; {choices}")
    return presets[name]


# ---------------------------------------------------------------- commands
def run_fit(args: argparse.Namespace) -> None:
    from flawmap.models import create_model

    data = args.data[0] if len(args.data) == 1 else args.data
    out = args.out or args.update
    if out is None:
        raise FlawmapError("give --out MODEL_DIR (where to save the model), or --update MODEL_DIR")
    _check_model_out(out, updated=args.update, force=args.force, hint=f", or --update {out} to add to it")
    if args.update is not None:
        model = _update(args, data)
    else:
        method = args.method or "patchcore"
        _methods().get(method)  # an unknown method fails here, listing the choices, before the flags
        params = {**_preset(method, args.preset), **_given_hyperparameters(args, method)}
        if isinstance(params.get("tile_size"), int):  # tiles go to the network at native resolution unless --image-size is given
            params.setdefault("image_size", params["tile_size"])
        seed = 0 if args.seed is None else args.seed
        model = create_model(method, runtime=_runtime(args), random_state=seed, **params)
        model.fit(data, skip_invalid=args.skip_invalid)
    model.save(out)
    calibration = model.calibration_
    print(
        f"saved {model.method} model to {out} (threshold {model.threshold_:.4f} for a false-alarm rate of "
        f"{calibration.false_alarm_rate:g}{calibration.raised_note()}, {model.n_train_images_} training {'tiles' if model.tile_size_ else 'images'} in {model.n_fits_} "
        f"fit{'s' if model.n_fits_ > 1 else ''}, fit {sum(model.fit_seconds_.values()):.1f} s)"
    )


def _check_model_out(out: Path, *, updated: Path | None, force: bool, hint: str = "") -> None:
    """FlawmapError unless ``out`` can receive a model (:func:`flawmap.io.check_model_target`);
    replacing a model other than ``updated`` (the one the command changes in place) needs --force."""
    if out != updated and (out / io.CONFIG_FILE).is_file() and not force:
        raise FlawmapError(f"{out}: already holds a model; give --force to replace it{hint}")
    io.check_model_target(out)


def _update(args: argparse.Namespace, data: Any) -> AnomalyModel:
    """``fit --update``: load the model and learn from more images with its own hyper-parameters."""
    from flawmap.models import load_model

    given = [_flag(name) for name in _hyperparameter_fields() if getattr(args, f"param_{name}") is not None]
    given += ["--seed"] * (args.seed is not None) + ["--preset"] * (args.preset is not None)
    given += ["--search-option"] * (args.search_options is not None)
    if given:
        raise FlawmapError(f"{given[0]} cannot be changed by --update: an update keeps the model's hyper-parameters")
    model = load_model(args.update, **dataclasses.asdict(_runtime(args)))
    if args.method is not None and args.method != model.method:
        raise FlawmapError(f"{args.update}: is a {model.method} model, not {args.method}")
    return model.partial_fit(data, skip_invalid=args.skip_invalid)


def run_calibrate(args: argparse.Namespace) -> None:
    from flawmap.calibration import check_false_alarm_rate
    from flawmap.models import load_model

    if args.restore == bool(args.good):
        raise FlawmapError("give GOOD_DIR (images to calibrate on) or --restore, not both" if args.restore else
                           "give GOOD_DIR: folders or files of good images to calibrate on (or --restore)")
    if args.restore and (args.false_alarm_rate is not None or args.allow_training_images):
        raise FlawmapError("--restore takes no --false-alarm-rate or --allow-training-images: it puts back a saved calibration")
    if args.false_alarm_rate is not None:
        check_false_alarm_rate(args.false_alarm_rate)
    out = args.model if args.out is None else args.out
    _check_model_out(out, updated=args.model, force=args.force)
    model = load_model(args.model, **dataclasses.asdict(_runtime(args)))
    if args.restore:
        model.restore_calibration()
    else:
        good = args.good[0] if len(args.good) == 1 else args.good
        model.calibrate(
            good, false_alarm_rate=args.false_alarm_rate, skip_invalid=args.skip_invalid,
            allow_training_images=args.allow_training_images,
        )
    model.save(out)
    calibration = model.calibration_
    print(
        f"{'restored' if args.restore else 'calibrated'} {out}: threshold {calibration.threshold:.4f} for a false-alarm rate of "
        f"{calibration.false_alarm_rate:g}{calibration.raised_note()} ({calibration.estimator} quantile of {calibration.n_scores} normal images; "
        f"{len(model.calibration_history_)} earlier calibration(s) kept, `flawmap calibrate {out} --restore` puts the last back)"
    )


def run_evaluate(args: argparse.Namespace) -> None:
    from flawmap.evaluate import evaluate
    from flawmap.loading import load

    for path, folder in ((args.json, False), (args.maps_dir, True)):
        if path is not None and path != Path("-"):
            check_writable(path, folder=folder)
    if args.report is not None:
        check_report_target(args.report)
    model = load(args.model, args.backend, **dataclasses.asdict(_runtime(args)))
    result = evaluate(model, args.data, maps_dir=args.maps_dir)
    print(format_metrics(result), file=sys.stderr if args.json == Path("-") else sys.stdout)
    _write_json(args.json, result)
    if args.report is not None:
        from flawmap.data import open_dataset

        _write_report(model, open_dataset(args.data), args.report, card=_card(model, args.model), metrics=result)


def run_predict(args: argparse.Namespace) -> None:
    from flawmap.loading import load
    from flawmap.prediction_folder import check_predictions_target, write_predictions

    if args.report is not None:
        check_report_target(args.report, force=args.force)
    check_predictions_target(args.out, force=args.force)
    model = load(args.model, args.backend, **dataclasses.asdict(_runtime(args)))
    if args.threshold is not None:
        model.set_threshold(args.threshold)
    written = write_predictions(model, args.images, args.out, recursive=args.recursive, skip_invalid=args.skip_invalid, force=args.force)
    print(f"scored {_count(written.n_scored, 'image')}, {written.n_anomalous} anomalous; overlays and scores.jsonl in {args.out}")
    if args.report is not None:
        _write_report(model, written.samples, args.report, card=_card(model, args.model), skip_invalid=args.skip_invalid, force=args.force)


def _write_json(path: Path | None, document: dict[str, Any]) -> None:
    """Write ``document`` as JSON to ``path``, or to stdout when ``path`` is ``-``; nothing for None."""
    if path is None:
        return
    text = json.dumps(document, indent=2) + "\n"
    if path == Path("-"):
        sys.stdout.write(text)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def run_export(args: argparse.Namespace) -> None:
    from flawmap.export import export_onnx

    out = export_onnx(
        args.model, args.out, opset=args.opset, batch=args.batch, weight_dtype=args.weight_dtype, input_dtype=args.input_dtype,
        force=args.force, progress=_progress(args),
    )
    print(
        f"exported {args.model} to {out} ({out.stat().st_size / 2**20:.1f} MiB, batch {args.batch}, "
        f"{args.input_dtype} input, {args.weight_dtype} weights; checked against the torch model on its calibration images)"
    )


def run_demo_data(args: argparse.Namespace) -> None:
    from flawmap.data import make_demo_data

    check_writable(args.out, folder=True)
    folders = make_demo_data(args.out)
    print("wrote demo categories: " + ", ".join(str(folder) for folder in folders))


def run_demo(args: argparse.Namespace) -> None:
    from flawmap.demo import run_demo as demo

    result = demo(args.out, method=args.method, runtime=_runtime(args))
    print()
    print(format_table(result.rows, ["dataset", "image_auroc", "pixel_auroc", "aupro", "pixel_ap", "predict_ms_per_image"]))
    print(f"\noverlays: {result.overlays}   models: {result.models}")
    print(f"report: {result.report}")


def run_benchmark(args: argparse.Namespace) -> None:
    from flawmap.benchmark import TABLE_COLUMNS, benchmark

    methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    rows = benchmark(
        args.data, methods, params=_method_params(args.param), json_path=args.json, progress=True,
        runtime=_runtime(args).replace(progress=False), unified=args.unified,
    )
    print(format_table(rows, ["mode", *TABLE_COLUMNS] if args.unified else list(TABLE_COLUMNS)))


# ---------------------------------------------------------------- helpers
def _method_params(specs: list[str]) -> dict[str, dict[str, Any]]:
    """``METHOD.NAME=VALUE`` strings to ``{method: {name: typed value}}``."""
    fields = _hyperparameter_fields()
    params: dict[str, dict[str, Any]] = {}
    for spec in specs:
        key, equals, text = spec.partition("=")
        method, dot, name = key.partition(".")
        if not equals or not dot:
            raise FlawmapError(f"--param {spec!r}: expected METHOD.NAME=VALUE")
        if method not in _methods():
            raise FlawmapError(f"--param {spec!r}: unknown method {method!r}; choose one of: {', '.join(_methods().names())}")
        if name not in fields or method not in fields[name][1]:
            raise FlawmapError(f"--param {spec!r}: method {method!r} has no hyper-parameter {name!r}")
        try:
            value = _value_parser(name, fields[name][0])(text)
            params.setdefault(method, {})[name] = _as_hyperparameter(name, value)
        except (ValueError, argparse.ArgumentTypeError) as error:
            raise FlawmapError(f"--param {spec!r}: {error}") from None
    for method, given in params.items():
        _check_calibration_fraction(method, given, f"--param {method}.calibration_fraction")
    return params


def _count(n: int, noun: str) -> str:
    """``1 image``, ``2 images``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def format_metrics(result: dict[str, float]) -> str:
    """One ``name: value`` line per metric."""
    return "\n".join(f"{key:>22}: {_cell(value)}" for key, value in result.items())


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A markdown table of ``rows`` restricted to ``columns``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(column, "")) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    """Floats with four decimals, anything else as ``str``."""
    return f"{value:.4f}" if isinstance(value, float) else str(value)



# ---------------------------------------------------------------- info
def _add_info_command(commands) -> None:
    """``info``: with torch or without (an exported .onnx model needs only onnxruntime)."""
    info = _command(commands, "info", run_info)
    info.add_argument("model", type=Path, metavar="MODEL", help="a model directory, or an exported .onnx file")
    info.add_argument("--json", type=Path, metavar="FILE", help="also write the model card as JSON ('-': stdout only)")


def run_info(args: argparse.Namespace) -> None:
    from flawmap.loading import load

    if args.json not in (None, Path("-")):
        check_writable(args.json, folder=False)
    card = _card(load(args.model), args.model)
    if args.json != Path("-"):
        print(card.to_text())
    _write_json(args.json, card.to_json())


def _card(model: Predictor, path: Path) -> ModelCard:
    """The model card of ``model``, loaded from ``path`` (:mod:`flawmap.model_card`)."""
    from flawmap.model_card import model_card

    return model_card(model, path)


# ---------------------------------------------------------------- serve
def _add_serve_command(commands) -> None:
    """``serve``: with torch or without (an exported .onnx model needs only onnxruntime)."""
    from flawmap.runtime import PRECISIONS
    from flawmap.serve import ServeSettings

    defaults = ServeSettings()
    serve = _command(commands, "serve", run_serve)
    serve.add_argument("model", type=Path, metavar="MODEL", help="a model directory, or an exported .onnx file")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8080, help="default 8080")
    _add_backend_choice(serve)
    serve.add_argument("--max-batch", type=int, default=defaults.max_batch, metavar="INT", help=f"most images per model pass (default {defaults.max_batch})")
    serve.add_argument("--max-queue", type=int, default=defaults.max_queue, metavar="INT", help=f"most requests in progress; more get 503 (default {defaults.max_queue})")
    serve.add_argument("--max-upload-mb", type=float, default=defaults.max_upload_mb, metavar="MB", help=f"largest request body (default {defaults.max_upload_mb:g})")
    serve.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_ms, metavar="MS", help=f"how long a batch waits for more images (default {defaults.max_wait_ms:g})")
    serve.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default cpu)")
    serve.add_argument("--precision", default=None, choices=PRECISIONS, help="arithmetic of a model directory (default auto)")
    serve.add_argument(
        "--log-level", default=None, choices=("critical", "error", "warning", "info", "debug"),
        help="uvicorn's (default info; warning with --quiet)",
    )
    _add_quiet_flag(serve, "no log line per request (uvicorn's log level warning, unless --log-level is given)")


def run_serve(args: argparse.Namespace) -> None:
    from flawmap.serve import ServeSettings, bind_socket, create_app, load_served_model, serve

    settings = ServeSettings(
        max_batch=args.max_batch, max_queue=args.max_queue, max_upload_mb=args.max_upload_mb, max_wait_ms=args.max_wait_ms
    )
    sock = bind_socket(args.host, args.port)
    try:
        served = load_served_model(args.model, args.backend, device=args.device, precision=args.precision, batch_size=settings.max_batch)
        app = create_app(served, settings)
        print(
            f"serving {served.model.method} model {args.model} ({served.backend}) at http://{args.host}:{sock.getsockname()[1]}"
            "/v1/predict (API description: /openapi.json); Ctrl+C stops", flush=True,
        )
        serve(app, settings, sock, log_level=args.log_level or ("warning" if args.quiet else "info"))
    finally:
        sock.close()


# ---------------------------------------------------------------- report
def _add_report_command(commands) -> None:
    """``report``: with torch or without (an exported .onnx model needs only onnxruntime)."""
    report = _command(commands, "report", run_report)
    report.add_argument("model", type=Path, metavar="MODEL", help="a model directory, or an exported .onnx file")
    report.add_argument("data", type=Path, metavar="DATA_DIR", help="a dataset (its labelled test split) or a folder of images")
    report.add_argument("--out", required=True, type=Path, metavar="DIR", help="DIR/index.html and its pictures go here")
    report.add_argument("--force", action="store_true", help="replace DIR/index.html even if flawmap did not write it")
    _add_backend_choice(report)
    _add_runtime_flags(report)


def run_report(args: argparse.Namespace) -> None:
    from flawmap.data import open_dataset, samples_from_paths
    from flawmap.loading import load

    check_report_target(args.out, force=args.force)
    model = load(args.model, args.backend, **dataclasses.asdict(_runtime(args)))
    dataset = open_dataset(args.data)
    data = dataset if dataset.test else samples_from_paths([args.data])
    _write_report(model, data, args.out, card=_card(model, args.model), force=args.force)


def check_report_target(out: Path, *, force: bool = False) -> None:
    from flawmap.html_report import check_report_target

    check_report_target(out, force=force)


def _write_report(model: Any, data: Any, out: Path, **options: Any) -> Path:
    """Write the HTML report of ``model`` on ``data`` (a Dataset or samples) and print where it is."""
    from flawmap.html_report import write_report

    path = write_report(model, data, out, **options)
    print(f"report: {path}")
    return path


# ---------------------------------------------------------------- score
def _add_score_command(commands) -> None:
    """``score``: with torch or without (an exported .onnx model needs only onnxruntime)."""
    score = _command(commands, "score", run_score)
    score.add_argument("model", type=Path, metavar="MODEL", help="a model directory, or an exported .onnx file")
    score.add_argument(
        "inputs", nargs="+", type=Path, metavar="INPUT",
        help="image files, folders (searched recursively), or .txt files listing one image or folder per line",
    )
    score.add_argument("--out", required=True, type=Path, metavar="RESULTS.parquet", help="one row per image (replaced when the run succeeds)")
    score.add_argument("--force", action="store_true", help="replace --out even if it is not a results table flawmap wrote")
    score.add_argument("--engine", default="local", choices=("local", "ray"), help="this process (default), or Ray Data tasks and model actors")
    score.add_argument("--maps-dir", type=Path, metavar="DIR", help="also save each anomaly map as DIR/<name>.npy (float32, the image's size)")
    _add_backend_choice(score)
    ray = score.add_argument_group("Ray (--engine ray; paths must be the same on every node)")
    ray.add_argument("--address", default=None, metavar="ADDR", help="join this Ray cluster (default: start a local one)")
    ray.add_argument("--num-cpus", type=int, default=None, metavar="INT", help="CPUs of the local Ray instance (default: all)")
    ray.add_argument("--actors", type=int, default=None, metavar="INT", help="model actors, each loads the model once (default 1)")
    ray.add_argument("--cpus-per-actor", type=float, default=None, metavar="X", help="CPUs each actor reserves (default 1)")
    _add_runtime_flags(score)


def run_score(args: argparse.Namespace) -> None:
    try:
        from flawmap.scoring import RaySettings, score_files
    except ImportError as error:
        raise FlawmapError(f'flawmap score needs pyarrow ({error}): pip install "flawmap[batch]"') from None

    ray_flags = {"address": args.address, "num_cpus": args.num_cpus, "actors": args.actors, "cpus_per_actor": args.cpus_per_actor}
    given = {name: value for name, value in ray_flags.items() if value is not None}
    if given and args.engine != "ray":
        raise FlawmapError(f"{_flag(next(iter(given)))} applies to --engine ray only")
    summary = score_files(
        args.model, args.inputs, args.out, engine=args.engine, backend=args.backend, runtime=_runtime(args),
        maps_dir=args.maps_dir, cluster=RaySettings(**given), force=args.force,
    )
    print(
        f"scored {_count(summary.n_images, 'image')} ({summary.n_anomalous} anomalous, {_count(summary.n_errors, 'error')}) "
        f"into {summary.out}" + (f"; maps in {args.maps_dir}" if args.maps_dir is not None else "")
    )


#: Commands that need torch, and what they do without it.
_NEEDS_TORCH = {name: _needs_torch(name) for name in ("fit", "calibrate", "export", "demo", "demo-data", "benchmark")}


if __name__ == "__main__":
    sys.exit(main())
