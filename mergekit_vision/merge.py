"""merge_many(): the pipeline, top to bottom; merge() is its two-model call, align() the permutations only.

plan (trace once: spec, graph, REPAIR sites) -> measure (one statistics request served by a ``collect``:
local loader, all-reduce, Flower) -> match (star, MergeMany sweeps, crossed taps) -> average ->
repair (targets ``sum_k w_k stat_k``, correction pass, fuse) -> report.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import sys
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ._version import __version__
from .calibration import (CalibrationPlan, Collect, LocalCollector, Statistics, StatisticsRequest, input_scale_hint,
                          plan_calibration, timed)
from .data import check_reiterable, iter_inputs
from .errors import ArchitectureMismatchError, ConfigError, DataError, NumericalError
from .interpolate import weighted_average
from .match import (WEIGHT_TOL, LINEAGE_THRESHOLD, lineage_cosine, lineage_groups, lineage_keys,
                    match_from_correlations, match_weights, shared_lineage)
from .match.activation import aligned_tap_plan
from .match.activation import match_blind_by_weights
from .match.evidence import check_matching_evidence, check_site_evidence
from .match.rotation import (EXACT_TOL, StreamPlan, function_error, procrustes_rotation, rotate_state_dict,
                             stream_agreement, stream_cross, stream_plans)
from .match.many import (DEFAULT_SWEEPS, IDENTITY_TOL, activation_sweeps, in_reference_order, near_identity,
                         pair_correlations, weight_sweeps)
from .options import METHODS, REPAIR_MODES, MergeOptions
from .permute import clear_tensor_caches, effective_perms, permute_state_dict
from .repair import fuse_corrections, repair_targets, with_affines
from .repair.lsq import find_lsq_sites, logit_sites, warn_underdetermined
from .report import GroupReport, MergeReport, SiteReport
from .spec import PermutationSpec

logger = logging.getLogger(__name__)

__all__ = ["merge", "merge_many", "align", "prepare_merge", "finish_merge", "PreparedMerge", "METHODS", "REPAIR_MODES",
           "check_same_architecture", "check_finite", "state_dict_sha256", "source_info"]


# ---- input checks ------------------------------------------------------------------------
def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside ``nn.DataParallel`` / ``DistributedDataParallel`` (``.module``) and
    ``torch.compile`` (``._orig_mod``), in any nesting; any other model as it is. Nothing is changed:
    the wrapper still holds the same model."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
            continue
        dynamo = sys.modules.get("torch._dynamo.eval_frame")  # imported by torch.compile itself
        if dynamo is not None and isinstance(model, getattr(dynamo, "OptimizedModule", ())):
            model = model._orig_mod
            continue
        return model


def check_same_architecture(model_a: nn.Module, model_b: nn.Module, names=("model_a", "model_b")) -> None:
    """The models have the same state-dict keys and shapes, and each tensor the same dtype and device
    in both (a bfloat16 A and a float32 B would otherwise fail deep inside the first forward pass)."""
    sa, sb = model_a.state_dict(), model_b.state_dict()
    for (ka, va), (kb, vb) in zip(sa.items(), sb.items()):
        if ka != kb:
            raise ArchitectureMismatchError(
                f"{names[1]} differs from {names[0]}: state-dict key {kb!r} where {names[0]} has {ka!r}. "
                "Build both with the same architecture name and kwargs.")
        if va.shape != vb.shape:
            raise ArchitectureMismatchError(
                f"{names[1]} differs from {names[0]} at {ka!r}: {tuple(vb.shape)} vs {tuple(va.shape)}. "
                "Build both with the same architecture name and kwargs (e.g. num_classes, width).")
        if va.dtype != vb.dtype:
            raise ArchitectureMismatchError(
                f"{names[1]} is {str(vb.dtype).removeprefix('torch.')} and {names[0]} "
                f"{str(va.dtype).removeprefix('torch.')} (at {ka!r}); convert one to the other's dtype before "
                f"merging, e.g. {names[1]}.to({va.dtype}).")
        if va.device != vb.device:
            raise ArchitectureMismatchError(
                f"{names[1]} is on {vb.device} and {names[0]} on {va.device} (at {ka!r}); put both on one "
                f"device before merging, e.g. {names[1]}.to({str(va.device)!r}) (device= sets where the merge runs).")
    if len(sa) != len(sb):
        extra = list(sa)[len(sb):] or list(sb)[len(sa):]
        raise ArchitectureMismatchError(
            f"{names[0]} has {len(sa)} tensors and {names[1]} {len(sb)} (first unmatched: {extra[0]!r}). "
            "Build both with the same architecture name and kwargs.")


def check_finite(model: nn.Module, name: str, fix: str = "fix or re-train the checkpoint before merging.") -> None:
    for k, v in model.state_dict().items():
        if v.is_floating_point() and v.numel() and not torch.isfinite(v.sum(dtype=torch.float64)):
            raise NumericalError(f"{name} has NaN or inf values in {k!r}; {fix}")


def check_merged_finite(merged: nn.Module, first_batch: Optional[torch.Tensor]) -> None:
    # interpolating finite weights gives finite weights: what overflowed is a correction's statistics
    check_finite(merged, "the merged model",
                 fix="the REPAIR/RESET statistics overflowed: " + input_scale_hint(first_batch))


def state_dict_sha256(model: nn.Module) -> str:
    """A content hash of the weights (keys, shapes, dtypes, values): which checkpoints were merged."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(f"{k}:{tuple(v.shape)}:{v.dtype};".encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def source_info(model: nn.Module, role: str) -> Dict[str, str]:
    name = getattr(model, "pretrained_cfg", {}).get("architecture") if hasattr(model, "pretrained_cfg") else None
    return {"role": role, "architecture": name or type(model).__name__, "sha256": state_dict_sha256(model)}


