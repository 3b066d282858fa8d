"""merge(): the pipeline, top to bottom.

trace spec -> one lockstep pass over A and B (matching moments, REPAIR targets) -> assignments ->
permute B -> interpolate -> one pass over the interpolated net with corrections acting -> fuse.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import sys
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import check_reiterable, iter_inputs
from .engine import Lockstep, bind, shared_graph
from .errors import ArchitectureMismatchError, ConfigError, DataError, MergeVisionError, NumericalError
from .interpolate import interpolate_state_dicts
from .match.activation import match_blind_by_weights
from .match.evidence import check_matching_evidence, check_site_evidence
from .match import (LINEAGE_THRESHOLD, TAP_POLICIES, ChannelMoments, PairCollector, lineage_cosine, lineage_keys,
                    match_from_correlations, match_weights, shared_lineage, WEIGHT_TOL)
from .permute import permute_state_dict
from .repair import (CorrectionPass, Target, affine_correction, find_sites, fuse_affine, fuse_bn_correction, fuse_reset,
                     permute_channel_stats)
from .repair.correct import ChannelAffine, foldable_addends
from .repair.sites import bn_eval, bn_forward
from .report import GroupReport, MergeReport, SiteReport
from .spec import PermutationSpec
from .trace import trace_permutation_spec

logger = logging.getLogger(__name__)

METHODS = ("activation", "weight", "none")
REPAIR_MODES = ("repair", "reset", "stream", "none")


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


def input_scale_hint(x: Optional[torch.Tensor]) -> str:
    """Where non-finite values come from once both models' weights are known to be finite: the inputs."""
    scale = ""
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel():
        scale = f" (|x| reaches {float(x.detach().abs().amax()):.3g} in a batch; normalized images are of order 1)"
    return ("both models' weights are finite, so the inputs are the likely cause: check the calibration data's "
            f"scale{scale} and pass images normalized as in training, e.g. with torchvision.transforms.Normalize"
            "(mean, std).")


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


def _repair_mode(repair: Union[bool, str, None]) -> str:
    if repair is True:
        return "repair"
    if repair in (False, None):
        return "none"
    if repair not in REPAIR_MODES:
        raise ConfigError(f"unknown repair mode {repair!r}; valid: {', '.join(REPAIR_MODES)} (or True/False)")
    return repair


@contextmanager
def _timer(timings: Dict[str, float], name: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
        logger.info("%s: %.2fs", name, timings[name])


def _batches(loader, *, max_batches, max_samples, device, dtype, desc, progress):
    it = iter_inputs(loader, max_batches=max_batches, max_samples=max_samples, device=device, dtype=dtype)
    return tqdm(_varying(it), desc=desc, disable=not progress, leave=False, unit="batch")


def _varying(batches):
    """The batches, and a DataError at the end of a pass whose floating inputs never varied."""
    lo = hi = None
    for x in batches:
        if x.is_floating_point():
            b_lo, b_hi = float(x.min()), float(x.max())
            lo, hi = (b_lo, b_hi) if lo is None else (min(lo, b_lo), max(hi, b_hi))
        yield x
    if lo is not None and lo == hi:
        raise DataError(f"the calibration inputs are constant (every value is {lo}): statistics of them "
                        "carry no information about the models. Pass real images, normalized as in training.")


def _check_values(vals, where: str, first_batch: Optional[torch.Tensor] = None):
    """Called once both models' weights passed ``check_finite``: non-finite values come from the inputs."""
    for v in vals:
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v.sum(dtype=torch.float64)):
            raise NumericalError(f"non-finite activations at {where} during calibration; "
                                 + input_scale_hint(first_batch))


def ordinary_tensors(model: nn.Module) -> nn.Module:
    """``model`` itself, or, when it holds inference tensors (a merge called inside
    ``torch.inference_mode()``, a natural place for code that only runs models forward), a copy made
    outside inference mode: autograd refuses inference tensors, so it could not be fine-tuned."""
    if not any(t.is_inference() for t in model.state_dict().values()):
        return model
    with torch.inference_mode(False):
        return copy.deepcopy(model)


