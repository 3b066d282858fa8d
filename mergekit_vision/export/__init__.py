"""Export: a merged model's state dict -> safetensors files (single or sharded), config.json, atomic writes.

``files``: the weights files and the atomic writes (every file the library writes goes through
``atomic_write``, so an interrupted run never leaves a half-written file under the final name);
``hub``: ``config.json`` for timm / torchvision loaders and the weights + config folder.
"""
from .files import (CONFIG_NAME, atomic_write, dumps_json, load_into, load_safetensors, load_sharded, parse_size,
                    save_safetensors, save_sharded, to_jsonable, write_json_atomic, write_text_atomic)
from .hub import save_model_folder, timm_config

__all__ = [
    "atomic_write",
    "write_text_atomic",
    "write_json_atomic",
    "to_jsonable",
    "dumps_json",
    "save_safetensors",
    "load_safetensors",
    "load_into",
    "parse_size",
    "save_sharded",
    "load_sharded",
    "timm_config",
    "save_model_folder",
    "CONFIG_NAME",
]