def ordinary_tensors(model: nn.Module) -> nn.Module:
    """``model`` itself, or, when it holds inference tensors (a merge called inside
    ``torch.inference_mode()``, a natural place for code that only runs models forward), a copy made
    outside inference mode: autograd refuses inference tensors, so it could not be fine-tuned."""
    if not any(t.is_inference() for t in model.state_dict().values()):
        return model
    with torch.inference_mode(False):
        return copy.deepcopy(model)


def work_copy(model: nn.Module, device: torch.device) -> nn.Module:
    """A merge's working copy of ``model``: on ``device``, in eval mode, never the caller's object. Its
    modules are copied (their flags and caches are its own); its parameters and buffers are the caller's
    tensors where they already live on ``device``: the merge only reads them, and a copy of each input's
    weights would add one model per input to the merge's peak memory."""
    tensors = list(model.parameters()) + list(model.buffers())
    if any(t.device != device for t in tensors):
        return copy.deepcopy(model).to(device).eval()
    return copy.deepcopy(model, {id(t): t for t in tensors}).eval()


# ---- the pipeline ------------------------------------------------------------------------
def merge_many(
    models: Sequence[nn.Module],
    calib_loader: Any = None,
    *,
    weights: Optional[Sequence[float]] = None,
    method: str = "activation",
    reference: Optional[int] = None,
    iterations: Optional[int] = None,
    repair: Union[bool, str] = True,
    max_batches: Optional[int] = None,
    max_samples: Optional[int] = None,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = True,
    return_report: bool = False,
    spec: Optional[PermutationSpec] = None,
    leaf_modules: Iterable = (),
    weight_iters: int = 100,
    weight_tol: float = WEIGHT_TOL,
    seed: int = 0,
    diagnostic_batches: int = 1,
    collect: Optional[Collect] = None,
    example: Optional[torch.Tensor] = None,
    lineage_threshold: Optional[float] = LINEAGE_THRESHOLD,
    taps: str = "all",
    tap_positions: Optional[int] = None,
    fold_stream: bool = True,
    lsq_ridge: float = 1e-3,
    lsq_positions: Optional[int] = 64,
    lsq_memory: Union[int, str, None] = "auto",
    lsq_logits: str = "mean",
    rotate_stream: bool = False,
) -> Union[nn.Module, Tuple[nn.Module, MergeReport]]:
    """Align ``models`` into one coordinate system, average them with ``weights`` and REPAIR the result.

    ``weights``: one non-negative number per model (e.g. clients' sample counts), normalized to sum 1;
    default equal. ``reference``: index of the model every other is first aligned to (default 0).
    ``iterations``: 0 aligns every model to the reference (star); N > 0 then runs up to N MergeMany
    sweeps (more than two models), each re-aligning every model to the weighted average of the others
    (weights: Git Re-Basin's MergeMany; activations: the pairwise correlations of all models, measured
    in the one statistics pass), stopping when a sweep changes no assignment. Default (None): up to
    :data:`DEFAULT_SWEEPS` sweeps, better than star in the measurements of docs/recipes/merge_many.md and
    far less sensitive to the choice of reference. ``method``, ``repair`` (also "stream" and "lsq") and the
    rest as for :func:`merge`; REPAIR's targets are ``sum_k w_k * stat_k`` for means and standard deviations,
    least squares' ``sum_k w_k * y_k`` of the aligned models' values.
    ``collect``: where the statistics come from (default: passes over ``calib_loader``); see
    :class:`~mergekit_vision.calibration.LocalCollector`, :func:`mergekit_vision.distributed.merge_many_distributed`
    and :mod:`mergekit_vision.recipes.flower`. ``example``: an input batch to trace with when no
    ``calib_loader`` is given. Returns a new model of ``models[0]``'s class, in eval mode, on its
    device; ``merged.merge_report`` holds the :class:`~mergekit_vision.report.MergeReport`.
    ``lineage_threshold``: when every model's conv/linear weights have a median cosine at least this
    with the reference's in every free group, compared unpermuted (FedAvg clients of one global model, gossip nodes,
    fine-tunes of one checkpoint), the models already share one coordinate system: matching is skipped
    and the report says why (``matching_skipped``, ``lineage_cosines``; ``lineage_keys``: the tensors
    compared, those the spec's free groups permute). None always matches. Wrapped models
    (``nn.DataParallel``, ``torch.compile``) are merged as the models inside, as by :func:`merge`.
    """
    models = list(models)
    if not models:
        raise ConfigError("merge_many needs at least one model; got an empty sequence")
    opts = MergeOptions.create(
        method=method, repair=repair, iterations=DEFAULT_SWEEPS if iterations is None else iterations,
        max_batches=max_batches, max_samples=max_samples, progress=progress, leaf_modules=leaf_modules,
        weight_iters=weight_iters, weight_tol=weight_tol, seed=seed, diagnostic_batches=diagnostic_batches,
        fold_stream=fold_stream, lineage_threshold=lineage_threshold, taps=taps, tap_positions=tap_positions,
        lsq_ridge=lsq_ridge, lsq_positions=lsq_positions, lsq_memory=lsq_memory, lsq_logits=lsq_logits,
        rotate_stream=rotate_stream)
    w = _normalized_weights(weights, len(models))
    ref = 0 if reference is None else reference
    if isinstance(ref, bool) or not isinstance(ref, int) or not 0 <= ref < len(models):
        raise ConfigError(f"reference must be a model index in 0..{len(models) - 1}, got {reference!r}")
    names = [f"models[{i}]" for i in range(len(models))]
    return _run(models, names, w, ref, calib_loader, opts, device=device, spec=spec, collect=collect,
                example=example, return_report=return_report)


