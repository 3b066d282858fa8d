"""Pick the zoo the tests check: the smallest one or two variants of every timm family (module) and
every torchvision classifier, by parameter count (models built on the meta device: no memory, no init).

    python benchmarks/zoo_census.py > tests/zoo_models.json
    python benchmarks/zoo_census.py --fractions > docs/bench/zoo_fractions.md   # the table in docs/spec.md

Writes {"timm": {module: [[name, params], ...]}, "torchvision": [[name, params], ...]}: per timm module
the smallest real variant and the next one, plus timm's own smallest ``test_*`` model where the family
has one; models over MAX_PARAMS are left out, as are models that cannot be built.
"""
import json
import sys

import timm
import torch
import torchvision

MAX_PARAMS = 60e6
PER_FAMILY = 2


def _params(build):
    for device in ("meta", "cpu"):  # some initializers copy real data (scipy's truncnorm): build those for real
        try:
            with torch.device(device):
                m = build()
            return sum(p.numel() for p in m.parameters())
        except Exception as exc:  # noqa: BLE001 -- a census: record and go on
            print(f"cannot build on {device}: {exc!s:.120}", file=sys.stderr)
    return None


def fractions():
    """Trace every model of tests/zoo_models.json at its input size: the permutable fraction of its
    hidden channels per family, and what freezes the rest (a markdown table)."""
    from collections import Counter
    from pathlib import Path

    from mergekit_vision import trace_permutation_spec

    census = json.loads((Path(__file__).parents[1] / "tests" / "zoo_models.json").read_text())
    rows = [(f"timm/{fam}", n) for fam, chosen in census["timm"].items() for n, _ in chosen]
    rows += [("torchvision", n) for n, _ in census["torchvision"]]
    print("| family | model | permutable fraction | free groups | what freezes the rest (top reasons) |")
    print("|---|---|---|---|---|")
    for fam, name in rows:
        try:
            torch.manual_seed(0)
            m = (torchvision.models.get_model(name, weights=None) if fam == "torchvision"
                 else timm.create_model(name, pretrained=False)).eval()
            size = 64
            try:
                with torch.no_grad():
                    m(torch.randn(1, 3, 64, 64))
            except Exception:  # noqa: BLE001 -- fixed input size
                size = (getattr(m, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-1]
            spec = trace_permutation_spec(m, torch.randn(1, 3, size, size))
            reasons = Counter(g.reason.split(" at node")[0] for g in spec.groups
                              if g.frozen and g.reason not in ("model input channels", "model output"))
            top = "; ".join(f"{r} ({c})" for r, c in reasons.most_common(2))
            print(f"| {fam} | {name} | {spec.permutable_fraction:.2f} | {len(spec.free_groups)} | {top} |", flush=True)
        except Exception as exc:  # noqa: BLE001 -- a census: record and go on
            print(f"| {fam} | {name} | – | – | {type(exc).__name__}: {' '.join(str(exc).split())[:100]} |", flush=True)


def main():
    if "--fractions" in sys.argv:
        return fractions()
    out = {"timm": {}, "torchvision": []}
    for module in timm.list_modules():
        sized = []
        for name in timm.list_models(module=module):
            n = _params(lambda name=name: timm.create_model(name, pretrained=False))
            if n is not None and n <= MAX_PARAMS:
                sized.append([name, n])
        sized.sort(key=lambda t: (t[1], t[0]))
        real = [t for t in sized if not t[0].startswith("test_")]
        test = [t for t in sized if t[0].startswith("test_")]
        chosen = real[:PER_FAMILY] + test[:1]
        if chosen:
            out["timm"][module] = chosen
        print(module, chosen, file=sys.stderr)
    for name in torchvision.models.list_models(module=torchvision.models):
        n = _params(lambda name=name: torchvision.models.get_model(name, weights=None))
        if n is not None and n <= MAX_PARAMS:
            out["torchvision"].append([name, n])
    out["torchvision"].sort(key=lambda t: t[0])
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
