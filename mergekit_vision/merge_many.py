"""merge_many(): N models of one architecture -> one, aligned into one coordinate system and averaged.

plan (spec, graph, REPAIR sites) -> statistics pass over all models in lockstep -> star assignments
(every model to the reference) -> optional MergeMany sweeps -> weighted average -> REPAIR with targets
sum_k w_k stat_k -> fuse. Every statistic is a float64 moment obtained through one ``collect`` function,
so data-parallel workers (``distributed.py``) and federated clients (``recipes/flower.py``) can supply
them: moments of shards pool exactly (``a + b``).
"""
from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
from torch import nn

from .data import check_reiterable, iter_inputs
from .engine import Lockstep, shared_graph
from .errors import ConfigError, DataError
from .interpolate import weighted_average
from .match import (LINEAGE_THRESHOLD, ChannelMoments, CrossMoments, lineage_cosine, lineage_keys,
                    match_from_correlations,
                    match_weights, shared_lineage, WEIGHT_TOL, solve_assignment)
from .match.activation import match_blind_by_weights, tap_plan
from .match.evidence import check_matching_evidence, check_site_evidence
from .merge import (METHODS, _batches, _chain, _check_matching_options, _check_values, _repair_mode,
                    _site_recorders, _timer, check_finite, check_merged_finite, check_same_architecture,
                    ordinary_tensors, unwrap_model)
from .permute import permute_state_dict
from .repair import (CorrectionPass, Site, Target, affine_correction, find_sites, fuse_affine, fuse_bn_correction,
                     fuse_reset, permute_channel_stats)
from .report import GroupReport, SiteReport, summary_tail
from .spec import PermutationSpec
from .trace import trace_permutation_spec

logger = logging.getLogger(__name__)

__all__ = ["merge_many", "MergeManyReport", "CalibrationPlan", "plan_calibration", "Statistics",
           "StatisticsRequest", "collect_statistics", "LocalCollector", "repair_targets", "IDENTITY_TOL",
           "DEFAULT_SWEEPS"]

# A model whose every group moved at most this fraction of its channels counts as unpermuted: the
# models already share one coordinate system (FedAvg / gossip from a common init).
IDENTITY_TOL = 0.05
# iterations=None: MergeMany with at most this many sweeps, for both methods (measured on two sets of four
# digits models: activation +REPAIR 89.3% / 90.7% vs star 89.6% / 80.0%, weight 65.8% / 80.7% vs
# 46.7% / 62.2%; star also swings by up to 12 points with the choice of reference; docs/recipes/merge_many.md)
DEFAULT_SWEEPS = 10


# ---- the plan: what every statistics pass walks ------------------------------------------
@dataclass
class CalibrationPlan:
    """The traced graph all models run through, their permutation spec and the REPAIR sites of ``mode``.
    Deterministic for an architecture: a federated client re-derives the same plan from its own copy."""

    spec: PermutationSpec
    gm: fx.GraphModule  # the traced graph (fx.GraphModule of the reference)
    sites: List[Site]
    mode: str  # "repair", "reset" or "none"


def plan_calibration(model: nn.Module, example: Optional[torch.Tensor], *, spec: Optional[PermutationSpec] = None,
                     repair: Union[bool, str] = True, leaf_modules: Iterable = ()) -> CalibrationPlan:
    """Trace ``model`` (once per architecture) on ``example`` (one input batch; not needed with ``spec``)."""
    mode = _repair_mode(repair)
    with torch.no_grad():
        if spec is None:
            if example is None:
                raise DataError("plan_calibration needs an input batch (example=) to trace the spec, or spec=")
            try:
                model(example)
            except Exception as exc:
                raise DataError(f"the models cannot take the example input (shape {tuple(example.shape)}, "
                                f"{str(example.dtype).removeprefix('torch.')}; the first sample of the calibration "
                                f"data, or example=): {type(exc).__name__}: {exc}") from exc
            spec = trace_permutation_spec(model, example, leaf_modules=leaf_modules)
        gm = shared_graph(model, leaf_modules=leaf_modules)
        sites = find_sites(gm, spec, mode) if mode != "none" else []
    return CalibrationPlan(spec, gm, sites, mode)


# ---- statistics: float64 moments that pool exactly across shards --------------------------
_CROSS = ("n", "ma", "mb", "maa", "mbb", "mab")
_CHANNEL = ("n", "mean", "m2")


