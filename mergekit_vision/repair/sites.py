"""Where REPAIR corrects: every BatchNorm output (folded into its affine) and every conv/linear output
that no BatchNorm directly normalizes (folded into the layer's weight and bias).

A site's *value* ``z`` is the per-channel quantity being corrected: the BatchNorm output before any
fused activation (timm's BatchNormAct2d), or the conv/linear output.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..ops import PRODUCER_MODULES, is_add, is_batchnorm
from ..spec import PermutationSpec

logger = logging.getLogger(__name__)


@dataclass
class Site:
    node: str           # the fx node whose value is corrected (BN or conv/linear call)
    module: str         # module path, for fusion
    kind: str           # "bn" or "conv"
    dim: int            # channel dim of the value
    channels: int
    segments: List[Tuple[int, int, int, str]] = field(default_factory=list)  # (start, offset, length, group)
    inputs: List[str] = field(default_factory=list)  # "add" sites: the addend nodes



def module_calls(gm: fx.GraphModule) -> Counter:
    """How many times the graph calls each module (a module called twice shares one set of weights)."""
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_module")


def find_sites(gm: fx.GraphModule, spec: PermutationSpec, mode: str) -> List[Site]:
    """Sites in graph order. ``mode`` is "repair" (BN + unnormalized conv/linear), "reset" (BN only) or
    "stream" (as "repair", plus every residual add: the REPAIR authors' variant for ImageNet ResNets)."""
    modules = dict(gm.named_modules())
    taps: Dict[Tuple[str, int], List[Tuple[int, int, int, str, bool]]] = {}
    for g in spec.groups:
        for t in g.taps:
            taps.setdefault((t.node, t.dim), []).append((t.start, t.offset, t.length, g.name,
                                                          g.reason == "model output"))
    sites: List[Site] = []
    for n in gm.graph.nodes:
        if mode == "stream" and is_add(n):
            for d in (1, -1, 2, 3):
                segs = taps.get((n.name, d))
                if segs and not any(s[4] for s in segs):
                    sites.append(Site(n.name, "", "add", d, sum(s[2] for s in segs), [s[:4] for s in segs],
                                      [a.name for a in n.args[:2]]))
                    break
            continue
        if n.op != "call_module":
            continue
        m = modules[n.target]
        if is_batchnorm(m):
            if m.weight is None or not isinstance(n.args[0], fx.Node) or getattr(m, "running_var", None) is None:
                continue  # (no running statistics: it normalizes every batch by itself, nothing to correct)
            key = (n.args[0].name, 1)
            kind = "bn"
        elif isinstance(m, PRODUCER_MODULES) and mode in ("repair", "stream"):
            users = list(n.users)
            if users and all(u.op == "call_module" and is_batchnorm(modules[u.target]) for u in users):
                continue  # the BatchNorm that follows is the site
            dim = 1 if not isinstance(m, nn.Linear) else None
            key = None
            for (node, d) in taps:
                if node == n.name and (dim is None or d == dim):
                    key = (node, d)
                    break
            if key is None:
                continue
            kind = "conv"
        else:
            continue
        segs = taps.get(key, [])
        channels = m.weight.shape[0] if kind == "conv" else m.num_features
        if sum(s[2] for s in segs) != channels or any(s[4] for s in segs):
            continue  # channels not fully tracked, or the model output (logits are not repaired)
        sites.append(Site(n.name, n.target, kind, key[1], channels, [s[:4] for s in segs]))
    # a module the graph calls more than once (coat's shared position encodings) has one set of weights
    # for every call: a correction fused into it for one call would change the others too
    calls = module_calls(gm)
    shared = sorted({s.module for s in sites if s.module and calls[s.module] > 1})
    if shared:
        logger.info("REPAIR: %d module(s) called more than once are not corrected (one fused correction "
                    "cannot serve every call): %s", len(shared),
                    ", ".join(shared[:5]) + (" ..." if len(shared) > 5 else ""))
    return [s for s in sites if not (s.module and calls[s.module] > 1)]


def bn_eval(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The BatchNorm's eval-mode output before any fused activation."""
    return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)


def bn_affine(m: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode BatchNorm as a per-channel ``z = s*x + t`` (float64; no affine: gamma 1, beta 0)."""
    f64 = torch.float64
    d = (m.running_var.to(f64) + m.eps).sqrt()
    s = d.reciprocal() if m.weight is None else m.weight.double() / d
    t = -(s * m.running_mean.to(f64))
    return s, t if m.bias is None else m.bias.double() + t


def bn_post(m: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """What a timm BatchNormAct2d does after the normalization (drop, act); identity for plain BN."""
    for sub in ("drop", "act"):
        f = getattr(m, sub, None)
        if f is not None:
            z = f(z)
    return z


def bn_forward(m: nn.Module, z: torch.Tensor):
    """The module's output made from its eval-mode normalization ``z`` (no second BatchNorm), or
    ``NotImplemented`` where its own forward would differ (train mode, no running statistics)."""
    if m.training or getattr(m, "running_mean", None) is None:
        return NotImplemented
    return bn_post(m, z)


def permute_channel_stats(v: torch.Tensor, site: Site, perms: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Reorder a per-channel statistic of model B at ``site`` by the groups' permutations."""
    out = v.clone()
    for start, offset, length, group in site.segments:
        if group in perms:
            local = perms[group][offset:offset + length].to(v.device) - offset
            out[start:start + length] = v[start + local]
    return out