def merge(
    model_a: nn.Module,
    model_b: nn.Module,
    calib_loader: Any = None,
    *,
    alpha: float = 0.5,
    method: str = "activation",
    repair: Union[bool, str] = True,
    max_batches: Optional[int] = None,
    max_samples: Optional[int] = None,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = True,
    return_report: bool = False,
    spec: Optional[PermutationSpec] = None,
    leaf_modules: Iterable = (),
    weight_iters: int = 100,
    weight_tol: float = WEIGHT_TOL,
    seed: int = 0,
    diagnostic_batches: int = 1,
    fold_stream: bool = True,
    lineage_threshold: Optional[float] = LINEAGE_THRESHOLD,
    taps: str = "all",
    tap_positions: Optional[int] = None,
    collect: Optional[Collect] = None,
    lsq_ridge: float = 1e-3,
    lsq_positions: Optional[int] = 64,
    lsq_memory: Union[int, str, None] = "auto",
    lsq_logits: str = "mean",
    rotate_stream: bool = False,
) -> Union[nn.Module, Tuple[nn.Module, MergeReport]]:
    """Align ``model_b`` to ``model_a``, interpolate at ``alpha`` and REPAIR the result: the two-model
    call of :func:`merge_many` (weights ``[1 - alpha, alpha]``, reference ``model_a``).

    Returns a new model of ``model_a``'s class and architecture, in eval mode, on ``model_a``'s device
    and dtype (``merged.merge_report`` holds the report; ``return_report=True`` returns it too), with
    ordinary tensors even when called inside ``torch.inference_mode()`` (it can be fine-tuned).
    ``calib_loader``: any re-iterable of batches (Tensor, (x, y) tuples, a DataLoader); no labels needed.
    A generator or another one-shot iterator raises DataError (the merge reads the data several times).
    ``method``: "activation" (correlation matching), "weight" (data-free), "none" (naive average).
    ``repair``: True/"repair", "reset" (re-estimate BatchNorm statistics only), False/"none", or
    "stream": as "repair" plus a correction on every residual add (the REPAIR authors' ImageNet ResNet
    variant). A stream correction folds exactly into the addends when each is a BatchNorm or biased
    conv used only by the add (projection shortcuts); otherwise (identity shortcuts) it is kept as an
    explicit ``ChannelAffine`` module and the result is a ``torch.fx.GraphModule`` with those extra
    modules (``fold_stream=False`` keeps every stream correction explicit). The default, "repair",
    always returns exactly ``model_a``'s architecture. ``repair="lsq"``: least-squares repair, every
    conv/linear layer (with the BatchNorm after it) refit in graph order, by ridge regression on the
    merged net's own inputs, to the interpolated endpoints' values (docs/merge.md); ``lsq_ridge`` is the
    ridge strength relative to each layer's mean input energy, ``lsq_positions`` the output positions per
    image each fit samples (None: all), ``lsq_memory`` the bytes of activations it holds before spilling
    them to ``TMPDIR`` ("auto": half the available memory; None: no limit; the result is the same),
    ``lsq_logits`` the target of a classifier's logits (a linear layer whose value the model returns):
    "mean", the interpolated logits like every other layer, or "probs", the log of the interpolated class
    probabilities (what the endpoints' ensemble predicts; docs/merge.md). It
    keeps ``model_a``'s architecture; with ``collect=`` the collector must run the walk (``LocalCollector``,
    also all-reduced as by ``merge_many_distributed``, or Flower's ``FlowerCollector``: one statistics
    round per round of fits). Models wrapped in ``nn.DataParallel``,
    ``DistributedDataParallel`` or ``torch.compile`` are merged as the models inside (``.module``,
    ``._orig_mod``; the wrappers are left as they are): the result is the inner architecture,
    neither wrapped nor compiled.
    ``lineage_threshold``: when the models' conv/linear weights, compared unpermuted, have a median
    cosine similarity at least this in every free group (fine-tunes of one checkpoint, FedAvg clients,
    gossip nodes), their channels already correspond: matching is skipped, the report says so (``matching_skipped``,
    ``lineage_cosine``) and REPAIR still runs. None always matches.
    The test compares only the tensors that the spec's free groups permute (``report.lineage_keys``).
    ``diagnostic_batches``: the calibration batches (default 1; 0: none) on which the report's per-site
    variance ratios before and after REPAIR are measured; they cost two forwards of those batches.
    ``taps``: where activation matching looks, "all" (post-activation, residual-add and norm outputs)
    or "lean" (no post-activation taps where a norm output is tapped: about half the statistics work
    and memory on BatchNorm nets; see :mod:`mergekit_vision.match.activation`), or "blocks" (as lean,
    and a residual stream observed once per block, at its adds: the cheapest on bottleneck ResNets).
    ``tap_positions``: at most this many positions per image (pixels, tokens) enter each tap's
    cross-moments, the same random ones for every image of a batch (drawn from the batch's contents,
    so shards, workers and clients sample a batch alike); a tap costs positions x C^2 per image, so
    this bounds the matching statistics of large maps. None: every position. REPAIR's statistics and
    the rest of the merge always see every position.
    ``weight_iters``, ``weight_tol``: method="weight" runs at most this many coordinate-descent sweeps
    and stops early when a sweep adds less than ``weight_tol`` of the objective's improvement so far
    (0: run to a fixed point). ``collect``: where the statistics come from, as for :func:`merge_many`
    (data-parallel workers, federated clients).
    ``rotate_stream``: after the permutations, align each residual stream by an orthogonal map (Procrustes
    on the activations' cross-moments at the stream's adds, fixing the all-ones direction), where it folds
    exactly into the weights: every reader of the stream a LayerNorm over its channels or a linear layer,
    every writer a linear layer (pre-norm transformers: ViT, DeiT, CaiT, torchvision's ViT). LayerNorm
    affines and layer scales are folded into the adjacent linear layers first, in every model (the norms
    keep their tensors, at 1 and 0); other streams keep their permutation, and ``report.rotations`` says
    why. Each rotated model is checked to compute the same function on a calibration batch in float64.
    REPAIR's targets are then measured on the rotated models (one more pass over them).
    """
    opts = MergeOptions.create(
        method=method, repair=repair, iterations=0, max_batches=max_batches, max_samples=max_samples,
        progress=progress, leaf_modules=leaf_modules, weight_iters=weight_iters, weight_tol=weight_tol, seed=seed,
        diagnostic_batches=diagnostic_batches, fold_stream=fold_stream, lineage_threshold=lineage_threshold,
        taps=taps, tap_positions=tap_positions, lsq_ridge=lsq_ridge, lsq_positions=lsq_positions,
        lsq_memory=lsq_memory, lsq_logits=lsq_logits, rotate_stream=rotate_stream)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise ConfigError(f"alpha must be a number in [0, 1] (the weight of model_b), got {alpha!r}")
    alpha = float(alpha)
    return _run([model_a, model_b], ["model_a", "model_b"], [1.0 - alpha, alpha], 0, calib_loader, opts,
                device=device, spec=spec, collect=collect, alpha=alpha, return_report=return_report)


