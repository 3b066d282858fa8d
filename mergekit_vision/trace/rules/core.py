"""What a rule gets and the helpers rules share: the ``RuleCall``, layout structures, joining and
cutting channel ranges, declaring a module's parameters, and the safe answer ``unknown``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..layout import DimLayout, Elements, pieces


@dataclass
class RuleCall:
    E: Elements
    where: str  # "node 'add_3' (add)" for messages
    args: tuple
    kwargs: dict
    largs: tuple  # layouts of args, same structure, None for non-tensors
    lkwargs: dict
    out: Any
    module: Optional[nn.Module] = None
    prefix: str = ""  # qualified name of the module, for state-dict keys
    declared: set = field(default_factory=set)  # (key, axis) a module rule accounted for
    static: tuple = ()  # per positional arg: True where the value is not computed from the input (a buffer)

    def arg(self, i: int, name: str, default=None):
        if len(self.args) > i:
            return self.args[i]
        return self.kwargs.get(name, default)

    def larg(self, i: int, name: str):
        if len(self.largs) > i:
            return self.largs[i]
        return self.lkwargs.get(name)

    def key(self, pname: str) -> str:
        return f"{self.prefix}.{pname}" if self.prefix else pname


# ---- small helpers -----------------------------------------------------------------------
def is_tensor(v) -> bool:
    return isinstance(v, torch.Tensor)


def ndim_of(v) -> int:
    return v.dim() if is_tensor(v) else 0


def layout_or_none(layout, value) -> tuple:
    if layout is None or not isinstance(layout, tuple):
        return tuple(None for _ in range(ndim_of(value)))
    return layout


def fresh_layout(E: Elements, value, reason: str, label: str):
    """Layout of a value we do not understand: every non-trivial dim is a new frozen element."""
    if is_tensor(value):
        return tuple(
            E.fresh_dim(s, label, reason) if (i > 0 and s > 1) else None for i, s in enumerate(value.shape)
        )
    if isinstance(value, (tuple, list)):
        return Multi(fresh_layout(E, v, reason, label) for v in value)
    return None


class Multi(tuple):
    """Layouts of a tuple/list output (split, chunk, max with dim)."""


def iter_layouts(layout):
    """All tensor layouts inside a (possibly nested) layout structure."""
    if layout is None:
        return
    if isinstance(layout, Multi):
        for lay in layout:
            yield from iter_layouts(lay)
    elif isinstance(layout, dict):
        for lay in layout.values():
            yield from iter_layouts(lay)
    elif isinstance(layout, tuple):
        yield layout


def freeze_all(E: Elements, layouts, reason: str) -> None:
    for lay in layouts:
        for tl in iter_layouts(lay):
            for d in tl:
                E.freeze_dim(d, reason)


def join_dim(E: Elements, a: DimLayout, b: DimLayout, why: str) -> DimLayout:
    """Tie two layouts of the same positions; a channel axis against a non-channel axis freezes it."""
    if a is None and b is None:
        return None
    if E.constant_along(a) or E.constant_along(b):  # a value that repeats along the dim commutes with any order
        return b if E.constant_along(a) else a
    if a is None or b is None:
        E.freeze_dim(a or b, f"{why}: channel axis meets a non-channel axis")
        return a or b
    for pc in pieces(a, b):
        if pc is None:
            E.freeze_dim(a, f"{why}: flattened channel blocks do not line up")
            E.freeze_dim(b, f"{why}: flattened channel blocks do not line up")
            return a
        sa, sb = pc
        E.join(sa.elem, sa.off, sb.elem, sb.off, sa.length, why)
    return a


def cut_dim(E: Elements, dim: DimLayout, block: int) -> None:
    """Channels may only move within consecutive blocks of ``block`` positions of this dim."""
    if not dim or block <= 0:
        return
    pos = 0
    for s in dim:
        for b in range((pos // block + 1) * block, pos + s.span, block):
            if (b - pos) % s.inner:
                E.freeze(s.elem, "block boundary falls inside a flattened channel")
            else:
                E.cut(s.elem, s.off + (b - pos) // s.inner)
        pos += s.span


def cut_slice(E: Elements, dim: DimLayout, start: int, stop: int) -> None:
    """The positions ``start:stop`` are used on their own: keep them invariant."""
    if not dim:
        return
    pos = 0
    for s in dim:
        for b in (start, stop):
            if pos < b < pos + s.span:
                if (b - pos) % s.inner:
                    E.freeze(s.elem, "slice boundary falls inside a flattened channel")
                else:
                    E.cut(s.elem, s.off + (b - pos) // s.inner)
        pos += s.span


def module_tensor(call: RuleCall, pname: str):
    """The module's parameter/buffer ``pname``, a dotted path (``"out_proj.weight"``); None if absent."""
    t = call.module
    for part in pname.split("."):
        t = getattr(t, part, None)
    return t


def param_dim(call: RuleCall, pname: str, axis: int) -> DimLayout:
    """The layout of axis ``axis`` of the module's parameter/buffer ``pname`` (a dotted path; declares it)."""
    t = module_tensor(call, pname)
    if not is_tensor(t):
        return None
    key = call.key(pname)
    call.declared.add((key, axis))
    return call.E.full(call.E.param(key, axis, t.shape[axis]))


def channel_free(call: RuleCall, pname: str, axes: Sequence[int], why: str) -> None:
    """Axes ``axes`` of the module's tensor ``pname`` (a dotted path) carry no channels (declares them)."""
    t = module_tensor(call, pname)
    if is_tensor(t):
        for a in axes:
            key = call.key(pname)
            call.declared.add((key, a))
            call.E.channel_free[(key, a)] = why


# ---- the safe answer, and the simplest rules ---------------------------------------------------
def unknown(call: RuleCall):
    reason = f"{call.where} is not understood"
    freeze_all(call.E, list(call.largs) + list(call.lkwargs.values()), reason)
    if call.module is not None:
        for pname, t in list(call.module.named_parameters()) + list(call.module.named_buffers()):
            key = call.key(pname)
            for a in range(t.dim()):
                if t.shape[a] > 1:
                    call.E.freeze(call.E.param(key, a, t.shape[a]), f"parameter of opaque module {call.where}")
                call.declared.add((key, a))
    return fresh_layout(call.E, call.out, reason, call.where)


def passthrough(call: RuleCall):
    """Same shape, channel c of the output depends on channel c of the input only."""
    x = call.args[0] if call.args else next(iter(call.kwargs.values()))
    lx = call.largs[0] if call.largs else next(iter(call.lkwargs.values()))
    if is_tensor(call.out) and is_tensor(x) and call.out.shape == x.shape:
        return layout_or_none(lx, x)
    return unknown(call)


def mixes_channels(call: RuleCall):
    reason = f"{call.where} mixes channels"
    freeze_all(call.E, list(call.largs), reason)
    return fresh_layout(call.E, call.out, reason, call.where)
