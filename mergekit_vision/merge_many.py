"""merge_many() and its parts, importable where they were before the one pipeline (issue 12), for
code written against that path; the package itself imports them from their homes: the pipeline
:func:`mergekit_vision.merge.merge_many`, the statistics substrate :mod:`mergekit_vision.calibration`,
the sweeps :mod:`mergekit_vision.match.many`, the report :class:`mergekit_vision.report.MergeReport`.
"""
from __future__ import annotations

from .calibration import (CalibrationPlan, Collect, LocalCollector, Statistics, StatisticsRequest,
                          collect_statistics, plan_calibration)
from .match.many import DEFAULT_SWEEPS, IDENTITY_TOL
from .merge import merge_many
from .repair import repair_targets
from .report import MergeReport

MergeManyReport = MergeReport  # one report for two and N models

__all__ = ["merge_many", "MergeManyReport", "CalibrationPlan", "plan_calibration", "Statistics",
           "StatisticsRequest", "collect_statistics", "LocalCollector", "repair_targets", "IDENTITY_TOL",
           "DEFAULT_SWEEPS", "Collect"]
