"""Run several models of one architecture through the same traced graph in lockstep.

Every statistics pass (matching, REPAIR targets, REPAIR measurement) is one walk over the graph:
node by node, each model computes its value, a callback sees the values of all models at once
(cross-moments need A and B together) and may replace them (REPAIR corrections act on later
layers), and values are freed after their last use, so peak memory stays that of plain forwards.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.fx as fx
from torch import nn

from .trace.tracer import trace_model

NodeHook = Callable[[fx.Node, List[Any]], Optional[List[Any]]]


class Lockstep:
    """Interpreters over ``graph`` bound to each model; ``run(x, hooks)`` walks them together.

    ``hooks`` maps node names to callbacks ``hook(node, values) -> values | None``; ``override``
    maps node names to ``fn(node, model_index, args, kwargs) -> value`` replacing the node's own
    computation (used to run a BatchNorm on batch statistics during REPAIR).
    """

    def __init__(self, models: Sequence[nn.Module], graph: fx.Graph):
        self.graph = graph
        self.interps = [fx.Interpreter(fx.GraphModule(m, graph), garbage_collect_values=False) for m in models]
        nodes = list(graph.nodes)
        last_use: Dict[fx.Node, fx.Node] = {}
        for n in reversed(nodes):
            for a in n.all_input_nodes:
                last_use.setdefault(a, n)
        self.free_after: Dict[fx.Node, List[fx.Node]] = {}
        for a, n in last_use.items():
            self.free_after.setdefault(n, []).append(a)
        self.nodes = nodes

    def run(self, x: torch.Tensor, hooks: Dict[str, Callable] = (), override: Dict[str, Callable] = (),
            active: Optional[Sequence[int]] = None) -> List[Any]:
        hooks = dict(hooks or {})
        override = dict(override or {})
        idx = list(range(len(self.interps))) if active is None else list(active)
        for k in idx:
            self.interps[k].env = {}
            self.interps[k].args_iter = iter([x])
        outputs: List[Any] = [None] * len(self.interps)
        for n in self.nodes:
            vals = []
            for k in idx:
                it = self.interps[k]
                v = NotImplemented
                if n.name in override:
                    args, kwargs = it.fetch_args_kwargs_from_env(n)
                    v = override[n.name](n, k, args, kwargs)
                if v is NotImplemented:
                    v = it.run_node(n)
                vals.append(v)
            if n.name in hooks:
                new = hooks[n.name](n, vals)
                if new is not None:
                    vals = new
            for k, v in zip(idx, vals):
                self.interps[k].env[n] = v
            if n.op == "output":
                for k, v in zip(idx, vals):
                    outputs[k] = v
            for dead in self.free_after.get(n, ()):
                for k in idx:
                    self.interps[k].env.pop(dead, None)
        return [outputs[k] for k in idx]


def shared_graph(model: nn.Module, leaf_modules=(), autowrap_functions=()) -> fx.GraphModule:
    """The traced graph that all models of this architecture are run through."""
    return trace_model(model, leaf_modules=leaf_modules, autowrap_functions=autowrap_functions)
