"""MergeMany: N models into one coordinate system. Star assignments (every model to the reference),
then sweeps that re-align each model to the weighted average of the others (Git Re-Basin's MergeMany
on weights; on activations, the pairwise correlations of one statistics pass)."""
from __future__ import annotations

import logging
from typing import Dict, List, Sequence, Tuple

import torch

from ..interpolate import weighted_average
from ..permute import effective_perms, permute_state_dict
from ..spec import PermutationSpec
from .assignment import solve_assignment, solve_heads
from .weight import heads_value, match_weights

logger = logging.getLogger(__name__)

__all__ = ["IDENTITY_TOL", "DEFAULT_SWEEPS", "near_identity", "pair_correlations", "activation_sweeps",
           "weight_sweeps", "in_reference_order"]

# A model whose every group moved at most this fraction of its channels counts as unpermuted: the
# models already share one coordinate system (FedAvg / gossip from a common init).
IDENTITY_TOL = 0.05
# iterations=None: MergeMany with at most this many sweeps, for both methods (measured on two sets of four
# digits models: activation +REPAIR 89.3% / 90.7% vs star 89.6% / 80.0%, weight 65.8% / 80.7% vs
# 46.7% / 62.2%; star also swings by up to 12 points with the choice of reference; docs/recipes/merge_many.md)
DEFAULT_SWEEPS = 10


def near_identity(spec: PermutationSpec, perms: List[Dict[str, torch.Tensor]], tol: float = IDENTITY_TOL) -> bool:
    for p in perms:
        for g in spec.free_groups:
            if g.name in p and float((p[g.name] != torch.arange(g.size)).float().mean()) > tol:
                return False
    return True


def pair_correlations(stats, i: int, j: int) -> Dict[str, torch.Tensor]:
    """Correlations of model i's channels (rows) with model j's, from whichever order was measured."""
    c = stats.correlations(i, j)
    return c if c else {g: m.T for g, m in stats.correlations(j, i).items()}


def activation_sweeps(stats, spec, perms, corrs, w, iterations, seed, report):
    """MergeMany on the pairwise correlations of one pass: coordinate ascent on
    ``sum_{j<k} w_j w_k sum_i corr_jk[perm_j[i], perm_k[i]]``, each step an exact assignment for one
    model against the weighted others, accepted only when it raises the objective (so it terminates).
    Two starts, star alignment and identity (Git Re-Basin's), keep the higher objective: models that
    share coordinates (FedAvg clients) stay unpermuted even when star alignment was noisy."""
    k_models = len(perms)
    pair = {(i, j): pair_correlations(stats, i, j) for i in range(k_models) for j in range(k_models) if i != j}
    runs = []
    for start, init in (("star", perms), ("identity", [{} for _ in perms])):
        p, c = [dict(x) for x in init], [dict(x) for x in corrs]
        sweeps, changes, converged = _ascend(pair, spec, p, c, w, iterations, seed)
        runs.append((_objective(pair, spec, p, w), start, p, c, sweeps, changes, converged))
        logger.info("merge_many from %s: %d sweeps, objective %.6f", start, sweeps, runs[-1][0])
    best = max(runs, key=lambda r: r[0])  # ties keep star (listed first)
    _, report.start, new_perms, new_corrs, report.sweeps, report.changes_per_sweep, report.converged = best
    perms[:], corrs[:] = new_perms, new_corrs


def _objective(pair, spec, perms, w) -> float:
    total = 0.0
    for (j, k), cs in pair.items():
        if j < k and w[j] * w[k] > 0:
            for g in spec.free_groups:
                if g.name in cs:
                    ar = torch.arange(g.size)
                    total += w[j] * w[k] * float(cs[g.name][perms[j].get(g.name, ar), perms[k].get(g.name, ar)].sum())
    return total


def _leave_one_out(k: int, w: Sequence[float]) -> Tuple[List[int], List[float]]:
    """Every model but ``k`` and their weights renormalized (equal where they sum to zero)."""
    others = [j for j in range(len(w)) if j != k]
    wo = [w[j] for j in others]
    return others, [v / sum(wo) for v in wo] if sum(wo) > 0 else [1.0 / len(others)] * len(others)


