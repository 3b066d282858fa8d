"""Residual-stream rotation: an orthogonal alignment of a stream, folded into the weights where it is exact.

A permutation is one orthogonal map of a group's channels. Where everything that touches a residual
stream is linear in its channels, any orthogonal ``R`` works as well: writers' rows become ``R W``,
readers' columns ``W R^T``, added tensors (class token, position embedding) ``R p``. A LayerNorm that
reads the stream commutes with ``R`` when ``R 1 = 1`` (the per-token mean and norm are kept), but its
elementwise affine does not: the affine is first folded into the linear layers that read the norm
(``W diag(g)``, ``b + W beta``; the norm keeps its tensors, at 1 and 0), and a layer scale into the
layer that writes it. Then every other member axis of the group is multiplied by ``R`` (the folded ones
and zeros need not be: ``R 1 = 1``).

``R`` maximizes the agreement of the reference's stream with the other model's (orthogonal Procrustes
on the cross-moments the matching pass measured at the stream's adds), restricted to maps that fix
``1``. A group is rotated only when every member is of a kind above and every op that carries the
stream is linear in it (:func:`stream_plans`); the caller checks the result once more on data, in
float64 (:func:`function_error`). Anything else keeps its permutation and says why.

Pure tensor functions over state dicts; :mod:`mergekit_vision.merge` wires them in (``rotate_stream``).
"""
from __future__ import annotations

import builtins
import copy
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_leaves

from ..ops import ADD, EVAL_IDENTITY_MODULES, LAYERNORM_FUNCTIONS, TAP_NAMES, is_add, is_eval_identity, op_name
from ..spec import PermutationGroup, PermutationSpec

LINEAR = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # linear in their channels, either axis
# ops that may carry the stream: linear in its channels, or a LayerNorm over exactly them (R 1 = 1)
CATS = ("cat", "concat")
STREAM_VALUES = TAP_NAMES[ADD] | frozenset(CATS)  # the stream itself: residual adds, token concatenations
STREAM_OPS = STREAM_VALUES | frozenset({"Linear", "Conv1d", "Conv2d", "Conv3d", "flatten", "transpose", "permute",
                                        "reshape", "view", "contiguous", "getitem", "expand", "mean", "layer_norm",
                                        "LayerNorm", "mul", "mul_", "MultiheadAttention",
                                        *EVAL_IDENTITY_MODULES})
NORM_OPS = ("layer_norm", "LayerNorm")
EXACT_TOL = 1e-8  # relative float64 error of a rotated endpoint's outputs above which nothing is rotated


@dataclass
class NormFold:
    """A LayerNorm over the stream whose affine is folded into its readers: ``W diag(g)``, ``b + W beta``."""

    weight: Optional[str]
    bias: Optional[str]
    readers: List[Tuple[str, Optional[str]]] = field(default_factory=list)  # (weight key, bias key)


@dataclass
class StreamPlan:
    """How one group is rotated: the members (every one is multiplied by R on its axis), the norms
    and layer scales folded first."""

    group: str
    size: int
    members: List[Tuple[str, int]]
    norms: List[NormFold] = field(default_factory=list)
    scales: List[Tuple[str, str, Optional[str]]] = field(default_factory=list)  # (gamma, writer weight, bias)
    taps: List[str] = field(default_factory=list)  # the stream's own values (adds, cats): Procrustes' evidence


# ---- which groups can be rotated ----------------------------------------------------------------
def _split(key: str) -> Tuple[str, str]:
    path, _, name = key.rpartition(".")
    return path, name