# ---- the pipeline ------------------------------------------------------------------------
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
    diagnostic_batches: int = 4,
    fold_stream: bool = True,
    lineage_threshold: Optional[float] = LINEAGE_THRESHOLD,
    taps: str = "all",
) -> Union[nn.Module, Tuple[nn.Module, MergeReport]]:
    """Align ``model_b`` to ``model_a``, interpolate at ``alpha`` and REPAIR the result.

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
    always returns exactly ``model_a``'s architecture. Models wrapped in ``nn.DataParallel``,
    ``DistributedDataParallel`` or ``torch.compile`` are merged as the models inside (``.module``,
    ``._orig_mod``; the wrappers are left as they are): the result is the inner architecture,
    neither wrapped nor compiled.
    ``lineage_threshold``: when the models' conv/linear weights, compared unpermuted, have a median
    cosine similarity at least this (fine-tunes of one checkpoint, FedAvg clients, gossip nodes), their
    channels already correspond: matching is skipped, the report says so (``matching_skipped``,
    ``lineage_cosine``) and REPAIR still runs. None always matches.
    The test compares only the tensors that the spec's free groups permute (``report.lineage_keys``).
    ``taps``: where activation matching looks, "all" (post-activation, residual-add and norm outputs)
    or "lean" (no post-activation taps where a norm output is tapped: about half the statistics work
    and memory on BatchNorm nets; see :mod:`mergekit_vision.match.activation`), or "blocks" (as lean,
    and a residual stream observed once per block, at its adds: the cheapest on bottleneck ResNets).
    ``weight_iters``, ``weight_tol``: method="weight" runs at most this many coordinate-descent sweeps
    and stops early when a sweep adds less than ``weight_tol`` of the objective's improvement so far
    (0: run to a fixed point).
    """
    from . import __version__

    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    _check_matching_options(taps, weight_tol)
    model_a, model_b = unwrap_model(model_a), unwrap_model(model_b)
    mode = _repair_mode(repair)
    if not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise ConfigError(f"alpha must be a number in [0, 1] (the weight of model_b), got {alpha!r}")
    alpha = float(alpha)
    needs_data = method == "activation" or mode != "none"
    if needs_data and calib_loader is None:
        raise DataError(f"method={method!r} with repair={mode!r} needs calibration data: pass calib_loader "
                        "(any iterable of input batches), or use method='weight', repair=False for a data-free merge.")
    if calib_loader is not None:
        check_reiterable(calib_loader)
    check_same_architecture(model_a, model_b)
    check_finite(model_a, "model_a")
    check_finite(model_b, "model_b")

    p0 = next(iter(model_a.parameters()))
    out_device, dtype = p0.device, p0.dtype
    work = torch.device(device) if device is not None else out_device
    timings: Dict[str, float] = {}
    report = MergeReport(method=method, alpha=alpha, repair=mode, version=__version__,
                         sources=[source_info(model_a, "model_a"), source_info(model_b, "model_b")])
    batches = dict(max_batches=max_batches, max_samples=max_samples, device=work, dtype=dtype)

    # never touch the inputs: every stage works on copies
    a = copy.deepcopy(model_a).to(work).eval()
    b = copy.deepcopy(model_b).to(work).eval()

    with _timer(timings, "trace"), torch.no_grad():
        first = example = None
        if calib_loader is not None:
            first = next(iter_inputs(calib_loader, max_batches=1, device=work, dtype=dtype))
            example = first[:1]
        if spec is None:
            if example is None:
                raise DataError("a data-free merge needs the input shape to trace the model: pass spec= "
                                "(mergekit_vision.trace_permutation_spec(model, example)) or a calib_loader")
            try:
                a(example)
            except Exception as exc:
                raise DataError(f"model_a cannot take the first calibration batch (shape {tuple(first.shape)}, "
                                f"{str(first.dtype).removeprefix('torch.')}): {type(exc).__name__}: {exc}") from exc
            spec = trace_permutation_spec(a, example, leaf_modules=leaf_modules)
        gm = shared_graph(a, leaf_modules=leaf_modules)
        sites = find_sites(gm, spec, mode) if mode != "none" else []
    report.frozen_groups = {g.name: g.reason for g in spec.groups if g.frozen}
    if method != "none":
        report.lineage_keys = lineage_keys(spec)
        report.lineage_cosine = lineage_cosine(a.state_dict(), b.state_dict(), report.lineage_keys)
        report.matching_skipped = shared_lineage([report.lineage_cosine], lineage_threshold)
    if report.matching_skipped:
        logger.info("merge: %s; matching skipped (lineage_threshold=None forces it)", report.matching_skipped)
        method = "none"

    # ---- pass 1: A and B together -> matching moments and REPAIR targets --------------------
    collector = PairCollector(spec, taps) if method == "activation" else None
    target_sites = sites if mode in ("repair", "stream") else []  # RESET needs no endpoint statistics
    site_stats: Dict[str, List[ChannelMoments]] = {s.node: [ChannelMoments(), ChannelMoments()] for s in target_sites}
    n_calib = 0
    if collector is not None or target_sites:
        lock = Lockstep([a, b], gm)
        hooks: Dict[str, Any] = dict(collector.hooks()) if collector else {}
        site_hooks, site_over = _site_recorders(target_sites, site_stats,
                                                [dict(a.named_modules()), dict(b.named_modules())],
                                                collector.known_moments if collector else None)
        for name, h in site_hooks.items():
            hooks[name] = _chain(h, hooks.get(name))  # the site's channel moments first: the tap reuses them
        with _timer(timings, "pass_ab"), torch.no_grad():
            for x in _batches(calib_loader, desc="calibrate A/B", progress=progress, **batches):
                outs = lock.run(x, hooks, override=site_over)
                _check_values(outs, "the models' outputs", first)
                n_calib += x.shape[0]
    report.calibration_samples = n_calib
    if collector is not None:
        check_matching_evidence(((g, node, m) for (g, node), m in collector.moments.items()), n_calib)
    check_site_evidence(((node, m) for node, ms in site_stats.items() for m in ms), n_calib)

    # ---- matching ---------------------------------------------------------------------------
    with _timer(timings, "match"):
        perms: Dict[str, torch.Tensor] = {}
        corrs: Dict[str, torch.Tensor] = {}
        if method == "activation":
            corrs = collector.correlations()
            perms = match_from_correlations(spec, corrs)
        elif method == "weight":
            perms = match_weights(spec, a.state_dict(), b.state_dict(), max_iter=weight_iters, tol=weight_tol,
                                  seed=seed)
    notes: Dict[str, str] = {}
    if method == "activation":  # groups seen only across another group's axis: a pass with B aligned there
        notes = _match_crossed(spec, taps, perms, corrs, lock, calib_loader, batches, progress, timings)
        with _timer(timings, "match"):  # groups the data shows nothing of: their weights decide, not a guess
            notes.update(match_blind_by_weights(spec, corrs, perms, a.state_dict(), b.state_dict(),
                                                max_iter=weight_iters, tol=weight_tol, seed=seed))
    for g in spec.free_groups:
        gr = GroupReport(size=g.size, blocks=g.blocks, note=notes.get(g.name))
        p = perms.get(g.name)
        if p is not None:
            ar = torch.arange(g.size)
            gr.moved = float((p != ar).float().mean())
            if g.name in corrs:
                c = corrs[g.name]
                gr.mean_corr = float(c[ar, p].mean())
                gr.identity_corr = float(c.diagonal().mean())
        report.groups[g.name] = gr

    # ---- permute B, interpolate ------------------------------------------------------------
    with _timer(timings, "interpolate"), torch.no_grad():
        sd_b = permute_state_dict(b.state_dict(), spec, perms) if perms else b.state_dict()
        merged = copy.deepcopy(a)
        merged.load_state_dict(interpolate_state_dicts(a.state_dict(), sd_b, alpha))
        merged.eval()

    # ---- REPAIR -----------------------------------------------------------------------------
    if sites:
        targets = {}
        for s in target_sites:
            sa_, sb_ = site_stats[s.node]
            sb_ = ChannelMoments(sb_.n, permute_channel_stats(sb_.mean, s, perms), permute_channel_stats(sb_.m2, s, perms))
            targets[s.node] = Target((1 - alpha) * sa_.mean + alpha * sb_.mean, (1 - alpha) * sa_.std + alpha * sb_.std)
        # the uncorrected interpolated net runs alongside on a few batches: the variance-collapse diagnostic
        raw = copy.deepcopy(merged) if diagnostic_batches and mode in ("repair", "stream") else None
        models = [merged] + ([raw] if raw is not None else [])
        fix = CorrectionPass(sites, [dict(m.named_modules()) for m in models], targets, mode)
        lock = Lockstep(models, gm)
        n_repair = 0
        with _timer(timings, "pass_repair"), torch.no_grad():
            for i, x in enumerate(_batches(calib_loader, desc=f"{mode} statistics", progress=progress, **batches)):
                active = [0, 1] if (raw is not None and i < diagnostic_batches) else [0]
                lock.run(x, hooks=fix.hooks(), override=fix.overrides(), active=active)
                n_repair += x.shape[0]
        report.calibration_samples = max(report.calibration_samples, n_repair)  # RESET reads data in this pass only
        check_site_evidence(fix.measured.items(), n_repair)
        with _timer(timings, "fuse"), torch.no_grad():
            mods = dict(merged.named_modules())
            explicit: Dict[str, Tuple[torch.Tensor, torch.Tensor, int]] = {}
            for s in sites:
                note = None
                if mode == "reset":
                    fuse_reset(mods[s.module], fix.measured[s.node])
                elif s.kind == "add":
                    a_, c_ = affine_correction(fix.measured[s.node], targets[s.node])
                    addends = foldable_addends(s, gm, mods)
                    if addends is None or not fold_stream:
                        explicit[s.node] = (a_, c_, s.dim)
                        note = "kept as an explicit ChannelAffine module (does not fold exactly)"
                    else:
                        for i, m in enumerate(addends):
                            fuse_affine(m, a_, c_ if i == 0 else torch.zeros_like(c_), "add")
                elif s.kind == "bn":
                    a_, c_ = affine_correction(fix.measured[s.node], targets[s.node])
                    fuse_bn_correction(mods[s.module], a_, c_, fix.measured[s.node])
                else:
                    a_, c_ = affine_correction(fix.measured[s.node], targets[s.node])
                    note = fuse_affine(mods[s.module], a_, c_, s.kind)
                before = None
                if fix.raw[s.node].n:
                    before = float((fix.raw[s.node].var / targets[s.node].std.pow(2).clamp_min(1e-12)).mean())
                report.sites[s.node] = SiteReport(kind=s.kind, module=s.module, var_ratio_before=before, note=note)
        if raw is not None:
            with _timer(timings, "diagnostics"), torch.no_grad():
                _measure_after(merged, gm, sites, targets, report, calib_loader, diagnostic_batches, batches, explicit)
        del raw
        if explicit:
            merged = _with_affines(merged, gm, explicit)

    merged = ordinary_tensors(merged.to(out_device).eval())
    check_merged_finite(merged, first)
    report.timings = timings
    merged.merge_report = report
    logger.info(report.summary())
    return (merged, report) if return_report else merged


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