@dataclass
class Statistics:
    """What one calibration pass measured, as pooled moments: ``a + b`` pools two data shards exactly.

    ``cross[(group, tap node, i, j)]``: cross-moments of models i and j at a matching tap;
    ``channels[(site node, k)]``: model k's per-channel moments at a REPAIR site; ``samples``: inputs seen.
    ``as_tensors()`` / ``from_tensors()`` give a flat ``{name: float64 tensor}`` view (to all-reduce,
    or to send as a Flower ArrayRecord).
    """

    cross: Dict[Tuple[str, str, int, int], CrossMoments] = field(default_factory=dict)
    channels: Dict[Tuple[str, int], ChannelMoments] = field(default_factory=dict)
    samples: int = 0

    def __add__(self, other: "Statistics") -> "Statistics":
        if not isinstance(other, Statistics):
            return NotImplemented
        cross = dict(self.cross)
        for k, v in other.cross.items():
            cross[k] = cross[k] + v if k in cross else v
        channels = dict(self.channels)
        for k, v in other.channels.items():
            channels[k] = channels[k] + v if k in channels else v
        return Statistics(cross, channels, self.samples + other.samples)

    def __radd__(self, other):  # sum(list_of_statistics) starts from 0
        return self if other == 0 else NotImplemented

    def as_tensors(self) -> Dict[str, torch.Tensor]:
        """``{name: float64 tensor}``, names in a fixed (sorted) order; moments of no data are left out."""
        out: Dict[str, torch.Tensor] = {"samples": torch.tensor([float(self.samples)], dtype=torch.float64)}
        for (g, node, i, j), m in sorted(self.cross.items()):
            if m.ma is not None:
                out.update({f"cross/{g}/{node}/{i}/{j}/{f}": t for f, t in zip(_CROSS, m.as_tensors())})
        for (node, k), m in sorted(self.channels.items()):
            if m.mean is not None:
                out.update({f"channels/{node}/{k}/{f}": t for f, t in zip(_CHANNEL, m.as_tensors())})
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> "Statistics":
        """The inverse of :meth:`as_tensors` (any mapping of names to tensors or arrays)."""
        t = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in tensors.items()}
        cross: Dict[str, Dict[str, torch.Tensor]] = {}
        channels: Dict[str, Dict[str, torch.Tensor]] = {}
        for name, v in t.items():
            kind, _, rest = name.partition("/")
            if kind in ("cross", "channels"):
                key, _, fld = rest.rpartition("/")
                (cross if kind == "cross" else channels).setdefault(key, {})[fld] = v
            elif name != "samples":
                raise DataError(f"statistics tensor {name!r} is not one of samples, cross/..., channels/...; "
                                "pass what Statistics.as_tensors() produced")
        st = cls(samples=int(round(float(t["samples"].reshape(-1)[0]))) if "samples" in t else 0)
        for key, fs in cross.items():
            g, node, i, j = key.rsplit("/", 3)  # the group name may hold '/'; fx node names never do
            st.cross[(g, node, int(i), int(j))] = CrossMoments.from_tensors([fs[f].reshape(-1) if f == "n" else fs[f]
                                                                             for f in _CROSS])
        for key, fs in channels.items():
            node, k = key.rsplit("/", 1)
            st.channels[(node, int(k))] = ChannelMoments.from_tensors([fs[f].reshape(-1) if f == "n" else fs[f]
                                                                       for f in _CHANNEL])
        return st

    def correlations(self, i: int, j: int) -> Dict[str, torch.Tensor]:
        """group -> correlation matrix between model i's channels (rows) and model j's (columns),
        averaged over the group's taps (as :class:`~mergekit_vision.match.PairCollector` does)."""
        acc: Dict[str, List[torch.Tensor]] = {}
        for (g, _, a, b), m in self.cross.items():
            if (a, b) == (i, j) and m.ma is not None:
                acc.setdefault(g, []).append(m.correlation())
        return {g: torch.stack(cs).mean(0) for g, cs in acc.items()}


@dataclass
class StatisticsRequest:
    """What a pass over the calibration data measures.

    ``pairs``: (i, j) model pairs whose cross-moments are taken at every matching tap; ``sites``: each
    model's moments at every REPAIR site; ``correction``: REPAIR's correction pass instead (model 0 run
    with every site renormalized to ``targets`` on its batch statistics; RESET: BatchNorms on batch
    statistics), recording model 0's pre-correction moments; ``max_batches`` caps the pass; ``taps``:
    the matching tap policy (:data:`~mergekit_vision.match.TAP_POLICIES`).
    """

    pairs: Tuple[Tuple[int, int], ...] = ()
    sites: bool = False
    correction: bool = False
    targets: Optional[Dict[str, Target]] = None
    max_batches: Optional[int] = None
    taps: str = "all"

    @property
    def empty(self) -> bool:
        return not (self.pairs or self.sites or self.correction)