def align(model_a: nn.Module, model_b: nn.Module, calib_loader: Any = None, *, method: str = "activation",
          **kwargs) -> nn.Module:
    """``model_b`` with its channels permuted into ``model_a``'s order: the same function as
    ``model_b``, ready to be interpolated against ``model_a`` at any alpha without matching again
    (``merge(model_a, aligned, calib, alpha=..., method="none", repair=...)``).

    ``method``: "activation" or "weight"; other keyword arguments as for :func:`merge`. The result's
    ``merge_report`` holds the matching report (groups, correlations, timings).
    """
    if method not in ("activation", "weight"):
        raise ConfigError(f"align needs a matching method; valid: activation, weight (got {method!r})")
    # merge at alpha=1 without correction is B permuted, bit for bit: 0*a + 1*b is exact in float64
    return merge(model_a, model_b, calib_loader, alpha=1.0, method=method, repair=False, **kwargs)


def _run(models: List[nn.Module], names: List[str], w: List[float], ref: int, calib_loader: Any,
         opts: MergeOptions, *, device=None, spec=None, collect=None, example=None, alpha=None,
         return_report=False):
    """The one pipeline: plan -> measure -> match (prepare_merge) -> average -> repair -> report (finish_merge)."""
    prepared = prepare_merge(models, calib_loader, opts, names=names, weights=w, reference=ref, device=device,
                             spec=spec, collect=collect, example=example)
    return finish_merge(prepared, w, alpha=alpha, return_report=return_report)


@dataclass
class StreamRotations:
    """rotate_stream's result: the streams that fold a rotation, and each model's ``R`` per stream (the
    reference's: none, only the folds)."""

    plans: Dict[str, StreamPlan]
    rotations: List[Dict[str, torch.Tensor]]


@dataclass
class PreparedMerge:
    """What a merge measured and matched, before averaging: ``finish_merge`` averages it with any
    weights and corrects the result (only its own passes run again: the correction and the diagnostic).
    The endpoints' statistics and the permutations do not depend on the averaging weights, except
    through MergeMany's sweeps (more than two models), which used ``weights``."""

    models: List[nn.Module]             # working copies (work_copy): the inputs' weights, read in place
    names: List[str]
    reference: int
    weights: List[float]
    opts: MergeOptions
    plan: CalibrationPlan
    stats: Statistics                   # the REPAIR sites' moments (the cross-moments are dropped once matched)
    perms: List[Dict[str, torch.Tensor]]
    gather: Collect
    report: MergeReport                 # the fields known before averaging
    out_device: torch.device
    first_batch: Optional[torch.Tensor] = None  # for the messages about the inputs' scale
    rotation: Optional[StreamRotations] = None  # rotate_stream: the streams rotated, each model's R


