"""The coupling pass: run the traced graph once on an example input, apply a rule per node, and
resolve the linked channel ranges into a ``PermutationSpec``.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections import defaultdict
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch import nn

import logging

from ..errors import MergeVisionError, TraceError
from ..ops import op_name
from ..spec import Member, PermutationGroup, PermutationSpec, Tap
from .layout import Elements, Seg, slice_dim
from .rules import Multi, RuleCall, freeze_all, function_rule, method_rule, module_rule, unknown
from .tracer import trace_model

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode for the duration, restoring each module's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, f in flags:
            m.training = f


def _map_layout(arg, layouts: Dict[fx.Node, Any]):
    if isinstance(arg, fx.Node):
        return layouts.get(arg)
    if isinstance(arg, (list, tuple)):
        return Multi(_map_layout(a, layouts) for a in arg)
    if isinstance(arg, dict):
        return {k: _map_layout(v, layouts) for k, v in arg.items()}
    return None


class CouplingPass(fx.Interpreter):
    """ShapeProp-style interpreter: real values flow, and each node's channel layout is computed."""

    def __init__(self, gm: fx.GraphModule, plain_reshapes: Iterable[str] = ()):
        super().__init__(gm)
        self.E = Elements(plain_reshapes=set(plain_reshapes))
        self.layouts: Dict[fx.Node, Any] = {}
        self.taps: List[Tuple[str, int, str, int, Seg]] = []
        self.tap_layouts: Dict[str, Tuple[Tuple[int, int, Seg], ...]] = {}  # node -> every (dim, pos, seg)
        self.used_keys: set = set()
        self.modules = dict(gm.named_modules())
        self.declared: set = set()
        self.dynamic: Dict[fx.Node, bool] = {}
        self.data: Dict[fx.Node, bool] = {}

    # ---- per node ------------------------------------------------------------------------
    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        layout = self._layout(n, value)
        self.layouts[n] = layout
        # only values computed from the input are activations (a weight-standardization chain is not)
        self.dynamic[n] = ((n.op == "placeholder" and isinstance(value, torch.Tensor))
                           or any(self.dynamic.get(a, False) for a in n.all_input_nodes))
        # data-dependent: computed from the input's values, not only from its shape (for RuleCall.static)
        self.data[n] = ((n.op == "placeholder" and isinstance(value, torch.Tensor))
                        or any(self.data.get(a, False) for a in n.all_input_nodes
                               if isinstance(self.env.get(a), (torch.Tensor, tuple, list))))
        if self.data[n] and isinstance(value, torch.Tensor) and isinstance(layout, tuple) \
                and not isinstance(layout, Multi):
            op = op_name(n, self.modules)
            segs = []
            for d, dl in enumerate(layout):
                if dl is None:
                    continue
                pos = 0
                for s in dl:
                    if s.inner == 1:
                        self.taps.append((n.name, d, op, pos, s))
                    segs.append((d, pos, s))
                    pos += s.span
            self.tap_layouts[n.name] = tuple(segs)
        return value

    def _layout(self, n: fx.Node, value: Any):
        E = self.E
        where = f"node '{n.name}' ({op_name(n, self.modules)})"
        if n.op == "placeholder":
            if not isinstance(value, torch.Tensor):
                return None
            return tuple(
                E.fresh_dim(s, "input", "model input channels") if d == 1 and s > 1 else None
                for d, s in enumerate(value.shape)
            )
        if n.op == "get_attr":
            if not isinstance(value, torch.Tensor):
                return None
            key = n.target
            self.used_keys.add(key)
            return tuple(E.full(E.param(key, a, s)) if s > 1 else None for a, s in enumerate(value.shape))
        if n.op == "output":
            freeze_all(E, [_map_layout(n.args[0], self.layouts)], "model output")
            return None
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        largs = tuple(_map_layout(a, self.layouts) for a in n.args)
        lkwargs = {k: _map_layout(v, self.layouts) for k, v in n.kwargs.items()}
        static = tuple(isinstance(a, fx.Node) and not self.data.get(a, False) for a in n.args)
        call = RuleCall(E, where, tuple(args), dict(kwargs), tuple(largs), dict(lkwargs), value, static=static)
        if n.op == "call_module":
            module = self.modules[n.target]
            call.module, call.prefix = module, n.target
            rule = module_rule(module) or unknown
            layout = self._apply(rule, call)
            self._check_declared(call, module, layout)
            return layout
        if n.op == "call_function":
            rule = function_rule(n.target) or unknown
        else:  # call_method
            rule = method_rule(n.target) or unknown
        if rule is unknown and not isinstance(value, (torch.Tensor, tuple, list)) and not any(
            isinstance(a, torch.Tensor) for a in list(args) + list(kwargs.values())
        ):
            return None  # arithmetic on python numbers and shapes
        return self._apply(rule, call)

    def _apply(self, rule, call: RuleCall):
        """A rule that trips over an unusual call freezes what it touches instead of failing the trace."""
        try:
            return rule(call)
        except Exception as exc:  # a rule bug must never corrupt a spec: fall back to the safe answer
            logger.debug("rule %s failed at %s: %r", getattr(rule, "__name__", rule), call.where, exc)
            call.where = f"{call.where} (rule {getattr(rule, '__name__', rule)} failed: {type(exc).__name__})"
            return unknown(call)

    def _check_declared(self, call: RuleCall, module: nn.Module, layout) -> None:
        """Every tensor of a module with a rule must be accounted for, or its channels freeze."""
        for pname, t in list(module.named_parameters()) + list(module.named_buffers()):
            key = call.key(pname)
            self.used_keys.add(key)
            for a in range(t.dim()):
                if (key, a) in call.declared or t.shape[a] <= 1:
                    continue
                reason = f"{call.where} has a tensor '{pname}' its rule does not know"
                E = self.E
                E.freeze(E.param(key, a, t.shape[a]), reason)
                freeze_all(E, list(call.largs), reason)
                freeze_all(E, [layout], reason)
        self.declared |= call.declared