def _match_crossed(spec, taps, perms, corrs, lock, loader, batches, progress, timings) -> Dict[str, str]:
    """Match the groups whose only taps cross another free group's axis (a token-mixing MLP's hidden
    units): one more pass over A and B with B's values aligned by the permutations found so far, until
    no group gains a usable tap. Returns group -> how it was matched, or why it was left unpermuted."""
    notes: Dict[str, str] = {}
    while True:
        extra = PairCollector(spec, taps, aligned=perms)
        if not extra.plan:
            break
        with _timer(timings, "pass_aligned"), torch.no_grad():
            for x in _batches(loader, desc="calibrate A/B (aligned taps)", progress=progress, **batches):
                lock.run(x, extra.hooks())
        found = extra.correlations()
        corrs.update(found)
        perms.update(match_from_correlations(spec, found))
        for gname, tlist in ((g, [t for n in extra.plan.values() for gg, t in n if gg == g]) for g in found):
            crossed = sorted({a[2] for t in tlist for a in t.across})
            notes[gname] = f"matched at taps whose other axes were first aligned by {', '.join(crossed)}"
    for g in spec.free_groups:
        if g.name not in perms:
            notes[g.name] = ("left in model_b's order (identity): no tap observes its channels with every other "
                             "axis shared or aligned")
            logger.warning("merge: group %s %s", g.name, notes[g.name])
    return notes