def prepare_merge(models: Sequence[nn.Module], calib_loader: Any, opts: MergeOptions, *,
                  names: Optional[Sequence[str]] = None, weights: Optional[Sequence[float]] = None,
                  reference: int = 0, device=None, spec=None, collect=None, example=None) -> PreparedMerge:
    """Checks, plan, the statistics pass and the matching of a merge (``weights``: normalized, for the
    sweeps; default equal)."""
    models = [unwrap_model(m) for m in models]  # DataParallel, torch.compile: the model inside
    names = list(names) if names is not None else [f"models[{i}]" for i in range(len(models))]
    w = list(weights) if weights is not None else [1.0 / len(models)] * len(models)
    ref = reference

    k_models, method, mode = len(models), opts.method, opts.repair
    if opts.needs_data and calib_loader is None and collect is None:
        raise DataError(f"method={method!r} with repair={mode!r} needs calibration data: pass calib_loader "
                        "(any iterable of input batches) or collect=, or use method='weight', repair=False "
                        "for a data-free merge.")
    if calib_loader is not None:
        check_reiterable(calib_loader)  # the merge reads the data several times
    for i in range(1, k_models):
        check_same_architecture(models[0], models[i], (names[0], names[i]))
    for name, m in zip(names, models):
        check_finite(m, name)

    p0 = next(iter(models[0].parameters()))
    out_device, dtype = p0.device, p0.dtype
    work = torch.device(device) if device is not None else out_device
    timings: Dict[str, float] = {}
    two = k_models == 2  # two models keep merge()'s names for the passes
    report = MergeReport(method=method, repair=mode, reference=ref, names=list(names), iterations=opts.iterations,
                         version=__version__, sources=[source_info(m, n) for m, n in zip(models, names)])
    ms = [work_copy(m, work) for m in models]  # never touch the inputs (their weights are only read)
    gather = collect or LocalCollector(calib_loader, max_batches=opts.max_batches, max_samples=opts.max_samples,
                                       device=work, progress=opts.progress)
    if mode == "lsq":
        _check_lsq_collect(gather)

    # ---- plan: trace once ------------------------------------------------------------------
    with timed(timings, "trace"):
        first = example  # a batch for the messages about the inputs' scale
        if example is None and calib_loader is not None:
            first = next(iter_inputs(calib_loader, max_batches=1, device=work, dtype=dtype))
            example = first[:1]
        if example is None and spec is None:
            raise DataError("a data-free merge needs an input batch to trace the models: pass calib_loader, "
                            "example= (one input batch) or spec= (mergekit_vision.trace_permutation_spec(model, x))")
        plan = plan_calibration(ms[ref], None if example is None else example.to(work, dtype), spec=spec,
                                repair=mode, leaf_modules=opts.leaf_modules, name=names[ref],
                                first_batch=None if first is example else first)
    spec = plan.spec
    report.frozen_groups = {g.name: g.reason for g in spec.groups if g.frozen}
    if method != "none":
        report.lineage_keys = lineage_keys(spec)
        ref_sd = ms[ref].state_dict()
        by_group = lineage_groups(spec)
        report.lineage_cosines = [1.0 if k == ref else lineage_cosine(ref_sd, m.state_dict(), groups=by_group)
                                  for k, m in enumerate(ms)]
        report.matching_skipped = shared_lineage([c for k, c in enumerate(report.lineage_cosines) if k != ref],
                                                 opts.lineage_threshold)
    if report.matching_skipped:
        logger.info("merge: %s; matching skipped (lineage_threshold=None forces it)", report.matching_skipped)
        method = "none"

    # ---- measure: one pass over all models -> cross-moments, REPAIR endpoint statistics ------
    sweeping = method != "none" and opts.iterations > 0 and k_models > 2
    if method == "activation" and sweeping:  # every pair: the sweeps then need no further pass over the data
        pairs = tuple((i, j) for i in range(k_models) for j in range(i + 1, k_models))
    else:
        pairs = tuple((ref, k) for k in range(k_models) if k != ref) if method == "activation" else ()
    request = StatisticsRequest(pairs=pairs, sites=opts.mode.needs_targets, taps=opts.taps,
                               tap_positions=opts.tap_positions)
    with timed(timings, "pass_ab" if two else "statistics"):
        stats = gather(ms, plan, request) if not request.empty else Statistics()
    report.calibration_samples = stats.samples
    for i, j in pairs:
        check_matching_evidence(((g, node, m) for (g, node, a, b), m in stats.cross.items() if (a, b) == (i, j)),
                                stats.samples, (names[i], names[j]), opts.tap_positions)
    check_site_evidence(((node, m) for (node, _), m in stats.channels.items()), stats.samples)

    # ---- match: star, then MergeMany sweeps, then groups seen only across another group's axis ----
    sds = [m.state_dict() for m in ms]
    perms: List[Dict[str, torch.Tensor]] = [{} for _ in ms]
    corrs: List[Dict[str, torch.Tensor]] = [{} for _ in ms]
    with timed(timings, "match"):
        for k in range(k_models):
            if k == ref or method == "none":
                continue
            if method == "activation":
                corrs[k] = pair_correlations(stats, ref, k)
                perms[k] = match_from_correlations(spec, corrs[k])
            else:
                perms[k] = match_weights(spec, sds[ref], sds[k], max_iter=opts.weight_iters, tol=opts.weight_tol,
                                         seed=opts.seed)
    report.near_identity = near_identity(spec, perms) if method != "none" and k_models > 1 else None
    if report.matching_skipped:
        report.near_identity = True  # identity by the lineage test, without matching
    if sweeping and not report.near_identity:  # star found nothing to align: the sweeps would not either
        with timed(timings, "merge_many_sweeps"):
            if method == "activation":
                activation_sweeps(stats, spec, perms, corrs, w, opts.iterations, opts.seed, report)
            else:
                weight_sweeps(sds, perms, w, spec, opts.iterations, opts.weight_iters, opts.weight_tol, opts.seed,
                              report)
            in_reference_order(spec, perms, corrs, ref)
        logger.info("merge_many: %d sweeps from the %s start (%s)", report.sweeps, report.start,
                    "converged" if report.converged else "not converged")
        report.near_identity = near_identity(spec, perms)
    if report.near_identity and not report.matching_skipped and k_models > 2:
        logger.warning("merge_many: every model's permutation is (nearly) identity (at most %.0f%% of any "
                       "group's channels moved): the models already share one coordinate system, as after "
                       "FedAvg or gossip from a common init.%s", 100 * IDENTITY_TOL,
                       " Skipping the MergeMany sweeps." if sweeping else "")
    notes: List[Dict[str, str]] = [{} for _ in ms]
    if method == "activation":
        notes = _match_crossed(spec, opts.taps, perms, corrs, ref, names, ms, plan, gather, timings)
        with timed(timings, "match"):  # groups the data shows nothing of: their weights decide, not a guess
            for k in range(k_models):
                if k != ref:
                    notes[k].update(match_blind_by_weights(spec, corrs[k], perms[k], sds[ref], sds[k],
                                                           max_iter=opts.weight_iters, tol=opts.weight_tol,
                                                           seed=opts.seed))
    report.rows = _group_rows(spec, perms, corrs, notes)
    rotation = None
    if opts.rotate_stream and method == "activation":
        with timed(timings, "rotate"):
            rotation = _rotate_streams(ms, sds, names, ref, plan, stats, perms,
                                       first if first is not None else example, report)
    elif opts.rotate_stream:
        logger.info("merge: rotate_stream: nothing rotated, matching was skipped (%s)", report.matching_skipped)

    report.timings = timings
    # the cross-moments have served (matching, sweeps, rotation): only the sites' moments go on, so the
    # C x C matrices of every tap are not held through the REPAIR pass
    stats = Statistics(channels=stats.channels, samples=stats.samples)
    return PreparedMerge(ms, names, ref, w, opts, plan, stats, perms, gather, report, out_device, first, rotation)