def _ascend(pair, spec, perms, corrs, w, iterations, seed):
    k_models = len(perms)
    gen = torch.Generator().manual_seed(seed)
    changes: List[int] = []
    for sweep in range(iterations):
        changed = 0
        for k in torch.randperm(k_models, generator=gen).tolist():
            others, wo = _leave_one_out(k, w)
            new_perm, new_corr, moved = {}, {}, False
            tied = {t for g in spec.free_groups for t in g.heads_of}
            eff = [effective_perms(spec, p) for p in perms]
            for g in spec.free_groups:
                if g.heads_of and all(t in pair[(others[0], k)] for t in g.heads_of):
                    # heads with their head blocks: rows in the merged coordinates (composed permutations)
                    scores = [sum(wj * pair[(j, k)][t][eff[j].get(t, torch.arange(spec[t].size))]
                                  for j, wj in zip(others, wo)) for t in g.heads_of]
                    new_h, new_w = solve_heads(scores, g.size)
                    old = [perms[k].get(n, torch.arange(spec[n].size)) for n in [g.name, *g.heads_of]]
                    if heads_value(scores, torch.zeros(g.size, g.size), new_h, new_w) <= \
                            heads_value(scores, torch.zeros(g.size, g.size), old[0], old[1:]) + 1e-9 * g.size:
                        new_h, new_w = old[0], old[1:]
                    for n, p, sc in zip([g.name, *g.heads_of], [new_h, *new_w], [None, *scores]):
                        moved |= not torch.equal(p, perms[k].get(n, torch.arange(p.numel())))
                        new_perm[n] = p
                        if sc is not None:
                            new_corr[n] = sc
                    continue
                if g.name in tied or g.name not in pair[(others[0], k)]:
                    continue
                ar = torch.arange(g.size)
                # row i of the others' average is channel perm_j[i] of model j
                score = sum(wj * pair[(j, k)][g.name][perms[j].get(g.name, ar)] for j, wj in zip(others, wo))
                old = perms[k].get(g.name, ar)
                new = solve_assignment(score, g.blocks)
                if float(score[ar, new].sum()) <= float(score[ar, old].sum()) + 1e-9 * g.size:
                    new = old
                moved |= not torch.equal(new, old)
                new_perm[g.name], new_corr[g.name] = new, score
            perms[k], corrs[k] = new_perm, new_corr
            changed += int(moved)
        changes.append(changed)
        logger.debug("merge_many sweep %d: %d of %d models changed their assignment", sweep + 1, changed, k_models)
        if changed == 0:
            return sweep + 1, changes, True
    return iterations, changes, False


def in_reference_order(spec, perms, corrs, ref) -> None:
    """Relabel the merged coordinates so that the reference is unpermuted (sweeps may move it):
    ``perm_k <- perm_k[inverse(perm_ref)]``, rows of the alignment scores likewise; a heads group and
    its head blocks on their composed permutations (``effective_perms``), split again after."""
    tied = {t for g in spec.free_groups for t in g.heads_of}
    for g in spec.free_groups:
        if not g.heads_of:
            continue
        eff = [effective_perms(spec, p) for p in perms]
        names = [g.name, *g.heads_of]
        refs = {n: eff[ref].get(n, torch.arange(spec[n].size)) for n in names}
        if all(torch.equal(p, torch.arange(p.numel())) for p in refs.values()):
            continue
        qs = {n: torch.argsort(p) for n, p in refs.items()}
        for k in range(len(perms)):
            if not any(n in perms[k] for n in names):
                continue
            full = {n: eff[k].get(n, torch.arange(spec[n].size))[qs[n]] for n in names}
            perms[k][g.name] = full[g.name]
            for t in g.heads_of:  # within heads: B's channel of aligned (i, d), moved back into B's head
                d = spec[t].size // g.size
                blocks = full[t].view(g.size, d)
                within = torch.empty_like(full[t])
                for i, j in enumerate(full[g.name].tolist()):
                    within[j * d:(j + 1) * d] = blocks[i]
                perms[k][t] = within
            for n in names:
                if n in corrs[k]:
                    corrs[k][n] = corrs[k][n][qs[n]]
    for g in spec.free_groups:
        if g.heads_of or g.name in tied:
            continue
        p_ref = perms[ref].get(g.name)
        if p_ref is None or torch.equal(p_ref, torch.arange(g.size)):
            continue
        q = torch.argsort(p_ref)
        for k in range(len(perms)):
            if g.name in perms[k]:
                perms[k][g.name] = perms[k][g.name][q]
            if g.name in corrs[k]:
                corrs[k][g.name] = corrs[k][g.name][q]


def weight_sweeps(sds, perms, w, spec, iterations, weight_iters, weight_tol, seed, report):
    """Git Re-Basin's MergeMany: each model weight-matched to the weighted average of the others,
    one model at a time (later models see earlier updates), starting from star alignment."""
    k_models = len(sds)
    report.start = "star"
    gen = torch.Generator().manual_seed(seed)
    for sweep in range(iterations):
        changed = 0
        for k in torch.randperm(k_models, generator=gen).tolist():
            others, wo = _leave_one_out(k, w)
            with torch.no_grad():
                target = weighted_average([permute_state_dict(sds[j], spec, perms[j]) if perms[j] else sds[j]
                                           for j in others], wo)
            new = match_weights(spec, target, sds[k], max_iter=weight_iters, tol=weight_tol, seed=seed,
                                init=perms[k] or None)
            if any(not torch.equal(new[g], perms[k].get(g, torch.arange(new[g].numel()))) for g in new):
                changed += 1
            perms[k] = new
        report.sweeps = sweep + 1
        report.changes_per_sweep.append(changed)
        logger.info("merge_many sweep %d: %d of %d models changed their assignment", sweep + 1, changed, k_models)
        if changed == 0:
            report.converged = True
            return
    report.converged = False