def _check_matching_options(taps: str, weight_tol: float) -> None:
    """The matching options merge and merge_many share: a known tap policy, a tolerance >= 0."""
    if taps not in TAP_POLICIES:
        raise ConfigError(f"unknown taps {taps!r}; valid: {', '.join(TAP_POLICIES)}")
    if isinstance(weight_tol, bool) or not isinstance(weight_tol, (int, float)) or not weight_tol >= 0:
        raise ConfigError(f"weight_tol must be a number >= 0 (0: run weight matching to a fixed point), "
                          f"got {weight_tol!r}")


def _chain(first, second):
    if first is None or second is None:
        return second if first is None else first

    def both(node, values):
        r = first(node, values)
        r2 = second(node, values if r is None else r)
        return r2 if r2 is not None else r

    return both


def _site_recorders(sites, site_stats, mods, known_moments=None):
    """Hooks (conv sites) and overrides (BN sites: ``z`` is computed from the BN input, before any
    fused activation, and the node's value made from it) that record each endpoint's site value.
    ``known_moments[(node, k)] = (dim, moments)`` shares each value's channel moments with a matching tap."""
    hooks, overrides = {}, {}
    for site in sites:
        stats = site_stats[site.node]
        if site.kind == "bn":
            def override(node, k, args, kwargs, site=site, stats=stats):
                m = mods[k][site.module]
                z = bn_eval(m, args[0])
                mom = stats[k].observe(z, site.dim)
                out = bn_forward(m, z)
                if known_moments is not None and out is z:
                    known_moments[(node.name, k)] = (site.dim, mom)
                return out
            overrides[site.node] = override
        else:
            def hook(node, values, site=site, stats=stats):
                for k, v in enumerate(values):
                    mom = stats[k].observe(v, site.dim)
                    if known_moments is not None:
                        known_moments[(node.name, k)] = (site.dim, mom)
            hooks[site.node] = hook
    return hooks, overrides


