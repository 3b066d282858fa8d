"""Framework-free pieces of the federated and decentralized recipes: Dirichlet non-IID splits, a logit
ensemble, cached local training, and sparse random gossip between nodes training in lockstep.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..export import load_into, save_safetensors
from ..interpolate import weighted_average
from ..training import warmup_decay_lr, resolve_augment, train_classifier

__all__ = ["dirichlet_split", "Ensemble", "train_cached", "GossipTrainer"]

logger = logging.getLogger(__name__)


def dirichlet_split(labels: torch.Tensor, num_clients: int, alpha: float, *, seed: int = 0,
                    min_size: int = 10) -> List[torch.Tensor]:
    """Per-client sample indices: each class is spread over the clients in Dirichlet(``alpha``) proportions
    (small ``alpha``: each client sees few classes; ``alpha`` -> inf: IID). Redrawn until every client
    has at least ``min_size`` samples."""
    if num_clients < 1 or alpha <= 0:
        raise ConfigError(f"dirichlet_split needs num_clients >= 1 and alpha > 0, got {num_clients}, {alpha}")
    rng = np.random.default_rng(seed)
    y = labels.cpu().numpy()
    for _ in range(100):
        parts: List[List[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * num_clients)) * len(idx)).round().astype(int)
            for k, part in enumerate(np.split(idx, cuts[:-1])):
                parts[k].append(part)
        out = [torch.from_numpy(np.sort(np.concatenate(ps))) for ps in parts]
        if min(len(o) for o in out) >= min_size:
            return out
    raise ConfigError(f"dirichlet_split: could not give every one of {num_clients} clients {min_size} samples "
                      f"with alpha={alpha}; raise alpha or lower min_size")


class Ensemble(nn.Module):
    """The members' averaged class probabilities (returned as log-probabilities): the usual upper bound
    for what one merged model can reach."""

    def __init__(self, models: Sequence[nn.Module], weights: Optional[Sequence[float]] = None):
        super().__init__()
        self.members = nn.ModuleList(models)
        w = torch.tensor(list(weights) if weights is not None else [1.0] * len(models), dtype=torch.float32)
        self.register_buffer("weights", w / w.sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = sum(w * m(x).softmax(-1) for w, m in zip(self.weights, self.members))
        return probs.clamp_min(1e-12).log()


def train_cached(build: Callable[[], nn.Module], data, path: Optional[Path], **train_kwargs) -> nn.Module:
    """``train_classifier(build(), data, **train_kwargs)``, or the weights saved at ``path`` by an earlier run."""
    model = build()
    if path is not None and Path(path).exists():
        try:
            return load_into(model, path).eval()
        except Exception:  # a stale cache file from another configuration: train again
            logger.warning("ignoring unreadable cache %s", path)
    train_classifier(model, data, **train_kwargs)
    model.eval()
    if path is not None:
        save_safetensors(model, path)
    return model


class GossipTrainer:
    """Decentralized SGD: ``K`` nodes take SGD steps in lockstep on their own data; after each step,
    with probability ``gossip_prob``, the nodes are paired at random and each pair averages its weights
    (and BatchNorm buffers). ``gossip_prob=0``: no communication. Learning rate: linear warmup, then decay
    to 0 over ``total_steps``, as :func:`~mergekit_vision.training.train_classifier`."""

    def __init__(self, models: Sequence[nn.Module], datasets: Sequence[Tuple[torch.Tensor, torch.Tensor]], *,
                 total_steps: int, batch_size: int = 64, lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 5e-4, warmup: float = 0.1, gossip_prob: float = 0.1, augment=None,
                 seed: int = 0):
        self.models = list(models)
        self.data = list(datasets)
        self.total = total_steps
        self.batch_size, self.lr, self.warmup = batch_size, lr, warmup
        self.gossip_prob = gossip_prob
        self.aug = resolve_augment(augment)
        self.gen = torch.Generator().manual_seed(seed)
        self.opts = [torch.optim.SGD(m.parameters(), lr=0.0, momentum=momentum, nesterov=True,
                                     weight_decay=weight_decay) for m in self.models]
        self.orders = [torch.empty(0, dtype=torch.long) for _ in self.models]
        self.step_count = 0
        self.gossip_events = 0

    def _batch(self, k: int):
        x, y = self.data[k]
        if len(self.orders[k]) < self.batch_size:
            self.orders[k] = torch.cat([self.orders[k], torch.randperm(len(x), generator=self.gen)])
        idx, self.orders[k] = self.orders[k][:self.batch_size], self.orders[k][self.batch_size:]
        xb = x[idx]
        return (self.aug(xb, self.gen) if self.aug is not None else xb), y[idx]

    def step(self) -> None:
        lr = warmup_decay_lr(self.step_count, self.total, self.lr, self.warmup)
        for k, (m, opt) in enumerate(zip(self.models, self.opts)):
            m.train()
            for g in opt.param_groups:
                g["lr"] = lr
            x, y = self._batch(k)
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        self.step_count += 1
        if self.gossip_prob > 0 and float(torch.rand(1, generator=self.gen)) < self.gossip_prob:
            self.gossip()

    @torch.no_grad()
    def gossip(self) -> None:
        """Random pairs average their weights (one node sits out when K is odd)."""
        order = torch.randperm(len(self.models), generator=self.gen).tolist()
        for a, b in zip(order[0::2], order[1::2]):
            avg = weighted_average([self.models[a].state_dict(), self.models[b].state_dict()], [0.5, 0.5])
            self.models[a].load_state_dict(avg)
            self.models[b].load_state_dict(avg)
        self.gossip_events += 1

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.step()
        for m in self.models:
            m.eval()

    @property
    def epochs_done(self) -> float:
        return self.step_count * self.batch_size / max(1, sum(len(d[0]) for d in self.data) / len(self.data))
