"""MergeReport: what a merge did and measured, as JSON-able plain data."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class GroupReport:
    size: int
    blocks: int
    mean_corr: Optional[float] = None        # mean correlation of matched channel pairs (activation)
    identity_corr: Optional[float] = None    # the same for the unpermuted pairing
    moved: float = 0.0                       # fraction of channels not mapped to themselves
    note: Optional[str] = None               # how it was matched when not at ordinary taps, or why not


@dataclass
class SiteReport:
    kind: str                                # "bn" or "conv"
    module: str
    var_ratio_before: Optional[float] = None  # mean over channels of var(merged) / target var, no REPAIR
    var_ratio_after: Optional[float] = None   # the same after REPAIR, measured on the fused model
    note: Optional[str] = None


def summary_tail(sites: Dict[str, "SiteReport"], timings: Dict[str, float]) -> List[str]:
    """The summary lines every merge report ends with: variance collapse before/after REPAIR, timings."""
    lines = []
    before = [s.var_ratio_before for s in sites.values() if s.var_ratio_before is not None]
    after = [s.var_ratio_after for s in sites.values() if s.var_ratio_after is not None]
    if before:
        lines.append(f"  variance ratio merged/target over {len(before)} sites: before REPAIR "
                     f"{sum(before) / len(before):.3f}, min {min(before):.3f}"
                     + (f"; after {sum(after) / len(after):.3f}" if after else ""))
    if timings:
        lines.append("  time: " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
    return lines


@dataclass
class MergeReport:
    method: str
    alpha: float
    repair: str
    calibration_samples: int = 0
    groups: Dict[str, GroupReport] = field(default_factory=dict)
    sites: Dict[str, SiteReport] = field(default_factory=dict)
    frozen_groups: Dict[str, str] = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict)
    sources: List[Dict[str, Any]] = field(default_factory=list)
    version: str = ""
    lineage_cosine: Optional[float] = None  # median cosine of the unpermuted conv/linear weights in lineage_keys
    lineage_keys: List[str] = field(default_factory=list)  # the tensors the lineage test compared (free groups')
    matching_skipped: Optional[str] = None  # why no matching ran although method asked for it

    def to_dict(self) -> dict:
        return asdict(self)

    def provenance(self) -> Dict[str, Any]:
        """What a weights file should say about how it was made (safetensors metadata)."""
        return {"merge_method": self.method, "alpha": self.alpha, "repair": self.repair,
                "calibration_samples": self.calibration_samples, "mergekit_vision_version": self.version,
                "sources": self.sources}

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @property
    def mean_corr(self) -> Optional[float]:
        vals = [g.mean_corr for g in self.groups.values() if g.mean_corr is not None]
        return sum(vals) / len(vals) if vals else None

    def summary(self) -> str:
        lines = [f"merge: method={self.method} alpha={self.alpha} repair={self.repair} "
                 f"calibration={self.calibration_samples} samples"]
        if self.matching_skipped:
            lines.append(f"  matching skipped: {self.matching_skipped} ({len(self.lineage_keys)} tensors compared)")
        if self.mean_corr is not None:
            lines.append(f"  matched correlation (mean over {len(self.groups)} groups): {self.mean_corr:.3f}")
        left = [name for name, g in self.groups.items() if g.note and g.note.startswith("left")]
        if left:
            lines.append(f"  {len(left)} groups left unpermuted (no usable tap): {', '.join(left[:5])}"
                         + (" ..." if len(left) > 5 else ""))
        return "\n".join(lines + summary_tail(self.sites, self.timings))
