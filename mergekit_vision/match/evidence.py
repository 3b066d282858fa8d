"""Is the calibration data enough to trust the statistics? Checked after each statistics pass.

A correlation matrix of C channels measured at n < C positions has rank below C: most assignments then
rest on noise. A statistic measured at a single position has no variance at all, and a channel that
never varies on the data (or data that never varies) carries no evidence for its assignment. The
checks name the group, tap or site and the number of samples that would suffice.
"""
from __future__ import annotations

import math
import warnings
from typing import Iterable, Optional, Tuple

import torch

from ..errors import CalibrationWarning, DataError
from .stats import ChannelMoments, CrossMoments


def _samples_needed(positions: float, samples: int, channels: int) -> int:
    per_sample = max(positions / max(samples, 1), 1e-12)
    return max(2, math.ceil(channels / per_sample))


def check_matching_evidence(taps: Iterable[Tuple[str, str, CrossMoments]], samples: int,
                            names: Tuple[str, str] = ("model_a", "model_b"),
                            tap_positions: Optional[int] = None) -> None:
    """``taps``: (group, tap node, moments) of one model pair. Raises DataError when a tap saw fewer
    than two positions or when no group has a single varying channel; warns (CalibrationWarning) when
    a group was seen at fewer positions than it has channels, or when some of its channels are
    constant at every tap. ``tap_positions``: the merge's, named in the advice where it sampled."""
    by_group = {}
    for group, node, mom in taps:
        if mom.ma is None:
            continue
        by_group.setdefault(group, []).append((node, mom))
    if not by_group:
        return
    informative, few, dead = 0, [], []
    for group, seen in sorted(by_group.items()):
        size = seen[0][1].ma.numel()
        for node, m in seen:
            if not all(bool(torch.isfinite(t).all()) for t in (m.maa, m.mbb, m.mab)):
                raise DataError(
                    f"the activations at tap {node!r} (group {group!r}) overflow the statistics' float32 "
                    "products: the inputs are far larger than the models were trained on. Pass images "
                    "normalized as in training.")
        node, mom = min(seen, key=lambda t: t[1].n)
        if mom.n < 2:
            raise DataError(
                f"group {group!r} ({size} channels) was observed at {int(mom.n)} position at tap {node!r}: "
                f"correlations need variance. Pass at least {_samples_needed(mom.n, samples, size)} "
                f"calibration samples (got {samples}).")
        best = max(seen, key=lambda t: t[1].n)[1]
        if best.n < size:
            few.append((_samples_needed(best.n, samples, size),
                        f"{group!r} ({size} channels, {int(best.n)} positions)"))
        alive = [None, None]
        for _, m in seen:
            for k, v in enumerate(m.alive()):
                alive[k] = v if alive[k] is None else alive[k] | v
        informative += int(bool(alive[0].any() and alive[1].any()))
        for k in (0, 1):
            if not alive[k].all():
                dead.append(f"{group!r} ({int((~alive[k]).sum())} of {size} in {names[k]})")
    if not informative:
        raise DataError(
            f"no channel of any of the {len(by_group)} matched groups varies on the calibration data "
            f"({samples} samples): the inputs carry no information to match with. Pass real images, "
            "normalized as in training.")
    if few:
        few.sort(key=lambda t: -t[0])  # the worst first
        warnings.warn(
            f"{len(few)} group(s) were observed at fewer positions than they have channels, so their "
            f"correlation matrices are rank-deficient and the assignments partly guesswork: "
            f"{_listing([w for _, w in few])}. Pass at least {max(n for n, _ in few)} calibration samples "
            f"(got {samples})"
            + (f", or let more positions per image into the taps (tap_positions={tap_positions}; None takes "
               "every position)" if tap_positions is not None else "") + ".", CalibrationWarning, stacklevel=3)
    if dead:
        warnings.warn(
            f"channels constant on the calibration data at every tap, whose assignment rests on no evidence: "
            f"{_listing(dead)}. Use more, and more varied, calibration data (real images, normalized as in "
            "training).", CalibrationWarning, stacklevel=3)


def _listing(items, limit: int = 5) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def check_site_evidence(sites: Iterable[Tuple[str, ChannelMoments]], samples: int) -> None:
    """``sites``: (site node, moments). Raises DataError when a REPAIR site was measured at fewer than
    two positions (no standard deviation to restore)."""
    for node, mom in sites:
        if mom.mean is not None and mom.n < 2:
            size = mom.mean.numel()
            raise DataError(
                f"REPAIR site {node!r} ({size} channels) was measured at {int(mom.n)} position: its standard "
                f"deviation is undefined. Pass at least {_samples_needed(mom.n, samples, 2)} calibration "
                f"samples (got {samples}), or repair=False.")
