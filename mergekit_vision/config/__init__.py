"""Merge configs: a YAML file -> a validated ``MergeConfig`` (``schema``), and the helpers that turn its
entries into models (``load_model``) and data loaders (``load_data``) (``loading``). Only the CLI and
these helpers know the schema; the library's stages take plain arguments.
"""
from .loading import file_sha256, load_data, load_model
from .schema import (DATA_KINDS, DTYPES, LOADERS, STATE_DICT_SUFFIXES, CalibrationConfig, EvaluationConfig,
                     MergeConfig, ModelConfig, load_config)

__all__ = ["ModelConfig", "CalibrationConfig", "EvaluationConfig", "MergeConfig", "load_config",
           "load_model", "load_data", "file_sha256", "DTYPES", "DATA_KINDS", "STATE_DICT_SUFFIXES", "LOADERS"]