def _with_affines(merged: nn.Module, gm, explicit) -> nn.Module:
    """The merged model as a GraphModule with a ChannelAffine after each add site that did not fold."""
    graph = copy.deepcopy(gm.graph)
    holder = nn.Module()
    for name, (a_, c_, dim) in explicit.items():
        holder.add_module(name, ChannelAffine(a_.to(dtype_of(merged)), c_.to(dtype_of(merged)), dim))
    root = bind(merged, gm)  # the merged model's modules and its own traced constants, if any
    root.add_module("repair_affine", holder)
    for node in list(graph.nodes):
        if node.name in explicit:
            with graph.inserting_after(node):
                new = graph.call_module(f"repair_affine.{node.name}", (node,))
            node.replace_all_uses_with(new, delete_user_cb=lambda u, new=new: u is not new)
    graph.lint()
    out = torch.fx.GraphModule(root, graph, class_name=type(merged).__name__)
    return out


def dtype_of(model: nn.Module) -> torch.dtype:
    return next(iter(model.parameters())).dtype


def _measure_after(merged, gm, sites, targets, report, loader, n_batches, batches, explicit=None):
    stats = {s.node: ChannelMoments() for s in sites}
    mods = dict(merged.named_modules())
    lock = Lockstep([merged], gm)
    explicit = explicit or {}

    def add_hook(node, values):
        site = next(s for s in sites if s.node == node.name)
        v = values[0]
        if node.name in explicit:
            a_, c_, dim = explicit[node.name]
            shape = [1] * v.dim()
            shape[dim] = -1
            v = v * a_.to(v.dtype).view(shape) + c_.to(v.dtype).view(shape)
        stats[site.node].observe(v, site.dim)
        return [v]

    def make(site):
        def override(node, k, args, kwargs):
            m = mods[site.module]
            if site.kind == "bn":
                z = bn_eval(m, args[0])
                stats[site.node].observe(z, site.dim)
                return bn_forward(m, z)
            z = m(*args, **kwargs)
            stats[site.node].observe(z, site.dim)
            return z
        return override

    over = {s.node: make(s) for s in sites if s.kind != "add"}
    hooks = {s.node: add_hook for s in sites if s.kind == "add"}
    kw = dict(batches)
    kw["max_batches"] = min(n_batches, kw["max_batches"] or n_batches)
    for x in iter_inputs(loader, **kw):
        lock.run(x, hooks=hooks, override=over)
    for s in sites:
        t = targets[s.node]
        report.sites[s.node].var_ratio_after = float((stats[s.node].var / t.std.pow(2).clamp_min(1e-12)).mean())