def finish_merge(prepared: PreparedMerge, weights: Sequence[float], *, alpha: Optional[float] = None,
                 return_report: bool = False) -> Union[nn.Module, Tuple[nn.Module, MergeReport]]:
    """Average the prepared merge's aligned models with ``weights`` (as given: normalize them first),
    correct the result (REPAIR targets ``sum_k w_k stat_k``) and report. ``prepared`` is not changed:
    call it again for other weights."""
    p, opts, w = prepared, prepared.opts, list(weights)
    ms, plan, perms, gather, ref, mode = p.models, p.plan, p.perms, p.gather, p.reference, opts.repair
    spec, two = plan.spec, len(ms) == 2
    report = copy.deepcopy(p.report)
    report.weights = w
    report.alpha = alpha if alpha is not None else (w[1] if two else None)
    timings = report.timings
    sds = [m.state_dict() for m in ms]

    # ---- average --------------------------------------------------------------------------------
    with timed(timings, "interpolate" if two else "average"), torch.no_grad():
        aligned = [permute_state_dict(sd, spec, q) if q else sd for sd, q in zip(sds, perms)]
        if p.rotation is not None:  # norms and layer scales folded in every model, the streams rotated
            aligned = [rotate_state_dict(sd, p.rotation.plans, r) for sd, r in zip(aligned, p.rotation.rotations)]
        merged = copy.deepcopy(ms[ref])
        merged.load_state_dict(weighted_average(aligned, w))
        clear_tensor_caches(merged)  # LeViT's cached attention biases are the reference's otherwise
        merged.eval()

    # ---- repair: targets sum_k w_k stat_k, correction pass, fuse ----------------------------------
    if mode == "lsq":
        raw = copy.deepcopy(merged) if opts.diagnostic_batches and plan.sites else None
        targets = _targets(p, aligned, w, timings, opts.diagnostic_batches) if raw is not None else {}
        with timed(timings, "pass_lsq"):
            _lsq_repair(p, merged, aligned, w, report)
        if raw is not None:
            _variance_diagnostic(gather, plan, raw, merged, targets, {}, opts, report, timings)
            del raw
    elif plan.sites:
        targets = _targets(p, aligned, w, timings) if opts.mode.needs_targets else {}
        with timed(timings, "pass_repair"):
            measured = gather([merged], plan, StatisticsRequest(correction=True, targets=targets or None))
        report.calibration_samples = max(report.calibration_samples, measured.samples)  # RESET: its only pass
        check_site_evidence(((node, m) for (node, _), m in measured.channels.items()), measured.samples)
        raw = copy.deepcopy(merged) if opts.diagnostic_batches and opts.mode.needs_targets else None
        with timed(timings, "fuse"):
            site_notes, explicit = fuse_corrections(
                merged, plan.gm, plan.sites, {s.node: measured.channels[(s.node, 0)] for s in plan.sites}, targets,
                mode, opts.fold_stream)
        report.sites = {s.node: SiteReport(kind=s.kind, module=s.module, note=site_notes[s.node]) for s in plan.sites}
        if raw is not None:
            _variance_diagnostic(gather, plan, raw, merged, targets, explicit, opts, report, timings)
            del raw
        if explicit:
            merged = with_affines(merged, plan.gm, explicit)

    merged = ordinary_tensors(merged.to(p.out_device).eval())  # a merge inside torch.inference_mode() too
    check_merged_finite(merged, p.first_batch)
    report.timings = timings
    merged.merge_report = report
    logger.info(report.summary())
    return (merged, report) if return_report else merged


