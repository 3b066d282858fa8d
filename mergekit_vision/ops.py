"""One op vocabulary: what kind of op a traced call is (an activation, a norm, a norm with its
activation fused in, a producer, an add, a pointwise op), for the coupling rules (``trace/rules``),
the tap policy (``match/activation``) and REPAIR's sites (``repair/sites``).

Ops are known two ways. As objects (module types, functions, method names): the rules and the sites
classify the graph's calls by them. By the name a ``Tap`` records (``Tap.op``: a module's class name,
a function's ``__name__``, a method name): the tap policy reads those from the spec, which is plain
data. ``TAP_NAMES`` holds those names per kind, made from the objects where a name is theirs.

timm's and torchvision's ops resolve once that library has been imported (a model built with it
has): ``import mergekit_vision`` imports neither, which is most of what importing them costs.
"""
from __future__ import annotations

import functools
import importlib
import operator
import sys
from typing import Dict, FrozenSet, Iterable, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

# ---- the kinds -------------------------------------------------------------------------------------
ACTIVATION = "activation"  # a rectifier-like nonlinearity: its output is what the next layer sees
NORM = "norm"              # normalizes channels (BatchNorm, GroupNorm, LayerNorm)
NORM_ACT = "norm_act"      # a norm with its activation fused in (timm's BatchNormAct2d): post-activation output
PRODUCER = "producer"      # writes a group's channels from other channels (conv, linear)
ADD = "add"                # a residual add
KINDS = (ACTIVATION, NORM, NORM_ACT, PRODUCER, ADD)

# ---- activations -----------------------------------------------------------------------------------
ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
    nn.Softplus, nn.Hardtanh,
)
ACTIVATION_FUNCTIONS = (
    F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.hardswish, F.mish, F.leaky_relu, F.elu, F.selu, F.celu,
    F.softplus, F.hardtanh, torch.relu,
)
ACTIVATION_METHODS = ("relu", "relu_", "gelu", "silu", "hardtanh")

# ---- pointwise: channel c of the output depends on channel c of the input only ------------------------
# (the activations, the squashing nonlinearities, dropout, casts and copies)
POINTWISE_MODULES = (
    nn.Identity, *ACTIVATION_MODULES, nn.Sigmoid, nn.Tanh, nn.Hardsigmoid, nn.Softsign, nn.Tanhshrink,
    nn.LogSigmoid, nn.Threshold, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
POINTWISE_FUNCTIONS = (
    *ACTIVATION_FUNCTIONS, F.hardsigmoid, F.sigmoid, F.tanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.alpha_dropout, F.threshold, F.logsigmoid, F.softsign,
    torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.abs, torch.neg, torch.clamp,
    torch.clip, torch.erf, torch.square, torch.reciprocal, torch.sign, torch.sin, torch.cos, torch.nan_to_num,
    torch.clamp_min, torch.clamp_max, torch.log1p, torch.expm1, operator.neg, operator.pos,
)
POINTWISE_METHODS = (
    *ACTIVATION_METHODS, "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "exp_", "log", "sqrt", "rsqrt", "abs",
    "neg", "clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max", "clip", "square", "reciprocal", "sign",
    "sin", "cos", "erf", "nan_to_num", "log1p", "expm1",
    # copies and casts
    "contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to", "type", "requires_grad_",
    "cpu", "cuda",
    "type_as",  # the second tensor only donates a dtype
)

# ---- broadcasting n-ary ops (the adds among them) -----------------------------------------------------
ADD_FUNCTIONS = (operator.add, torch.add, operator.iadd)
ADD_METHODS = ("add", "add_", "__add__")
BROADCAST_FUNCTIONS = (
    *ADD_FUNCTIONS, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow, operator.isub,
    operator.imul, operator.itruediv, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div,
    torch.true_divide, torch.maximum, torch.minimum, torch.where, torch.lerp, torch.addcmul, torch.addcdiv,
    torch.pow, torch.rsub, torch.fmax, torch.fmin,
)
BROADCAST_METHODS = (
    *ADD_METHODS, "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "pow_", "maximum", "minimum", "masked_fill",
    "masked_fill_", "where", "lerp", "addcmul", "addcmul_", "rsub", "__mul__", "__radd__", "__rmul__", "__sub__",
    "__truediv__",
)

# ---- norms -----------------------------------------------------------------------------------------
BATCHNORM_MODULES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)  # per-channel stats
GROUPNORM_MODULES = (nn.GroupNorm,)
LAYERNORM_MODULES = (nn.LayerNorm,)
BATCHNORM_FUNCTIONS = (F.batch_norm, F.instance_norm)
GROUPNORM_FUNCTIONS = (F.group_norm,)
LAYERNORM_FUNCTIONS = (F.layer_norm,)


