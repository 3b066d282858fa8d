"""Weight matching: mergekit_vision against the PyPI package `rebasin` (0.0.47) on timm models.

RESULT: see docs/results.md ("Against rebasin"), produced by the command below on a 2-core x86_64 CPU
(shared, 1 thread, no GPU).

    pip install rebasin && python benchmarks/rebasin_compare.py --models resnet18 resnet50

For each model, three pairs of randomly initialized timm models in eval mode:
  * "independent": A and B from different seeds, random BatchNorm statistics (as trained nets have);
  * "permuted copy": B is A with every permutable group shuffled (the same function), random BN statistics;
  * "permuted copy, default BN": the same with BatchNorm statistics at their defaults (0 mean, 1 var);
  * "trained": with ``--ckpt DIR``, the CIFAR-10 pair ``timm_{model}_stem4_s0/_s1`` that
    ``benchmarks/train_pairs.py`` cached there (two seeds, timm's own stem at 32 px).
Each library aligns B to A by weight matching (Git Re-Basin's coordinate descent, <= 100 sweeps). Reported:
CPU time of the process, one thread (tracing + matching + applying the permutation, and the matching
alone), whether B still
computes the same function afterwards (relative output change on random inputs), and, for permuted
copies, whether B's weights came back to A's (the right answer is known), and the objective both
maximize, sum over parameters of <W_A, W_B aligned>, relative to its Cauchy-Schwarz bound.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import sys
import time
import types

import torch


def _rel(y, ref) -> float:
    return float((y - ref).norm() / ref.norm())


def _pair(name: str, kind: str, pixels: int, ckpt=None):
    import timm

    from mergekit_vision import permute, random_perms, trace_permutation_spec
    from mergekit_vision.testing import randomize_model

    if kind == "trained":
        if ckpt is None:
            raise SystemExit("the trained pair needs --ckpt (the folder benchmarks/train_pairs.py wrote)")
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from pathlib import Path

        from train_pairs import load_checkpoint

        return tuple(load_checkpoint(Path(ckpt), f"timm_{name}_stem4", s).eval() for s in (0, 1))

    a = timm.create_model(name, pretrained=False).eval()
    if kind != "permuted copy, default BN":
        randomize_model(a, seed=0)
    else:
        # random weights and affines, BN running statistics left at 0 / 1
        stats = {k: v.clone() for k, v in a.state_dict().items() if "running" in k}
        randomize_model(a, seed=0)
        a.load_state_dict({**a.state_dict(), **stats})
    if kind == "independent":
        b = randomize_model(timm.create_model(name, pretrained=False), seed=1).eval()
    else:
        spec = trace_permutation_spec(a, torch.randn(1, 3, pixels, pixels))
        b = permute(a, spec, random_perms(spec, torch.Generator().manual_seed(7))).eval()
    return a, b


def _objective(m1, m2) -> float:
    """sum over parameters of <W_1, W_2>, relative to sum of |W_1| |W_2| (1: identical up to scale)."""
    p2 = dict(m2.named_parameters())
    dots = [(float((v.detach().double() * p2[k].detach().double()).sum()),
             float(v.detach().double().norm() * p2[k].detach().double().norm()))
            for k, v in m1.named_parameters()]
    return sum(d for d, _ in dots) / sum(n for _, n in dots)


def _differing(m1, m2) -> list:
    """Floating tensors of ``m2`` that differ from ``m1``'s."""
    s2 = m2.state_dict()
    return [k for k, v in m1.state_dict().items() if v.is_floating_point() and not torch.allclose(v, s2[k], atol=1e-6)]


# CPU seconds of this process (one thread): the other jobs on a shared machine do not inflate them
clock = time.process_time


def run_ours(a, b, x):
    from mergekit_vision.merge import align

    # the merge report's stage timings read the same clock (sys.modules: the package's `merge` is the function)
    shim = {k: getattr(time, k) for k in dir(time) if not k.startswith("_")}
    sys.modules["mergekit_vision.merge"].time = types.SimpleNamespace(**{**shim, "perf_counter": clock})
    t0 = clock()
    aligned = align(a, b, [x], method="weight", progress=False)
    total = clock() - t0
    t = aligned.merge_report.timings
    return aligned, dict(total_s=total, match_s=t["match"], trace_s=t["trace"])


