"""Federated / data-parallel least-squares repair: how many statistics rounds a model needs and how
many bytes of float64 sums each data shard sends per round (repair="lsq" through
``merge_many_distributed`` or the Flower recipes).

RESULT: see docs/merge.md ("Least-squares repair", sharded data).

Counted from the traced graph, no data: the rounds of ``repair.lsq.lsq_rounds`` plus the last round
of composed BatchNorms' output moments. A fit of ``groups`` blocks with patch dimension ``d`` and
``out`` outputs per block sends its centred statistics (``repair.lsq.stats_numel``: ``Cxx`` d^2, ``Cxy``
d * out, the means d + out, the targets' centred sum of squares out, per block), its row count and its
unknowns (the patch entries that read the input); a
moments round sends (count, mean, m2) per composed BatchNorm; every round adds its index and sample
count. Float64: 8 bytes a number. ``--check`` runs the walk on two random images of the first model
and compares these counts with the bytes it records.

    python benchmarks/lsq_rounds.py resnet20 timm_resnet18 timm_resnet50
"""
from __future__ import annotations

import argparse


def build(name: str):
    import torch

    from mergekit_vision.models import create_model

    if name.startswith("timm_"):
        import timm

        return timm.create_model(name[len("timm_"):], pretrained=False).eval(), torch.zeros(1, 3, 224, 224)
    width = 1
    if ":" in name:
        name, width = name.split(":")[0], int(name.split(":")[1])
    return create_model(name, width=width).eval(), torch.zeros(1, 3, 32, 32)


def count(model) -> dict:
    from mergekit_vision.engine import shared_graph
    from mergekit_vision.repair.lsq import find_lsq_sites, lsq_rounds, patch_layout, stats_numel

    gm = shared_graph(model)
    mods = dict(model.named_modules())
    sites, skipped = find_lsq_sites(gm)
    rounds = lsq_rounds(gm.graph, sites)
    per_round = []
    for r in rounds:
        n = 2  # round index, samples
        for s in r:
            lay = patch_layout(mods[s.module], s.kind)
            n += stats_numel(lay.groups, lay.dim, lay.out)
        per_round.append(8 * n)
    composed = [s for s in sites if s.bn is not None]
    if composed:
        per_round.append(8 * (2 + sum(2 * patch_layout(mods[s.module], s.kind).out
                                      * patch_layout(mods[s.module], s.kind).groups + 1 for s in composed)))
    params = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    return {"fits": len(sites), "fit_rounds": len(rounds), "rounds": len(per_round), "bytes": per_round,
            "model_bytes": params, "batched": [[s.module for s in r] for r in rounds if len(r) > 1]}


def check(name: str, expected: list) -> None:
    import copy

    import torch

    from mergekit_vision.engine import shared_graph
    from mergekit_vision.repair.lsq import lsq_pass

    model, x = build(name)
    x = torch.randn(2, *x.shape[1:], generator=torch.Generator().manual_seed(0))
    res = lsq_pass(copy.deepcopy(model), [model], [1.0], shared_graph(model), [x], positions=4)
    assert res.round_bytes == expected, (res.round_bytes, expected)
    print(f"{name}: the walk's recorded bytes per round equal the count")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="resnet20, resnet20:4 (width), vgg11, timm_<name>")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    first = None
    for name in args.models:
        c = count(build(name)[0])
        first = first or (name, c["bytes"])
        b = c["bytes"]
        print(f"{name}: {c['fits']} fits in {c['fit_rounds']} fit rounds + {c['rounds'] - c['fit_rounds']} "
              f"moments round = {c['rounds']} rounds; float64 sums per shard per round: max {max(b) / 1e6:.2f} MB, "
              f"median {sorted(b)[len(b) // 2] / 1e6:.3f} MB, total {sum(b) / 1e6:.1f} MB "
              f"(model {c['model_bytes'] / 1e6:.1f} MB); batched: {c['batched']}")
    if args.check:
        check(*first)


if __name__ == "__main__":
    main()
