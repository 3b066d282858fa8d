"""The ``mergekit-vision`` command line: merge, inspect, curve, demo."""
from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from .errors import CalibrationWarning, ConfigError, MergeVisionError

logger = logging.getLogger("mergekit_vision.cli")

DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_MODES = ("naive", "aligned", "reset", "repair")


# ---- shared steps ------------------------------------------------------------------------------------
@contextmanager
def _stage(timings: Dict[str, float], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - t0
    logger.info("%s: %.2fs", name.replace("_", " "), timings[name])


def _load_config(args: argparse.Namespace):
    from .config import load_config

    return load_config(args.config, overrides={"device": args.device, "dtype": args.dtype})


def _check_device(config) -> None:
    import torch

    dev = torch.device(config.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {config.device!r} is not available on this machine "
                          "(torch.cuda.is_available() is False); use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device: {config.device!r} is not available on this machine; use --device cpu")


def _load_inputs(config, timings: Dict[str, float]) -> Tuple[Any, Any, Any, Any, list]:
    """(model_a, model_b, calibration loader, evaluation loader or None, source records)."""
    models, calib, evaluation, sources = _load_all(config, timings)
    return models[0], models[1], calib, evaluation, sources


def _load_all(config, timings: Dict[str, float]) -> Tuple[List[Any], Any, Any, list]:
    """(every model of the config, calibration loader, evaluation loader or None, source records)."""
    from .config import load_data, load_model

    _check_device(config)
    models, sources = [], []
    with _stage(timings, "load_models"):
        for i, mc in enumerate(config.models):
            m, src = load_model(mc, where=f"models[{i}]", dtype=config.torch_dtype)
            models.append(m)
            sources.append(src)
    for i, src in enumerate(sources[1:], 1):
        if src["sha256"] is not None and src["sha256"] == sources[0]["sha256"]:
            logger.warning("models[0] and models[%d] load the same checkpoint (sha256 %s...)%s", i,
                           src["sha256"][:12], ": the merge is that model" if len(sources) == 2 else "")
    a = models[0]
    with _stage(timings, "load_data"):
        calib = load_data(config.calibration, where="calibration", seed=config.seed, model=a)
        evaluation = None
        if config.evaluation is not None:
            evaluation = load_data(config.evaluation, where="evaluation", seed=config.seed, model=a, labels=True)
    return models, calib, evaluation, sources


class _Cast:
    """A re-iterable view of labelled batches with the inputs cast to the models' dtype."""

    def __init__(self, loader, dtype):
        self.loader, self.dtype = loader, dtype

    def __iter__(self):
        for x, y, *_ in self.loader:
            yield x.to(self.dtype), y


def _accuracy(model, loader, config) -> float:
    from .training import evaluate

    device = config.device
    model.to(device)
    try:
        return evaluate(model, _Cast(loader, config.torch_dtype), device=device)["acc"]
    finally:
        model.to("cpu")


# ---- merge -------------------------------------------------------------------------------------------
def _cmd_merge(args: argparse.Namespace) -> int:
    import torch

    from .merge import merge, merge_many
    from .output import check_output_folder, write_output_folder

    t0 = time.perf_counter()
    config = _load_config(args)
    check_output_folder(args.out_dir, "OUT_DIR")  # found before the models are loaded, not after the merge
    timings: Dict[str, float] = {}
    models, calib, evaluation, sources = _load_all(config, timings)
    a = models[0]

    torch.manual_seed(config.seed)
    common = dict(method=config.method, repair=config.repair, device=config.device, progress=not args.quiet,
                  return_report=True, seed=config.seed, taps=config.taps, weight_tol=config.weight_tol,
                  lineage_threshold=config.lineage_threshold, lsq_ridge=config.lsq_ridge,
                  lsq_positions=config.lsq_positions, tap_positions=config.tap_positions,
                  lsq_memory=config.lsq_memory, lsq_logits=config.lsq_logits, rotate_stream=config.rotate_stream)
    with _stage(timings, "merge"):
        if len(models) == 2:
            merged, report = merge(a, models[1], calib, alpha=config.alpha, **common)
        else:
            merged, report = merge_many(models, calib, weights=config.weights, **common)
    extra = [k for k in merged.state_dict() if k not in a.state_dict()]
    if extra:  # repair: stream keeps corrections that do not fold as extra modules
        raise ConfigError(f"repair: {config.repair!r} left {len(extra)} tensors that {config.models[0].model!r} has "
                          f"no place for (e.g. {extra[0]!r}), so the folder would not load into it; nothing was "
                          "written. Use repair: repair (or reset) for a model of exactly the input architecture.")
    metrics = None
    if evaluation is not None:
        with _stage(timings, "evaluate"):
            names = ["model_a", "model_b"] if len(models) == 2 else [f"models[{i}]" for i in range(len(models))]
            metrics = {n: _accuracy(m, evaluation, config) for n, m in zip(names, models)}
            metrics.update(merged=_accuracy(merged, evaluation, config), samples=len(evaluation.dataset))
        shown = ["A", "B"] if len(models) == 2 else names
        logger.info("accuracy: %s, merged %.2f%% (%d samples)",
                    ", ".join(f"{t} {100 * metrics[n]:.2f}%" for t, n in zip(shown, names)), 100 * metrics["merged"],
                    metrics["samples"])
    report.sources = sources
    # the merge's own stages (trace, pass_ab, match, ...) sit inside "merge"
    report.timings = {"load_models": timings["load_models"], "load_data": timings["load_data"],
                      **report.timings, **{k: v for k, v in timings.items() if k not in ("load_models", "load_data")}}
    args.writing_started = True  # from here on an interrupt can leave OUT_DIR incomplete
    with _stage(timings, "write_output"):
        write_output_folder(args.out_dir, merged, config, report, model_name=config.models[0].arch,
                            library=config.models[0].library, metrics=metrics)
    logger.info("done: %s in %.1fs", args.out_dir, time.perf_counter() - t0)
    return 0


# ---- curve -------------------------------------------------------------------------------------------
def _cmd_curve(args: argparse.Namespace) -> int:
    import torch

    from .export import write_json_atomic
    from .output import check_output_folder

    from .evaluate import interpolation_curve, plot_curve

    config = _load_config(args)
    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f"--out '{out}' is a folder; give the PNG's file path, e.g. {out / 'curve.png'}")
    check_output_folder(out.parent, "the folder of --out")  # before the models are loaded and evaluated
    if len(config.models) != 2:
        raise ConfigError(f"{args.config}: curve interpolates between two models, (1 - alpha)·A + alpha·B; the "
                          f"config has {len(config.models)}. Keep the two whose path you want, or use merge for "
                          "all of them")
    if config.evaluation is None:
        raise ConfigError(f"{args.config}: evaluation: missing — curve measures accuracy along the path: give "
                          "evaluation: {path: DATA, split: test} (the same keys as calibration)")
    timings: Dict[str, float] = {}
    a, b, calib, evaluation, _ = _load_inputs(config, timings)
    a.to(config.device)
    b.to(config.device)
    if config.torch_dtype != torch.float32:
        evaluation = _Cast(evaluation, config.torch_dtype)
    with _stage(timings, "curve"):
        curve = interpolation_curve(a, b, evaluation, calib_loader=calib, alphas=tuple(args.alphas),
                                    modes=tuple(args.modes), method=config.method, progress=not args.quiet,
                                    rotate_stream=config.rotate_stream, lsq_logits=config.lsq_logits)
    print(curve.table())
    mids = [(m, curve.barrier(m)["mid"]) for m in curve.modes]
    if all(v is not None for _, v in mids):
        print("accuracy barrier at alpha=0.5 (mean endpoint minus midpoint, points): "
              + ", ".join(f"{m} {100 * v:.2f}" for m, v in mids))
    write_json_atomic(out.with_suffix(".json"), curve.to_dict())
    if importlib.util.find_spec("matplotlib") is None:  # an optional extra
        logger.warning("matplotlib is not installed, so no plot: pip install 'mergekit-vision[plot]'. "
                       "The numbers are in %s", out.with_suffix(".json"))
    else:
        plot_curve(curve, out)
        logger.info("wrote %s and %s", out, out.with_suffix(".json"))
    return 0


