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
    """An fx tracer that keeps timm's notrace modules and user ``leaf_modules`` as leaves and
    remembers which module it was inside when tracing fails."""

    def __init__(self, leaf_modules: Sequence = (), autowrap_functions: Sequence = ()):
        timm_leaves, timm_fns = _timm_leaf_modules()
        self.leaf_types = tuple(t for t in list(timm_leaves) + list(leaf_modules) if isinstance(t, type))
        self.leaf_names = {n for n in leaf_modules if isinstance(n, str)}
        fns = tuple(f for f in list(timm_fns) + list(autowrap_functions) if callable(f))
        super().__init__(autowrap_functions=fns)
        self._mv_stack: List[str] = []
        self.failed_in: Optional[str] = None  # innermost module being traced when fx raised

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        self._mv_stack.append(f"{name} ({type(m).__name__})" if name else type(m).__name__)
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
    """Symbolically trace ``model``; raise ``TraceError`` with the offending module and the fix."""
    tracer = ModelTracer(list(leaf_modules), list(autowrap_functions))
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many kinds: TraceError, TypeError, RuntimeError, ...
        where = tracer.failed_in or f"the top-level {type(model).__name__}.forward"
        innermost = tracer.failed_in.split(" ")[0] if tracer.failed_in else None
        hint = (
            f"pass leaf_modules=[{innermost!r}] (or its class) to treat it as an opaque leaf; its channels are then "
            "frozen, which is safe"
            if innermost
            else "make the data-dependent part a submodule and pass it in leaf_modules=, or wrap the function "
            "with torch.fx.wrap / autowrap_functions="
        )
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: failed inside {where}: "
            f"{type(exc).__name__}: {exc}. Fix: {hint}."
        ) from exc
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)
