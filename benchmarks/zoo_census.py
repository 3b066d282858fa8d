"""Pick the zoo the tests check: the smallest one or two variants of every timm family (module) and
every torchvision classifier, by parameter count (models built on the meta device: no memory, no init).

    python benchmarks/zoo_census.py > tests/zoo_models.json

Writes {"timm": {module: [[name, params], ...]}, "torchvision": [[name, params], ...]}; models over
MAX_PARAMS are left out, as are models that cannot be built without downloading weights.
"""
import json
import sys

import timm
import torch
import torchvision

MAX_PARAMS = 60e6
PER_FAMILY = 2


def _params(build):
    try:
        with torch.device("meta"):
            m = build()
        return sum(p.numel() for p in m.parameters())
    except Exception as exc:  # noqa: BLE001 -- a census: record and go on
        print(f"cannot build: {exc!s:.120}", file=sys.stderr)
        return None


def main():
    out = {"timm": {}, "torchvision": []}
    for module in timm.list_modules():
        sized = []
        for name in timm.list_models(module=module):
            n = _params(lambda: timm.create_model(name, pretrained=False))
            if n is not None and n <= MAX_PARAMS:
                sized.append([name, n])
        sized.sort(key=lambda t: (t[1], t[0]))
        if sized:
            out["timm"][module] = sized[:PER_FAMILY]
        print(module, sized[:PER_FAMILY], file=sys.stderr)
    for name in torchvision.models.list_models(module=torchvision.models):
        n = _params(lambda: torchvision.models.get_model(name, weights=None))
        if n is not None and n <= MAX_PARAMS:
            out["torchvision"].append([name, n])
    out["torchvision"].sort(key=lambda t: t[0])
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