# collect(models, plan, request) -> Statistics: where the data is (local, sharded, federated)
Collect = Callable[[List[nn.Module], CalibrationPlan, StatisticsRequest], Statistics]


@torch.no_grad()
def collect_statistics(models: Sequence[nn.Module], loader: Any, plan: CalibrationPlan,
                       request: Optional[StatisticsRequest] = None, *, max_batches: Optional[int] = None,
                       max_samples: Optional[int] = None, device: Optional[Union[str, torch.device]] = None,
                       progress: bool = False, **request_kwargs) -> Statistics:
    """One lockstep pass of ``models`` over ``loader``: the moments ``request`` asks for.

    ``collect_statistics(models, shard, plan, pairs=[(0, 1)], sites=True)`` on each data shard, summed,
    equals the same call on the whole data (float64 moments, equal up to rounding).
    """
    req = request if request is not None else StatisticsRequest(**request_kwargs)
    if req.max_batches is not None:
        max_batches = req.max_batches if max_batches is None else min(max_batches, req.max_batches)
    models = list(models)
    p0 = next(iter(models[0].parameters()))
    batches = dict(max_batches=max_batches, max_samples=max_samples,
                   device=torch.device(device) if device is not None else p0.device, dtype=p0.dtype)
    st = Statistics()
    if req.correction:
        if req.targets is None and plan.mode == "repair":
            raise ConfigError("a REPAIR correction pass needs targets (site node -> Target)")
        fix = CorrectionPass(plan.sites, [dict(models[0].named_modules())], req.targets or {}, plan.mode)
        lock = Lockstep(models[:1], plan.gm)
        for x in _batches(loader, desc=f"{plan.mode} statistics", progress=progress, **batches):
            lock.run(x, hooks=fix.hooks(), override=fix.overrides())
            st.samples += x.shape[0]
        st.channels = {(node, 0): m for node, m in fix.measured.items()}
        return st

    hooks: Dict[str, Any] = {}
    if req.pairs:
        taps = tap_plan(plan.spec, req.taps)
        pairs = [tuple(p) for p in req.pairs]

        def record_pairs(node, values):
            for gname, t in taps[node.name]:
                for i, j in pairs:
                    st.cross.setdefault((gname, t.node, i, j), CrossMoments()).observe(
                        values[i], values[j], t.dim, t.start, t.length)

        hooks = {node: record_pairs for node in taps}
    overrides: Dict[str, Any] = {}
    if req.sites and plan.sites:
        per_site = {s.node: [ChannelMoments() for _ in models] for s in plan.sites}
        site_hooks, overrides = _site_recorders(plan.sites, per_site, [dict(m.named_modules()) for m in models])
        for name, h in site_hooks.items():
            hooks[name] = _chain(hooks.get(name), h)
    lock = Lockstep(models, plan.gm)
    for x in _batches(loader, desc=f"statistics of {len(models)} models", progress=progress, **batches):
        outs = lock.run(x, hooks, override=overrides)
        _check_values(outs, "the models' outputs", x)
        st.samples += x.shape[0]
    if req.sites and plan.sites:
        st.channels = {(node, k): m for node, ms in per_site.items() for k, m in enumerate(ms)}
    return st


class LocalCollector:
    """The default ``collect``: passes over a local loader; ``reduce`` (e.g. an all-reduce across
    data-parallel workers, see :mod:`mergekit_vision.distributed`) is applied to every pass's statistics."""

    def __init__(self, loader: Any, *, max_batches: Optional[int] = None, max_samples: Optional[int] = None,
                 device: Optional[Union[str, torch.device]] = None, progress: bool = False,
                 reduce: Optional[Callable[[Statistics], Statistics]] = None):
        self.loader = loader
        self.kwargs = dict(max_batches=max_batches, max_samples=max_samples, device=device, progress=progress)
        self.reduce = reduce

    def __call__(self, models: List[nn.Module], plan: CalibrationPlan, request: StatisticsRequest) -> Statistics:
        st = collect_statistics(models, self.loader, plan, request, **self.kwargs)
        return self.reduce(st) if self.reduce is not None else st