# ---- stages ---------------------------------------------------------------------------------
def _rotate_streams(ms, sds, names, ref, plan, stats, perms, x, report) -> Optional[StreamRotations]:
    """rotate_stream: the residual streams that fold a rotation exactly, each model's Procrustes ``R``
    against the reference at the streams' adds, and a float64 check of every transformed model on ``x``;
    ``report.rotations`` says what was rotated and why the rest was not."""
    spec = plan.spec
    plans, refused = stream_plans(spec, ms[ref], plan.gm, x[:1], sds)
    report.rotations.update({g: f"not rotated: {why}" for g, why in refused.items()})
    rots: List[Dict[str, torch.Tensor]] = [{} for _ in ms]
    for name, pl in list(plans.items()):
        agree = []
        for k in range(len(ms)):
            if k == ref:
                continue
            cross = stream_cross(stats, pl, ref, k, perms[k].get(name))
            if cross is None:
                report.rotations[name] = "not rotated: the matching pass measured none of its adds (taps=)"
                del plans[name]
                break
            rots[k][name] = procrustes_rotation(cross)
            agree.append(f"{stream_agreement(cross):.3f} -> {stream_agreement(cross, rots[k][name]):.3f}")
        else:
            report.rotations[name] = f"rotated ({len(pl.norms)} norms, {len(pl.scales)} layer scales folded); " \
                                     f"stream cosine at its adds, permuted -> rotated: {', '.join(agree)}"
    if not plans:
        return None
    for k, m in enumerate(ms):  # the same function in float64, or nothing is rotated
        sd = permute_state_dict(sds[k], spec, perms[k]) if perms[k] else sds[k]
        err = function_error(m, rotate_state_dict(sd, plans, {g: r for g, r in rots[k].items() if g in plans},
                                                  torch.float64), x[:8])
        if not err <= EXACT_TOL:
            why = (f"not rotated: the rotated {names[k]} differs from it by {err:.1e} (relative, float64) on a "
                   "calibration batch; an op on the stream does not commute with the rotation")
            report.rotations.update({g: why for g in plans})
            logger.warning("merge: rotate_stream: %s", why)
            return None
    return StreamRotations(plans, [{g: r for g, r in rk.items() if g in plans} for rk in rots])


def _aligned_models(p: PreparedMerge, aligned: List[Dict[str, torch.Tensor]], w: List[float]) -> List[nn.Module]:
    """The aligned models of nonzero weight, as modules (the reference itself where its tensors are its own)."""
    ends = []
    for k, (sd, wk) in enumerate(zip(aligned, w)):
        if wk == 0:
            continue
        if k == p.reference and p.rotation is None:
            ends.append(p.models[k])  # its aligned state dict is its own
        else:
            m = copy.deepcopy(p.models[p.reference])
            m.load_state_dict(sd)
            ends.append(clear_tensor_caches(m).eval())  # caches of the reference's tensors are stale now
    return ends


def _targets(p: PreparedMerge, aligned, w: List[float], timings, max_batches: Optional[int] = None):
    """REPAIR's targets ``sum_k w_k stat_k``: from the matching pass's statistics, permuted; with rotated
    streams from a pass over the rotated models (a rotation mixes channels, so per-channel statistics do not
    follow it), on ``max_batches`` batches where only the diagnostic needs them."""
    plan, spec = p.plan, p.plan.spec
    if not plan.sites:
        return {}
    if p.rotation is None:
        return repair_targets(plan.sites, p.stats, [effective_perms(spec, q) for q in p.perms], w)
    with timed(timings, "pass_rotated"):
        st = p.gather(_aligned_models(p, aligned, w), plan, StatisticsRequest(sites=True, max_batches=max_batches))
    return repair_targets(plan.sites, st, [{} for wk in w if wk], [wk for wk in w if wk])


def _variance_diagnostic(gather, plan, raw, merged, targets, explicit, opts, report, timings) -> None:
    """The uncorrected average next to the fused one, on a few batches: the variance-collapse diagnostic."""
    with timed(timings, "diagnostics"):
        diag = gather([raw, merged], plan, StatisticsRequest(
            sites=True, max_batches=opts.diagnostic_batches,
            affines={n: (a, c) for n, (a, c, _) in explicit.items()} or None))
    for s in plan.sites:
        tv = targets[s.node].std.pow(2).clamp_min(1e-12)
        site = report.sites.setdefault(s.node, SiteReport(kind=s.kind, module=s.module))
        for k, attr in ((0, "var_ratio_before"), (1, "var_ratio_after")):
            got = diag.channels.get((s.node, k))
            if got is not None and got.n:
                setattr(site, attr, float((got.var / tv).mean()))


