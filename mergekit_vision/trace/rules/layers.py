"""Rules for the producers (conv, linear) and the other layers with per-channel weights (PReLU)."""
from __future__ import annotations

from typing import List, Optional, Sequence

from ..layout import DimLayout, ExtraMember
from .core import RuleCall, channel_free, cut_dim, is_tensor, join_dim, layout_or_none, param_dim


def conv_core(call: RuleCall, x, lx, lw: Sequence[DimLayout], lb: DimLayout, groups: int,
              weight_key: Optional[str], in_ch: int, out_ch: int, transposed: bool = False,
              pointwise: Sequence[bool] = ()):
    """``pointwise[i]``: spatial dim ``i`` has kernel 1, stride 1, dilation 1 and no padding, so its
    positions map one to one (LambdaNet's Conv3d runs a (r, r, 1) kernel over v's channels there)."""
    E = call.E
    out = call.out
    layout: List[DimLayout] = [lx[0]]
    # spatial dims of the input must not carry channels (ECA's conv1d over channels does), unless the
    # kernel leaves that dim's positions one to one
    passes = {d: d - 2 < len(pointwise) and pointwise[d - 2] and x.shape[d] == out.shape[d]
              for d in range(2, x.dim())}
    for d in range(2, x.dim()):
        if not passes[d]:
            E.freeze_dim(lx[d], f"{call.where} convolves across a channel axis (e.g. ECA)")
    if transposed:
        lw = [lw[1], lw[0]] + list(lw[2:])
    lout = lw[0]
    for d in lw[2:]:
        E.freeze_dim(d, f"{call.where}: conv kernel spatial axis")
    if lout is None:
        lout = E.fresh_dim(out_ch, call.where, "conv weight of unknown provenance")
    if lb is not None:
        join_dim(E, lout, lb, call.where)
    cin = lx[1]
    if groups == 1:
        join_dim(E, cin, lw[1], call.where)
    elif groups == in_ch == out_ch and not transposed:  # depthwise: channel c -> channel c
        join_dim(E, cin, lout, call.where)
    elif groups == in_ch and not transposed:
        E.freeze_dim(cin, f"{call.where}: depthwise conv with a channel multiplier")
        E.freeze_dim(lout, f"{call.where}: depthwise conv with a channel multiplier")
    else:
        ipg, opg = in_ch // groups, out_ch // groups
        cut_dim(E, lout, opg)
        cut_dim(E, cin, ipg)
        if lw[1] is not None:  # a weight axis we already track cannot hold per-block permutations
            E.freeze_dim(lw[1], f"{call.where}: grouped conv weight in-axis")
            E.freeze_dim(cin, f"{call.where}: grouped conv weight in-axis seen elsewhere")
        elif cin is not None and weight_key is not None and not transposed:
            pos = 0
            for s in cin:
                if s.inner != 1:
                    E.freeze(s.elem, f"{call.where}: flattened channels into a grouped conv")
                else:
                    E.extra_members.append(ExtraMember(s.elem, s.off, s.length, weight_key, 1, pos, 1, groups))
                pos += s.span
        else:
            E.freeze_dim(cin, f"{call.where}: grouped transposed conv")
            E.freeze_dim(lout, f"{call.where}: grouped transposed conv")
    layout.append(lout)
    layout.extend(lx[d] if passes.get(d) else None for d in range(2, out.dim()))
    return tuple(layout)


def _pointwise_dims(m) -> List[bool]:
    """Per spatial dim of a conv module: whether its positions map one to one (see ``conv_core``)."""
    pad = m.padding if isinstance(m.padding, tuple) else (None,) * len(m.kernel_size)  # 'same'/'valid' strings
    return [k == 1 and s == 1 and dl == 1 and p == 0 and not getattr(m, "transposed", False)
            for k, s, dl, p in zip(m.kernel_size, m.stride, m.dilation, pad)]