def is_batchnorm(m: nn.Module) -> bool:
    """A BatchNorm with running statistics: torch's, or a FrozenBatchNorm (timm, torchvision)."""
    return isinstance(m, nn.modules.batchnorm._BatchNorm) or (
        type(m).__name__.startswith("FrozenBatchNorm") and hasattr(m, "running_var"))


# ---- producers -------------------------------------------------------------------------------------
CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
LINEAR_MODULES = (nn.Linear,)
PRODUCER_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # REPAIR corrects their outputs
CONV_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d)
LINEAR_FUNCTIONS = (F.linear,)

# ---- spatial ops and channel mixers -----------------------------------------------------------------
SPATIAL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
    nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
)
SPATIAL_FUNCTIONS = (
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, F.upsample,
)
CHANNEL_MIXING_MODULES = (nn.ChannelShuffle, nn.PixelShuffle, nn.PixelUnshuffle, nn.LocalResponseNorm, nn.GLU)
CHANNEL_MIXING_FUNCTIONS = (F.channel_shuffle, F.pixel_shuffle, F.pixel_unshuffle, F.glu, F.local_response_norm)

# ---- attention: batched products over the head dim (trace/rules/attention.py) ---------------------------
MATMUL_FUNCTIONS = (torch.matmul, operator.matmul, torch.bmm)
MATMUL_METHODS = ("matmul", "bmm", "__matmul__")
ATTENTION_FUNCTIONS = (F.scaled_dot_product_attention,)


# ---- timm's and torchvision's ops, by the names their packages export ------------------------------
# kind -> ((package, (names...)), ...); a name the installed version lacks is skipped
LIBRARY_MODULES: Dict[str, Dict[str, Tuple[Tuple[str, Tuple[str, ...]], ...]]] = {
    "timm": {
        # timm's activation modules are pointwise functions (PReLU, with a per-channel weight, is not here)
        "pointwise": (
            ("timm.layers.activations", ("GELU", "GELUTanh", "HardMish", "HardSigmoid", "HardSwish", "Mish",
                                         "QuickGELU", "Sigmoid", "Swish", "Tanh")),
            ("timm.layers.activations_me", ("HardMishMe", "HardSigmoidMe", "HardSwishMe", "MishMe", "SwishMe")),
        ),
        "batchnorm": (("timm.layers", ("BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d",
                                       "FrozenBatchNorm2d")),),
        "groupnorm": (("timm.layers", ("GroupNormAct",)),),
        "conv": (("timm.layers", ("Conv2dSame", "StdConv2dSame", "ScaledStdConv2dSame")),),
        "spatial": (("timm.layers", ("AvgPool2dSame", "MaxPool2dSame")),),
    },
    "torchvision": {
        # stochastic depth drops whole samples (a per-sample scalar): channel-equivariant
        "pointwise": (("torchvision.ops", ("StochasticDepth",)),),
        # Swin's attention hands its weights to a wrapped function: a leaf with a rule of its own
        "window_attention": (("torchvision.models.swin_transformer", ("ShiftedWindowAttention",)),),
    },
}
LIBRARY_FUNCTIONS: Dict[str, Dict[str, Tuple[Tuple[str, Tuple[str, ...]], ...]]] = {
    # timm's attention: ``maybe_add_mask(scores, mask)`` broadcasts an add; ``resolve_self_attn_mask``
    # builds the additive mask (None without one)
    "timm": {"broadcast": (("timm.layers.attention", ("maybe_add_mask",)),),
             "attention_mask": (("timm.layers.attention", ("resolve_self_attn_mask",)),),
             # windows (or grid cells) back to a channels-last map: positions move, channels stay last
             "tokens": tuple((f"timm.models.{m}", ("window_reverse", "grid_reverse"))
                             for m in ("swin_transformer", "swin_transformer_v2", "swin_transformer_v2_cr",
                                       "davit", "gcvit", "maxxvit"))},
    "torchvision": {"pointwise": (("torchvision.ops", ("stochastic_depth",)),
                                  ("torchvision.ops.misc", ("stochastic_depth",))),
                    # Swin's patch merging: 2×2 pixels side by side on the channel axis
                    "patch_merging_pad": (("torchvision.models.swin_transformer", ("_patch_merging_pad",)),)},
}


