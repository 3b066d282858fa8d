"""The rule tables, filled once from the op vocabulary (``mergekit_vision.ops``), and the extension
point: ``register_module_rule``, ``register_function_rule``, ``register_method_rule``.

A lookup asks, in order: the rules users registered, the built-in tables, then timm's and
torchvision's rules (resolved once each library is imported; ``import mergekit_vision`` imports
neither). A module type is looked up along its MRO, so a subclass inherits its base's rule.
"""
from __future__ import annotations

import functools
import operator
from typing import Any, Callable, Dict, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ... import ops
from ...errors import MergeVisionError
from .attention import attention_mask, matmul_rule, multihead_attention_module, sdpa_rule, window_attention_module
from .core import RuleCall, mixes_channels, passthrough
from .elementwise import elementwise, norm_method, pad_rule, reduction, spatial_op
from .layers import conv_functional, conv_module, linear_functional, linear_module, prelu_module
from .norms import (batchnorm_functional, batchnorm_module, groupnorm_functional, groupnorm_module,
                    layernorm_functional, layernorm_module)
from .shape import (cat_rule, chunk_rule, expand_rule, getattr_rule, getitem_rule, movedim_rule, patch_merging_pad,
                    permute_rule, repeat_interleave_rule, repeat_rule, reshape_rule, roll_rule, split_rule, stack_rule,
                    tokens_last, transpose_rule, unbind_rule, unfold_rule)

Rule = Callable[[RuleCall], Any]


def _table(*parts) -> Dict[Any, Rule]:
    """One table from (ops, rule) parts, later parts winning: each op's entry is written once here."""
    table: Dict[Any, Rule] = {}
    for objects, rule in parts:
        for o in objects:
            table[o] = rule
    return table


def no_layout(call: RuleCall):
    """``x.size()``, ``x.dim()``: python numbers, no channels."""
    return None


MODULE_RULES: Dict[type, Rule] = _table(
    (ops.POINTWISE_MODULES, passthrough),
    (ops.CONV_MODULES, conv_module),
    (ops.LINEAR_MODULES, linear_module),
    (ops.BATCHNORM_MODULES, batchnorm_module),
    (ops.GROUPNORM_MODULES, groupnorm_module),
    (ops.LAYERNORM_MODULES, layernorm_module),
    ((nn.PReLU,), prelu_module),
    (ops.SPATIAL_MODULES, spatial_op),
    ((nn.Softmax, nn.LogSoftmax, nn.Softmax2d), passthrough),  # along a dim: equivariant
    ((nn.Flatten, nn.Unflatten), reshape_rule),
    (ops.CHANNEL_MIXING_MODULES, mixes_channels),
    ((nn.MultiheadAttention,), multihead_attention_module),
)

FUNCTION_RULES: Dict[Any, Rule] = _table(
    (ops.POINTWISE_FUNCTIONS, passthrough),
    (ops.BROADCAST_FUNCTIONS, elementwise),
    (ops.CONV_FUNCTIONS, conv_functional),
    (ops.LINEAR_FUNCTIONS, linear_functional),
    (ops.BATCHNORM_FUNCTIONS, batchnorm_functional),
    (ops.GROUPNORM_FUNCTIONS, groupnorm_functional),
    (ops.LAYERNORM_FUNCTIONS, layernorm_functional),
    (ops.SPATIAL_FUNCTIONS, spatial_op),
    ((F.pad,), pad_rule),
    # softmax and normalize along a dim: equivariant, every dim passes through
    ((F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, F.normalize), passthrough),
    ((torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze), reshape_rule),
    ((torch.permute,), permute_rule),
    ((torch.transpose, torch.swapaxes), transpose_rule),
    ((torch.movedim,), movedim_rule),
    ((torch.cat, torch.concat, torch.concatenate), cat_rule),
    ((torch.stack,), stack_rule),
    ((torch.split,), split_rule),
    ((torch.chunk,), chunk_rule),
    ((torch.unbind,), unbind_rule),
    ((torch.roll,), roll_rule),
    ((torch.repeat_interleave,), repeat_interleave_rule),
    ((torch.mean, torch.sum, torch.amax, torch.amin, torch.max, torch.min, torch.std, torch.var, torch.logsumexp,
      torch.prod), reduction()),
    ((torch.argmax, torch.argmin), reduction(arg_sensitive=True)),
    ((operator.getitem,), getitem_rule),
    ((getattr,), getattr_rule),
    (ops.CHANNEL_MIXING_FUNCTIONS, mixes_channels),
    (ops.MATMUL_FUNCTIONS, matmul_rule),
    (ops.ATTENTION_FUNCTIONS, sdpa_rule),
)

METHOD_RULES: Dict[str, Rule] = _table(
    (ops.POINTWISE_METHODS, passthrough),
    (ops.BROADCAST_METHODS, elementwise),
    (("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"), reshape_rule),
    (("permute",), permute_rule),
    (("transpose", "swapaxes"), transpose_rule),
    (("movedim",), movedim_rule),
    (("expand", "expand_as", "broadcast_to"), expand_rule),
    (("repeat",), repeat_rule),
    (("repeat_interleave",), repeat_interleave_rule),
    (("split",), split_rule),
    (("chunk",), chunk_rule),
    (("unbind",), unbind_rule),
    (("roll",), roll_rule),
    (("unfold",), unfold_rule),
    (("mean", "sum", "amax", "amin", "max", "min", "std", "var", "logsumexp", "prod"), reduction()),
    (("argmax", "argmin"), reduction(arg_sensitive=True)),
    (("norm",), norm_method),
    (("softmax", "log_softmax"), passthrough),
    (("size", "dim", "numel"), no_layout),
    (ops.MATMUL_METHODS, matmul_rule),
)

