"""Solve channel assignments with scipy's linear_sum_assignment, block by block."""
from __future__ import annotations

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
