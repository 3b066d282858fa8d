"""Solve channel assignments with scipy's linear_sum_assignment, block by block."""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def solve_assignment(score: torch.Tensor, blocks: int = 1) -> torch.Tensor:
    """The permutation ``perm`` maximizing ``sum_i score[i, perm[i]]`` with ``perm`` kept inside each
    of ``blocks`` equal contiguous blocks. Convention: B's channel ``perm[i]`` goes to position ``i``."""
    n = score.shape[0]
    bs = n // blocks
    s = score.detach().to(torch.float64).cpu().numpy()
    if not np.all(np.isfinite(s)):
        s = np.nan_to_num(s, nan=-1e9, posinf=1e9, neginf=-1e9)
    perm = np.empty(n, dtype=np.int64)
    for b in range(blocks):
        sl = slice(b * bs, (b + 1) * bs)
        rows, cols = linear_sum_assignment(s[sl, sl], maximize=True)
        perm[b * bs + rows] = b * bs + cols
    return torch.from_numpy(perm)


def solve_heads(scores: List[torch.Tensor], heads: int, own: Optional[torch.Tensor] = None,
                ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Match attention heads: ``scores`` are the head-block groups' full (A's channel x B's channel)
    score matrices, ``heads`` blocks each; ``own`` an optional (heads x heads) score of the per-head
    tensors. Each pair (A's head i, B's head j) is scored by the best within-head assignment of every
    group (one linear assignment per block pair and group), plus ``own``; then one assignment over the
    heads on the summed scores. Returns the heads permutation and, per group, the within-head
    permutation to apply first (``permute.py``'s two steps): aligned channel (i, d) is B's channel
    ``(heads_perm[i], within[heads_perm[i]*dim + d] - heads_perm[i]*dim)``."""
    pair = np.zeros((heads, heads)) if own is None else own.detach().to(torch.float64).cpu().numpy().copy()
    best = []  # per group: [i][j] -> B's within-head channel for each of A's
    for score in scores:
        s = score.detach().to(torch.float64).cpu().numpy()
        s = np.nan_to_num(s, nan=-1e9, posinf=1e9, neginf=-1e9)
        d = s.shape[0] // heads
        cols = np.empty((heads, heads, d), dtype=np.int64)
        for i in range(heads):
            for j in range(heads):
                blk = s[i * d:(i + 1) * d, j * d:(j + 1) * d]
                r, c = linear_sum_assignment(blk, maximize=True)
                cols[i, j, r] = c
                pair[i, j] += blk[r, c].sum()
        best.append(cols)
    _, head_perm = linear_sum_assignment(pair, maximize=True)
    within = []
    for cols in best:
        d = cols.shape[2]
        perm = np.empty(heads * d, dtype=np.int64)
        for i, j in enumerate(head_perm):
            perm[j * d:(j + 1) * d] = j * d + cols[i, j]
        within.append(torch.from_numpy(perm))
    return torch.from_numpy(np.asarray(head_perm, dtype=np.int64)), within