def _module(model: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        return None


def _keeps_last_dim(node: fx.Node) -> bool:
    """An indexing or reduction that leaves the last (channel) axis whole: ``x[:, 0]``, ``x.mean(1)``."""
    meta = node.args[0].meta.get("tensor_meta") if node.args and isinstance(node.args[0], fx.Node) else None
    if meta is None:
        return False
    ndim = len(meta.shape)
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if name == "getitem":
        idx = node.args[1]
        idx = idx if isinstance(idx, tuple) else (idx,)
        return len(idx) < ndim and all(isinstance(i, (int, slice)) for i in idx)
    if name == "mean":
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = dims if isinstance(dims, (tuple, list)) else (dims,)
        return all(isinstance(d, int) and d % ndim != ndim - 1 for d in dims)
    return False


def _norm_readers(node: fx.Node, modules: Dict[str, nn.Module]) -> Union[List[Tuple[str, fx.Node]], str]:
    """The linear layers that read LayerNorm ``node``'s output, through ops that keep each channel
    apart (identity modules, token indexing, means over tokens); a reason when something else does."""
    out, stack, seen = [], list(node.users), set()
    while stack:
        u = stack.pop()
        if u in seen:
            continue
        seen.add(u)
        if u.op == "call_function" and u.target is builtins.getattr:
            continue  # x.shape
        if is_eval_identity(u, modules) or (u.op in ("call_function", "call_method") and _keeps_last_dim(u)):
            stack.extend(u.users)
            continue
        if u.op == "call_module":
            mod = modules[u.target]
            if isinstance(mod, nn.Linear):
                out.append((f"{u.target}.weight", u))
                continue
            if isinstance(mod, nn.MultiheadAttention) and len(set(u.args[:3])) == 1:  # self-attention(x, x, x)
                out.append((f"{u.target}.in_proj_weight", u))
                continue
        return f"its output reaches {op_name(u, modules)} ({u.name}), not only linear layers"
    return out


def _normalized_shape(node: fx.Node, modules: Dict[str, nn.Module]) -> Tuple[int, ...]:
    if node.op == "call_module":
        return tuple(modules[node.target].normalized_shape)
    shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
    return tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)


def _scale_writer(gamma: fx.Node, spec_rows: set, modules) -> Optional[str]:
    """The layer whose output a layer scale ``x * gamma`` multiplies (through identity modules)."""
    for mul in gamma.users:
        name = mul.target if mul.op == "call_method" else getattr(mul.target, "__name__", "")
        if name not in ("mul", "mul_") or len(mul.args) != 2:
            return None
        x = mul.args[0] if mul.args[1] is gamma else mul.args[1]
        while isinstance(x, fx.Node) and is_eval_identity(x, modules):
            x = x.args[0]
        if not (isinstance(x, fx.Node) and x.op == "call_module" and f"{x.target}.weight" in spec_rows):
            return None
        return x.target
    return None


def _feeds_stream(node: fx.Node) -> bool:
    """A tensor (class token, position embedding) that reaches the stream only by adds and concatenations,
    through reshapes along its other axes."""
    stack = list(node.users)
    while stack:
        u = stack.pop()
        name = u.target if u.op == "call_method" else getattr(u.target, "__name__", "")
        if u.op == "call_function" and u.target is builtins.getattr:
            continue
        if name in ("expand", "repeat", "to", "type_as"):
            stack.extend(u.users)
        elif not (is_add(u) or (u.op == "call_function" and name in CATS)):
            return False
    return True


@dataclass
class _Graph:
    """What the plans look up in the trace: modules, the reads of each tensor, each LayerNorm's call."""

    modules: Dict[str, nn.Module]
    attrs: Dict[str, List[fx.Node]]  # tensor key -> its get_attr nodes
    norms: Dict[str, fx.Node]        # LayerNorm module path -> the node that applies it
    nodes: Dict[str, fx.Node]

    @classmethod
    def of(cls, gm: fx.GraphModule) -> _Graph:
        modules, attrs, norms = dict(gm.named_modules()), {}, {}
        for n in gm.graph.nodes:
            if n.op == "get_attr":
                attrs.setdefault(n.target, []).append(n)
            elif n.op == "call_module" and isinstance(modules[n.target], nn.LayerNorm):
                norms[n.target] = n
            elif n.op == "call_function" and n.target in LAYERNORM_FUNCTIONS:
                w = n.kwargs.get("weight", n.args[2] if len(n.args) > 2 else None)
                if isinstance(w, fx.Node) and w.op == "get_attr":
                    norms[_split(w.target)[0]] = n
        return cls(modules, attrs, norms, {n.name: n for n in gm.graph.nodes})