def _group_name(members: Sequence[Member], order: Dict[Tuple[str, int], int], ndim: Dict[str, int],
                used: set, fallback: str) -> str:
    """Name a group after its first producer in graph order (a conv/linear weight's out-axis)."""
    producers = [m for m in members if m.axis == 0 and ndim.get(m.key, 0) >= 2 and (m.key, 0) in order]
    pool = producers or [m for m in members if (m.key, m.axis) in order] or list(members)
    base = fallback
    if pool:
        first = min(pool, key=lambda m: order.get((m.key, m.axis), 1 << 30))
        base = first.key[: -len(".weight")] if first.key.endswith(".weight") else first.key
    return _unique(base, used)


def _join_runs(items, same, step):
    """Join consecutive ``Member``/``Tap`` records that continue each other: same ``same(x)``, and both
    the positions (``start``, in steps of ``step(x)``) and the group channels (``offset``) contiguous."""
    out: list = []
    for it in items:
        if out:
            q = out[-1]
            if same(q) == same(it) and q.start + q.length * step(q) == it.start and q.offset + q.length == it.offset:
                out[-1] = dataclasses.replace(q, length=q.length + it.length)
                continue
        out.append(it)
    return out


@dataclasses.dataclass
class _Heads:
    """One head axis (a component of head elements) and the head-block groups its splits make."""

    size: int
    blocks: List[Tuple[int, str]] = dataclasses.field(default_factory=list)  # (display index, role)
    bad: str = ""


