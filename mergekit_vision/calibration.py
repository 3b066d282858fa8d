"""Calibration statistics: the plan every pass walks (spec, graph, REPAIR sites), float64 moments that
pool exactly across data shards (``a + b``), and the ``collect`` functions that measure them: a local
loader here; all-reduce (``distributed.py``) and Flower (``recipes/flower.py``) build on these.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from .data import iter_inputs
from .engine import Lockstep, shared_graph
from .errors import ConfigError, DataError, NumericalError
from .match import ChannelMoments, CrossMoments
from .match.stats import batch_key, mean_correlations, sample_positions, tap_generator, values_at
from .match.activation import align_across, aligned_tap_plan, observe_tap, tap_plan
from .options import REPAIRS, repair_mode
from .repair import CorrectionPass, Site, Target, find_sites
from .repair.lsq import LsqResult, LsqRound, LsqSite, lsq_pass
from .repair.sites import bn_eval, bn_forward
from .spec import PermutationSpec
from .trace import trace_permutation_spec

logger = logging.getLogger(__name__)

__all__ = ["CalibrationPlan", "plan_calibration", "Statistics", "StatisticsRequest", "Collect",
           "collect_statistics", "LocalCollector", "timed", "input_scale_hint", "calibration_batches", "check_values",
           "chain", "site_recorders"]


# ---- helpers every pass uses -------------------------------------------------------------
@contextmanager
def timed(timings: Dict[str, float], name: str):
    """Add the block's wall time to ``timings[name]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
        logger.info("%s: %.2fs", name, timings[name])


def calibration_batches(loader, *, max_batches, max_samples, device, dtype, desc, progress):
    """The loader's input batches on ``device``/``dtype``, with a progress bar; a DataError at the end
    of a pass whose floating inputs never varied."""
    it = iter_inputs(loader, max_batches=max_batches, max_samples=max_samples, device=device, dtype=dtype)
    return tqdm(_varying(it), desc=desc, disable=not progress, leave=False, unit="batch")


def _varying(batches):
    lo = hi = None
    for x in batches:
        if x.is_floating_point():
            b_lo, b_hi = float(x.min()), float(x.max())
            lo, hi = (b_lo, b_hi) if lo is None else (min(lo, b_lo), max(hi, b_hi))
        yield x
    if lo is not None and lo == hi:
        raise DataError(f"the calibration inputs are constant (every value is {lo}): statistics of them "
                        "carry no information about the models. Pass real images, normalized as in training.")


def input_scale_hint(x: Optional[torch.Tensor]) -> str:
    """Where non-finite values come from once both models' weights are known to be finite: the inputs."""
    scale = ""
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel():
        scale = f" (|x| reaches {float(x.detach().abs().amax()):.3g} in a batch; normalized images are of order 1)"
    return ("both models' weights are finite, so the inputs are the likely cause: check the calibration data's "
            f"scale{scale} and pass images normalized as in training, e.g. with torchvision.transforms.Normalize"
            "(mean, std).")


def check_values(vals, where: str, first_batch: Optional[torch.Tensor] = None):
    """Called once the models' weights passed ``check_finite``: non-finite values come from the inputs."""
    for v in vals:
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v.sum(dtype=torch.float64)):
            raise NumericalError(f"non-finite activations at {where} during calibration; "
                                 + input_scale_hint(first_batch))


def chain(first, second):
    """Two lockstep hooks as one: ``second`` sees the values ``first`` returned."""
    if first is None or second is None:
        return second if first is None else first

    def both(node, values):
        r = first(node, values)
        r2 = second(node, values if r is None else r)
        return r2 if r2 is not None else r

    return both


def site_recorders(sites, site_stats, mods, known_moments=None):
    """Hooks (conv and add sites) and overrides (BN sites: ``z`` is computed from the BN input, before
    any fused activation, and the node's value made from it) that record each model's site value.
    ``known_moments`` (a :class:`SharedMoments`) shares each value's centred rows with a matching tap; the
    other sites keep only their moments."""
    hooks, overrides = {}, {}
    shared = known_moments.nodes if known_moments is not None else set()
    for site in sites:
        stats = site_stats[site.node]
        if site.kind == "bn":
            def override(node, k, args, kwargs, site=site, stats=stats):
                m = mods[k][site.module]
                z = bn_eval(m, args[0])
                out = bn_forward(m, z)
                if out is z and site.node in shared:
                    known_moments.offer(node.name, k, site.dim, stats[k].observe_centred(z, site.dim))
                else:
                    stats[k].observe(z, site.dim)
                return out
            overrides[site.node] = override
        else:
            def hook(node, values, site=site, stats=stats):
                for k, v in enumerate(values):
                    if site.node in shared:
                        known_moments.offer(node.name, k, site.dim, stats[k].observe_centred(v, site.dim))
                    else:
                        stats[k].observe(v, site.dim)
            hooks[site.node] = hook
    return hooks, overrides