# ---- the report ---------------------------------------------------------------------------
@dataclass
class MergeManyReport:
    """What merge_many did: per group, per model, how far the assignment is from identity."""

    method: str
    repair: str
    weights: List[float]
    reference: int
    iterations: int                       # MergeMany sweeps allowed (0: star alignment only)
    sweeps: int = 0                       # sweeps run
    converged: Optional[bool] = None      # a sweep changed no assignment
    start: Optional[str] = None           # the sweeps' start kept: "star" or "identity" (activation), "star" (weight)
    changes_per_sweep: List[int] = field(default_factory=list)  # models whose assignment changed
    near_identity: Optional[bool] = None  # every model's permutation (nearly) identity: nothing to align
    lineage_cosines: List[float] = field(default_factory=list)  # each model vs the reference, unpermuted weights
    lineage_keys: List[str] = field(default_factory=list)  # the tensors the lineage test compared (free groups')
    matching_skipped: Optional[str] = None  # why no matching ran although method asked for it
    calibration_samples: int = 0
    groups: Dict[str, List[GroupReport]] = field(default_factory=dict)  # group -> one report per model
    sites: Dict[str, SiteReport] = field(default_factory=dict)
    frozen_groups: Dict[str, str] = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict)
    version: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    def moved(self) -> List[float]:
        """Per model: the fraction of all permutable channels its assignment moved."""
        k = len(self.weights)
        tot = [0.0] * k
        size = sum(rs[0].size for rs in self.groups.values()) or 1
        for rs in self.groups.values():
            for i, r in enumerate(rs):
                tot[i] += r.moved * r.size
        return [t / size for t in tot]

    def summary(self) -> str:
        lines = [f"merge_many: {len(self.weights)} models, method={self.method} repair={self.repair} "
                 f"reference={self.reference} sweeps={self.sweeps}/{self.iterations}"
                 + ("" if self.converged is None else f" ({'converged' if self.converged else 'not converged'})")
                 + f", calibration={self.calibration_samples} samples"]
        if self.groups:
            lines.append("  channels moved per model: " + ", ".join(f"{100 * m:.0f}%" for m in self.moved()))
        if self.matching_skipped:
            lines.append(f"  matching skipped: {self.matching_skipped}")
        elif self.near_identity:
            lines.append("  every permutation is (nearly) identity: the models already share one coordinate "
                         "system (e.g. FedAvg or gossip from a common init); alignment changes nothing here, "
                         "method='none' gives the same merge without matching")
        return "\n".join(lines + summary_tail(self.sites, self.timings))


