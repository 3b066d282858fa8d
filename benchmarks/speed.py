"""Speed and memory of `merge` against its floor.

RESULT: filled in from the run recorded in docs/results.md (see "Speed" there).

The floor is what any activation-based merge must spend: one forward pass of A, of B and of the
merged net over the same calibration batches (eval mode, no grad), timed in the same process as the
merge. Times are CPU seconds of that process (one thread; `time.process_time`, also for the merge
report's stage timings): on a machine shared with other jobs, wall time swings 2x between the floor
and the merge, CPU time does not. Wall seconds are kept in the JSON. Each configuration runs in its
own subprocess: its peak resident memory (ru_maxrss) is its own.

    python benchmarks/speed.py                              # the default sweep (long on 2 CPU cores)
    python benchmarks/speed.py --only resnet18:32:5000      # one configuration: model:pixels:images
    python benchmarks/speed.py --only resnet50:32:5000:lean # the same with merge(taps="lean")
    python benchmarks/speed.py --only resnet50:224:1000:all:16  # and tap_positions=16 ("none": all)
    python benchmarks/speed.py --json speed.json            # also keep the raw numbers
    python benchmarks/speed.py --curve resnet18:32:1000     # interpolation_curve vs one merge() per point
    python benchmarks/speed.py --device cuda --dtype bfloat16 --only resnet50:224:5000  # on a GPU (wall s)

Inputs are random tensors (speed does not depend on the pixels); models are timm's, randomly
initialized with random BatchNorm statistics. One thread unless --threads says otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import types

# model:pixels:images. 224 px uses fewer images: on this 2-core CPU a wide_resnet50_2 forward at
# 224 px is ~1 image/s per pass.
DEFAULT = [
    "resnet18:32:500", "resnet18:32:2000", "resnet18:32:5000", "resnet18:32:10000",
    "resnet50:32:5000", "wide_resnet50_2:32:5000",
    "resnet18:224:256", "resnet50:224:256", "wide_resnet50_2:224:128",
]
PARTS = ("trace", "pass_ab", "match", "interpolate", "pass_repair", "fuse", "diagnostics", "export")


def _maxrss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / 2**20  # KiB on Linux, bytes on macOS


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def stats_macs(model, x, taps: str, tap_positions) -> dict:
    """Per image: the forward's multiply-adds and those of the matching taps' cross-moments (positions x
    C_a x C_b each, at most ``tap_positions`` positions): what exact statistics must compute at the least;
    and the megabytes of the taps' float64 C_a x C_b matrices, what they must hold."""
    import torch
    from torch.fx.passes.shape_prop import ShapeProp
    from torch.utils.flop_counter import FlopCounterMode

    from mergekit_vision.calibration import plan_calibration
    from mergekit_vision.match.activation import tap_plan

    x = x[:1].float()
    m = model.float()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        m(x)
    plan = plan_calibration(m, x)
    ShapeProp(plan.gm).propagate(x)
    shapes = {nd.name: nd.meta["tensor_meta"].shape for nd in plan.gm.graph.nodes if "tensor_meta" in nd.meta}
    macs = held = 0
    for node, ts in tap_plan(plan.spec, taps).items():
        for _, t in ts:
            sh = shapes[node]
            c = t.length or sh[t.dim]
            pos = sh.numel() // (sh[0] * sh[t.dim])
            macs += (pos if tap_positions is None else min(pos, tap_positions)) * c * c
            held += c * c * 8  # the tap's float64 cross-moment, held through the pass
    return dict(forward_macs=fc.get_total_flops() / 2, tap_macs=macs, tap_moments_mb=held / 1e6)


