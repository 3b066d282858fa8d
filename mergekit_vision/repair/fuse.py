"""REPAIR's last step: fold each site's measured correction into the merged model's weights, or keep
it as an explicit ``ChannelAffine`` module where it does not fold exactly (identity-shortcut adds)."""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..engine import bind
from ..match.stats import ChannelMoments
from .correct import (ChannelAffine, Target, affine_correction, foldable_addends, fuse_affine, fuse_bn_correction,
                      fuse_reset)
from .sites import Site

Affines = Dict[str, Tuple[torch.Tensor, torch.Tensor, int]]  # add-site node -> (scale, shift, channel dim)


@torch.no_grad()
def fuse_corrections(merged: nn.Module, gm, sites: List[Site], measured: Dict[str, ChannelMoments],
                     targets: Dict[str, Target], mode: str, fold_stream: bool = True,
                     ) -> Tuple[Dict[str, Optional[str]], Affines]:
    """Fuse every site's correction into ``merged`` in place (RESET: its running statistics).
    Returns a note per site (None: fused exactly) and the add-site corrections left explicit."""
    mods = dict(merged.named_modules())
    notes: Dict[str, Optional[str]] = {}
    explicit: Affines = {}
    for s in sites:
        note = None
        got = measured[s.node]
        if mode == "reset":
            fuse_reset(mods[s.module], got)
        elif s.kind == "add":
            a_, c_ = affine_correction(got, targets[s.node])
            addends = foldable_addends(s, gm, mods)
            if addends is None or not fold_stream:
                explicit[s.node] = (a_, c_, s.dim)
                note = "kept as an explicit ChannelAffine module (does not fold exactly)"
            else:
                for i, m in enumerate(addends):
                    fuse_affine(m, a_, c_ if i == 0 else torch.zeros_like(c_), "add")
        elif s.kind == "bn":
            a_, c_ = affine_correction(got, targets[s.node])
            fuse_bn_correction(mods[s.module], a_, c_, got)
        else:
            a_, c_ = affine_correction(got, targets[s.node])
            note = fuse_affine(mods[s.module], a_, c_, s.kind)
        notes[s.node] = note
    return notes, explicit


def with_affines(merged: nn.Module, gm, explicit: Affines) -> nn.Module:
    """The merged model as a GraphModule with a ChannelAffine after each add site that did not fold."""
    graph = copy.deepcopy(gm.graph)
    holder = nn.Module()
    dtype = next(iter(merged.parameters())).dtype
    for name, (a_, c_, dim) in explicit.items():
        holder.add_module(name, ChannelAffine(a_.to(dtype), c_.to(dtype), dim))
    root = bind(merged, gm)  # the merged model's modules and its own traced constants, if any
    root.add_module("repair_affine", holder)
    for node in list(graph.nodes):
        if node.name in explicit:
            with graph.inserting_after(node):
                new = graph.call_module(f"repair_affine.{node.name}", (node,))
            node.replace_all_uses_with(new, delete_user_cb=lambda u, new=new: u is not new)
    graph.lint()
    return torch.fx.GraphModule(root, graph, class_name=type(merged).__name__)