def _plan_group(g: PermutationGroup, model: nn.Module, graph: _Graph, state_dicts) -> Union[StreamPlan, str]:
    modules, attrs = graph.modules, graph.attrs
    rows = {m.key for m in g.members if m.axis == 0}
    plan = StreamPlan(g.name, g.size, [(m.key, m.axis) for m in g.members])
    folded = set()
    for m in g.members:
        if (m.start, m.offset, m.length, m.inner, m.groups, m.stride) != (0, 0, g.size, 1, 1, 0):
            return f"{m} holds part of the group (a concatenation, split or grouped layer)"
        path, name = _split(m.key)
        mod = _module(model, path)
        if isinstance(mod, LINEAR) and name in ("weight", "bias"):
            if getattr(mod, "groups", 1) != 1:
                return f"{m.key} is a grouped convolution"
            continue
        if isinstance(mod, nn.MultiheadAttention) and (name, m.axis) == ("in_proj_weight", 1):
            continue
        if isinstance(mod, nn.LayerNorm) and name in ("weight", "bias"):
            if tuple(mod.normalized_shape) != (g.size,):
                return f"LayerNorm {path} normalizes over {tuple(mod.normalized_shape)}, not the {g.size} channels"
            if path in folded:
                continue
            node = graph.norms.get(path)
            if node is None:
                return f"LayerNorm {path} is not called where the trace can see it"
            readers = _norm_readers(node, modules)
            if isinstance(readers, str):
                return f"LayerNorm {path}: {readers}, so its affine cannot be folded"
            fold = NormFold(mod.weight is not None and f"{path}.weight" or None,
                            mod.bias is not None and f"{path}.bias" or None)
            for wkey, rnode in readers:
                rmod = modules[rnode.target]
                mha = isinstance(rmod, nn.MultiheadAttention)
                has_bias = (rmod.in_proj_bias if mha else rmod.bias) is not None
                bkey = f"{rnode.target}.{'in_proj_bias' if mha else 'bias'}" if has_bias else None
                if bkey is None and fold.bias and any(sd[fold.bias].abs().max() > 0 for sd in state_dicts):
                    return f"LayerNorm {path}'s shift has no bias to fold into ({rnode.target} has none)"
                fold.readers.append((wkey, bkey))
            plan.norms.append(fold)
            folded.add(path)
            continue
        nodes = attrs.get(m.key, [])
        if not nodes:  # a module call the trace keeps whole (BatchNorm, GroupNorm, ...)
            return f"{m.key} belongs to a {type(mod).__name__}, which a rotation of the channels does not pass through"
        writer = _scale_writer(nodes[0], rows, modules) if len(nodes) == 1 else None
        if writer is not None:
            wmod = modules[writer]
            plan.scales.append((m.key, f"{writer}.weight", f"{writer}.bias" if wmod.bias is not None else None))
            continue
        if all(_feeds_stream(n) for n in nodes):
            continue
        return f"{m.key} ({type(mod).__name__}) acts on each channel apart, which a rotation does not commute with"
    for t in g.taps:
        if t.op not in STREAM_OPS:
            return f"the stream passes through {t.op} ({t.node}), which a rotation does not commute with"
        if t.op in NORM_OPS and _normalized_shape(graph.nodes[t.node], modules) != (g.size,):
            return f"the norm at {t.node} does not normalize over exactly the {g.size} channels"
        if t.op in ("mul", "mul_") and not plan.scales:
            return f"the stream is multiplied at {t.node}, not by a layer scale that folds"
    plan.taps = sorted({t.node for t in g.taps if t.op in STREAM_VALUES})
    if not plan.taps:
        return "no tap observes the stream itself (its adds)"
    return plan


