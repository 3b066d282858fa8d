"""Trace a model with torch.fx, using timm's own leaf-module and autowrap lists.

Input: an ``nn.Module``. Output: a ``GraphModule`` sharing the model's parameters, or a ``TraceError``
that names the module being traced when fx failed and says how to make it a leaf.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple, Type

import torch.fx as fx
from torch import nn

from ..errors import TraceError


def _timm_leaf_modules() -> Tuple[List[Type[nn.Module]], List]:
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except Exception:  # timm absent or too old: plain fx conventions
        return [], []
    return list(get_notrace_modules()), list(get_notrace_functions())


class ModelTracer(fx.Tracer):
    """An fx tracer with extra leaf modules (types or qualified names) that remembers which module it
    was inside when tracing fails."""

    def __init__(self, leaf_modules: Sequence = (), autowrap_functions: Sequence = ()):
        _, timm_fns = _timm_leaf_modules()
        self.leaf_types = tuple(t for t in leaf_modules if isinstance(t, type))
        self.leaf_names = {n for n in leaf_modules if isinstance(n, str)}
        fns = tuple(f for f in list(timm_fns) + list(autowrap_functions) if callable(f))
        super().__init__(autowrap_functions=fns)
        self._mv_stack: List[Tuple[str, type]] = []
        self.failed_in: Optional[Tuple[str, type]] = None  # innermost module being traced when fx raised

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        self._mv_stack.append((self.path_of_module(m), type(m)))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self._mv_stack[-1]
            raise
        finally:
            self._mv_stack.pop()


def trace_model(
    model: nn.Module,
    *,
    leaf_modules: Iterable = (),
    autowrap_functions: Iterable = (),
) -> fx.GraphModule:
    """Symbolically trace ``model``; raise ``TraceError`` with the offending module and the fix.

    timm's notrace modules are traced through when fx can (more channels become visible) and made
    leaves, as timm does, only when fx fails inside one; timm modules that have a channel rule
    (BatchNormAct2d, Conv2dSame, ...) are always leaves.
    """
    from .rules import timm_rule_types  # the rule table knows which timm leaves it understands

    timm_leaves, _ = _timm_leaf_modules()
    leaves = list(leaf_modules) + [t for t in timm_leaves if t in timm_rule_types()]
    timm_set = set(timm_leaves)
    while True:
        tracer = ModelTracer(leaves, list(autowrap_functions))
        try:
            graph = tracer.trace(model)
            break
        except Exception as exc:  # fx raises many kinds: TraceError, TypeError, RuntimeError, ...
            failed = tracer.failed_in
            if failed is not None and failed[1] in timm_set and failed[1] not in leaves:
                leaves.append(failed[1])  # timm's own convention: this module is a leaf
                continue
            name = f"{failed[0] or '<root>'} ({failed[1].__name__})" if failed else None
            where = name or f"the top-level {type(model).__name__}.forward"
            hint = (
                f"pass leaf_modules=[{failed[0]!r}] (or its class) to treat it as an opaque leaf; its channels "
                "are then frozen, which is safe"
                if failed
                else "make the data-dependent part a submodule and pass it in leaf_modules=, or wrap the function "
                "with torch.fx.wrap / autowrap_functions="
            )
            raise TraceError(
                f"torch.fx could not trace {type(model).__name__}: failed inside {where}: "
                f"{type(exc).__name__}: {exc}. Fix: {hint}."
            ) from exc
    return fx.GraphModule(tracer.root, graph, type(model).__name__)