# ---- the pipeline ---------------------------------------------------------------------------
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
    diagnostic_batches: int = 4,
    collect: Optional[Collect] = None,
    example: Optional[torch.Tensor] = None,
    lineage_threshold: Optional[float] = LINEAGE_THRESHOLD,
    taps: str = "all",
) -> Union[nn.Module, Tuple[nn.Module, MergeManyReport]]:
    """Align ``models`` into one coordinate system, average them with ``weights`` and REPAIR the result.

    ``weights``: one non-negative number per model (e.g. clients' sample counts), normalized to sum 1;
    default equal. ``reference``: index of the model every other is first aligned to (default 0).
    ``iterations``: 0 aligns every model to the reference (star); N > 0 then runs up to N MergeMany
    sweeps, each re-aligning every model to the weighted average of the others (weights: Git Re-Basin's
    MergeMany; activations: the pairwise correlations of all models, measured in the one statistics
    pass), stopping when a sweep changes no assignment. Default (None): up to :data:`DEFAULT_SWEEPS`
    sweeps, better than star in the measurements of docs/recipes/merge_many.md and far less sensitive
    to the choice of reference. ``method``, ``repair`` and the rest as for :func:`mergekit_vision.merge`; REPAIR's
    targets are ``sum_k w_k * stat_k`` for means and standard deviations.
    ``collect``: where the statistics come from (default: passes over ``calib_loader``); see
    :class:`LocalCollector`, :func:`mergekit_vision.distributed.merge_many_distributed` and
    :mod:`mergekit_vision.recipes.flower`. ``example``: an input batch to trace with when no
    ``calib_loader`` is given. Returns a new model of ``models[0]``'s class, in eval mode, on its
    device; ``merged.merge_report`` holds a :class:`MergeManyReport`. ``lineage_threshold``: when every
    model's conv/linear weights have a median cosine at least this with the reference's, compared
    unpermuted (FedAvg clients of one global model, gossip nodes, fine-tunes of one checkpoint), the
    models already share one coordinate system: matching is skipped and the report says why
    (``matching_skipped``, ``lineage_cosines``; ``lineage_keys``: the tensors compared, those the spec's
    free groups permute). None always matches. Wrapped models (``nn.DataParallel``, ``torch.compile``)
    are merged as the models inside, as by ``merge``.
    """
    from . import __version__

    models = [unwrap_model(m) for m in models]  # DataParallel, torch.compile: the model inside
    k_models = len(models)
    if k_models == 0:
        raise ConfigError("merge_many needs at least one model; got an empty sequence")
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    mode = _repair_mode(repair)
    if mode not in ("repair", "reset", "none"):
        raise ConfigError(f"merge_many supports repair=True/'repair', 'reset' or False, not {repair!r} "
                          "(merge()'s 'stream' corrections are not implemented for N models yet)")
    w = _normalized_weights(weights, k_models)
    ref = 0 if reference is None else reference
    if not isinstance(ref, int) or not 0 <= ref < k_models:
        raise ConfigError(f"reference must be a model index in 0..{k_models - 1}, got {reference!r}")
    _check_matching_options(taps, weight_tol)
    if iterations is None:
        iterations = DEFAULT_SWEEPS
    if not isinstance(iterations, int) or iterations < 0:
        raise ConfigError(f"iterations must be an int >= 0 (0: star alignment), got {iterations!r}")
    needs_data = method == "activation" or mode != "none"
    if needs_data and calib_loader is None and collect is None:
        raise DataError(f"method={method!r} with repair={mode!r} needs calibration data: pass calib_loader "
                        "(any iterable of input batches) or collect=, or use method='weight', repair=False "
                        "for a data-free merge.")
    if calib_loader is not None:
        check_reiterable(calib_loader)
    names = [f"models[{i}]" for i in range(k_models)]
    for i in range(1, k_models):
        check_same_architecture(models[0], models[i], (names[0], names[i]))
    for i, m in enumerate(models):
        check_finite(m, names[i])

    p0 = next(iter(models[0].parameters()))
    out_device, dtype = p0.device, p0.dtype
    work = torch.device(device) if device is not None else out_device
    timings: Dict[str, float] = {}
    report = MergeManyReport(method=method, repair=mode, weights=w, reference=ref, iterations=iterations,
                             version=__version__)
    ms = [copy.deepcopy(m).to(work).eval() for m in models]  # never touch the inputs
    gather = collect or LocalCollector(calib_loader, max_batches=max_batches, max_samples=max_samples,
                                       device=work, progress=progress)

    with _timer(timings, "trace"):
        first = example
        if example is None and calib_loader is not None:
            first = next(iter_inputs(calib_loader, max_batches=1, device=work, dtype=dtype))
            example = first[:1]
        if example is None and spec is None:
            raise DataError("merge_many needs an input batch to trace the models: pass calib_loader, "
                            "example= (one input batch) or spec=")
        plan = plan_calibration(ms[ref], None if example is None else example.to(work, dtype), spec=spec,
                                repair=mode, leaf_modules=leaf_modules)
    spec = plan.spec
    report.frozen_groups = {g.name: g.reason for g in spec.groups if g.frozen}
    if method != "none":
        report.lineage_keys = lineage_keys(spec)
        ref_sd = ms[ref].state_dict()
        report.lineage_cosines = [1.0 if k == ref else lineage_cosine(ref_sd, m.state_dict(), report.lineage_keys)
                                  for k, m in enumerate(ms)]
        report.matching_skipped = shared_lineage([c for k, c in enumerate(report.lineage_cosines) if k != ref],
                                                 lineage_threshold)
    if report.matching_skipped:
        logger.info("merge_many: %s; matching skipped (lineage_threshold=None forces it)", report.matching_skipped)
        method = "none"

    # ---- pass 1: all models together -> cross-moments against the reference, REPAIR endpoint stats
    pairwise = method == "activation" and iterations > 0 and k_models > 2
    if pairwise:  # every pair: the sweeps then need no further pass over the data
        pairs = tuple((i, j) for i in range(k_models) for j in range(i + 1, k_models))
    else:
        pairs = tuple((ref, k) for k in range(k_models) if k != ref) if method == "activation" else ()
    first = StatisticsRequest(pairs=pairs, sites=mode == "repair", taps=taps)
    with _timer(timings, "statistics"):
        stats = gather(ms, plan, first) if not first.empty else Statistics()
    report.calibration_samples = stats.samples
    for i, j in pairs:
        check_matching_evidence(((g, node, m) for (g, node, a, b), m in stats.cross.items() if (a, b) == (i, j)),
                                stats.samples, (names[i], names[j]))
    check_site_evidence(((node, m) for (node, _), m in stats.channels.items()), stats.samples)

    # ---- star alignment: every model to the reference ------------------------------------
    sds = [m.state_dict() for m in ms]
    with _timer(timings, "match"):
        perms: List[Dict[str, torch.Tensor]] = [{} for _ in ms]
        corrs: List[Dict[str, torch.Tensor]] = [{} for _ in ms]
        for k in range(k_models):
            if k == ref or method == "none":
                continue
            if method == "activation":
                corrs[k] = _pair_correlations(stats, ref, k)
                perms[k] = match_from_correlations(spec, corrs[k])
                for g, note in match_blind_by_weights(spec, corrs[k], perms[k], sds[ref], sds[k], max_iter=weight_iters,
                                                      tol=weight_tol, seed=seed).items():
                    logger.info("merge_many: model %d, group %s %s", k, g, note)
            else:
                perms[k] = match_weights(spec, sds[ref], sds[k], max_iter=weight_iters, tol=weight_tol,
                                         seed=seed)
    report.near_identity = _near_identity(spec, perms) if method != "none" and k_models > 1 else None
    if report.matching_skipped:
        report.near_identity = True  # identity by the lineage test, without matching
    skip = bool(report.near_identity)  # star found nothing to align: the sweeps would not either

    # ---- MergeMany: each model to the weighted average of the others ------------------------
    if iterations and method != "none" and k_models > 2 and not skip:
        with _timer(timings, "merge_many_sweeps"):
            if method == "activation":
                _activation_sweeps(stats, spec, perms, corrs, w, iterations, seed, report)
            else:
                _weight_sweeps(sds, perms, w, spec, iterations, weight_iters, weight_tol, seed, report)
            _in_reference_order(spec, perms, corrs, ref)
        logger.info("merge_many: %d sweeps from the %s start (%s)", report.sweeps, report.start,
                    "converged" if report.converged else "not converged")
        report.near_identity = _near_identity(spec, perms)
    if report.near_identity and not report.matching_skipped:
        logger.warning("merge_many: every model's permutation is (nearly) identity (at most %.0f%% of any "
                       "group's channels moved): the models already share one coordinate system, as after "
                       "FedAvg or gossip from a common init.%s", 100 * IDENTITY_TOL,
                       " Skipping the MergeMany sweeps." if skip and iterations and k_models > 2 else "")
    _report_groups(report, spec, perms, corrs)

    # ---- permute, average ---------------------------------------------------------------------
    with _timer(timings, "average"), torch.no_grad():
        aligned = [permute_state_dict(sd, spec, p) if p else sd for sd, p in zip(sds, perms)]
        merged = copy.deepcopy(ms[ref])
        merged.load_state_dict(weighted_average(aligned, w))
        merged.eval()

    # ---- REPAIR: targets sum_k w_k stat_k, correction pass, fuse ----------------------------------
    if plan.sites:
        targets = repair_targets(plan.sites, stats, perms, w) if mode == "repair" else {}
        raw = copy.deepcopy(merged) if diagnostic_batches and mode == "repair" else None
        with _timer(timings, "pass_repair"):
            measured = gather([merged], plan, StatisticsRequest(correction=True, targets=targets or None))
        report.calibration_samples = max(report.calibration_samples, measured.samples)  # RESET: its only pass
        check_site_evidence(((node, m) for (node, _), m in measured.channels.items()), measured.samples)
        with _timer(timings, "fuse"), torch.no_grad():
            mods = dict(merged.named_modules())
            for s in plan.sites:
                m, got = mods[s.module], measured.channels[(s.node, 0)]
                note = None
                if mode == "reset":
                    fuse_reset(m, got)
                elif s.kind == "bn":
                    fuse_bn_correction(m, *affine_correction(got, targets[s.node]), got)
                else:
                    note = fuse_affine(m, *affine_correction(got, targets[s.node]), s.kind)
                report.sites[s.node] = SiteReport(kind=s.kind, module=s.module, note=note)
        if raw is not None:
            # the uncorrected average next to the fused one, on a few batches: the variance-collapse diagnostic
            with _timer(timings, "diagnostics"):
                diag = gather([raw, merged], plan, StatisticsRequest(sites=True, max_batches=diagnostic_batches))
            for s in plan.sites:
                tv = targets[s.node].std.pow(2).clamp_min(1e-12)
                for k, attr in ((0, "var_ratio_before"), (1, "var_ratio_after")):
                    got = diag.channels.get((s.node, k))
                    if got is not None and got.n:
                        setattr(report.sites[s.node], attr, float((got.var / tv).mean()))
            del raw

    merged = ordinary_tensors(merged.to(out_device).eval())
    check_merged_finite(merged, first)
    report.timings = timings
    merged.merge_report = report
    logger.info(report.summary())
    return (merged, report) if return_report else merged