# what each kind of library op does to channels (kinds as in ops.LIBRARY_MODULES / LIBRARY_FUNCTIONS)
LIBRARY_KIND_RULES: Dict[str, Rule] = {
    "pointwise": passthrough, "batchnorm": batchnorm_module, "groupnorm": groupnorm_module, "conv": conv_module,
    "spatial": spatial_op, "broadcast": elementwise, "attention_mask": attention_mask, "tokens": tokens_last,
    "window_attention": window_attention_module, "patch_merging_pad": patch_merging_pad,
}
# library modules whose rule needs the call as a whole: always traced as leaves
LEAF_KINDS = ("window_attention",)

# ---- the extension point ---------------------------------------------------------------------------
USER_MODULE_RULES: Dict[type, Rule] = {}
USER_FUNCTION_RULES: Dict[Any, Rule] = {}
USER_METHOD_RULES: Dict[str, Rule] = {}


def _register(table: Dict[Any, Rule], key, rule: Optional[Rule], what: str):
    def add(r: Rule) -> Rule:
        if not callable(r):
            raise MergeVisionError(f"a rule for {what} must be a callable taking a RuleCall, got {type(r).__name__}")
        table[key] = r
        return r
    return add if rule is None else add(rule)


def register_module_rule(module_type: type, rule: Optional[Rule] = None):
    """Use ``rule`` for every call of a module of ``module_type`` (or a subclass); as a decorator,
    ``@register_module_rule(MyBlock)``. A registered module type is traced as a leaf, so its rule
    sees the call (input layouts, the module, its output), not the ops inside it. The rule returns
    the output's layout and links ranges through ``call.E`` (see ``RuleCall`` and docs/spec.md)."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise MergeVisionError(f"register_module_rule takes an nn.Module subclass, got {module_type!r}")
    return _register(USER_MODULE_RULES, module_type, rule, module_type.__name__)


def register_function_rule(function: Callable, rule: Optional[Rule] = None):
    """Use ``rule`` for every ``call_function`` node of ``function`` (a torch function, or one the
    graph keeps as a call: ``torch.fx.wrap`` / ``autowrap_functions=``)."""
    if not callable(function):
        raise MergeVisionError(f"register_function_rule takes a function, got {function!r}")
    return _register(USER_FUNCTION_RULES, function, rule, getattr(function, "__name__", repr(function)))


def register_method_rule(name: str, rule: Optional[Rule] = None):
    """Use ``rule`` for every ``call_method`` node calling the tensor method ``name``."""
    if not isinstance(name, str):
        raise MergeVisionError(f"register_method_rule takes a method name, got {name!r}")
    return _register(USER_METHOD_RULES, name, rule, f"method {name!r}")


# ---- lookups ---------------------------------------------------------------------------------------
@functools.cache
def library_rules(libraries: Tuple[str, ...], functions: bool = False) -> Dict[Any, Rule]:
    """The rules of the ops of ``libraries`` (as ``ops.loaded_libraries()`` names them)."""
    out: Dict[Any, Rule] = {}
    for lib in libraries:
        for kind, objects in ops.resolve_library(lib, functions).items():
            for o in objects:
                out.setdefault(o, LIBRARY_KIND_RULES[kind])
    return out


def module_rule(module: nn.Module) -> Optional[Rule]:
    library = library_rules(ops.loaded_libraries())
    for t in type(module).__mro__:
        for table in (USER_MODULE_RULES, MODULE_RULES, library):
            if t in table:
                return table[t]
    return None


def function_rule(function) -> Optional[Rule]:
    for table in (USER_FUNCTION_RULES, FUNCTION_RULES):
        if function in table:
            return table[function]
    return library_rules(ops.loaded_libraries(), functions=True).get(function)


def method_rule(name: str) -> Optional[Rule]:
    return USER_METHOD_RULES.get(name, METHOD_RULES.get(name))


def timm_rule_types() -> Set[type]:
    """timm module types with a rule here (kept as leaves when tracing, where timm lists them as such)."""
    library = library_rules(ops.loaded_libraries())
    return {t for table in (USER_MODULE_RULES, MODULE_RULES, library) for t in table
            if t.__module__.startswith("timm.")}


def library_leaf_types() -> Tuple[type, ...]:
    """Library module types whose rule reads the call as a whole (``LEAF_KINDS``): traced as leaves."""
    return tuple(t for lib in ops.loaded_libraries() for kind in LEAF_KINDS
                 for t in ops.resolve_library(lib).get(kind, ()))


def registered_module_types() -> Tuple[type, ...]:
    """The module types users gave a rule (``register_module_rule``): traced as leaves."""
    return tuple(USER_MODULE_RULES)