def conv_module(call: RuleCall):
    m = call.module
    x = call.args[0]
    lx = layout_or_none(call.largs[0], x)
    transposed = bool(getattr(m, "transposed", False))
    w = m.weight
    lw = [param_dim(call, "weight", 0)]
    if m.groups == 1:
        lw.append(param_dim(call, "weight", 1))
    else:
        call.declared.add((call.key("weight"), 1))
        lw.append(None)
    channel_free(call, "weight", range(2, w.dim()), "conv kernel spatial axis")
    lw.extend([None] * (w.dim() - 2))
    lb = param_dim(call, "bias", 0) if getattr(m, "bias", None) is not None else None
    for extra in ("gain",):  # ScaledStdConv: a per-output-channel gain of shape (out, 1, 1, 1)
        if is_tensor(getattr(m, extra, None)):
            g = getattr(m, extra)
            if g.shape[0] == m.out_channels and g.numel() == m.out_channels:
                join_dim(call.E, lw[0] if not transposed else lw[1], param_dim(call, extra, 0), call.where)
    if transposed and m.groups == 1:
        lw = [lw[0], lw[1]] + lw[2:]  # weight is (in, out, ...); conv_core swaps
    return conv_core(call, x, lx, lw, lb, m.groups, call.key("weight"), m.in_channels, m.out_channels, transposed,
                     pointwise=_pointwise_dims(m))


def _functional_args(call: RuleCall):
    """``F.conv*`` / ``F.linear`` arguments: input, weight and bias with their layouts."""
    x = call.arg(0, "input")
    lx = layout_or_none(call.larg(0, "input"), x)
    w = call.arg(1, "weight")
    lw = list(layout_or_none(call.larg(1, "weight"), w))
    b = call.arg(2, "bias")
    lb = layout_or_none(call.larg(2, "bias"), b)[0] if is_tensor(b) else None
    return x, lx, w, lw, lb


def conv_functional(call: RuleCall):
    x, lx, w, lw, lb = _functional_args(call)
    groups = call.arg(6, "groups", 1)
    return conv_core(call, x, lx, lw, lb, groups, None, x.shape[1], w.shape[0])


def linear_core(call: RuleCall, x, lx, lw, lb, weight_key: Optional[str]):
    E = call.E
    cin = lx[-1]
    lout = lw[0]
    if lout is None:
        lout = E.fresh_dim(call.out.shape[-1], call.where, "linear weight of unknown provenance")
    if lb is not None:
        join_dim(E, lout, lb, call.where)
    if cin is not None and any(s.inner != 1 for s in cin):
        if lw[1] is not None or weight_key is None:
            E.freeze_dim(cin, f"{call.where}: flattened features into a weight axis tracked elsewhere")
            E.freeze_dim(lw[1], f"{call.where}: flattened features")
        else:
            pos = 0
            for s in cin:
                E.extra_members.append(ExtraMember(s.elem, s.off, s.length, weight_key, 1, pos, s.inner, 1))
                pos += s.span
    else:
        join_dim(E, cin, lw[1], call.where)
    return tuple(list(lx[:-1]) + [lout])


def linear_module(call: RuleCall):
    m = call.module
    x = call.args[0]
    lx = layout_or_none(call.largs[0], x)
    lw = [param_dim(call, "weight", 0), None]
    cin = lx[-1]
    if cin is not None and any(s.inner != 1 for s in cin):
        call.declared.add((call.key("weight"), 1))
    else:
        lw[1] = param_dim(call, "weight", 1)
    lb = param_dim(call, "bias", 0) if m.bias is not None else None
    return linear_core(call, x, lx, lw, lb, call.key("weight"))


def linear_functional(call: RuleCall):
    x, lx, _, lw, lb = _functional_args(call)
    return linear_core(call, x, lx, lw, lb, None)


def prelu_module(call: RuleCall):
    x = call.args[0]
    lx = layout_or_none(call.largs[0], x)
    if call.module.weight.numel() > 1:
        join_dim(call.E, lx[1], param_dim(call, "weight", 0), call.where)
    else:
        call.declared.add((call.key("weight"), 0))
    return lx