# ---- stages -----------------------------------------------------------------------------------
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


def _near_identity(spec: PermutationSpec, perms: List[Dict[str, torch.Tensor]], tol: float = IDENTITY_TOL) -> bool:
    for p in perms:
        for g in spec.free_groups:
            if g.name in p and float((p[g.name] != torch.arange(g.size)).float().mean()) > tol:
                return False
    return True


def _pair_correlations(stats: Statistics, i: int, j: int) -> Dict[str, torch.Tensor]:
    """Correlations of model i's channels (rows) with model j's, from whichever order was measured."""
    c = stats.correlations(i, j)
    return c if c else {g: m.T for g, m in stats.correlations(j, i).items()}


def _activation_sweeps(stats, spec, perms, corrs, w, iterations, seed, report):
    """MergeMany on the pairwise correlations of one pass: coordinate ascent on
    ``sum_{j<k} w_j w_k sum_i corr_jk[perm_j[i], perm_k[i]]``, each step an exact assignment for one
    model against the weighted others, accepted only when it raises the objective (so it terminates).
    Two starts, star alignment and identity (Git Re-Basin's), keep the higher objective: models that
    share coordinates (FedAvg clients) stay unpermuted even when star alignment was noisy."""
    k_models = len(perms)
    pair = {(i, j): _pair_correlations(stats, i, j) for i in range(k_models) for j in range(k_models) if i != j}
    runs = []
    for start, init in (("star", perms), ("identity", [{} for _ in perms])):
        p, c = [dict(x) for x in init], [dict(x) for x in corrs]
        sweeps, changes, converged = _ascend(pair, spec, p, c, w, iterations, seed)
        runs.append((_objective(pair, spec, p, w), start, p, c, sweeps, changes, converged))
        logger.info("merge_many from %s: %d sweeps, objective %.6f", start, sweeps, runs[-1][0])
    best = max(runs, key=lambda r: r[0])  # ties keep star (listed first)
    _, report.start, new_perms, new_corrs, report.sweeps, report.changes_per_sweep, report.converged = best
    perms[:], corrs[:] = new_perms, new_corrs


