"""Evaluation along the interpolation path: two models and labelled data in, a ``Curve`` out
(accuracy and loss per alpha for naive averaging, aligned, aligned + RESET, aligned + REPAIR),
its barriers, a text table and a plot.
"""
from __future__ import annotations

import copy
import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset
from tqdm.auto import tqdm

from .data import check_reiterable, iter_inputs
from .errors import ConfigError, DataError, MergeVisionError
from .merge import align, finish_merge, prepare_merge, unwrap_model
from .ops import is_batchnorm
from .options import MergeOptions
from .spec import PermutationSpec
from .trace import trace_permutation_spec
from .training import iter_labelled, labelled_tensors, evaluate

__all__ = ["Curve", "interpolation_curve", "plot_curve", "MODES"]

logger = logging.getLogger(__name__)

# mode -> (match B to A first, merge's repair argument)
MODES: Dict[str, Tuple[bool, Union[bool, str]]] = {
    "naive": (False, False),
    "aligned": (True, False),
    "reset": (True, "reset"),
    "repair": (True, True),
    "lsq": (True, "lsq"),  # least-squares repair (docs/merge.md); not in the default modes
    "stream": (True, "stream"),  # REPAIR plus a correction on every residual add; not in the default modes
}
LABELS = {"naive": "naive average", "aligned": "aligned", "reset": "aligned + RESET", "repair": "aligned + REPAIR",
          "stream": "aligned + REPAIR (+ streams)", "lsq": "aligned + least squares"}
METRICS = ("acc", "loss")