def _lsq_repair(p: PreparedMerge, merged: nn.Module, aligned: List[Dict[str, torch.Tensor]], w: List[float],
                report: MergeReport) -> None:
    """Least-squares repair of ``merged`` in place (repair/lsq.py): one walk over the calibration batches
    with the aligned endpoints of nonzero weight and the merged net; the fits go into the report."""
    opts, gather = p.opts, p.gather
    ends, ws = _aligned_models(p, aligned, w), [wk for wk in w if wk]
    sites, skipped = find_lsq_sites(p.plan.gm)
    sites = logit_sites(sites, p.plan.gm, opts.lsq_logits)
    if opts.lsq_logits != "mean" and not any(s.target == opts.lsq_logits for s in sites):
        logger.warning("lsq_logits=%r: no linear layer's value is the model's output, so every layer is fitted to "
                       "the interpolated values", opts.lsq_logits)
    res = gather.lsq(merged, ends, ws, p.plan.gm, sites, ridge=opts.lsq_ridge, positions=opts.lsq_positions,
                     seed=opts.seed, memory=opts.lsq_memory)
    if res.spilled_bytes:
        logger.info("least-squares repair: %.0f MB of activations spilled to disk (lsq_memory=%r)",
                    res.spilled_bytes / 1e6, opts.lsq_memory)
    del ends
    report.calibration_samples = max(report.calibration_samples, res.samples)
    report.lsq_round_bytes = list(res.round_bytes)
    thin = warn_underdetermined(res.fits, sites, res.samples)
    for s in sites:
        f = res.fits[s.value]
        notes = []
        if s.target == "probs":
            notes.append("target: the log of the averaged class probabilities (lsq_logits='probs')")
        if f.rows < f.dim:
            notes.append(f"under-determined: {f.rows} patches for {f.dim} unknowns per group (regularized)")
        if f.jitter:
            notes.append(f"singular system: extra diagonal {f.jitter:g} x mean(diag G)")
        note = "; ".join(notes) or None
        site = report.sites.setdefault(s.value, SiteReport(kind=s.kind if s.bn is None else "bn", module=s.module))
        site.module = s.module
        site.residual_before, site.residual_after, site.note = f.residual_before, f.residual_after, note
    for module, why in skipped.items():
        logger.info("least-squares repair: %s %s", module, why)
    del thin


def _check_lsq_collect(gather: Collect) -> None:
    """``repair="lsq"`` walks the data itself: the collector must offer ``lsq(...)`` (LocalCollector,
    FlowerCollector), and one that pools its passes must pool the walk's rounds too."""
    lsq = getattr(gather, "lsq", None)
    if not callable(lsq):
        raise ConfigError(f"repair='lsq' walks the calibration data itself and needs a collect= with an lsq(...) "
                          f"method ({type(gather).__name__} has none): a LocalCollector (local data, or sharded: "
                          "merge_many_distributed) or the Flower recipes' FlowerCollector; with this collect "
                          "function use repair='repair'")
    problem = getattr(gather, "lsq_problem", None)
    why = problem() if callable(problem) else None
    if why:
        raise ConfigError(f"repair='lsq': {why}")


def _normalized_weights(weights: Optional[Sequence[float]], k: int) -> List[float]:
    if weights is None:
        return [1.0 / k] * k
    try:
        w = [float(v) for v in weights]
    except (TypeError, ValueError):
        raise ConfigError(f"weights must be {k} numbers (one per model), got {weights!r}") from None
    if len(w) != k:
        raise ConfigError(f"weights has {len(w)} entries for {k} models; give one weight per model")
    if any(not (v >= 0) or v == float("inf") for v in w) or sum(w) <= 0:
        raise ConfigError(f"weights must be finite, non-negative and not all zero (e.g. sample counts), got {w}")
    total = sum(w)
    return [v / total for v in w]


def _match_crossed(spec, taps, perms, corrs, ref, names, ms, plan, gather, timings) -> List[Dict[str, str]]:
    """Match the groups whose only taps cross another free group's axis (a token-mixing MLP's hidden
    units): one more pass with each model's values aligned to the reference by the permutations found
    so far, until no group gains a usable tap. Returns per model: group -> how it was matched, or why
    it was left unpermuted."""
    notes: List[Dict[str, str]] = [{} for _ in ms]
    others = [k for k in range(len(ms)) if k != ref]
    while others:
        plans = {k: aligned_tap_plan(spec, perms[k], taps) for k in others}
        if not any(plans.values()):
            break
        request = StatisticsRequest(pairs=tuple((ref, k) for k in others if plans[k]), taps=taps,
                                    aligned={k: perms[k] for k in others if plans[k]})
        with timed(timings, "pass_aligned"):
            stats = gather(ms, plan, request)
        gained = False
        for k in others:
            found = stats.correlations(ref, k)
            corrs[k].update(found)
            perms[k].update(match_from_correlations(spec, found))
            gained |= bool(found)
            for gname in found:
                tlist = [t for n in plans[k].values() for gg, t in n if gg == gname]
                crossed = sorted({a[2] for t in tlist for a in t.across})
                notes[k][gname] = f"matched at taps whose other axes were first aligned by {', '.join(crossed)}"
        if not gained:
            break
    for g in spec.free_groups:
        if not g.taps:  # seen by no activation at all (heads inside nn.MultiheadAttention): weight matched next
            continue
        missing = [k for k in others if g.name not in perms[k]]
        for k in missing:
            notes[k][g.name] = (f"left in {names[k]}'s order (identity): no tap observes its channels with every "
                                "other axis shared or aligned")
        if missing:
            logger.warning("merge: group %s %s", g.name, notes[missing[0]][g.name])
    return notes


def _group_rows(spec: PermutationSpec, perms, corrs, notes) -> Dict[str, List[GroupReport]]:
    rows = {}
    for g in spec.free_groups:
        ar = torch.arange(g.size)
        rs = []
        for p, c, n in zip(perms, corrs, notes):
            gr = GroupReport(size=g.size, blocks=g.blocks, note=n.get(g.name))
            if g.name in p:
                gr.moved = float((p[g.name] != ar).float().mean())
                if g.name in c:
                    gr.mean_corr = float(c[g.name][ar, p[g.name]].mean())
                    gr.identity_corr = float(c[g.name].diagonal().mean())
            rs.append(gr)
        rows[g.name] = rs
    return rows


def dtype_of(model: nn.Module) -> torch.dtype:
    return next(iter(model.parameters())).dtype