def _objective(pair, spec, perms, w) -> float:
    total = 0.0
    for (j, k), cs in pair.items():
        if j < k and w[j] * w[k] > 0:
            for g in spec.free_groups:
                if g.name in cs:
                    ar = torch.arange(g.size)
                    total += w[j] * w[k] * float(cs[g.name][perms[j].get(g.name, ar), perms[k].get(g.name, ar)].sum())
    return total


def _ascend(pair, spec, perms, corrs, w, iterations, seed):
    k_models = len(perms)
    gen = torch.Generator().manual_seed(seed)
    changes: List[int] = []
    for sweep in range(iterations):
        changed = 0
        for k in torch.randperm(k_models, generator=gen).tolist():
            others = [j for j in range(k_models) if j != k]
            wo = [w[j] for j in others]
            wo = [v / sum(wo) for v in wo] if sum(wo) > 0 else [1.0 / len(others)] * len(others)
            new_perm, new_corr, moved = {}, {}, False
            for g in spec.free_groups:
                if g.name not in pair[(others[0], k)]:
                    continue
                ar = torch.arange(g.size)
                # row i of the others' average is channel perm_j[i] of model j
                score = sum(wj * pair[(j, k)][g.name][perms[j].get(g.name, ar)] for j, wj in zip(others, wo))
                old = perms[k].get(g.name, ar)
                new = solve_assignment(score, g.blocks)
                if float(score[ar, new].sum()) <= float(score[ar, old].sum()) + 1e-9 * g.size:
                    new = old
                moved |= not torch.equal(new, old)
                new_perm[g.name], new_corr[g.name] = new, score
            perms[k], corrs[k] = new_perm, new_corr
            changed += int(moved)
        changes.append(changed)
        logger.debug("merge_many sweep %d: %d of %d models changed their assignment", sweep + 1, changed, k_models)
        if changed == 0:
            return sweep + 1, changes, True
    return iterations, changes, False