def run_rebasin(a, b, x):
    from rebasin import PermutationCoordinateDescent

    b = copy.deepcopy(b)
    t0 = clock()
    pcd = PermutationCoordinateDescent(a, b, x)
    t1 = clock()
    pcd.calculate_permutations(max_iterations=100)
    t2 = clock()
    pcd.apply_permutations()
    t3 = clock()
    return b, dict(total_s=t3 - t0, match_s=t2 - t1, trace_s=t1 - t0)


def compare(name: str, kind: str, pixels: int, ckpt=None) -> dict:
    a, b = _pair(name, kind, pixels, ckpt)
    g = torch.Generator().manual_seed(123)
    x = torch.randn(8, 3, pixels, pixels, generator=g)
    probe = torch.randn(16, 3, pixels, pixels, generator=g)
    with torch.no_grad():
        ya, yb = a(probe), b(probe)
    row = dict(model=name, pair=kind, pixels=pixels, b_vs_a_before=_rel(yb, ya))
    for lib, fn in (("mergekit_vision", run_ours), ("rebasin", run_rebasin)):
        torch.manual_seed(0)  # rebasin draws its sweep order from the global generator
        try:
            aligned, t = fn(a, b, x)
        except Exception as exc:  # report, do not hide, a library failing on a model
            row[lib] = dict(error=f"{type(exc).__name__}: {exc}"[:300])
            continue
        with torch.no_grad():
            ya2 = aligned(probe)
        moved = sum(not torch.equal(v, aligned.state_dict()[k]) for k, v in b.state_dict().items())
        row[lib] = dict(t, function_change=_rel(ya2, yb), tensors_moved=moved,
                        differ_from_a=_differing(a, aligned) if kind.startswith("permuted") else None,
                        output_vs_a=_rel(ya2, ya), objective=_objective(a, aligned))
    return row


def table(rows) -> str:
    lines = ["| model | pair | library | total CPU s | matching CPU s | B's output change after alignment | "
             "weights back to A's | tensors moved | objective |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for lib in ("mergekit_vision", "rebasin"):
            d = r[lib]
            if "error" in d:
                lines.append(f"| {r['model']} | {r['pair']} | {lib} | error: {d['error']} | | | | | |")
                continue
            diff = d["differ_from_a"]
            rec = "-" if diff is None else ("yes" if not diff else f"no: {len(diff)} tensors differ, e.g. {diff[0]}")
            lines.append(f"| {r['model']} | {r['pair']} | {lib} | {d['total_s']:.2f} | {d['match_s']:.2f} | "
                         f"{d['function_change']:.1e} | {rec} | {d['tensors_moved']} | "
                         f"{d.get('objective', float('nan')):.4f} |")
    speed = [r for r in rows if "error" not in r["rebasin"] and "error" not in r["mergekit_vision"]]
    for r in speed:
        lines.append("")
        lines.append(f"{r['model']} / {r['pair']}: rebasin / mergekit_vision time = "
                     f"{r['rebasin']['total_s'] / r['mergekit_vision']['total_s']:.1f}x total, "
                     f"{r['rebasin']['match_s'] / r['mergekit_vision']['match_s']:.1f}x matching alone")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--pairs", nargs="+", default=["independent", "permuted copy", "permuted copy, default BN"])
    p.add_argument("--pixels", type=int, default=64, help="input size for tracing and the output checks")
    p.add_argument("--ckpt", default=None, help="folder of train_pairs.py checkpoints, for --pairs trained")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    print(f"# machine: {platform.machine()}, {os.cpu_count()} CPUs, {args.threads} thread(s); "
          f"torch {torch.__version__}",
          flush=True)
    rows = []
    for name in args.models:
        for kind in args.pairs:
            r = compare(name, kind, args.pixels, args.ckpt)
            rows.append(r)
            print(json.dumps(r), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(r) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
