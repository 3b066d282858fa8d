"""Trace a model with torch.fx, using timm's own leaf-module and autowrap lists.

Input: an ``nn.Module``. Output: a ``GraphModule`` sharing the model's parameters, or a ``TraceError``
that names the module being traced when fx failed and says how to make it a leaf.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Type

import torch.fx as fx
from torch import nn

from ..errors import TraceError
from .rules import library_leaf_types, registered_module_types, timm_rule_types


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


_CONTAINERS = (dict, list, set)
_MISSING = object()

# module attributes that cache values computed from the module's tensors in eval mode (timm's LeViT,
# EfficientFormer(V2), EfficientViT-MSRA, TinyViT: attention biases gathered per head). A trace runs
# with them empty, so the graph computes those values from the tensors (a filled cache would be traced
# as a constant: its parameter would join no permutation group and its values would be the traced
# model's for every model run through the graph); code that rewrites tensors empties them
# (``permute.clear_tensor_caches``).
TENSOR_CACHES = ("attention_bias_cache",)


@contextlib.contextmanager
def restored_state(model: nn.Module):
    """Undo what a forward did to the modules' own attributes when the block exits.

    Symbolic tracing runs ``forward`` with Proxies: a module that caches a computed tensor in eval
    mode (timm's LeViT / EfficientFormerV2 attention-bias caches) stores a Proxy in its cache, and fx
    stows tensors it cannot name as ``_tensor_constantN`` attributes on the traced module itself. Left
    there, the model is mutated, and a second trace of it reuses the first trace's Proxy, whose node
    belongs to another graph ("Node add referenced nonexistent value getitem_6" when the graph runs).
    Every attribute a module held before is restored (containers in place, so references to them stay
    valid) and every attribute added is removed. ``TENSOR_CACHES`` are empty inside the block.
    """
    saved: List[Tuple[nn.Module, Dict[str, Any], Dict[str, Any]]] = []
    for m in model.modules():
        attrs = dict(vars(m))
        contents = {k: (dict(v) if isinstance(v, dict) else list(v))
                    for k, v in attrs.items() if isinstance(v, _CONTAINERS)}
        saved.append((m, attrs, contents))
        for k in TENSOR_CACHES:
            if isinstance(attrs.get(k), dict):
                attrs[k].clear()  # refilled from ``contents`` on exit
    try:
        yield model
    finally:
        for m, attrs, contents in saved:
            now = vars(m)
            for k in [k for k in now if k not in attrs]:
                del now[k]
            for k, v in attrs.items():
                if now.get(k, _MISSING) is not v:
                    now[k] = v
                if k in contents:
                    old = contents[k]
                    if isinstance(v, dict):
                        if v.keys() != old.keys() or any(v[q] is not old[q] for q in old):
                            v.clear()
                            v.update(old)
                    elif len(v) != len(old) or any(a is not b for a, b in zip(v, old)):
                        v.clear()
                        if isinstance(v, set):
                            v.update(old)
                        else:
                            v.extend(old)


def default_args(model: nn.Module) -> Dict[str, Any]:
    """The forward arguments after the input that have defaults, with those defaults.

    The graph is run with the input alone (the coupling pass, the lockstep walks), so these are
    traced as constants (fx ``concrete_args``): ``forward(x, mask=None)`` then records the
    ``mask is None`` branch the model takes when called as ``model(x)``, not a branch on a
    placeholder that later fails (timm's Hiera).
    """
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # no introspectable signature: trace as fx would
        return {}
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p.default for p in params[1:] if p.kind in kinds and p.default is not inspect.Parameter.empty}


def trace_model(
    model: nn.Module,
    *,
    leaf_modules: Iterable = (),
    autowrap_functions: Iterable = (),
) -> fx.GraphModule:
    """Symbolically trace ``model``; raise ``TraceError`` with the offending module and the fix.

    timm's notrace modules are traced through when fx can (more channels become visible) and made
    leaves, as timm does, only when fx fails inside one; timm modules that have a channel rule
    (BatchNormAct2d, Conv2dSame, ...) are always leaves, and so are torchvision's Swin attention
    (``ShiftedWindowAttention``: its rule reads the weights it hands to a wrapped function) and the module
    types given a rule with ``register_module_rule`` (the rule sees the call, not its insides). Forward
    arguments after the input that have defaults are traced at their defaults (see ``default_args``): the
    graph takes the input alone.
    """
    timm_leaves, _ = _timm_leaf_modules()
    leaves = list(leaf_modules) + list(registered_module_types()) + list(library_leaf_types())
    leaves += [t for t in timm_leaves if t in timm_rule_types()]
    timm_set = set(timm_leaves)
    while True:
        tracer = ModelTracer(leaves, list(autowrap_functions))
        try:
            with restored_state(model):
                graph = tracer.trace(model, concrete_args=default_args(model) or None)
                # the GraphModule copies fx's stowed constants from the model before they are removed
                gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
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
    try:
        graph.lint()
    except Exception as exc:  # e.g. a value carried over from another trace by module state
        raise TraceError(f"torch.fx traced {type(model).__name__} into an inconsistent graph: {exc}") from exc
    gm.meta["trace_options"] = dict(leaf_modules=tuple(leaves), autowrap_functions=tuple(autowrap_functions))
    return gm