# ---- inspect, demo -----------------------------------------------------------------------------------
def _cmd_inspect(args: argparse.Namespace) -> int:
    import torch

    from .sources import create_model
    from .trace import trace_permutation_spec

    model = create_model(args.model, kwargs={"num_classes": args.num_classes} if args.num_classes else None)
    shape = (1, args.in_chans, args.size, args.size)
    x = torch.randn(*shape)
    try:
        with torch.no_grad():
            model.eval()(x)
    except Exception as exc:  # the model's own message, and the input size it was built for
        own = _built_for_size(model)
        fix = (f"it was built for {own}-px inputs: pass --size {own}" if own and own != args.size
               else "pass --size and --in-chans that fit it")
        raise ConfigError(f"{args.model} does not run on an input of shape {shape} "
                          f"({type(exc).__name__}: {str(exc).strip()[:200]}); {fix}") from None
    spec = trace_permutation_spec(model, x)
    print(spec.summary())
    print(spec.table(show_frozen=not args.free_only))
    if args.members:
        for g in spec.groups:
            print(f"\n[{g.name}] size={g.size} blocks={g.blocks}" + (f" frozen: {g.reason}" if g.frozen else ""))
            for m in g.members:
                print(f"    {m}")
    return 0


def _built_for_size(model) -> Optional[int]:
    """The input size a timm model's pretrained config names (ViTs: 224), else None."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return int(size[-1]) if size else None


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if args.device not in (None, "cpu") or args.dtype not in (None, "float32"):
        # the demo's models are a few hundred kilobytes on 16-pixel digits: a GPU or another dtype would
        # change nothing but the last digits; merge and curve take --device/--dtype
        raise ConfigError(f"demo runs on the CPU in float32 (got --device {args.device or 'cpu'} --dtype "
                          f"{args.dtype or 'float32'}); --device and --dtype apply to merge and curve")
    results = run_demo(Path(args.out), quiet=args.quiet)
    if isinstance(results, dict) and results.get("table"):
        print(results["table"])
    return 0


# ---- parser ------------------------------------------------------------------------------------------
def _floats(text: str) -> List[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0,0.5,1, got {text!r}") from None


def _names(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _add_global_flags(p: argparse.ArgumentParser, suppress: bool) -> None:
    # The same flags on the main parser and on each subcommand, so they work before or after it;
    # SUPPRESS on the subcommand keeps a value given before it.
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    p.add_argument("-q", "--quiet", action="store_true", default=d(False),
                   help="no progress bars; log warnings and errors only")
    p.add_argument("-v", "--verbose", action="store_true", default=d(False), help="debug logging")
    p.add_argument("--device", default=d(None), help="override the config's device (cpu, cuda, cuda:1, mps)")
    p.add_argument("--dtype", default=d(None), help="override the config's dtype (float32, float16, bfloat16, float64)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mergekit-vision", description=__doc__,
                                epilog="Config reference: docs/config.md. Errors exit with code 2.")
    _add_global_flags(p, suppress=False)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pm = sub.add_parser("merge", help="merge the models of a YAML config (two or more) into an output folder",
                        description="Merge the models of CONFIG and write OUT_DIR: model.safetensors, "
                                    "config.json, mergekit_vision_config.yml, merge_report.json, README.md.")
    pm.add_argument("config", help="YAML merge config (docs/config.md)")
    pm.add_argument("out_dir", help="output folder (created; files of an earlier run are replaced)")
    _add_global_flags(pm, suppress=True)
    pm.set_defaults(func=_cmd_merge)

    pi = sub.add_parser("inspect", help="print a model's permutation groups")
    pi.add_argument("model", help="timm:NAME, torchvision:NAME, mkv:NAME (this package's small models)")
    pi.add_argument("--size", type=int, default=64, help="example input size (pixels)")
    pi.add_argument("--in-chans", type=int, default=3)
    pi.add_argument("--num-classes", type=int, default=None)
    pi.add_argument("--free-only", action="store_true", help="hide frozen groups")
    pi.add_argument("--members", action="store_true", help="list every member of every group")
    _add_global_flags(pi, suppress=True)
    pi.set_defaults(func=_cmd_inspect)

    pc = sub.add_parser("curve", help="accuracy along the interpolation path, and the barrier",
                        description="Evaluate (1 - alpha)·A + alpha·B on the config's evaluation set for each "
                                    "mode; print the table and the barriers, save a PNG and a JSON.")
    pc.add_argument("config", help="YAML merge config with an evaluation: section")
    pc.add_argument("--out", default="curve.png", help="PNG path (the numbers go to the same name with .json)")
    pc.add_argument("--alphas", type=_floats, default=list(DEFAULT_ALPHAS), help="e.g. 0,0.25,0.5,0.75,1")
    pc.add_argument("--modes", type=_names, default=list(DEFAULT_MODES), help="e.g. naive,aligned,reset,repair")
    _add_global_flags(pc, suppress=True)
    pc.set_defaults(func=_cmd_curve)

    pd = sub.add_parser("demo", help="train two small models, merge them, show the result")
    pd.add_argument("--out", default="mergekit_vision_demo", help="output folder")
    _add_global_flags(pd, suppress=True)
    pd.set_defaults(func=_cmd_demo)
    return p


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        return msg if record.levelno == logging.INFO else f"{record.levelname.lower()}: {msg}"


@contextmanager
def _logging_to_stderr(args: argparse.Namespace) -> Iterator[None]:
    """The package's log records go to stderr (other libraries keep Python's default: warnings and up);
    the logger is restored afterwards, so ``main()`` can be called in-process."""
    log = logging.getLogger("mergekit_vision")
    saved = log.handlers[:], log.level, log.propagate
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.WARNING if args.quiet else (logging.DEBUG if args.verbose else logging.INFO))
    with warnings.catch_warnings():
        # the library's own warnings (weak calibration evidence) as one log line each, --quiet included
        warnings.simplefilter("always", CalibrationWarning)
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, CalibrationWarning):
                log.warning("warning: %s", message)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        try:
            yield
        finally:
            log.handlers[:], log.level, log.propagate = saved


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with _logging_to_stderr(args):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except MergeVisionError as exc:
        logger.debug("traceback", exc_info=True)
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)  # one line
        return 2
    except KeyboardInterrupt:
        print("error: interrupted" + _left_behind(args), file=sys.stderr)
        return 130


def _left_behind(args: argparse.Namespace) -> str:
    """What an interrupted ``merge`` left in OUT_DIR. Every file is written atomically and README.md
    last (removed first), so a folder with README.md is complete; before the writing starts the
    folder is not touched at all."""
    from .output import CARD_NAME

    if not getattr(args, "out_dir", None):
        return ""
    out = Path(args.out_dir)
    complete = (out / CARD_NAME).is_file()
    if getattr(args, "writing_started", False):
        return (f"; {out} holds a complete result ({CARD_NAME} is there)" if complete else
                f"; {out} is incomplete (no {CARD_NAME}): run the merge again")
    if not out.exists():
        return f"; nothing was written ({out} was not created)"
    return f"; nothing was written to {out}" + (", its earlier complete result is untouched" if complete else "")


if __name__ == "__main__":
    sys.exit(main())