# ---- the plan: what every statistics pass walks ------------------------------------------
@dataclass
class CalibrationPlan:
    """The traced graph all models run through, their permutation spec and the REPAIR sites of ``mode``.
    Deterministic for an architecture: a federated client re-derives the same plan from its own copy."""

    spec: PermutationSpec
    gm: fx.GraphModule  # the traced graph (fx.GraphModule of the reference)
    sites: List[Site]
    mode: str  # "repair", "reset", "stream" or "none"


def plan_calibration(model: nn.Module, example: Optional[torch.Tensor], *, spec: Optional[PermutationSpec] = None,
                     repair: Union[bool, str] = True, leaf_modules: Iterable = (),
                     name: str = "the models", first_batch: Optional[torch.Tensor] = None) -> CalibrationPlan:
    """Trace ``model`` (once per architecture) on ``example`` (one input batch; not needed with ``spec``).
    ``name``: how errors call the model(s); ``first_batch``: the batch ``example`` was cut from, if any."""
    mode = repair_mode(repair)
    with torch.no_grad():
        if spec is None:
            if example is None:
                raise DataError("plan_calibration needs an input batch (example=) to trace the spec, or spec=")
            try:
                model(example)
            except Exception as exc:
                cut = "" if first_batch is None else (
                    f", cut from the first calibration batch (shape {tuple(first_batch.shape)}, "
                    f"{str(first_batch.dtype).removeprefix('torch.')})")
                raise DataError(f"{name} cannot take the example input (shape {tuple(example.shape)}, "
                                f"{str(example.dtype).removeprefix('torch.')}; the first sample of the calibration "
                                f"data, or example=){cut}: {type(exc).__name__}: {exc}") from exc
            spec = trace_permutation_spec(model, example, leaf_modules=leaf_modules)
        gm = shared_graph(model, leaf_modules=leaf_modules, input_shape=tuple(spec.input_shape[1:]) or None)
        sites = find_sites(gm, spec, REPAIRS[mode].sites) if mode != "none" else []
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

    def __add__(self, other: Statistics) -> Statistics:
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
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> Statistics:
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
        return mean_correlations((g, m) for (g, _, a, b), m in self.cross.items()
                                 if (a, b) == (i, j) and m.ma is not None)


