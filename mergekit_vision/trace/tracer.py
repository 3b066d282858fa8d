"""Trace a model with torch.fx, using timm's own leaf-module and autowrap lists.

Input: an ``nn.Module``. Output: a ``GraphModule`` sharing the model's parameters, or a ``TraceError``
that names the module being traced when fx failed and says how to make it a leaf.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Type

import torch
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


class SizedProxy(fx.Proxy):
    """A proxy inside a module traced with its sizes known (``ModelTracer``'s ``specialize``): its
    ``shape``, ``size()``, ``dim()``, ``dtype`` and ``device`` are python values where the value's
    examples at two batch sizes agree, and stay traced (``x.size(d)``) where they differ; so a forward
    that branches on its input's height, width or dtype traces, while the batch stays a variable."""

    def _examples(self):
        return self.tracer.examples.get(self.node)

    def size(self, dim=None):
        ex = self._examples()
        if ex is None:
            return self.tracer.create_proxy("call_method", "size", (self,) if dim is None else (self, dim), {})
        s1, s2 = ex[0].shape, ex[1].shape
        dims = range(len(s1)) if dim is None else [dim]
        out = tuple(s1[d] if s1[d] == s2[d] else self.tracer.create_proxy("call_method", "size", (self, d), {})
                    for d in dims)
        return out if dim is None else out[0]

    @property
    def shape(self):
        return self.size()

    def dim(self):
        ex = self._examples()
        return ex[0].dim() if ex is not None else self.tracer.create_proxy("call_method", "dim", (self,), {})

    @property
    def ndim(self):
        return self.dim()

    @property
    def dtype(self):
        ex = self._examples()
        return ex[0].dtype if ex is not None else self.__getattr__("dtype")

    @property
    def device(self):
        ex = self._examples()
        return ex[0].device if ex is not None else self.__getattr__("device")


def _run_node(root: nn.Module, kind: str, target, args, kwargs):
    """What a node computes, on real values."""
    if kind == "call_function":
        return target(*args, **kwargs)
    if kind == "call_method":
        return getattr(args[0], target)(*args[1:], **kwargs)
    if kind == "call_module":
        return root.get_submodule(target)(*args, **kwargs)
    if kind == "get_attr":
        v = root
        for part in target.split("."):
            v = getattr(v, part)
        return v
    raise KeyError(kind)


class ModelTracer(fx.Tracer):
    """An fx tracer with extra leaf modules (types or qualified names) that remembers which module it
    was inside when tracing fails.

    ``specialize``: module types traced with their sizes known (``SizedProxy``), from ``inputs`` (per
    module name, per call: the call's positional arguments run on a batch of one and of two). Inside
    such a module every node is also run on those two examples, so the sizes of what it computes are
    known too; anything that cannot be run so stays a plain proxy."""

    def __init__(self, leaf_modules: Sequence = (), autowrap_functions: Sequence = (), specialize: Sequence = (),
                 inputs: Optional[Dict[str, List[tuple]]] = None):
        _, timm_fns = _timm_leaf_modules()
        self.leaf_types = tuple(t for t in leaf_modules if isinstance(t, type))
        self.leaf_names = {n for n in leaf_modules if isinstance(n, str)}
        fns = tuple(f for f in list(timm_fns) + list(autowrap_functions) if callable(f))
        super().__init__(autowrap_functions=fns)
        self._mv_stack: List[Tuple[str, type]] = []
        self.failed_in: Optional[Tuple[str, type]] = None  # innermost module being traced when fx raised
        self.specialize = tuple(specialize)
        self.inputs = inputs or {}
        self.examples: Dict[fx.Node, tuple] = {}  # node -> its values on the two examples
        self._sized = 0  # depth inside specialized modules
        self._running = False
        self._calls: Dict[str, int] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return SizedProxy(node, self) if self._sized else super().proxy(node)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        p = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if self._sized and not self._running and isinstance(p, fx.Proxy):
            values = []
            self._running = True  # ops on real values must not record nodes
            try:
                for i in (0, 1):
                    def real(a, i=i):
                        if isinstance(a, fx.Proxy):
                            return self.examples[a.node][i]  # KeyError: not known, p stays plain
                        return a
                    values.append(_run_node(self.root, kind, target, fx.node.map_aggregate(args, real),
                                            fx.node.map_aggregate(kwargs, real)))
                self.examples[p.node] = tuple(values)
            except Exception:  # not runnable on the examples: its sizes stay traced
                pass
            finally:
                self._running = False
        return p

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._running:  # a module run on the examples reads its real tensors
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m, forward, args, kwargs):
        if self._running:  # run on the examples: no node
            return forward(*args, **kwargs)
        path = self.path_of_module(m)
        self._mv_stack.append((path, type(m)))
        sized = (isinstance(m, self.specialize) and path in self.inputs
                 and not self.is_leaf_module(m, path))
        if sized:
            k = self._calls.get(path, 0)
            self._calls[path] = k + 1
            one, two = self.inputs[path][k]
            wrapped = []
            for j, a in enumerate(args):
                if isinstance(a, fx.Proxy) and j < len(one) and isinstance(one[j], torch.Tensor):
                    self.examples[a.node] = (one[j], two[j])
                    a = SizedProxy(a.node, self)
                wrapped.append(a)
            args = tuple(wrapped)
            self._sized += 1
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self._mv_stack[-1]
            raise
        finally:
            self._mv_stack.pop()
            if sized:
                self._sized -= 1