def run_one(model_name: str, pixels: int, n: int, batch: int, threads: int, taps: str = "all",
            tap_positions: str = "none", device: str = "cpu", dtype: str = "float32") -> dict:
    import timm
    import torch

    from mergekit_vision import merge, save_safetensors
    from mergekit_vision.testing import randomize_model

    torch.set_num_threads(threads)
    gpu = device != "cpu"
    if gpu:  # wall seconds, the device drained at each reading (kernels run asynchronously)
        def clock():
            torch.cuda.synchronize()
            return time.perf_counter()
    else:
        clock = time.process_time  # CPU seconds of this process: what the other jobs on the machine leave alone
    # the merge report's stage timings read the same clock (the package's `merge` is the function:
    # the module is looked up in sys.modules)
    shim = {k: getattr(time, k) for k in dir(time) if not k.startswith("_")}
    sys.modules["mergekit_vision.calibration"].time = types.SimpleNamespace(**{**shim, "perf_counter": clock})
    dt = getattr(torch, dtype)
    a = randomize_model(timm.create_model(model_name, pretrained=False), seed=0).eval().to(device, dt)
    b = randomize_model(timm.create_model(model_name, pretrained=False), seed=1).eval().to(device, dt)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(min(batch, n - i), 3, pixels, pixels, generator=g).to(device, dt)
               for i in range(0, n, batch)]
    rss_setup = _rss_mb()

    def forward_all(m):
        t0 = clock()
        with torch.no_grad():
            for x in batches:
                m(x)
        return clock() - t0

    def device_peak_mb():
        return torch.cuda.max_memory_allocated() / 2**20 if gpu else float("nan")

    forward_all(a)  # warm-up (allocator, oneDNN primitive caches)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    floor = {"a": forward_all(a), "b": forward_all(b)}
    peak_floor, dev_floor = _maxrss_mb(), device_peak_mb()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    t0, w0 = clock(), time.perf_counter()
    positions = None if tap_positions == "none" else int(tap_positions)
    merged, report = merge(a, b, batches, method="activation", repair=True, progress=False, return_report=True,
                           taps=taps, tap_positions=positions)
    t_merge, wall_merge = clock() - t0, time.perf_counter() - w0
    peak_merge, dev_merge = _maxrss_mb(), device_peak_mb()
    floor["merged"] = forward_all(merged)
    with tempfile.TemporaryDirectory() as d:
        t0 = clock()
        save_safetensors(merged, os.path.join(d, "merged.safetensors"))
        t_export = clock() - t0
    parts = dict(report.timings)
    parts["export"] = t_export
    floor_total = sum(floor.values())
    total = t_merge + t_export
    cost = stats_macs(a, batches[0], taps, positions) if not gpu else {}
    return dict(model=model_name, pixels=pixels, images=n, batch=batch, threads=threads, taps=taps,
                tap_positions=positions, **cost,
                device=device, dtype=dtype, device_peak_floor_mb=dev_floor, device_peak_merge_mb=dev_merge,
                params_m=sum(p.numel() for p in a.parameters()) / 1e6,
                floor=floor, floor_s=floor_total, merge_s=t_merge, merge_wall_s=wall_merge, total_s=total,
                ratio=total / floor_total,
                parts=parts, unaccounted_s=t_merge - sum(report.timings.values()),
                rss_setup_mb=rss_setup, peak_floor_mb=peak_floor, peak_merge_mb=peak_merge,
                groups=len(report.groups), sites=len(report.sites))


def run_curve(model_name: str, pixels: int, n: int, batch: int, threads: int) -> dict:
    """``interpolation_curve`` (each mode measured once, the correction per alpha) against what it
    replaced: one ``merge()`` per mode and alpha. Evaluation is left out of both (it is the same work);
    the merged tensors of every point are compared."""
    import timm
    import torch

    import importlib

    ev = importlib.import_module("mergekit_vision.evaluate")  # the module (the package exports a function too)
    from mergekit_vision import merge
    from mergekit_vision.evaluate import MODES, interpolation_curve
    from mergekit_vision.testing import randomize_model

    torch.set_num_threads(threads)
    clock = time.process_time
    a = randomize_model(timm.create_model(model_name, pretrained=False, num_classes=10), seed=0).eval()
    b = randomize_model(timm.create_model(model_name, pretrained=False, num_classes=10), seed=1).eval()
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(min(batch, n - i), 3, pixels, pixels, generator=g) for i in range(0, n, batch)]
    labelled = [(torch.randn(8, 3, pixels, pixels, generator=g), torch.randint(0, 10, (8,), generator=g))]
    alphas, modes = (0.0, 0.25, 0.5, 0.75, 1.0), ("naive", "aligned", "reset", "repair")

    merged_points = {}
    real_eval = ev.evaluate

    def keep(model, data, **kw):  # the curve's models, kept to compare with merge()'s
        merged_points[len(merged_points)] = {k: v.clone() for k, v in model.state_dict().items()}
        return real_eval(model, data, **kw)

    ev.evaluate = keep
    try:
        t0 = clock()
        curve = interpolation_curve(a, b, labelled, calib_loader=calib, alphas=alphas, modes=modes, progress=False)
        t_curve = clock() - t0 - curve.meta["timings"]["eval"]
    finally:
        ev.evaluate = real_eval
    t0 = clock()
    aligned = merge(a, b, calib, alpha=1.0, repair=False, progress=False)
    points, same = 2, True  # the curve's first two scored models are the endpoints
    for mode in modes:
        matched, repair = MODES[mode]
        for alpha in alphas:
            m = merge(a, aligned if matched else b, calib, alpha=alpha, method="none", repair=repair,
                      progress=False)
            got = merged_points[points]
            same &= all(torch.equal(got[k], v) for k, v in m.state_dict().items())
            points += 1
    t_merges = clock() - t0
    return dict(model=model_name, pixels=pixels, images=n, batch=batch, threads=threads, curve_s=t_curve,
                merges_s=t_merges, speedup=t_merges / t_curve, points=len(alphas) * len(modes), identical=same)


