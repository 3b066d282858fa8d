"""FedAvg with alignment (+REPAIR) against plain FedAvg, in Flower (flwr 1.42 Message API).

Result (CIFAR-10, first 5k train / 1k test images, 4 clients, resnet20 width 0.5, Dirichlet alpha=0.5,
8 rounds, E=1): plain FedAvg 35.4% (34.8% on a second run); AlignedFedAvg (activation) 34.1% -- its
lineage test sees that the clients share the global model's channel order and skips the matching (before
that test, matching moved 69-89% of the channels in round 1 and ended at 29.8%); + RESET 35.6%; + REPAIR
31.5% (before REPAIR's train-consistent BN fold it collapsed to 11.5%). Machine: 2-core AMD EPYC VM
shared with other jobs, 1 thread, torch 2.14.1 CPU, flwr 1.42.0; ~6 min per strategy. Details:
docs/recipes/fedavg_align.md.

    pip install -e ".[federated]"
    python examples/fedavg_align.py --data ../shared/data/cifar10 --local-epochs 1 3 --out runs/fedavg

K clients on Dirichlet non-IID shards start every round from the global model. Plain Flower FedAvg is
compared with AlignedFedAvg (every client aligned to the global model by activation matching, with and
without REPAIR; statistics from the clients in QUERY rounds): test accuracy of the global model per
round, rounds to reach --target, and the strategy's own report of how far the clients' permutations were
from identity. The ServerApp and ClientApp run in this process (recipes.flower.run_inprocess); with
``flwr[simulation]`` installed the same apps run under ``flwr.simulation.run_simulation``.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from mergekit_vision.data import load_cifar10
from mergekit_vision.models import resnet20
from mergekit_vision.recipes.federated import dirichlet_split
from mergekit_vision.training import evaluate, train_classifier


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="CIFAR-10 folder or .npz")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--train-samples", type=int, default=5000)
    ap.add_argument("--test-samples", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--local-epochs", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05, help="local learning rate, decayed to 0 within each round")
    ap.add_argument("--calib-per-client", type=int, default=256)
    ap.add_argument("--target", type=float, default=0.35, help="accuracy for 'rounds to target'")
    ap.add_argument("--strategies", nargs="+", default=None,
                    help="run only the strategies whose name contains one of these words (e.g. FedAvg RESET)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/fedavg")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    log = logging.getLogger("fedavg")
    log.setLevel(logging.INFO)
    logging.getLogger("flwr").setLevel(logging.WARNING)  # Flower logs every round at INFO

    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg

    from mergekit_vision.recipes.flower import AlignedFedAvg, client_app, run_inprocess, state_dict_of

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    train = load_cifar10(args.data, "train", max_samples=args.train_samples)
    test = load_cifar10(args.data, "test", max_samples=args.test_samples)
    x, y = train.tensors
    parts = dirichlet_split(y, args.clients, args.alpha, seed=args.seed)
    build = lambda: resnet20(width=args.width)  # noqa: E731

    def data_fn(context):
        idx = parts[int(context.node_config["partition-id"])]
        return (x[idx], y[idx]), [x[idx[:args.calib_per_client]]]

    def train_fn(model, data, config):
        train_classifier(model, data, epochs=int(config["local-epochs"]), batch_size=args.batch_size,
                         lr=args.lr, warmup=0.0, augment="crop_flip", seed=int(config["server-round"]))
        return {"num-examples": len(data[0])}

    def load(arrays):
        m = build()
        m.load_state_dict(state_dict_of(arrays))
        return m.eval()

    strategies = {
        "FedAvg": lambda: FedAvg(fraction_evaluate=0.0, min_train_nodes=args.clients,
                                 min_available_nodes=args.clients),
        "FedAvg + RESET (no alignment)": lambda: AlignedFedAvg(
            build, method="none", repair="reset", example=torch.zeros(1, 3, 32, 32), fraction_evaluate=0.0,
            min_train_nodes=args.clients, min_available_nodes=args.clients),
        "AlignedFedAvg (activation)": lambda: AlignedFedAvg(
            build, method="activation", repair=False, example=torch.zeros(1, 3, 32, 32), fraction_evaluate=0.0,
            min_train_nodes=args.clients, min_available_nodes=args.clients),
        "AlignedFedAvg (activation + RESET)": lambda: AlignedFedAvg(
            build, method="activation", repair="reset", example=torch.zeros(1, 3, 32, 32), fraction_evaluate=0.0,
            min_train_nodes=args.clients, min_available_nodes=args.clients),
        "AlignedFedAvg (activation + REPAIR)": lambda: AlignedFedAvg(
            build, method="activation", repair=True, example=torch.zeros(1, 3, 32, 32), fraction_evaluate=0.0,
            min_train_nodes=args.clients, min_available_nodes=args.clients),
    }
    if args.strategies:
        strategies = {n: f for n, f in strategies.items() if any(w in n for w in args.strategies)}
    results = {"args": vars(args), "sizes": [len(p) for p in parts], "runs": {}}
    for epochs in args.local_epochs:
        for name, make in strategies.items():
            strategy = make()
            app = ServerApp()
            box = {}

            @app.main()
            def main_fn(grid, context, strategy=strategy, box=box, epochs=epochs):
                torch.manual_seed(args.seed)  # one common init for every strategy
                box["result"] = strategy.start(
                    grid, ArrayRecord.from_torch_state_dict(build().state_dict()), num_rounds=args.rounds,
                    train_config=ConfigRecord({"local-epochs": epochs}),
                    evaluate_fn=lambda rnd, arrays: MetricRecord({"acc": evaluate(load(arrays), test)["acc"]}))

            t0 = time.perf_counter()
            run_inprocess(app, client_app(build, data_fn, train_fn), args.clients)
            res = box["result"]
            accs = [res.evaluate_metrics_serverapp[r]["acc"] for r in range(args.rounds + 1)]
            hit = next((r for r, a in enumerate(accs) if a >= args.target), None)
            run = {"accuracy per round": accs, "rounds to target": hit, "seconds": time.perf_counter() - t0}
            if isinstance(strategy, AlignedFedAvg):
                run["max channels moved per round"] = [max(rep.moved()[1:])
                                                      for _, rep in sorted(strategy.reports.items())]
                run["near identity per round"] = [rep.near_identity for _, rep in sorted(strategy.reports.items())]
            results["runs"][f"{name}, E={epochs}"] = run
            log.info("E=%d %s: %s (%.0fs)", epochs, name, " ".join(f"{100 * a:.1f}" for a in accs), run["seconds"])
            (out / "results.json").write_text(json.dumps(results, indent=2))
    results["seconds"] = time.perf_counter() - t_start
    (out / "results.json").write_text(json.dumps(results, indent=2))

    lines = [f"CIFAR-10 ({args.train_samples} train / {args.test_samples} test), resnet20 width {args.width}, "
             f"{args.clients} clients, Dirichlet alpha={args.alpha}; global test accuracy after each round", "",
             "| strategy, local epochs | " + " | ".join(str(r) for r in range(1, args.rounds + 1))
             + f" | rounds to {100 * args.target:.0f}% | channels moved (max) |",
             "|---|" + "---|" * (args.rounds + 2)]
    for name, run in results["runs"].items():
        moved = run.get("max channels moved per round")
        lines.append(f"| {name} | " + " | ".join(f"{100 * a:.1f}" for a in run["accuracy per round"][1:])
                     + f" | {run['rounds to target'] if run['rounds to target'] is not None else '-'} | "
                     + (f"{100 * max(moved):.0f}%" if moved else "") + " |")
    lines.append(f"\ntotal time {results['seconds'] / 60:.1f} min")
    text = "\n".join(lines)
    (out / "results.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
