"""REPAIR: measure -> targets -> correct -> fuse, one small function each.

Targets at ``alpha`` interpolate the endpoints' per-channel means and *standard deviations*. The
interpolated network is run once with every site renormalized on its batch statistics to its target
(so earlier corrections already act on later sites, as in the paper's code); the pooled statistics
measured there give each site's final affine correction ``z -> a*z + c``, which is folded into the
BatchNorm (see :func:`fuse_bn_correction`) or the conv/linear weight and bias.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataError
from ..match.stats import BatchMoments, ChannelMoments, channel_moments
from .sites import Site, bn_affine, bn_eval, bn_forward, bn_post, is_batchnorm, permute_channel_stats

_TINY = 1e-12


@dataclass
class Target:
    mean: torch.Tensor
    std: torch.Tensor


def interpolate_targets(stats_a: ChannelMoments, stats_b: ChannelMoments, alpha: float) -> Target:
    """``(1-alpha)*stat_A + alpha*stat_B`` for means and standard deviations (not variances)."""
    return Target((1 - alpha) * stats_a.mean + alpha * stats_b.mean, (1 - alpha) * stats_a.std + alpha * stats_b.std)


def renormalizer(moments: BatchMoments, target: Target) -> Tuple[torch.Tensor, torch.Tensor]:
    """The per-channel ``(scale, shift)`` (float64) taking a batch with these moments to the target."""
    n, mean, m2 = moments
    var = m2.double() / n
    scale = target.std.double() / (var + 1e-10).sqrt()
    return scale, target.mean.double() - mean.double() * scale


def renormalize(z: torch.Tensor, dim: int, target: Target, moments: Optional[BatchMoments] = None) -> torch.Tensor:
    """Per-channel renormalization of ``z`` to the target on this batch's own statistics
    (``moments``: this batch's ``channel_moments(z, dim)`` if already computed)."""
    scale, shift = renormalizer(moments if moments is not None else channel_moments(z, dim), target)
    shape = [1] * z.dim()
    shape[dim] = -1
    return torch.addcmul(shift.to(z.dtype).view(shape), z, scale.to(z.dtype).view(shape))


def renormalized_bn(m: nn.Module, x: torch.Tensor, target: Target) -> Tuple[torch.Tensor, BatchMoments]:
    """The eval-mode BatchNorm's output ``z`` renormalized to ``target`` on this batch's statistics, and
    z's batch moments, without forming z: its moments are those of the input x through the BatchNorm's
    affine (mean s*mean_x + t, sum of squares s^2 * that of x), and the correction rides in the one
    BatchNorm's affine (weight*scale, bias*scale + shift), so the site costs a read of x and the BatchNorm."""
    mx = channel_moments(x, 1)
    s, t = bn_affine(m)
    mom = BatchMoments(mx.n, s * mx.mean + t, s * s * mx.m2)
    scale, shift = renormalizer(mom, target)
    w = scale if m.weight is None else m.weight.double() * scale
    b = shift if m.bias is None else m.bias.double() * scale + shift
    out = F.batch_norm(x, m.running_mean, m.running_var, w.to(x.dtype), b.to(x.dtype), False, 0.0, m.eps)
    return out, mom


def affine_correction(measured: ChannelMoments, target: Target) -> Tuple[torch.Tensor, torch.Tensor]:
    """The per-channel ``(a, c)`` with ``a*z + c`` having the target mean and std."""
    std = measured.std
    a = torch.where(std > _TINY, target.std / std.clamp_min(_TINY), torch.zeros_like(std))
    c = target.mean - a * measured.mean
    return a, c


class CorrectionPass:
    """Overrides for the lockstep run of the interpolated model: measure ``z`` (pooled) and pass on
    the batch-renormalized value. Model index 1, when present, is the uncorrected interpolated model,
    measured for the variance-collapse diagnostic."""

    def __init__(self, sites: List[Site], modules_by_model: List[Dict[str, nn.Module]], targets: Dict[str, Target],
                 mode: str):
        self.sites = {s.node: s for s in sites}
        self.modules = modules_by_model
        self.targets = targets
        self.mode = mode
        self.measured: Dict[str, ChannelMoments] = {s.node: ChannelMoments() for s in sites}
        self.raw: Dict[str, ChannelMoments] = {s.node: ChannelMoments() for s in sites}

    def overrides(self):
        return {name: self._bn if s.kind == "bn" else self._conv for name, s in self.sites.items() if s.kind != "add"}

    def hooks(self):
        return {name: self._add for name, s in self.sites.items() if s.kind == "add"}

    def _add(self, node, values):
        site = self.sites[node.name]
        mom = self.measured[site.node].observe(values[0], site.dim)
        if len(values) > 1:
            self.raw[site.node].observe(values[1], site.dim)
        return [renormalize(values[0], site.dim, self.targets[site.node], mom)] + list(values[1:])

    def _bn(self, node, k, args, kwargs):
        site = self.sites[node.name]
        m = self.modules[k][site.module]
        x = args[0]
        if k == 1:  # uncorrected model: diagnostic only
            z = bn_eval(m, x)
            self.raw[site.node].observe(z, site.dim)
            return bn_forward(m, z)
        if self.mode == "reset":
            self.measured[site.node].observe(x, site.dim)
            z = F.batch_norm(x, None, None, m.weight, m.bias, True, 0.0, m.eps)
            return bn_post(m, z)
        out, mom = renormalized_bn(m, x, self.targets[site.node])
        self.measured[site.node].add_batch(mom)
        return bn_post(m, out)

    def _conv(self, node, k, args, kwargs):
        site = self.sites[node.name]
        m = self.modules[k][site.module]
        z = m(*args, **kwargs)
        if k == 1:
            self.raw[site.node].observe(z, site.dim)
            return z
        mom = self.measured[site.node].observe(z, site.dim)
        return renormalize(z, site.dim, self.targets[site.node], mom)


@torch.no_grad()
def fuse_affine(module: nn.Module, a: torch.Tensor, c: torch.Tensor, kind: str) -> Optional[str]:
    """Fold ``z -> a*z + c`` into the module producing ``z``; returns a note if the shift was dropped."""
    w = module.weight
    shape = (-1,) + (1,) * (w.dim() - 1)
    w.mul_(a.to(w.dtype).view(shape))
    b = getattr(module, "bias", None)
    if b is not None:
        b.mul_(a.to(b.dtype)).add_(c.to(b.dtype))
        return None
    if torch.any(c.abs() > 0):
        return "no bias to hold the shift: only the scale was fused"
    return None


@torch.no_grad()
def fuse_bn_correction(module: nn.Module, a: torch.Tensor, c: torch.Tensor, measured: ChannelMoments) -> None:
    """Fold ``z -> a*z + c`` on a BatchNorm's output ``z`` so that it holds in eval *and* in train mode.

    Scaling gamma and beta alone is exact in eval mode but keeps the interpolated running statistics,
    which describe some other distribution than the one the layer now sees; as soon as the model trains
    again (fine-tuning, the next FedAvg round) BatchNorm normalizes with batch statistics and the folded
    scale is wrong. Here the running statistics become the statistics of the layer's input x, recovered
    exactly from those of ``z = s*(x - rm) + beta`` (``measured``; s = gamma / sqrt(rv + eps)):
    mu_x = (mu_z - beta)/s + rm, var_x = var_z/s^2; the affine absorbs the rest:
    gamma' = a*s*sqrt(var_x + eps), beta' = a*s*(mu_x - rm) + a*beta + c. The eval function is the same
    ``a*z + c``; a train-mode batch with the calibration statistics gets the same output too. Channels
    with s = 0 (z constant) keep their running statistics (any value is exact there).
    """
    if getattr(module, "running_mean", None) is None or measured.n == 0 or module.weight is None \
            or module.bias is None:
        fuse_affine(module, a, c, "bn")  # batch statistics only, or no affine to move the statistics into
        return
    f64 = torch.float64
    rm, rv = module.running_mean.to(f64), module.running_var.to(f64)
    gamma, beta = module.weight.to(f64), module.bias.to(f64)
    a, c = a.to(f64), c.to(f64)
    s = gamma / (rv + module.eps).sqrt()
    ok = s.abs() > _TINY
    s_safe = torch.where(ok, s, torch.ones_like(s))
    n = measured.n
    mu = torch.where(ok, (measured.mean.to(f64) - beta) / s_safe + rm, rm)
    var = torch.where(ok, measured.var.to(f64) / s_safe ** 2 * n / max(n - 1, 1), rv)  # torch's unbiased convention
    module.running_mean.copy_(mu.to(module.running_mean.dtype))
    module.running_var.copy_(var.to(module.running_var.dtype))
    module.weight.copy_((a * s * (var + module.eps).sqrt()).to(module.weight.dtype))
    module.bias.copy_((a * s * (mu - rm) + a * beta + c).to(module.bias.dtype))


class ChannelAffine(nn.Module):
    """``x * scale + shift`` per channel: a REPAIR correction that cannot be folded exactly."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor, dim: int = 1):
        super().__init__()
        self.dim = dim
        self.register_buffer("scale", scale.clone())
        self.register_buffer("shift", shift.clone())

    def forward(self, x):
        shape = [1] * x.dim()
        shape[self.dim] = -1
        return x * self.scale.view(shape) + self.shift.view(shape)


def foldable_addends(site: Site, gm, modules: Dict[str, nn.Module]) -> Optional[List[nn.Module]]:
    """The modules producing each addend of an add site, if a per-channel affine on the sum folds into
    them exactly (BatchNorm or biased conv/linear outputs used only by this add)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    out = []
    for name in site.inputs:
        n = nodes[name]
        if n.op != "call_module" or len(n.users) != 1:
            return None
        m = modules[n.target]
        if is_batchnorm(m) and type(m).__name__.startswith("BatchNorm") and m.weight is not None:
            out.append(m)
        elif isinstance(m, (nn.Conv2d, nn.Linear, nn.Conv1d)) and m.bias is not None:
            out.append(m)
        else:
            return None
    return out


@torch.no_grad()
def fuse_reset(module: nn.Module, measured: ChannelMoments) -> None:
    """RESET: the BatchNorm's running statistics become those measured on the calibration data."""
    n = measured.n
    module.running_mean.copy_(measured.mean.to(module.running_mean.dtype))
    module.running_var.copy_((measured.var * n / max(n - 1, 1)).to(module.running_var.dtype))


def repair_targets(sites: List[Site], stats, perms: List[Dict[str, torch.Tensor]],
                   weights: List[float]) -> Dict[str, Target]:
    """REPAIR's targets for a weighted average of aligned models: ``sum_k w_k * stat_k`` for the
    per-channel means and standard deviations (not variances), each model's statistics permuted
    into the merged coordinates first. ``stats.channels[(site node, k)]``: model k's moments."""
    targets = {}
    for s in sites:
        mean = std = None
        for k, wk in enumerate(weights):
            m = stats.channels.get((s.node, k))
            if m is None or not m.n:
                raise DataError(f"no statistics for model {k} at REPAIR site {s.node!r}; the collect "
                                "function must measure every model's sites (StatisticsRequest(sites=True))")
            mk = permute_channel_stats(m.mean, s, perms[k]) if perms[k] else m.mean
            sk = permute_channel_stats(m.std, s, perms[k]) if perms[k] else m.std
            mean = wk * mk if mean is None else mean + wk * mk
            std = wk * sk if std is None else std + wk * sk
        targets[s.node] = Target(mean, std)
    return targets
