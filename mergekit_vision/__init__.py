"""mergekit_vision: merge independently trained vision models (timm, torchvision).

trace -> match -> interpolate -> REPAIR -> export.
"""
from ._version import __version__
from .errors import MergeVisionError
from .export import load_safetensors, save_safetensors
from .merge import merge
# through the submodule of the same name: importing it binds mergekit_vision.merge_many to the function,
# which a later ``import mergekit_vision.merge_many`` would otherwise rebind to the module
from .merge_many import merge_many
from .permute import permute, permute_state_dict, random_perms
from .spec import Member, PermutationGroup, PermutationSpec, Tap
from .trace import trace_permutation_spec

__all__ = [
    "MergeVisionError",
    "merge",
    "merge_many",
    "save_safetensors",
    "load_safetensors",
    "Member",
    "PermutationGroup",
    "PermutationSpec",
    "Tap",
    "permute",
    "permute_state_dict",
    "random_perms",
    "trace_permutation_spec",
    "__version__",
]