def stream_plans(spec: PermutationSpec, model: nn.Module, gm: fx.GraphModule, example: torch.Tensor,
                 state_dicts: Sequence[Mapping[str, torch.Tensor]]) -> Tuple[Dict[str, StreamPlan], Dict[str, str]]:
    """(group -> plan) for every free group of single channels that a rotation folds into exactly, and
    (group -> why not) for the other residual streams (free groups observed at an add). ``gm``: ``model``'s
    trace (run once on ``example`` for the shapes); ``state_dicts``: every model's (a LayerNorm shift with
    no bias to fold into is refused only where some model has one)."""
    from torch.fx.passes.shape_prop import ShapeProp

    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    plans, refused = {}, {}
    graph = _Graph.of(gm)
    for g in spec.free_groups:
        if g.is_heads or g.blocks != 1 or g.size < 3 or not g.members:
            continue
        got = _plan_group(g, model, graph, state_dicts)
        if isinstance(got, StreamPlan):
            plans[g.name] = got
        elif any(t.op in TAP_NAMES[ADD] for t in g.taps):  # a residual stream that stays
            refused[g.name] = got
    return plans, refused


# ---- the rotation ---------------------------------------------------------------------------------
def _complement(d: int, device=None) -> torch.Tensor:
    """An orthonormal basis (d, d - 1) of the vectors orthogonal to 1 (a Householder reflection's columns)."""
    v = torch.full((d,), d ** -0.5, dtype=torch.float64, device=device)
    w = -v
    w[0] += 1.0
    h = torch.eye(d, dtype=torch.float64, device=device) - 2.0 * torch.outer(w, w) / w.dot(w)
    return h[:, 1:]


def procrustes_rotation(m: torch.Tensor) -> torch.Tensor:
    """The orthogonal ``R`` with ``R 1 = 1`` that maximizes ``tr(R^T m)``: ``m = sum a b^T`` of the
    reference's values ``a`` and the other model's ``b``, so ``R b`` is as close to ``a`` as a rotation
    that keeps each token's mean can bring it."""
    d = m.shape[0]
    q = _complement(d, m.device)
    u, _, vh = torch.linalg.svd(q.T @ m.to(torch.float64) @ q)
    v = torch.full((d, 1), d ** -0.5, dtype=torch.float64, device=m.device)
    return q @ (u @ vh) @ q.T + v @ v.T


