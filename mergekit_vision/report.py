"""MergeReport: what a merge of two or more models did and measured, as JSON-able plain data."""
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
    kind: str                                # "bn", "conv" or "add"
    module: str
    var_ratio_before: Optional[float] = None  # mean over channels of var(merged) / target var, no REPAIR
    var_ratio_after: Optional[float] = None   # the same after REPAIR, measured on the fused model
    note: Optional[str] = None
    residual_before: Optional[float] = None   # repair="lsq": |XW - Y|^2 / |Y - mean Y|^2 of the averaged map
    residual_after: Optional[float] = None    # the same for the fitted map (merged net's own inputs X)


def summary_tail(sites: Dict[str, SiteReport], timings: Dict[str, float]) -> List[str]:
    """The summary lines every merge report ends with: variance collapse before/after REPAIR, timings."""
    lines = []
    before = [s.var_ratio_before for s in sites.values() if s.var_ratio_before is not None]
    after = [s.var_ratio_after for s in sites.values() if s.var_ratio_after is not None]
    if before:
        lines.append(f"  variance ratio merged/target over {len(before)} sites: before REPAIR "
                     f"{sum(before) / len(before):.3f}, min {min(before):.3f}"
                     + (f"; after {sum(after) / len(after):.3f}" if after else ""))
    res = [(s.residual_before, s.residual_after) for s in sites.values() if s.residual_after is not None]
    if res:
        lines.append(f"  least-squares fits over {len(res)} layers: relative residual before "
                     f"{sum(r[0] for r in res) / len(res):.3f}, after {sum(r[1] for r in res) / len(res):.3f} (mean)")
    if timings:
        lines.append("  time: " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
    return lines


def _mean(vals: List[float]) -> Optional[float]:
    return sum(vals) / len(vals) if vals else None


@dataclass
class MergeReport:
    """One report for every merge. ``rows[group]`` holds one :class:`GroupReport` per model (the
    reference's row: unpermuted); ``groups`` is the view most readers want: for two models the other
    model's row against the reference, for more the mean over the non-reference models."""

    method: str
    alpha: Optional[float] = None           # two models: the weight of the second; None for N-way merges
    repair: str = "none"
    calibration_samples: int = 0
    weights: List[float] = field(default_factory=list)  # one per model, as averaged
    reference: int = 0                      # the model whose channel order the merge keeps
    names: List[str] = field(default_factory=list)  # how messages and rows name the models
    iterations: int = 0                     # MergeMany sweeps allowed (0: star alignment only)
    sweeps: int = 0                         # sweeps run
    converged: Optional[bool] = None        # a sweep changed no assignment
    start: Optional[str] = None             # the sweeps' start kept: "star" or "identity" (activation), "star" (weight)
    changes_per_sweep: List[int] = field(default_factory=list)  # models whose assignment changed
    near_identity: Optional[bool] = None    # every model's permutation (nearly) identity: nothing to align
    rows: Dict[str, List[GroupReport]] = field(default_factory=dict)  # group -> one report per model
    sites: Dict[str, SiteReport] = field(default_factory=dict)
    frozen_groups: Dict[str, str] = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict)
    sources: List[Dict[str, Any]] = field(default_factory=list)
    version: str = ""
    lineage_cosines: List[float] = field(default_factory=list)  # each model vs the reference, unpermuted weights
    lineage_keys: List[str] = field(default_factory=list)  # the tensors the lineage test compared (free groups')
    matching_skipped: Optional[str] = None  # why no matching ran although method asked for it
    lsq_round_bytes: List[int] = field(default_factory=list)  # repair="lsq": float64 statistics per shard, per round
    rotations: Dict[str, str] = field(default_factory=dict)  # rotate_stream: residual stream -> rotated, or why not

    @property
    def num_models(self) -> int:
        return len(self.weights) or (len(next(iter(self.rows.values()))) if self.rows else 2)

    @property
    def groups(self) -> Dict[str, GroupReport]:
        """group -> the non-reference model's row (two models), or their mean (more models)."""
        if self.num_models == 2:
            other = 1 - self.reference
            return {name: rs[other] for name, rs in self.rows.items()}
        out = {}
        for name, rs in self.rows.items():
            others = [r for k, r in enumerate(rs) if k != self.reference] or rs
            out[name] = GroupReport(
                size=rs[0].size, blocks=rs[0].blocks, moved=sum(r.moved for r in others) / len(others),
                mean_corr=_mean([r.mean_corr for r in others if r.mean_corr is not None]),
                identity_corr=_mean([r.identity_corr for r in others if r.identity_corr is not None]),
                note=next((r.note for r in others if r.note), None))
        return out

    @property
    def lineage_cosine(self) -> Optional[float]:
        """The median weight cosine of the models with the reference (the lowest, for more than two)."""
        others = [c for k, c in enumerate(self.lineage_cosines) if k != self.reference]
        return min(others) if others else None

    @property
    def mean_corr(self) -> Optional[float]:
        return _mean([g.mean_corr for g in self.groups.values() if g.mean_corr is not None])

    def moved(self) -> List[float]:
        """Per model: the fraction of all permutable channels its assignment moved."""
        k = self.num_models
        tot = [0.0] * k
        size = sum(rs[0].size for rs in self.rows.values()) or 1
        for rs in self.rows.values():
            for i, r in enumerate(rs):
                tot[i] += r.moved * r.size
        return [t / size for t in tot]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["groups"] = {name: asdict(g) for name, g in self.groups.items()}
        d["lineage_cosine"] = self.lineage_cosine
        return d

    def provenance(self) -> Dict[str, Any]:
        """What a weights file should say about how it was made (safetensors metadata)."""
        return {"merge_method": self.method, "alpha": self.alpha, "repair": self.repair,
                "calibration_samples": self.calibration_samples, "mergekit_vision_version": self.version,
                "sources": self.sources, "weights": self.weights, "reference": self.reference}

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    def summary(self) -> str:
        if self.num_models == 2:
            lines = [f"merge: method={self.method} alpha={self.alpha} repair={self.repair} "
                     f"calibration={self.calibration_samples} samples"]
        else:
            lines = [f"merge_many: {self.num_models} models, method={self.method} repair={self.repair} "
                     f"reference={self.reference} sweeps={self.sweeps}/{self.iterations}"
                     + ("" if self.converged is None else f" ({'converged' if self.converged else 'not converged'})")
                     + f", calibration={self.calibration_samples} samples"]
            if self.rows:
                lines.append("  channels moved per model: " + ", ".join(f"{100 * m:.0f}%" for m in self.moved()))
        if self.matching_skipped:
            lines.append(f"  matching skipped: {self.matching_skipped} ({len(self.lineage_keys)} tensors compared)")
        elif self.near_identity and self.num_models > 2:
            lines.append("  every permutation is (nearly) identity: the models already share one coordinate "
                         "system (e.g. FedAvg or gossip from a common init); alignment changes nothing here, "
                         "method='none' gives the same merge without matching")
        groups = self.groups
        if self.mean_corr is not None:
            lines.append(f"  matched correlation (mean over {len(groups)} groups): {self.mean_corr:.3f}")
        left = [name for name, g in groups.items() if g.note and g.note.startswith("left")]
        if left:
            lines.append(f"  {len(left)} groups left unpermuted (no usable tap): {', '.join(left[:5])}"
                         + (" ..." if len(left) > 5 else ""))
        for name, note in self.rotations.items():
            lines.append(f"  residual stream {name}: {note}")
        if self.lsq_round_bytes:
            b = self.lsq_round_bytes
            lines.append(f"  least-squares walk: {len(b)} statistics rounds; on sharded data each shard sends "
                         f"{sum(b) / 1e6:.2f} MB of float64 sums in all (largest round {max(b) / 1e6:.2f} MB)")
        return "\n".join(lines + summary_tail(self.sites, self.timings))
