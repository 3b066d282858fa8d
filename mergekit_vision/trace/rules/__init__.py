"""Coupling rules: what each op does to the channel layouts of its inputs.

A rule gets a ``RuleCall`` (real argument values, their layouts, the real output) and returns the
output's layout, linking element ranges through ``call.E`` on the way. The rules live by concept
(``core``: the call and shared helpers; ``elementwise``; ``shape``; ``layers``: conv/linear
producers; ``norms``) and are looked up in tables keyed by module type, function or method name
(``registry``), filled once from the op vocabulary. An op found in no table freezes every channel it
touches (``unknown``), which is always safe. Users add rules with ``register_module_rule``,
``register_function_rule`` and ``register_method_rule`` (docs/spec.md, "Adding a rule").
"""
from .core import (Multi, RuleCall, channel_free, cut_dim, cut_slice, fresh_layout, freeze_all, is_tensor,
                   iter_layouts, join_dim, layout_or_none, mixes_channels, param_dim, passthrough, unknown)
from .elementwise import elementwise, reduce_dims, spatial_op
from .registry import (FUNCTION_RULES, METHOD_RULES, MODULE_RULES, Rule, function_rule, method_rule, module_rule,
                       register_function_rule, register_method_rule, register_module_rule,
                       library_leaf_types, registered_module_types, timm_rule_types)
from .shape import reshape_layout

__all__ = [
    "RuleCall", "Rule", "Multi", "register_module_rule", "register_function_rule", "register_method_rule",
    "module_rule", "function_rule", "method_rule", "timm_rule_types", "registered_module_types", "library_leaf_types",
    "MODULE_RULES", "FUNCTION_RULES", "METHOD_RULES",
    # helpers for writing rules
    "passthrough", "elementwise", "unknown", "mixes_channels", "spatial_op", "reduce_dims", "reshape_layout",
    "join_dim", "cut_dim", "cut_slice", "param_dim", "channel_free", "layout_or_none", "fresh_layout",
    "freeze_all", "iter_layouts", "is_tensor",
]