def stream_cross(stats, plan: StreamPlan, i: int, j: int, perm: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Mean over the stream's taps of ``sum a b^T / sqrt(sum |a|^2 sum |b|^2)`` between model i's values
    and model j's (its channels put in i's order by ``perm``), from the matching pass's moments;
    None when the pass measured none."""
    acc, count = None, 0
    for node in plan.taps:
        cm, flip = stats.cross.get((plan.group, node, i, j)), False
        if cm is None:
            cm, flip = stats.cross.get((plan.group, node, j, i)), True
        if cm is None or cm.ma is None or not cm.n:
            continue
        m = cm.mab + cm.n * torch.outer(cm.ma, cm.mb)
        ea = cm.maa.sum() + cm.n * cm.ma.pow(2).sum()
        eb = cm.mbb.sum() + cm.n * cm.mb.pow(2).sum()
        m = (m.T if flip else m) / (ea * eb).sqrt().clamp_min(1e-300)
        acc = m if acc is None else acc + m
        count += 1
    if acc is None:
        return None
    acc = acc / count
    return acc[:, perm] if perm is not None else acc


def _along(t: torch.Tensor, axis: int, r: torch.Tensor) -> torch.Tensor:
    """``t`` with ``r`` applied along ``axis``: ``new[.., i, ..] = sum_j r[i, j] old[.., j, ..]``."""
    return torch.movedim(torch.movedim(t, axis, -1) @ r.T, -1, axis)


def rotate_state_dict(sd: Mapping[str, torch.Tensor], plans: Mapping[str, StreamPlan],
                      rotations: Mapping[str, torch.Tensor], dtype: Optional[torch.dtype] = None
                      ) -> Dict[str, torch.Tensor]:
    """A new state dict with every plan's norms and layer scales folded and, for the groups in
    ``rotations``, every member multiplied by its ``R``: computed in float64, stored in each tensor's
    own dtype (``dtype``: every changed tensor in that one instead, e.g. float64 to check the function
    before rounding). Folding alone (no ``R``) is the reference's share: the same function, unit affines."""
    out = OrderedDict(sd)
    if hasattr(sd, "_metadata"):
        out._metadata = sd._metadata
    work: Dict[str, torch.Tensor] = {}

    def get(k: str) -> torch.Tensor:
        if k not in work:
            work[k] = sd[k].detach().to(torch.float64).clone()
        return work[k]

    for plan in plans.values():
        for fold in plan.norms:
            g = get(fold.weight) if fold.weight else None
            b = get(fold.bias) if fold.bias else None
            for wkey, bkey in fold.readers:
                w = get(wkey)
                if b is not None and bkey is not None:
                    get(bkey).add_(w @ b)
                if g is not None:
                    w.mul_(g)
            if g is not None:
                g.fill_(1.0)
            if b is not None:
                b.zero_()
        for gamma, wkey, bkey in plan.scales:
            s = get(gamma)
            w = get(wkey)
            w.mul_(s.reshape(-1, *([1] * (w.dim() - 1))))
            if bkey is not None:
                get(bkey).mul_(s)
            s.fill_(1.0)
    for name, r in rotations.items():
        plan = plans[name]
        unit = {k for f in plan.norms for k in (f.weight, f.bias)} | {s[0] for s in plan.scales}
        for key, axis in plan.members:
            if key not in unit:  # folded norms and scales hold ones and zeros, which R keeps (R 1 = 1)
                t = get(key)
                work[key] = _along(t, axis, r.to(t.device, torch.float64))
    for k, v in work.items():
        out[k] = v.to(dtype or sd[k].dtype)
    return out


@torch.no_grad()
def function_error(model: nn.Module, sd: Mapping[str, torch.Tensor], x: torch.Tensor) -> float:
    """Relative float64 difference of ``model``'s outputs on ``x`` with its own tensors and with ``sd``
    (nothing of ``model`` is changed): 0 up to rounding when ``sd`` is the same function."""
    from ..permute import clear_tensor_caches

    m = clear_tensor_caches(copy.deepcopy(model)).to(torch.float64).eval()
    x = x.to(torch.float64)
    before = [t.clone() for t in tree_leaves(m(x)) if isinstance(t, torch.Tensor)]
    m.load_state_dict({k: v.to(torch.float64) if v.is_floating_point() else v for k, v in sd.items()})
    clear_tensor_caches(m)
    after = [t for t in tree_leaves(m(x)) if isinstance(t, torch.Tensor)]
    num = sum(float((a - b).pow(2).sum()) for a, b in zip(after, before))
    den = sum(float(b.pow(2).sum()) for b in before)
    return (num / den) ** 0.5 if den > 0 else num ** 0.5


def stream_agreement(m: torch.Tensor, r: Optional[torch.Tensor] = None) -> float:
    """``tr(R^T m)`` of :func:`stream_cross`'s matrix: the streams' mean cosine (1: the same values)."""
    return float(m.trace() if r is None else (r * m).sum())


__all__ = ["StreamPlan", "NormFold", "stream_plans", "procrustes_rotation", "stream_cross", "rotate_state_dict",
           "function_error", "stream_agreement", "EXACT_TOL"]
