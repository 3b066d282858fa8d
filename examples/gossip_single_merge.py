"""Decentralized gossip with a single global merge at the end ("A Single Merging Suffices", Zhu et al. 2025).

Result (CIFAR-10, first 5k train / 1k test images, 4 nodes, resnet20 width 0.5, Dirichlet alpha=0.5,
8 epochs): with gossip (p=0.1 per step, 16 exchanges) from a common init the single final merge
(average + BN re-estimation) reaches 37.6% vs 38.2% for the mean node, and beats the mean node by 3-11
points at every earlier epoch; merge_many reports 0% channels moved (near identity). Without
communication it collapses: 20.2% vs 29.9% (common init; alignment + REPAIR 23.6%) and 12.5% vs 29.2%
(different inits; alignment + REPAIR 26.3%). Centralized: 56.0%. Machine: 2-core AMD EPYC VM shared
with other jobs, 1 thread, torch 2.14.1 CPU, 14 min. Details: docs/recipes/gossip_single_merge.md.

    python examples/gossip_single_merge.py --data ../shared/data/cifar10 --out runs/gossip

K nodes run SGD in lockstep on Dirichlet non-IID shards. With sparse random gossip (after a step, with
probability --gossip-prob, random pairs average their weights) and one final average of all nodes with
BatchNorm statistics re-estimated (merge_many method="none", repair="reset"), the merged model is
compared with the mean node, centralized training on the union and, per epoch, the mergeability gap
(merged minus mean local accuracy). Ablations: no communication from a common init (the paper's
prediction: the final merge collapses), and no communication from different inits, where alignment
(merge_many's activation matching + REPAIR) should start to matter. The near-identity report of an
aligned merge on the gossip nodes says whether alignment had anything to do.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from pathlib import Path

import torch

from mergekit_vision.data import load_cifar10
from mergekit_vision.merge_many import merge_many
from mergekit_vision.models import resnet20
from mergekit_vision.recipes.federated import GossipTrainer, dirichlet_split, train_cached
from mergekit_vision.training import evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="CIFAR-10 folder or .npz")
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--train-samples", type=int, default=5000)
    ap.add_argument("--test-samples", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--gossip-prob", type=float, default=0.1, help="chance of a gossip exchange after a step")
    ap.add_argument("--calib-per-node", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/gossip")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("mergekit_vision").setLevel(logging.WARNING)
    log = logging.getLogger("gossip")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    train = load_cifar10(args.data, "train", max_samples=args.train_samples)
    test = load_cifar10(args.data, "test", max_samples=args.test_samples)
    x, y = train.tensors
    parts = dirichlet_split(y, args.nodes, args.alpha, seed=args.seed)
    shards = [(x[i], y[i]) for i in parts]
    sizes = [len(i) for i in parts]
    calib = [x[i[:args.calib_per_node]] for i in parts]
    steps_per_epoch = math.ceil(sum(sizes) / args.nodes / args.batch_size)
    total = args.epochs * steps_per_epoch
    build = lambda: resnet20(width=args.width)  # noqa: E731
    results = {"args": vars(args), "sizes": sizes, "variants": {}}

    torch.manual_seed(10_000 + args.seed)
    central_file = out / f"central_w{args.width}_n{args.train_samples}_e{args.epochs}.safetensors"
    central = train_cached(build, (x, y), central_file,
                           epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, augment="crop_flip",
                           seed=args.seed)
    results["centralized"] = evaluate(central, test)["acc"]
    log.info("centralized: %.4f", results["centralized"])

    variants = {
        "gossip, common init": dict(gossip=args.gossip_prob, common=True),
        "no communication, common init": dict(gossip=0.0, common=True),
        "no communication, different inits": dict(gossip=0.0, common=False),
    }
    for name, v in variants.items():
        torch.manual_seed(args.seed)
        first = build()
        models = []
        for k in range(args.nodes):
            if v["common"]:
                models.append(copy.deepcopy(first))
            else:
                torch.manual_seed(100 + k + args.seed)
                models.append(build())
        trainer = GossipTrainer(models, shards, total_steps=total, batch_size=args.batch_size, lr=args.lr,
                                gossip_prob=v["gossip"], augment="crop_flip", seed=args.seed)
        curve = []
        for epoch in range(1, args.epochs + 1):
            trainer.run(steps_per_epoch)
            local = [evaluate(m, test)["acc"] for m in models]
            mean_local = sum(a * s for a, s in zip(local, sizes)) / sum(sizes)
            merged = merge_many(models, calib, weights=sizes, method="none", repair="reset", progress=False)
            row = {"epoch": epoch, "mean local": mean_local, "merged (average + BN re-estimation)":
                   evaluate(merged, test)["acc"], "gossip events": trainer.gossip_events}
            row["mergeability gap"] = row["merged (average + BN re-estimation)"] - mean_local
            if epoch == args.epochs:  # the aligned merge, once, at the end
                aligned, rep = merge_many(models, calib, weights=sizes, repair=True, progress=False,
                                          return_report=True)
                row["aligned + REPAIR"] = evaluate(aligned, test)["acc"]
                row["aligned: channels moved per node"] = rep.moved()
                row["aligned: near identity"] = rep.near_identity
            curve.append(row)
            log.info("%s epoch %d: mean local %.4f merged %.4f gap %+.4f (%.0fs)", name, epoch, mean_local,
                     row["merged (average + BN re-estimation)"], row["mergeability gap"], time.perf_counter() - t_start)
        results["variants"][name] = curve
        (out / "results.json").write_text(json.dumps(results, indent=2))
    results["seconds"] = time.perf_counter() - t_start
    (out / "results.json").write_text(json.dumps(results, indent=2))

    lines = [f"CIFAR-10 ({args.train_samples} train / {args.test_samples} test), resnet20 width {args.width}, "
             f"{args.nodes} nodes, Dirichlet alpha={args.alpha}, {args.epochs} epochs; test accuracy at the end", "",
             "| variant | mean node | single merge (average + BN re-est.) | aligned + REPAIR | channels moved | "
             "gap (merged - mean node) |", "|---|---|---|---|---|---|"]
    for name, curve in results["variants"].items():
        r = curve[-1]
        moved = max(r["aligned: channels moved per node"])
        lines.append(f"| {name} | {100 * r['mean local']:.1f}% | {100 * r['merged (average + BN re-estimation)']:.1f}% "
                     f"| {100 * r['aligned + REPAIR']:.1f}% | {100 * moved:.0f}% "
                     f"| {100 * r['mergeability gap']:+.1f} |")
    lines.append(f"| centralized (union) | | {100 * results['centralized']:.1f}% | | | |")
    lines += ["", "mergeability gap per epoch (points):", ""]
    lines.append("| variant | " + " | ".join(str(e) for e in range(1, args.epochs + 1)) + " |")
    lines.append("|---|" + "---|" * args.epochs)
    for name, curve in results["variants"].items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * r['mergeability gap']:+.1f}" for r in curve) + " |")
    lines.append(f"\ntotal time {results['seconds'] / 60:.1f} min")
    text = "\n".join(lines)
    (out / "results.md").write_text(text + "\n")
    _plot(results, out / "mergeability_gap.png")
    print(text)


def _plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, curve in results["variants"].items():
        ax.plot([r["epoch"] for r in curve], [100 * r["mergeability gap"] for r in curve], marker="o", label=name)
    ax.axhline(0, color="gray", lw=0.5)
    ax.set_xlabel("epoch")
    ax.set_ylabel("merged - mean node (points)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
