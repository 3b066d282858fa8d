"""Cost of least-squares repair against the forward-pass floor.

RESULT: see docs/results.md ("Least-squares repair", cost).

The floor is one forward pass of A, of B and of the merged net over the calibration batches (eval, no
grad), as in benchmarks/speed.py, measured before and after the lsq pass (the ratio uses their mean, so
that a change of the machine's load during a run moves both sides alike). The lsq pass is
``repair.lsq.lsq_pass`` over the same batches with the two endpoints (B aligned) and the merged net: one
walk, all batches' values held up to ``--memory`` (lsq_memory), the rest spilled to TMPDIR. Times are
CPU seconds of the process (``time.process_time``; one thread unless --threads); each configuration runs
in its own subprocess so that its peak resident memory (ru_maxrss) is its own.

    python benchmarks/lsq_cost.py --only resnet20:32:1000 resnet20:32:5000
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(name: str, pixels: int, n: int, batch: int, threads: int, positions, memory="auto") -> dict:
    import copy

    import torch

    from mergekit_vision.engine import shared_graph
    from mergekit_vision.models import create_model
    from mergekit_vision.repair.lsq import lsq_pass
    from mergekit_vision.testing import measure_norm_statistics, randomize_model

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(min(batch, n - i), 3, pixels, pixels, generator=g) for i in range(0, n, batch)]
    if name.startswith("timm_"):
        import timm

        build = lambda: timm.create_model(name[5:], pretrained=False, num_classes=10)  # noqa: E731
    else:
        build = lambda: create_model(name)  # noqa: E731
    a = measure_norm_statistics(randomize_model(build(), 1), batches[:2])
    b = measure_norm_statistics(randomize_model(build(), 2), batches[:2])
    merged = copy.deepcopy(a)
    with torch.no_grad():
        for va, vb in zip(merged.state_dict().values(), b.state_dict().values()):
            if va.is_floating_point():
                va.copy_(0.5 * va + 0.5 * vb)
    rss0 = _maxrss_mb()

    def forward_all(m):
        t = time.process_time()
        with torch.no_grad():
            for x in batches:
                m(x)
        return time.process_time() - t

    floor = sum(forward_all(m) for m in (a, b, merged))
    peak_floor = _maxrss_mb()
    gm = shared_graph(a)
    t, wall = time.process_time(), time.perf_counter()
    res = lsq_pass(merged, [a, b], [0.5, 0.5], gm, batches, positions=positions, memory=memory)
    lsq = time.process_time() - t
    lsq_wall = time.perf_counter() - wall
    peak_lsq = _maxrss_mb()
    # the floor again after the pass (the merged net is now the refit one: same cost), so that a change in
    # the machine's load during the run moves both sides of the ratio alike: the ratio uses their mean
    floor_after = sum(forward_all(m) for m in (a, b, merged))
    floor_mean = 0.5 * (floor + floor_after)
    return dict(model=name, pixels=pixels, images=n, positions=positions, floor_s=floor_mean, floor_before_s=floor,
                floor_after_s=floor_after, lsq_s=lsq, lsq_wall_s=lsq_wall, ratio=lsq / floor_mean, fits=len(res.fits),
                dual_fits=sum(f.solver == "dual" for f in res.fits.values()), memory=memory,
                spilled_mb=res.spilled_bytes / 2**20, held_peak_mb=res.peak_held_bytes / 2**20,
                rss_setup_mb=rss0, peak_floor_mb=peak_floor, peak_lsq_mb=peak_lsq)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", default=["resnet20:32:1000", "resnet20:32:5000"],
                   help="model:pixels:images (model: a mergekit_vision model, or timm_<name>)")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--positions", default="64", help="lsq_positions (an int, or 'all')")
    p.add_argument("--memory", default="auto", help="lsq_memory: 'auto', 'none' or a size such as 512MB")
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    positions = None if args.positions == "all" else int(args.positions)
    memory = None if args.memory == "none" else args.memory
    if args.child:
        name, px, n = args.child.split(":")
        print(json.dumps(run_one(name, int(px), int(n), args.batch, args.threads, positions, memory)))
        return 0
    rows = []
    for cfg in args.only:
        out = subprocess.run([sys.executable, __file__, "--child", cfg, "--batch", str(args.batch), "--threads",
                              str(args.threads), "--positions", args.positions, "--memory", args.memory],
                             capture_output=True, text=True)
        if out.returncode:
            print(out.stderr, file=sys.stderr)
            return out.returncode
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"{cfg} positions={args.positions}: floor {r['floor_s']:.1f} CPU s ({r['floor_before_s']:.1f} before, "
              f"{r['floor_after_s']:.1f} after), lsq pass {r['lsq_s']:.1f} CPU s "
              f"(ratio {r['ratio']:.2f}), peak RSS floor {r['peak_floor_mb']:.0f} MB, lsq {r['peak_lsq_mb']:.0f} MB "
              f"(ratio {r['peak_lsq_mb'] / r['peak_floor_mb']:.2f}; held {r['held_peak_mb']:.0f} MB, spilled "
              f"{r['spilled_mb']:.0f} MB), {r['dual_fits']}/{r['fits']} fits dual",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