def _in_reference_order(spec, perms, corrs, ref) -> None:
    """Relabel the merged coordinates so that the reference is unpermuted (sweeps may move it):
    ``perm_k <- perm_k[inverse(perm_ref)]``, rows of the alignment scores likewise."""
    for g in spec.free_groups:
        p_ref = perms[ref].get(g.name)
        if p_ref is None or torch.equal(p_ref, torch.arange(g.size)):
            continue
        q = torch.argsort(p_ref)
        for k in range(len(perms)):
            if g.name in perms[k]:
                perms[k][g.name] = perms[k][g.name][q]
            if g.name in corrs[k]:
                corrs[k][g.name] = corrs[k][g.name][q]


def _weight_sweeps(sds, perms, w, spec, iterations, weight_iters, weight_tol, seed, report):
    """Git Re-Basin's MergeMany: each model weight-matched to the weighted average of the others,
    one model at a time (later models see earlier updates), starting from star alignment."""
    k_models = len(sds)
    report.start = "star"
    gen = torch.Generator().manual_seed(seed)
    for sweep in range(iterations):
        changed = 0
        for k in torch.randperm(k_models, generator=gen).tolist():
            others = [j for j in range(k_models) if j != k]
            wo = [w[j] for j in others]
            wo = [v / sum(wo) for v in wo] if sum(wo) > 0 else [1.0 / len(others)] * len(others)
            with torch.no_grad():
                target = weighted_average([permute_state_dict(sds[j], spec, perms[j]) if perms[j] else sds[j]
                                           for j in others], wo)
            new = match_weights(spec, target, sds[k], max_iter=weight_iters, tol=weight_tol, seed=seed,
                                init=perms[k] or None)
            if any(not torch.equal(new[g], perms[k].get(g, torch.arange(new[g].numel()))) for g in new):
                changed += 1
            perms[k] = new
        report.sweeps = sweep + 1
        report.changes_per_sweep.append(changed)
        logger.info("merge_many sweep %d: %d of %d models changed their assignment", sweep + 1, changed, k_models)
        if changed == 0:
            report.converged = True
            return
    report.converged = False


def _report_groups(report: MergeManyReport, spec: PermutationSpec, perms, corrs) -> None:
    for g in spec.free_groups:
        rows = []
        ar = torch.arange(g.size)
        for p, c in zip(perms, corrs):
            gr = GroupReport(size=g.size, blocks=g.blocks)
            if g.name not in p and g.taps and all(t.crossed for t in g.taps):
                gr.note = ("left in this model's order (identity): every tap crosses another free group's axis, "
                           "which merge_many does not align (merge does)")
            if g.name in p:
                gr.moved = float((p[g.name] != ar).float().mean())
                if g.name in c:
                    gr.mean_corr = float(c[g.name][ar, p[g.name]].mean())
                    gr.identity_corr = float(c[g.name].diagonal().mean())
            rows.append(gr)
        report.groups[g.name] = rows


def repair_targets(sites: List[Site], stats: Statistics, perms: List[Dict[str, torch.Tensor]],
                   weights: Sequence[float]) -> Dict[str, Target]:
    """REPAIR's targets for a weighted average of aligned models: ``sum_k w_k * stat_k`` for the
    per-channel means and standard deviations (not variances), each model's statistics permuted
    into the merged coordinates first."""
    targets = {}
    for s in sites:
        mean = std = None
        for k, wk in enumerate(weights):
            m = stats.channels.get((s.node, k))
            if m is None or not m.n:
                raise DataError(f"no statistics for model {k} at REPAIR site {s.node!r}; the collect "
                                "function must measure every model's sites (StatisticsRequest(sites=True))")
            mk = permute_channel_stats(m.mean, s, perms[k]) if perms[k] else m.mean
            sk = permute_channel_stats(m.std, s, perms[k]) if perms[k] else m.std
            mean = wk * mk if mean is None else mean + wk * mk
            std = wk * sk if std is None else std + wk * sk
        targets[s.node] = Target(mean, std)
    return targets