def _head_blocks(E: Elements, A, display: List, placed: set) -> Dict[int, _Heads]:
    """Place each head split's blocks as one display group (the blocks of q and k, or of v and the
    output projection: ``blocks`` = heads) and collect, per head component, the groups its permutation
    must move. Every split on a head axis must be tied, or moving heads would be unsound."""
    out: Dict[int, _Heads] = {}
    tied: Dict[Tuple[int, ...], int] = {}
    owner: Dict[int, int] = {}  # a head-block group's display index -> the head component moving it
    for s in E.splits:
        if s.outer != 1 or not s.root.role or s.sliced:
            continue
        heads_atoms = range(A.first[s.head], A.first[s.head] + len(A.bounds[s.head]) - 1)
        hcs = {A.find(i) for i in heads_atoms}
        hc = A.find(A.first[s.head])
        h = out.setdefault(hc, _Heads(s.heads))
        if len(hcs) != 1 or A.bounds[s.head] != [0, s.heads]:
            for c in hcs:
                out.setdefault(c, _Heads(A.atom_len[c])).bad = f"{s.where}: its heads are used apart"
            continue
        comps = []
        for b in range(s.heads):
            block = slice_dim(s.chan, b * s.dim, (b + 1) * s.dim)
            pcs = list(A.pieces(block[0].elem, block[0].off, s.dim)) if block and len(block) == 1 else []
            if len(pcs) != 1 or pcs[0][1] != 0 or A.atom_len[pcs[0][0]] != s.dim:
                comps = None
                break
            comps.append(A.find(pcs[0][0]))
        if not comps or len(set(comps)) != len(comps):
            h.bad = h.bad or (f"{s.where}: the head dim is shared by all heads (a norm, rotary embedding, "
                              "relative-position table or shared lambda over it), so heads are not matched as "
                              "wholes" if comps else
                              f"{s.where}: a head's channels are used apart")
            continue
        key = tuple(comps)
        if key not in tied:
            if any(c in placed for c in comps):
                h.bad = h.bad or f"{s.where}: a head's channels are tied to another head layout"
                continue
            tied[key] = len(display)
            display.append((block[0].elem, comps))
            placed.update(comps)
        if owner.setdefault(tied[key], hc) != hc:
            # the same head blocks viewed through two head axes that nothing joined (GCViT: one global
            # query, a residual stream, split into heads by every block of a stage): two heads groups
            # would move the same blocks apart
            why = f"{s.where}: its head blocks are also split into heads elsewhere, on another head axis"
            for c in (hc, owner[tied[key]]):
                out[c].bad = out[c].bad or why
        entry = (tied[key], s.role)
        if all(gi != tied[key] for gi, _ in h.blocks):
            h.blocks.append(entry)
        elif s.role == "qk":  # a group seen as v's and as k's is the qk group
            h.blocks = [(gi, "qk" if gi == tied[key] else r) for gi, r in h.blocks]
    return out


