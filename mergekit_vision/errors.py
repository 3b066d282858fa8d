"""One exception family for mergekit_vision: every error a user can trigger is a MergeVisionError."""
from __future__ import annotations


class MergeVisionError(Exception):
    """Base class: bad input, untraceable model, inconsistent spec, bad config."""


class TraceError(MergeVisionError):
    """torch.fx could not trace the model (names the module/op and the fix)."""


class SpecError(MergeVisionError):
    """A permutation spec or a permutation does not fit the model."""


class ArchitectureMismatchError(MergeVisionError):
    """Models that should share an architecture do not."""


class DataError(MergeVisionError):
    """Calibration or evaluation data is empty, malformed, or does not fit the model."""


class NumericalError(MergeVisionError):
    """NaN or inf in weights or activations."""


class ConfigError(MergeVisionError):
    """A merge config is invalid (names the key and the fix)."""


class ExportError(MergeVisionError):
    """A weights file or output folder cannot be written or read (missing, not safetensors, incomplete)."""


class CalibrationWarning(UserWarning):
    """The calibration data gives weak evidence for a statistic (names the group or site and the fix)."""