@functools.cache
def resolve_library(library: str, functions: bool = False) -> Dict[str, tuple]:
    """kind -> the objects of ``library`` (types, or functions) that ``LIBRARY_MODULES`` (or
    ``LIBRARY_FUNCTIONS``) names; empty kinds where the library or a name is missing."""
    table = (LIBRARY_FUNCTIONS if functions else LIBRARY_MODULES).get(library, {})
    out: Dict[str, tuple] = {}
    for kind, sources in table.items():
        found = []
        for package, names in sources:
            try:
                mod = importlib.import_module(package)
            except Exception:  # absent, or too old to have this module
                continue
            for n in names:
                obj = getattr(mod, n, None)
                if (isinstance(obj, type) if not functions else callable(obj)) and obj not in found:
                    found.append(obj)
        out[kind] = tuple(found)
    return out


def loaded_libraries() -> Tuple[str, ...]:
    """The libraries with ops here that this process has imported."""
    return tuple(lib for lib in ("timm", "torchvision") if lib in sys.modules)


def library_ops(kind: str, functions: bool = False) -> tuple:
    """Every imported library's objects of ``kind`` (module types, or functions)."""
    return tuple(o for lib in loaded_libraries() for o in resolve_library(lib, functions).get(kind, ()))


# modules that return their input unchanged in eval mode, by class name (timm's DropPath is not torch's)
EVAL_IDENTITY_MODULES = frozenset({"Identity", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout",
                                   "DropPath"})


def is_eval_identity(node: fx.Node, modules: Dict[str, nn.Module]) -> bool:
    """``node`` calls a module that returns its input unchanged in eval mode."""
    return node.op == "call_module" and type(modules[node.target]).__name__ in EVAL_IDENTITY_MODULES


def is_pointwise_module(m: nn.Module) -> bool:
    """Channel c of the module's output depends on channel c of its input only."""
    return isinstance(m, POINTWISE_MODULES) or isinstance(m, library_ops("pointwise"))


# ---- the names a Tap records, per kind --------------------------------------------------------------
def names_of(objects: Iterable) -> FrozenSet[str]:
    return frozenset(getattr(o, "__name__", str(o)) for o in objects)


# The tap policy matches these names exactly: a subclass is its own name (InstanceNorm, SyncBatchNorm
# and timm's StdConv2d are not norms or producers there).
TAP_NAMES: Dict[str, FrozenSet[str]] = {
    ACTIVATION: names_of(ACTIVATION_MODULES + ACTIVATION_FUNCTIONS) | frozenset(ACTIVATION_METHODS),
    NORM_ACT: frozenset({"BatchNormAct2d", "GroupNormAct", "SyncBatchNormAct", "FrozenBatchNormAct2d"}),  # timm
    NORM: names_of((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, *GROUPNORM_MODULES, *LAYERNORM_MODULES,
                    F.batch_norm, *GROUPNORM_FUNCTIONS, *LAYERNORM_FUNCTIONS)) | frozenset({"LayerNorm2d"}),  # timm
    PRODUCER: names_of(PRODUCER_MODULES + CONV_FUNCTIONS + LINEAR_FUNCTIONS),
    ADD: names_of(ADD_FUNCTIONS) | frozenset(ADD_METHODS),
}


def tap_kind(op: str) -> Optional[str]:
    """The kind of the op a ``Tap`` names (``Tap.op``), or None."""
    for kind in KINDS:
        if op in TAP_NAMES[kind]:
            return kind
    return None


def op_name(node: fx.Node, modules: Dict[str, nn.Module]) -> str:
    """The name a ``Tap`` records for ``node``: its module's class name, its function's ``__name__``,
    or its method name."""
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def is_add(node: fx.Node) -> bool:
    """A call that adds two graph values (a residual add)."""
    adds = ((node.op == "call_function" and node.target in ADD_FUNCTIONS)
            or (node.op == "call_method" and node.target in ADD_METHODS))
    return adds and len(node.args) >= 2 and all(isinstance(a, fx.Node) for a in node.args[:2])