def table(rows) -> str:
    gpu = any(r.get("device", "cpu") != "cpu" for r in rows)
    unit = "wall s" if gpu else "CPU s"  # a GPU's kernels run asynchronously: wall time, drained at each reading
    head = (f"| model | px | images | taps | tap_positions | tap MACs / forward MACs | dtype | "
            f"floor {unit} (A+B+merged) | merge+export {unit} | ratio | "
            + " | ".join(PARTS) + " | RSS after setup / peak floor / peak merge (MB) | taps' float64 MB |"
            + (" device peak floor / merge (MB) |" if gpu else ""))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        share = f"{r['tap_macs'] / r['forward_macs']:.2f}" if r.get("forward_macs") else "-"
        lines.append(f"| {r['model']} | {r['pixels']} | {r['images']} | {r.get('taps', 'all')} | "
                     f"{r.get('tap_positions') or 'all'} | {share} | "
                     f"{r.get('dtype', 'float32')} | {r['floor_s']:.1f} | {r['total_s']:.1f} | "
                     f"**{r['ratio']:.2f}** | " + " | ".join(f"{r['parts'].get(p, 0.0):.2f}" for p in PARTS)
                     + f" | {r['rss_setup_mb']:.0f} / {r['peak_floor_mb']:.0f} / {r['peak_merge_mb']:.0f} |"
                     + (f" {r['tap_moments_mb']:.0f} |" if 'tap_moments_mb' in r else " - |")
                     + (f" {r['device_peak_floor_mb']:.0f} / {r['device_peak_merge_mb']:.0f} |" if gpu else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="*", default=None, help="configurations model:pixels:images (default: the sweep)")
    p.add_argument("--batch32", type=int, default=256, help="calibration batch size at <= 64 px")
    p.add_argument("--batch224", type=int, default=32, help="calibration batch size at larger sizes")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="append raw results (one JSON object per line)")
    p.add_argument("--curve", default=None, metavar="MODEL:PX:IMAGES",
                   help="time interpolation_curve against one merge() per mode and alpha instead")
    p.add_argument("--device", default="cpu", help="where the models, the data and the merge run (e.g. cuda)")
    p.add_argument("--dtype", default="float32", help="the models' dtype (float32, bfloat16)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.curve:
        m, px, n = args.curve.split(":")
        r = run_curve(m, int(px), int(n), args.batch32 if int(px) <= 64 else args.batch224, args.threads)
        print(f"# machine: {platform.machine()}, {os.cpu_count()} CPUs, {args.threads} thread(s)")
        print("| model | px | images | curve points | curve CPU s | merge() per point CPU s | speed-up | identical |")
        print("|---|---|---|---|---|---|---|---|")
        print(f"| {r['model']} | {r['pixels']} | {r['images']} | {r['points']} | {r['curve_s']:.1f} | "
              f"{r['merges_s']:.1f} | **{r['speedup']:.1f}x** | {r['identical']} |")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")
        return 0
    if args.child:  # one configuration, in this process
        m, px, n, *taps = args.child.split(":")
        bs = args.batch32 if int(px) <= 64 else args.batch224
        print("RESULT " + json.dumps(run_one(m, int(px), int(n), bs, args.threads, *taps, device=args.device,
                                             dtype=args.dtype)), flush=True)
        return 0
    print(f"# machine: {platform.machine()}, {os.cpu_count()} CPUs, {args.threads} thread(s); "
          f"python {platform.python_version()}", flush=True)
    rows = []
    for cfg in args.only or DEFAULT:
        cmd = [sys.executable, __file__, "--child", cfg, "--threads", str(args.threads),
               "--batch32", str(args.batch32), "--batch224", str(args.batch224), "--device", args.device,
               "--dtype", args.dtype]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if out.returncode != 0 or line is None:
            print(f"{cfg}: failed ({out.returncode})\n{out.stderr[-2000:]}", flush=True)
            continue
        r = json.loads(line[len("RESULT "):])
        rows.append(r)
        print(f"{cfg}: ratio {r['ratio']:.2f} (merge+export {r['total_s']:.1f}s, floor {r['floor_s']:.1f}s; "
              f"wall {time.perf_counter() - t0:.0f}s) parts "
              + json.dumps({k: round(v, 2) for k, v in r['parts'].items()}),
              flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")
    print(table(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