@dataclass
class StatisticsRequest:
    """What a pass over the calibration data measures.

    ``pairs``: (i, j) model pairs whose cross-moments are taken at every matching tap; ``aligned``:
    instead of those taps, the crossed taps (a token-mixing MLP's hidden units) that the permutations
    ``aligned[j]`` of model j make usable, model j's values put in model i's order across the other
    axes first; ``sites``: each model's moments at every REPAIR site; ``affines``: add-site node ->
    ``(scale, shift)`` applied to the last model's value before it is recorded (corrections kept as
    explicit ChannelAffine modules); ``correction``: REPAIR's correction pass instead (model 0 run
    with every site renormalized to ``targets`` on its batch statistics; RESET: BatchNorms on batch
    statistics), recording model 0's pre-correction moments; ``max_batches`` caps the pass; ``taps``:
    the matching tap policy (:data:`~mergekit_vision.match.TAP_POLICIES`); ``tap_positions``: at most this
    many positions per image enter a matching tap's cross-moments, the same random ones for every image
    of a batch, drawn from the batch's contents and the tap's node (so a shard, a worker or a client
    samples a batch as the whole data would); None: every position. REPAIR's statistics see every position.
    """

    pairs: Tuple[Tuple[int, int], ...] = ()
    sites: bool = False
    correction: bool = False
    targets: Optional[Dict[str, Target]] = None
    max_batches: Optional[int] = None
    taps: str = "all"
    tap_positions: Optional[int] = None
    aligned: Optional[Dict[int, Dict[str, torch.Tensor]]] = None
    affines: Optional[Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = None

    @property
    def empty(self) -> bool:
        return not (self.pairs or self.sites or self.correction)


class SharedMoments(dict):
    """``(node, model index) -> (channel dim, Centred)``: a REPAIR site's centred values of this batch,
    which a matching tap on the same value reuses (its moments, and its rows for the GEMM) instead of
    computing them again. Only values some tap in ``nodes`` reads are kept (until that tap takes them)."""

    def __init__(self, nodes=()):
        super().__init__()
        self.nodes = set(nodes)

    def offer(self, node: str, k: int, dim: int, centred) -> None:
        if node in self.nodes:
            self[(node, k)] = (dim, centred)


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
        if req.targets is None and REPAIRS[plan.mode].needs_targets:
            raise ConfigError("a REPAIR correction pass needs targets (site node -> Target)")
        fix = CorrectionPass(plan.sites, [dict(models[0].named_modules())], req.targets or {}, plan.mode)
        lock = Lockstep(models[:1], plan.gm)
        for x in calibration_batches(loader, desc=f"{plan.mode} statistics", progress=progress, **batches):
            lock.run(x, hooks=fix.hooks(), override=fix.overrides())
            st.samples += x.shape[0]
        st.channels = {(node, 0): m for node, m in fix.measured.items()}
        return st

    hooks: Dict[str, Any] = {}
    pairs = [tuple(p) for p in req.pairs]
    batch = {"size": 0, "key": 0}  # the batch being walked: its size and batch_key (positions' seed)
    known = SharedMoments()
    if pairs and req.aligned is None:
        taps = tap_plan(plan.spec, req.taps)
        known = SharedMoments(taps if req.tap_positions is None else ())  # sampled taps centre their own rows

        used = sorted({k for p in pairs for k in p})

        def record_pairs(node, values):
            kn = [known.pop((node.name, k), None) for k in range(len(values))]
            sampled = {}  # tap dim -> (positions, each model's values there): the node's taps on one axis share them
            for gname, t in taps[node.name]:
                if t.dim not in sampled:
                    idx = _tap_sample(batch, node.name, values[0], t.dim, req.tap_positions)
                    sampled[t.dim] = (idx, dict(enumerate(values)) if idx is None  # else (N, C, positions):
                                      else {k: values_at(values[k], t.dim, idx) for k in used})
                idx, vals = sampled[t.dim]
                if idx is not None:
                    t = dataclasses.replace(t, dim=1)  # the sampled values' channel axis
                whole = idx is None and t.start == 0 and t.length in (0, values[0].shape[t.dim])
                for i, j in pairs:
                    a = vals[i]
                    moments = None
                    if whole and all(m is not None and m[0] % a.dim() == t.dim % a.dim() for m in (kn[i], kn[j])):
                        moments = (kn[i][1], kn[j][1])
                    observe_tap(st.cross.setdefault((gname, t.node, i, j), CrossMoments()), a, vals[j], t, moments)

        hooks = {node: record_pairs for node in taps}
    elif pairs:
        crossed = {j: aligned_tap_plan(plan.spec, req.aligned[j], req.taps) for _, j in pairs}

        def record_aligned(node, values):
            for i, j in pairs:
                for gname, t in crossed[j].get(node.name, ()):
                    b = align_across(values[j], t, plan.spec, req.aligned[j])
                    st.cross.setdefault((gname, t.node, i, j), CrossMoments()).observe(
                        values[i], b, t.dim, t.start, t.length)

        hooks = {node: record_aligned for c in crossed.values() for node in c}
    overrides: Dict[str, Any] = {}
    if req.sites and plan.sites:
        per_site = {s.node: [ChannelMoments() for _ in models] for s in plan.sites}
        site_hooks, overrides = site_recorders(plan.sites, per_site, [dict(m.named_modules()) for m in models],
                                               known if pairs and req.aligned is None else None)
        for name, h in site_hooks.items():
            hooks[name] = chain(h, hooks.get(name))  # the site's channel moments first: the tap reuses them
        for name, (scale, shift) in (req.affines or {}).items():
            hooks[name] = chain(_affine_hook(plan.sites, name, scale, shift), hooks.get(name))
    lock = Lockstep(models, plan.gm)
    for x in calibration_batches(loader, desc=f"statistics of {len(models)} models", progress=progress, **batches):
        batch.update(size=x.shape[0], key=batch_key(x) if req.tap_positions is not None else 0)
        outs = lock.run(x, hooks, override=overrides)
        check_values(outs, "the models' outputs", x)
        st.samples += x.shape[0]
    if req.sites and plan.sites:
        st.channels = {(node, k): m for node, ms in per_site.items() for k, m in enumerate(ms)}
    return st


def _tap_sample(batch: Dict[str, int], node: str, value: Any, dim: int, keep: Optional[int]) -> Optional[torch.Tensor]:
    """The positions (flattened axes other than the batch and ``dim``) a matching tap at ``node`` keeps
    of ``value`` in this batch, or None for all: values without positions, or whose first axis is not
    the batch's (an attention's ``(L, N, C)``), are observed whole."""
    if keep is None or not isinstance(value, torch.Tensor) or value.dim() < 3:
        return None
    d = dim % value.dim()
    if d == 0 or value.shape[0] != batch["size"] or not value.numel():
        return None
    total = value.numel() // (value.shape[0] * value.shape[d])
    return sample_positions(total, keep, tap_generator(batch["key"], node))


def _affine_hook(sites: List[Site], name: str, scale: torch.Tensor, shift: torch.Tensor):
    dim = next(s.dim for s in sites if s.node == name)

    def apply(node, values):
        v = values[-1]
        shape = [1] * v.dim()
        shape[dim] = -1
        return list(values[:-1]) + [v * scale.to(v.dtype).view(shape) + shift.to(v.dtype).view(shape)]

    return apply


class LocalCollector:
    """The default ``collect``: passes over a local loader; ``reduce`` (e.g. an all-reduce across
    data-parallel workers, see :mod:`mergekit_vision.distributed`) is applied to every pass's statistics,
    ``lsq_reduce`` to every round of the least-squares walk (:meth:`lsq`, ``repair="lsq"``)."""

    def __init__(self, loader: Any, *, max_batches: Optional[int] = None, max_samples: Optional[int] = None,
                 device: Optional[Union[str, torch.device]] = None, progress: bool = False,
                 reduce: Optional[Callable[[Statistics], Statistics]] = None,
                 lsq_reduce: Optional[Callable[[LsqRound], LsqRound]] = None):
        self.loader = loader
        self.kwargs = dict(max_batches=max_batches, max_samples=max_samples, device=device, progress=progress)
        self.reduce = reduce
        self.lsq_reduce = lsq_reduce

    def __call__(self, models: List[nn.Module], plan: CalibrationPlan, request: StatisticsRequest) -> Statistics:
        st = collect_statistics(models, self.loader, plan, request, **self.kwargs)
        return self.reduce(st) if self.reduce is not None else st

    def lsq_problem(self) -> Optional[str]:
        """Why this collector cannot serve ``repair="lsq"``, or None."""
        if self.reduce is not None and self.lsq_reduce is None:
            return ("this LocalCollector pools its statistics with reduce= but has no lsq_reduce= for the "
                    "least-squares walk (each worker would refit on its own shard): pass lsq_reduce= as well "
                    "(mergekit_vision.distributed.all_reduce_lsq; merge_many_distributed does)")
        return None

    def lsq(self, merged: nn.Module, endpoints: Sequence[nn.Module], weights: Sequence[float], gm: fx.GraphModule,
            sites: List[LsqSite], *, ridge: float, positions: Optional[int], seed: int,
            memory: Union[int, str, None] = None) -> LsqResult:
        """``repair="lsq"``: the least-squares walk (:func:`~mergekit_vision.repair.lsq.lsq_pass`) over this
        loader's batches, all held, on ``merged``'s device, its values beyond ``memory`` bytes spilled to
        disk (``lsq_memory``); each round pooled with ``lsq_reduce`` (which turns the dual solve off)."""
        problem = self.lsq_problem()
        if problem:
            raise ConfigError(problem)
        kw = self.kwargs
        p0 = next(iter(merged.parameters()))
        batches = list(calibration_batches(self.loader, max_batches=kw["max_batches"], max_samples=kw["max_samples"],
                                           device=p0.device, dtype=p0.dtype, desc="least-squares repair",
                                           progress=kw["progress"]))
        return lsq_pass(merged, endpoints, weights, gm, batches, ridge=ridge, positions=positions, seed=seed,
                        sites=sites, memory=memory, reduce=self.lsq_reduce)