def _tie_heads(spec: PermutationSpec, heads: Dict[int, _Heads], where: Dict[int, Tuple[int, int]],
               group_of_display: List[int], used_names: set) -> None:
    """Give each head axis's group the members of the head-block groups (every block of ``dim``
    positions moves as one: ``inner=dim``) and their names (``heads_of``); freeze it where heads cannot
    move as wholes. Tied groups are named ``<producer>:qk`` / ``:vo``, the heads ``<qk producer>:heads``."""
    group_at = dict(zip(group_of_display, spec.groups))
    for hc, h in heads.items():
        gh = group_at.get(where[hc][0]) if hc in where else None
        if gh is None:
            continue
        tied = [(group_at.get(gi), role) for gi, role in sorted(h.blocks, key=lambda t: t[1] != "qk")]
        why = h.bad
        if not why and not tied:
            why = "head axis without head-block groups"
        if not why and gh.size != h.size:
            why = "the head axis is joined to other channels"
        for g, _ in tied:
            if why:
                break
            if g is None or g.frozen:
                why = f"head-block group {g.name if g else '?'} is frozen ({g.reason if g else 'no taps'})"
            elif g.blocks != h.size or g.size % h.size:
                why = f"head-block group {g.name} is not {h.size} blocks"
            elif any(m.groups != 1 or m.offset % g.block_size or m.length % g.block_size for m in g.members):
                why = f"head-block group {g.name} has members that do not hold whole heads"
        if why:
            if not gh.frozen:
                gh.frozen, gh.reason = True, why
            continue
        base = tied[0][0].name.split("#")[0]
        for g, role in tied:
            used_names.discard(g.name)
            g.name = _unique(f"{g.name.split('#')[0]}:{role or 'heads'}", used_names)
            d = g.block_size  # one head's channels of this group (q/k and v may differ: LeViT)
            gh.members.extend(Member(m.key, m.axis, m.start, m.offset // d, m.length // d, m.inner * d)
                              for m in g.members)
        used_names.discard(gh.name)
        gh.name = _unique(f"{base}:heads", used_names)
        gh.heads_of = [g.name for g, _ in tied]
        runs = _strided_runs(gh.members)
        if runs is None:
            gh.frozen, gh.reason = True, "the heads' channels do not line up head by head"
            gh.heads_of = []
            continue
        gh.members = runs


def _strided_runs(members: List[Member]) -> Optional[List[Member]]:
    """Join a heads group's one-head members into members covering every head, track by track (the
    i-th member of each head on one tensor axis: LeViT's q and k rows of each head), at a constant
    step of positions (``Member.stride``). None where the heads' members do not line up."""
    out = [m for m in members if m.length != 1]
    buckets: Dict[tuple, Dict[int, List[Member]]] = defaultdict(lambda: defaultdict(list))
    for m in members:
        if m.length == 1:
            buckets[(m.key, m.axis, m.inner, m.groups)][m.offset].append(m)
    for by_head in buckets.values():
        heads = sorted(by_head)
        tracks = [sorted(by_head[h], key=lambda m: m.start) for h in heads]
        if len({len(t) for t in tracks}) != 1:
            return None
        for k in range(len(tracks[0])):
            run = [t[k] for t in tracks]
            steps = {b.start - a.start for a, b in zip(run, run[1:])}
            if heads != list(range(heads[0], heads[0] + len(heads))) or len(steps) > 1 or \
                    (steps and min(steps) < run[0].inner):
                return None
            step = steps.pop() if steps else run[0].inner
            out.append(dataclasses.replace(run[0], length=len(run), stride=0 if step == run[0].inner else step))
    return sorted(out, key=lambda m: (m.offset, m.key, m.axis, m.start))


def _unique(name: str, used: set) -> str:
    out, k = name, 1
    while out in used:
        k += 1
        out = f"{name}#{k}"
    used.add(out)
    return out


def resolve_spec(p: CouplingPass, model: nn.Module, input_shape) -> PermutationSpec:
    """Atoms -> components -> display groups (components from one element's equal blocks are shown
    as one group with ``blocks``) -> members and taps in group coordinates."""
    E = p.E
    virtual = E.finish_splits()  # head dims and q/k/v axes that only the attention rules touched
    for xm in E.extra_members:  # member ranges must fall on atom boundaries
        E.cut(xm.elem, xm.off)
        E.cut(xm.elem, xm.off + xm.length)
    A = E.resolve()
    n_atoms = len(A.atom_elem)
    comp_atoms: Dict[int, List[int]] = defaultdict(list)
    for i in range(n_atoms):
        comp_atoms[A.find(i)].append(i)
    anchor = {c: min(A.atom_elem[i] for i in atoms) for c, atoms in comp_atoms.items()}

    # display groups: an element whose atoms are equal blocks, each its own component anchored here
    display: List[Tuple[int, List[int]]] = []  # (anchor element, components in block order)
    placed: set = set()
    heads = _head_blocks(E, A, display, placed)
    for e in range(len(E.size)):
        if e in virtual:
            continue
        atoms = list(range(A.first[e], A.first[e] + len(A.bounds[e]) - 1))
        comps = [A.find(i) for i in atoms]
        mine = [c for c in comps if anchor[c] == e and c not in placed]
        if not mine:
            continue
        if (len(atoms) > 1 and len(set(comps)) == len(comps) and all(anchor[c] == e for c in comps)
                and len({A.atom_len[i] for i in atoms}) == 1
                and len({bool(A.reasons.get(c)) for c in comps}) == 1):
            display.append((e, comps))
            placed.update(comps)
        else:
            for c in dict.fromkeys(mine):
                display.append((e, [c]))
                placed.add(c)

    # where each component sits in its display group
    where: Dict[int, Tuple[int, int]] = {}
    for gi, (_, comps) in enumerate(display):
        size = A.atom_len[comps[0]]
        for k, c in enumerate(comps):
            where[c] = (gi, k * size)
    members: Dict[int, List[Member]] = defaultdict(list)
    taps: Dict[int, List[Tap]] = defaultdict(list)

    def place(e, off, length):
        for ia, inside, n in A.pieces(e, off, length):
            gi, base = where[A.find(ia)]
            yield gi, base + inside, n, inside == 0 and n == A.atom_len[ia]

    for (key, axis), e in E.param_of.items():
        pos = 0
        for gi, goff, n, _ in place(e, 0, E.size[e]):
            members[gi].append(Member(key, axis, pos, goff, n))
            pos += n
    for xm in E.extra_members:
        pos = xm.start
        for gi, goff, n, _ in place(xm.elem, xm.off, xm.length):
            members[gi].append(Member(xm.key, xm.axis, pos, goff, n, xm.inner, xm.groups))
            pos += n * xm.inner
    for node, dim, op, pos, seg in p.taps:
        if seg.elem in virtual:
            continue
        for gi, goff, n, whole in place(seg.elem, seg.off, seg.length):
            if whole:
                taps[gi].append(Tap(node, dim, op, pos, goff, n))
            pos += n

    for gi in members:
        members[gi] = _join_runs(sorted(set(members[gi]), key=lambda m: (m.key, m.axis, m.start)),
                                 lambda m: (m.key, m.axis, m.inner, m.groups), lambda m: m.inner)
    for gi in taps:
        taps[gi] = _join_runs(sorted(set(taps[gi]), key=lambda t: (t.node, t.dim, t.start)),
                              lambda t: (t.node, t.dim), lambda t: 1)

    # frozen reasons, and a (key, axis) position claimed by two groups freezes both
    reasons: Dict[int, List[str]] = {gi: [r for c in comps for r in A.reasons.get(c, [])]
                                     for gi, (_, comps) in enumerate(display)}
    # tensors outside the state dict (non-persistent buffers) cannot be permuted with it: a member
    # there is harmless only if the tensor is the same along that axis, else the group freezes
    sd_keys = set(model.state_dict().keys())
    tensors = dict(model.named_buffers())
    tensors.update(dict(model.named_parameters()))
    for gi in list(members):
        keep = []
        for m in members[gi]:
            if m.key in sd_keys:
                keep.append(m)
                continue
            t = tensors.get(m.key)
            if t is not None and m.groups == 1:
                sl = t.narrow(m.axis, m.start, m.length * m.inner)
                if bool((sl == sl.narrow(m.axis, 0, 1)).all()):
                    E.channel_free[(m.key, m.axis)] = "non-persistent buffer, equal along this axis"
                    continue
            reasons[gi].append(f"'{m.key}' is not in the state dict (non-persistent) and varies along axis {m.axis}")
        members[gi] = keep
    by_axis: Dict[Tuple[str, int], List[Tuple[int, int, int, int]]] = defaultdict(list)
    for gi, ms in members.items():
        for m in ms:
            by_axis[(m.key, m.axis)].append((m.start, m.start + m.length * m.inner, gi, m.offset))
    for (key, axis), spans in by_axis.items():
        spans.sort()
        for (_, a1, ga, _), (b0, _, gb, _) in zip(spans, spans[1:]):
            if b0 < a1:
                for g in (ga, gb):
                    msg = f"'{key}' axis {axis} is claimed twice"
                    if msg not in reasons[g]:
                        reasons[g].append(msg)

    # heads and their blocks inside a leaf module (nn.MultiheadAttention) show no activation, yet are groups
    head_displays = {where[hc][0] for hc in heads if hc in where} | {gi for h in heads.values() for gi, _ in h.blocks}
    spec = PermutationSpec(input_shape=tuple(input_shape), model_name=type(model).__name__)
    group_of_display: List[int] = []  # display index of each spec group
    used_names: set = set()
    sd = model.state_dict()
    ndim = {k: v.dim() for k, v in sd.items()}
    for gi, (e, comps) in enumerate(display):
        block = A.atom_len[comps[0]]
        size = block * len(comps)
        rs = list(dict.fromkeys(reasons[gi]))[:6]
        ms = sorted(members.get(gi, []), key=lambda m: (m.offset, m.key, m.axis))
        if not taps.get(gi) and not (gi in head_displays and not rs):
            # never an activation channel: parameter axes that no permutation may touch
            for m in ms:
                if rs or size > 1:
                    spec.channel_free.append((m.key, m.axis, rs[0] if rs else "never meets an activation channel"))
            continue
        if not rs and block <= 1:
            rs.append("a single channel" if size == 1 else "block constraints leave every channel fixed")
        frozen = bool(rs)
        name = "input" if E.label[e] == "input" else _group_name(ms, E.param_of, ndim, used_names, E.label[e])
        group_of_display.append(gi)
        spec.groups.append(PermutationGroup(
            name=name, size=size, members=ms, blocks=len(comps), frozen=frozen,
            reason="; ".join(rs) if frozen else None, taps=taps[gi],
        ))
    _tie_heads(spec, heads, where, group_of_display, used_names)
    # taps whose value carries a free group's channels on another axis (see Tap.across)
    name_of = {gi: g for gi, g in zip(group_of_display, spec.groups)}
    across: Dict[str, List[Tuple[int, int, str, int, int, int]]] = {}
    for node, segs in p.tap_layouts.items():
        out = []
        for d, pos, seg in segs:
            if seg.elem in virtual:
                continue
            for gi, goff, n, _ in place(seg.elem, seg.off, seg.length):
                g = name_of.get(gi)
                if g is not None and not g.frozen:
                    out.append((d, pos, g.name, goff, n, seg.inner))
                pos += n * seg.inner
        across[node] = out
    for g in spec.groups:
        g.taps = [dataclasses.replace(t, across=tuple(a for a in across.get(t.node, ()) if a[0] != t.dim))
                  for t in g.taps]
    for (key, axis), why in E.channel_free.items():
        spec.channel_free.append((key, axis, why))
    touched = {m.key for g in spec.groups for m in g.members} | {c[0] for c in spec.channel_free} | p.used_keys
    spec.unused = [k for k in sd if k not in touched]
    return spec


def trace_permutation_spec(
    model: nn.Module,
    example_input: Optional[torch.Tensor] = None,
    *,
    input_shape: Optional[Sequence[int]] = None,
    leaf_modules: Iterable = (),
    autowrap_functions: Iterable = (),
) -> PermutationSpec:
    """Infer the permutation groups of ``model`` by tracing it with torch.fx.

    ``example_input`` (or ``input_shape``) is run once, in eval mode and without gradients; the
    model's parameters, buffers and train/eval flags are left as they were. Only its first sample is
    run, as ``merge`` traces: the spec does not depend on the batch size (a batch axis of size one
    carries nothing, so a reshape that folds the batch into the heads, as HaloNet's does, reads as
    the head split it is for every sample).
    """
    if example_input is None:
        if input_shape is None:
            raise MergeVisionError("trace_permutation_spec needs example_input= or input_shape=, e.g. (1, 3, 64, 64)")
        p0 = next(iter(model.parameters()), None)
        example_input = torch.randn(*input_shape, dtype=p0.dtype if p0 is not None else torch.float32,
                                    device=p0.device if p0 is not None else "cpu")
    if not isinstance(example_input, torch.Tensor):
        raise MergeVisionError(f"example_input must be a Tensor, got {type(example_input).__name__}")
    if example_input.dim() > 1 and example_input.shape[0] > 1:
        example_input = example_input[:1]
    with eval_mode(model), torch.no_grad():
        gm = trace_model(model, leaf_modules=leaf_modules, autowrap_functions=autowrap_functions,
                         input_shape=tuple(example_input.shape[1:]))
        plain: set = set()
        while True:
            p = CouplingPass(gm, plain)
            try:
                p.run(example_input)
            except MergeVisionError:
                raise
            except Exception as exc:
                raise TraceError(
                    f"running the traced {type(model).__name__} on an input of shape {tuple(example_input.shape)} "
                    f"failed: {type(exc).__name__}: {exc}. Check that the example input fits the model "
                    "(channels, size)."
                ) from exc
            # a reshape viewed as heads that no attention used is a plain channel-splitting reshape:
            # trace again with it as one (so a model without attention traces exactly as it always did)
            unused = p.E.unused_splits() - plain
            if not unused:
                break
            plain |= unused
    return resolve_spec(p, model, example_input.shape)