def module_inputs(model: nn.Module, types: tuple, input_shape: Tuple[int, ...], dtype,
                  device=None) -> Dict[str, List[tuple]]:
    """Per module of ``types`` (by name), per call: its positional arguments when ``model`` runs a random
    batch of one and of two inputs of ``input_shape`` (eval mode, no grad, the model's state restored)."""
    seen: Dict[str, List[tuple]] = {}
    runs = []
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: seen.setdefault(n, []).append(a))
             for n, m in model.named_modules() if isinstance(m, types)]
    g = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad(), restored_state(model):
            for batch in (1, 2):
                seen.clear()
                model(torch.randn(batch, *input_shape, generator=g).to(device=device, dtype=dtype))
                runs.append(dict(seen))
    finally:
        for h in hooks:
            h.remove()
    return {n: list(zip(calls, runs[1].get(n, []))) for n, calls in runs[0].items()}


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
    input_shape: Optional[Sequence[int]] = None,
    specialize: Sequence[type] = (),
) -> fx.GraphModule:
    """Symbolically trace ``model``; raise ``TraceError`` with the offending module and the fix.

    timm's notrace modules are traced through when fx can (more channels become visible) and made
    leaves, as timm does, only when fx fails inside one; timm modules that have a channel rule
    (BatchNormAct2d, Conv2dSame, ...) are always leaves, and so are torchvision's Swin attention
    (``ShiftedWindowAttention``: its rule reads the weights it hands to a wrapped function) and the module
    types given a rule with ``register_module_rule`` (the rule sees the call, not its insides). Forward
    arguments after the input that have defaults are traced at their defaults (see ``default_args``): the
    graph takes the input alone.

    A module whose forward branches on a size or dtype of what it computes (TinyViT's block, ConViT's
    GPSA, MobileViT's blocks: "symbolically traced variables cannot be used as inputs to control flow")
    is traced with those sizes known when ``input_shape`` (one input's shape, without the batch) is
    given: ``ModelTracer``'s ``specialize``. Sizes that depend on the batch stay traced, the others are
    constants: the graph then runs inputs of ``input_shape`` only (``gm.meta["input_shape"]``;
    ``check_input_shape``). Without ``input_shape``, or where that fails too, such a module is a leaf
    if timm lists it as one, else the trace fails with a ``TraceError`` that says what to do.
    """
    timm_leaves, _ = _timm_leaf_modules()
    leaves = list(leaf_modules) + list(registered_module_types()) + list(library_leaf_types())
    leaves += [t for t in timm_leaves if t in timm_rule_types()]
    timm_set = set(timm_leaves)
    specialize = list(specialize)
    shape = tuple(int(d) for d in input_shape) if input_shape is not None else None
    p0 = next(iter(model.parameters()), None)
    dtype = p0.dtype if p0 is not None and p0.is_floating_point() else torch.float32
    device = p0.device if p0 is not None else None
    while True:
        try:
            inputs = module_inputs(model, tuple(specialize), shape, dtype, device) if specialize else {}
        except Exception:  # the model does not run inputs of that shape: trace as if none had been given
            shape, specialize, inputs = None, [], {}
        tracer = ModelTracer(leaves, list(autowrap_functions), specialize, inputs)
        try:
            with restored_state(model):
                graph = tracer.trace(model, concrete_args=default_args(model) or None)
                # the GraphModule copies fx's stowed constants from the model before they are removed
                gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
            break
        except Exception as exc:  # fx raises many kinds: TraceError, TypeError, RuntimeError, ...
            failed = tracer.failed_in
            if failed is not None and shape is not None and failed[1] not in specialize + leaves:
                specialize.append(failed[1])  # trace it again with its sizes known
                continue
            if failed is not None and failed[1] in specialize and failed[1] not in leaves:
                specialize.remove(failed[1])  # sizes did not help: as if none had been given
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
    gm.meta["trace_options"] = dict(leaf_modules=tuple(leaves), autowrap_functions=tuple(autowrap_functions),
                                    input_shape=shape if specialize else None, specialize=tuple(specialize))
    if specialize:
        gm.meta["input_shape"] = shape
        gm.meta["specialized"] = tuple(t.__name__ for t in specialize)
    return gm


def check_input_shape(gm: fx.GraphModule, x: torch.Tensor) -> None:
    """A graph traced with sizes known (``trace_model``'s ``input_shape``) runs inputs of that shape only."""
    shape = gm.meta.get("input_shape")
    if shape is not None and tuple(x.shape[1:]) != tuple(shape):
        raise TraceError(
            f"the traced graph of {gm.__class__.__name__} runs inputs of shape (batch, "
            f"{', '.join(map(str, shape))}) only: {', '.join(gm.meta['specialized'])} branch on the sizes of "
            f"their inputs, so they were traced at that size; got {tuple(x.shape)}. Calibrate on inputs of "
            "one size, the size of the example the spec was traced on.")
