"""Run several models of one architecture through the same traced graph in lockstep.

Every statistics pass (matching, REPAIR targets, REPAIR measurement) is one walk over the graph:
node by node, each model computes its value, a callback sees the values of all models at once
(cross-moments need A and B together) and may replace them (REPAIR corrections act on later
layers), and values are freed after their last use, so peak memory stays that of plain forwards.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.fx as fx
from torch import nn

from .errors import MergeVisionError
from .trace.tracer import check_input_shape, trace_model

NodeHook = Callable[[fx.Node, List[Any]], Optional[List[Any]]]


class Lockstep:
    """Interpreters over ``graph`` bound to each model; ``run(x, hooks)`` walks them together.

    ``hooks`` maps node names to callbacks ``hook(node, values) -> values | None``; ``override``
    maps node names to ``fn(node, model_index, args, kwargs) -> value`` replacing the node's own
    computation (used to run a BatchNorm on batch statistics during REPAIR).
    """

    def __init__(self, models: Sequence[nn.Module], graph: Union[fx.GraphModule, fx.Graph]):
        shared = graph if isinstance(graph, fx.Graph) else graph.graph
        self.graph = shared
        self.gm = None if isinstance(graph, fx.Graph) else graph  # its input shape, where it has one
        self.nodes = list(shared.nodes)
        gms = [bind(m, graph) for m in models]
        self.interps = [fx.Interpreter(g, garbage_collect_values=False) for g in gms]
        # each model's own nodes, in the shared graph's order (its own graph when it was traced anew)
        self.node_lists = [self.nodes if g.graph is shared else list(g.graph.nodes) for g in gms]
        index = {n: i for i, n in enumerate(self.nodes)}
        last_use: Dict[int, int] = {}
        for i in reversed(range(len(self.nodes))):
            for a in self.nodes[i].all_input_nodes:
                last_use.setdefault(index[a], i)
        self.free_after: Dict[int, List[int]] = {}
        for a, i in last_use.items():
            self.free_after.setdefault(i, []).append(a)

    def run(self, x: torch.Tensor, hooks: Dict[str, Callable] = (), override: Dict[str, Callable] = (),
            active: Optional[Sequence[int]] = None) -> List[Any]:
        hooks = dict(hooks or {})
        override = dict(override or {})
        if self.gm is not None:
            check_input_shape(self.gm, x)
        idx = list(range(len(self.interps))) if active is None else list(active)
        for k in idx:
            self.interps[k].env = {}
            self.interps[k].args_iter = iter([x])
        outputs: List[Any] = [None] * len(self.interps)
        for i, n in enumerate(self.nodes):
            vals = []
            for k in idx:
                it, nk = self.interps[k], self.node_lists[k][i]
                v = NotImplemented
                if n.name in override:
                    args, kwargs = it.fetch_args_kwargs_from_env(nk)
                    v = override[n.name](nk, k, args, kwargs)
                if v is NotImplemented:
                    v = it.run_node(nk)
                vals.append(v)
            if n.name in hooks:
                new = hooks[n.name](n, vals)
                if new is not None:
                    vals = new
            for k, v in zip(idx, vals):
                self.interps[k].env[self.node_lists[k][i]] = v
            if n.op == "output":
                for k, v in zip(idx, vals):
                    outputs[k] = v
            for dead in self.free_after.get(i, ()):
                for k in idx:
                    self.interps[k].env.pop(self.node_lists[k][dead], None)
        return [outputs[k] for k in idx]


def _has_target(m: nn.Module, target: str) -> bool:
    obj = m
    for atom in target.split("."):
        if not hasattr(obj, atom):
            return False
        obj = getattr(obj, atom)
    return True


def _signature(n: fx.Node) -> str:
    return n.format_node()


def bind(model: nn.Module, graph: Union[fx.GraphModule, fx.Graph]) -> fx.GraphModule:
    """``model``'s own GraphModule over the shared graph: the same nodes, by name and order.

    A traced graph may read tensors that live on no module of the model: fx stows them as
    ``_tensor_constantN`` attributes of the GraphModule it traced (computed from buffers, e.g. Swin's
    ``relative_position_index.view(-1)``, or from a module's cache). They are each model's own values,
    so a model lacking them is traced itself (with the shared trace's options), and its graph must be
    the shared one node for node; copying the first model's constants would run every other model
    with them.
    """
    shared = graph if isinstance(graph, fx.Graph) else graph.graph
    missing = [n.target for n in shared.nodes if n.op == "get_attr" and not _has_target(model, n.target)]
    if not missing:
        return fx.GraphModule(model, shared)
    options = None if isinstance(graph, fx.Graph) else graph.meta.get("trace_options")
    if options is None:
        raise MergeVisionError(
            f"the traced graph reads {missing[0]!r}, which {type(model).__name__} does not have; pass the "
            "GraphModule from mergekit_vision.engine.shared_graph (it knows how to trace each model)")
    own = trace_model(model, **options)
    ours, theirs = list(shared.nodes), list(own.graph.nodes)
    k = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if _signature(a) != _signature(b)), None)
    if k is None and len(ours) != len(theirs):
        k = min(len(ours), len(theirs))
    if k is not None:
        where = (f"node {k}: {_signature(ours[k])!r} vs {_signature(theirs[k])!r}"
                 if k < min(len(ours), len(theirs)) else f"{len(ours)} vs {len(theirs)} nodes")
        raise MergeVisionError(
            f"{type(model).__name__} traces to a different graph than the model the graph was traced from "
            f"({where}): its forward depends on state other than its weights (e.g. a cache filled by an "
            "earlier forward). Build all models the same way (a fresh model, then load_state_dict) before merging.")
    return own


def shared_graph(model: nn.Module, leaf_modules=(), autowrap_functions=(), input_shape=None) -> fx.GraphModule:
    """The traced graph that all models of this architecture are run through; ``input_shape`` (one
    input's, without the batch) lets modules that branch on sizes be traced (``trace_model``)."""
    return trace_model(model, leaf_modules=leaf_modules, autowrap_functions=autowrap_functions,
                       input_shape=input_shape)