@contextmanager
def quiet_merges():
    """The curve's inner merges log warnings only: the curve shows one progress bar and a line per mode,
    not a merge summary per point (their numbers are in the curve)."""
    loggers = [logging.getLogger(n) for n in ("mergekit_vision.merge", "mergekit_vision.calibration")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@dataclass
class Curve:
    """Accuracy and loss of the merged model at each alpha, per mode (plain data, JSON-able).

    ``acc[mode][i]`` / ``loss[mode][i]`` belong to ``alphas[i]`` (accuracy in [0, 1]); ``endpoints``
    holds the input models' own metrics, ``{"a": {"acc", "loss"}, "b": {...}}``: every barrier is
    measured against their mean. ``notes`` says why a requested mode is missing.
    """

    alphas: List[float]
    acc: Dict[str, List[float]]
    loss: Dict[str, List[float]]
    endpoints: Dict[str, Dict[str, float]]
    notes: Dict[str, str] = field(default_factory=dict)
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def modes(self) -> List[str]:
        return list(self.acc)

    def values(self, mode: str, metric: str = "acc") -> List[float]:
        if metric not in METRICS:
            raise ConfigError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
        table = getattr(self, metric)
        if mode not in table:
            why = f" ({self.notes[mode]})" if mode in self.notes else ""
            raise ConfigError(f"the curve has no mode {mode!r}{why}; it has: {', '.join(table)}")
        return table[mode]

    def mean_endpoint(self, metric: str = "acc") -> float:
        return 0.5 * (self.endpoints["a"][metric] + self.endpoints["b"][metric])

    def barrier(self, mode: str, metric: str = "acc") -> Dict[str, Optional[float]]:
        """``max`` over the path and ``mid`` (alpha = 0.5; None if not sampled) of the mean endpoint
        metric minus the path's (for loss: the path's minus the mean endpoint's). Positive is worse."""
        vals = self.values(mode, metric)
        ref = self.mean_endpoint(metric)
        gaps = [ref - v if metric == "acc" else v - ref for v in vals]
        mid = next((g for a, g in zip(self.alphas, gaps) if abs(a - 0.5) < 1e-9), None)
        return {"max": max(gaps), "mid": mid}

    def reduction(self, mode: str, baseline: str = "aligned", metric: str = "acc") -> Optional[float]:
        """The fraction of ``baseline``'s midpoint barrier that ``mode`` removes (REPAIR's "barrier
        reduction": 1 - barrier(mode) / barrier(aligned)); None without a midpoint or a positive baseline."""
        b, ref = self.barrier(mode, metric)["mid"], self.barrier(baseline, metric)["mid"]
        if b is None or ref is None or ref <= 0:
            return None
        return 1.0 - b / ref

    def table(self) -> str:
        ea, eb = self.endpoints["a"], self.endpoints["b"]
        lines = [f"endpoints: model_a acc {100 * ea['acc']:.2f}% loss {ea['loss']:.4f} | "
                 f"model_b acc {100 * eb['acc']:.2f}% loss {eb['loss']:.4f}"]
        info = [f"{k} {self.meta[k]}" for k in ("method", "eval_samples", "calib_samples") if k in self.meta]
        if info:
            lines.append("  " + ", ".join(info))
        width = max([7] + [len(m) for m in self.modes])
        has_red = "aligned" in self.acc
        for metric, scale, fmt in (("acc", 100.0, "{:7.2f}"), ("loss", 1.0, "{:7.4f}")):
            label = metric + (" %" if metric == "acc" else "")
            head = f"{label:<{width}} " + " ".join(f"a={a:<5.2f}" for a in self.alphas)
            head += " | barrier mid     max"
            if metric == "acc" and has_red:
                head += " | reduction"
            lines.append(head)
            for mode in self.modes:
                row = f"{mode:<{width}} " + " ".join(fmt.format(scale * v) for v in self.values(mode, metric))
                b = self.barrier(mode, metric)
                mid = "      -" if b["mid"] is None else fmt.format(scale * b["mid"])
                row += f" |     {mid} {fmt.format(scale * b['max'])}"
                if metric == "acc" and has_red:
                    r = self.reduction(mode) if mode not in ("naive", "aligned") else None
                    row += " |" + ("        -" if r is None else f"   {100 * r:5.1f}%")
                lines.append(row)
        for mode, note in self.notes.items():
            lines.append(f"note: {mode}: {note}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["barriers"] = {m: {k: self.barrier(m, k) for k in METRICS} for m in self.modes}
        d["reductions"] = {m: self.reduction(m) for m in self.modes if m != "aligned"} if "aligned" in self.acc else {}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Curve:
        return cls(list(d["alphas"]), dict(d["acc"]), dict(d["loss"]), dict(d["endpoints"]),
                   dict(d.get("notes", {})), dict(d.get("meta", {})))


class _Head:
    """The first ``n`` labelled samples of a re-iterable loader, itself re-iterable."""

    def __init__(self, data: Any, n: int, batch_size: int = 512):
        self.data, self.n, self.batch_size = data, n, batch_size

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        seen = 0
        for x, y in iter_labelled(self.data, self.batch_size):
            x, y = x[: self.n - seen], y[: self.n - seen]
            seen += int(y.shape[0])
            yield x, y
            if seen >= self.n:
                return


def _head(data: Any, n: Optional[int]) -> Any:
    if n is None:
        return data
    if n < 1:
        raise DataError(f"max_samples must be >= 1 or None, got {n}")
    tensors = labelled_tensors(data)
    if tensors is not None:
        return TensorDataset(tensors[0][:n], tensors[1][:n])
    return _Head(data, n)


def _check_alphas(alphas: Sequence[float]) -> List[float]:
    out = []
    for a in alphas:
        if not isinstance(a, (int, float)) or isinstance(a, bool) or not 0.0 <= float(a) <= 1.0:
            raise ConfigError(f"alphas must be numbers in [0, 1] (the weight of model_b), got {a!r} in {list(alphas)}")
        out.append(float(a))
    if not out:
        raise ConfigError("alphas is empty; pass e.g. (0.0, 0.25, 0.5, 0.75, 1.0)")
    return out


def interpolation_curve(
    model_a: nn.Module,
    model_b: nn.Module,
    eval_loader: Any,
    *,
    calib_loader: Any = None,
    alphas: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    modes: Sequence[str] = ("naive", "aligned", "reset", "repair"),
    method: str = "activation",
    max_samples: Optional[int] = None,
    calib_samples: Optional[int] = None,
    progress: bool = True,
    spec: Optional[PermutationSpec] = None,
    rotate_stream: bool = False,
    lsq_logits: str = "mean",
) -> Curve:
    """Accuracy and loss of ``merge(model_a, model_b, alpha=...)`` along the path, per mode.

    Modes: "naive" (plain average, no matching), "aligned" (B matched to A once with ``method``,
    the permutation reused at every alpha), "reset" (aligned + BatchNorm statistics re-estimated;
    skipped, with a note, when the models have no BatchNorm), "repair" (aligned + REPAIR), and, on
    request, "stream" (aligned + REPAIR with residual-stream corrections, ``merge(repair="stream")``)
    and "lsq" (aligned + least-squares repair, ``merge(repair="lsq")``).
    ``eval_loader``: labelled data (as :func:`mergekit_vision.training.evaluate` takes it), cut to
    ``max_samples``. ``calib_loader``: data for matching and REPAIR/RESET statistics, cut to
    ``calib_samples``; None uses the evaluation inputs (transductive: pass training data for a
    clean protocol). At alpha = 0 and 1, "naive" and "aligned" are the endpoint models themselves;
    "reset" and "repair" are the endpoints with their statistics re-estimated on the calibration data.
    ``spec``: the permutation spec every merge uses (default: traced from ``model_a``), e.g.
    ``spec.without_heads()`` to measure what aligning attention heads adds. ``rotate_stream``: the matched
    modes also rotate the residual streams where that folds exactly (``merge(rotate_stream=True)``); their
    model A is then A with its LayerNorm affines and layer scales folded (the same function).
    ``lsq_logits``: the "lsq" mode's target for the classifier's logits (``merge(lsq_logits=...)``).
    """
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ConfigError(f"unknown mode(s) {unknown or list(modes)}; valid: {', '.join(MODES)}")
    if method not in ("activation", "weight"):
        raise ConfigError(f"unknown matching method {method!r}; valid: activation, weight")
    alphas = _check_alphas(alphas)
    # the models inside DataParallel / torch.compile, as merge() takes them; the data is read once per
    # mode and for the trace, so a one-shot iterator is refused here rather than silently short a batch
    model_a, model_b = unwrap_model(model_a), unwrap_model(model_b)
    check_reiterable(eval_loader, "eval_loader")  # read once per point
    if calib_loader is not None:
        check_reiterable(calib_loader)
    eval_data = _head(eval_loader, max_samples)
    if calib_loader is None:
        logger.warning("interpolation_curve: no calib_loader; matching and REPAIR statistics use the evaluation "
                       "inputs (pass training data for a clean protocol)")
        calib_loader = eval_data
    p0 = next(iter(model_a.parameters()))
    device = p0.device
    t_start = time.perf_counter()
    timings = {"eval": 0.0, "merge": 0.0, "align": 0.0}

    def score(model):
        t0 = time.perf_counter()
        r = evaluate(model, eval_data, device=device)
        timings["eval"] += time.perf_counter() - t0
        return r

    # trace once: every merge below reuses the spec
    if spec is None:
        example = next(iter_inputs(calib_loader, max_batches=1, device=device, dtype=p0.dtype))[:1]
        spec = trace_permutation_spec(copy.deepcopy(model_a).eval(), example)
    common = dict(max_samples=calib_samples, progress=False, spec=spec)

    curve = Curve(alphas, {}, {}, {"a": score(model_a), "b": score(model_b)})
    curve.meta.update(method=method, calib_samples=None, eval_samples=None, rotate_stream=rotate_stream,
                      lsq_logits=lsq_logits)
    aligned, folded_a = None, model_a
    if any(MODES[m][0] for m in modes):
        t0 = time.perf_counter()
        logger.info("curve: aligning model_b to model_a (%s matching)", method)
        with quiet_merges():
            if rotate_stream:  # A's norms are folded too: both ends of one matching, at weights (1, 0) and (0, 1)
                opts = MergeOptions.create(method=method, repair=False, max_samples=calib_samples, progress=False,
                                           rotate_stream=True)
                prepared = prepare_merge([model_a, model_b], calib_loader, opts, names=["model_a", "model_b"],
                                         spec=spec)
                folded_a, aligned = (finish_merge(prepared, w) for w in ([1.0, 0.0], [0.0, 1.0]))
                curve.meta["rotations"] = aligned.merge_report.rotations
            else:
                aligned = align(model_a, model_b, calib_loader, method=method, **common)
        timings["align"] = time.perf_counter() - t0
        rep = aligned.merge_report
        curve.meta["matched_corr"] = rep.mean_corr
        curve.meta["calib_samples"] = rep.calibration_samples or None
    has_bn = any(is_batchnorm(m) for m in model_a.modules())
    todo = [m for m in modes if has_bn or m != "reset"]
    if len(todo) < len(modes):
        curve.notes["reset"] = "skipped: the models have no BatchNorm (RESET re-estimates BatchNorm statistics)"
    bar = tqdm(total=len(todo) * len(alphas), desc="interpolation curve", disable=not progress, unit="model")
    try:
        for mode in todo:
            matched, repair = MODES[mode]
            a, b = (folded_a, aligned) if matched else (model_a, model_b)
            curve.acc[mode], curve.loss[mode] = [], []
            logger.info("curve: %s at %d alphas", LABELS[mode], len(alphas))
            # the endpoints' statistics do not depend on alpha: measured once per mode, the correction per alpha
            t0 = time.perf_counter()
            with quiet_merges():
                opts = MergeOptions.create(method="none", repair=repair, max_samples=calib_samples, progress=False,
                                           lsq_logits=lsq_logits)
                prepared = prepare_merge([a, b], calib_loader, opts, names=["model_a", "model_b"], spec=spec)
            timings["merge"] += time.perf_counter() - t0
            for alpha in alphas:
                bar.set_postfix_str(f"{LABELS[mode]}, alpha={alpha:.2f}")
                t0 = time.perf_counter()
                with quiet_merges():
                    merged, rep = finish_merge(prepared, [1.0 - alpha, alpha], alpha=alpha, return_report=True)
                timings["merge"] += time.perf_counter() - t0
                r = score(merged)
                curve.acc[mode].append(r["acc"])
                curve.loss[mode].append(r["loss"])
                if rep.calibration_samples:
                    curve.meta["calib_samples"] = rep.calibration_samples
                before = [s.var_ratio_before for s in rep.sites.values() if s.var_ratio_before is not None]
                after = [s.var_ratio_after for s in rep.sites.values() if s.var_ratio_after is not None]
                if before and after:
                    # the merged net's variance over its targets, mean over sites: before the correction
                    # (REPAIR's "variance collapse") and after it
                    vr = curve.meta.setdefault("var_ratio", {}).setdefault(mode, {})
                    vr[f"{alpha:g}"] = [sum(before) / len(before), sum(after) / len(after)]
                bar.update(1)
    finally:
        bar.close()
    curve.meta["eval_samples"] = _count(eval_data)
    timings["total"] = time.perf_counter() - t_start
    curve.meta["timings"] = timings
    return curve


def _count(data: Any) -> Optional[int]:
    """The number of labelled samples, where known without reading the data again."""
    tensors = labelled_tensors(data)
    if tensors is not None:
        return int(tensors[1].shape[0])
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        return len(data)
    return None


_COLORS = {"naive": "#7f7f7f", "aligned": "#1f77b4", "reset": "#ff7f0e", "repair": "#2ca02c", "stream": "#d62728",
           "lsq": "#9467bd"}


def plot_curve(curve: Curve, path: Union[str, Path], *, metric: str = "acc", title: Optional[str] = None) -> Path:
    """Write ``metric`` (test accuracy by default) against alpha, one line per mode, as a PNG."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MergeVisionError("plot_curve needs matplotlib, which the [plot] extra installs: "
                               "pip install 'mergekit-vision[plot]'") from exc
    from .export import atomic_write

    scale = 100.0 if metric == "acc" else 1.0
    fig = Figure(figsize=(5.0, 3.6), dpi=120)
    FigureCanvasAgg(fig)  # a canvas of its own: no pyplot state, no display backend
    ax = fig.add_subplot(1, 1, 1)
    order = sorted(range(len(curve.alphas)), key=lambda i: curve.alphas[i])
    xs = [curve.alphas[i] for i in order]
    for mode in curve.modes:
        ys = curve.values(mode, metric)
        ax.plot(xs, [scale * ys[i] for i in order], marker="o", ms=3.5, lw=1.6, color=_COLORS.get(mode),
                label=LABELS.get(mode, mode))
    ax.plot([0.0, 1.0], [scale * curve.endpoints["a"][metric], scale * curve.endpoints["b"][metric]], ls=":",
            color="black", lw=1.0, label="endpoints")
    ax.set_xlabel("interpolation alpha (weight of model B)")
    ax.set_ylabel("test accuracy (%)" if metric == "acc" else "test loss")
    ax.set_xlim(-0.02, 1.02)
    if metric == "acc":
        ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
