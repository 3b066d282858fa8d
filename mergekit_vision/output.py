"""The output folder of ``mergekit-vision merge``: weights, config.json, the config, the report, a model card.

Files are written atomically, weights first and README.md last: a folder without README.md is incomplete.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

from torch import nn

from ._version import __version__
from .errors import ExportError
from .export import CONFIG_NAME, save_sharded, timm_config, write_json_atomic, write_text_atomic
from .report import MergeReport

__all__ = ["write_output_folder", "check_output_folder", "CONFIG_YAML", "REPORT_NAME", "CARD_NAME"]

logger = logging.getLogger(__name__)

CONFIG_YAML = "mergekit_vision_config.yml"
REPORT_NAME = "merge_report.json"
CARD_NAME = "README.md"
_METHOD_WORDS = {"activation": "activation matching (channels of B aligned to A by activation correlation)",
                 "weight": "weight matching (channels of B aligned to A by weight similarity, data-free)",
                 "none": "no alignment (naive weight average)"}
_REPAIR_WORDS = {"repair": "REPAIR (per-channel mean and std restored, fused into the weights)",
                 "reset": "RESET (BatchNorm statistics re-estimated)", "none": "none"}


def check_output_folder(out_dir: Union[str, Path], what: str = "output folder") -> Path:
    """Fail before any work when ``out_dir`` cannot be written: it must be a folder this process can
    write, or one it can create (its nearest existing ancestor a writable folder, no file on the way).
    The probe creates and removes a temporary file there, so permissions, ACLs and read-only mounts
    all count, for root too; nothing is left behind and a missing folder is not created yet."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{what} '{out}' is a file; give a folder path (it is created if missing)")
    base = out
    while not base.exists() and base.parent != base:
        base = base.parent
    if not base.is_dir():
        raise ExportError(f"{what} '{out}' cannot be created: '{base}' is a file, not a folder; give another path")
    try:
        with tempfile.TemporaryFile(dir=base, prefix=".mergekit_vision-write-test-"):
            pass
    except OSError as exc:
        where = "is not writable" if base == out else f"cannot be created: '{base}' is not writable"
        raise ExportError(f"{what} '{out}' {where} ({exc.strerror or exc}); choose another folder or fix "
                          "its permissions") from exc
    return out


def write_output_folder(out_dir: Union[str, Path], merged: nn.Module, config: Any, report: MergeReport, *,
                        model_name: str, library: str, metrics: Optional[Mapping[str, Any]] = None) -> List[Path]:
    """Write the folder: model.safetensors (sharded above ``config.out_shard_size``), config.json,
    mergekit_vision_config.yml, merge_report.json and README.md, in that order; return the paths.

    ``config`` is the validated ``MergeConfig``; ``model_name`` the architecture name in ``library``
    ("timm", "torchvision" or "mkv"); ``metrics`` the measured accuracies (``{"model_a": ..,
    "model_b": .., "merged": .., "samples": N}``), if any.
    """
    out = check_output_folder(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # README.md marks a finished folder: an earlier run's card goes first, so a re-run that is
    # interrupted never pairs new weights with an old card.
    (out / CARD_NAME).unlink(missing_ok=True)

    metadata = {
        "merge_method": report.method,
        "alpha": report.alpha,
        **({"weights": report.weights} if len(report.sources) > 2 else {}),
        "repair": report.repair,
        "calibration_samples": report.calibration_samples,
        "mergekit_vision_version": __version__,
        "sources": [{k: s.get(k) for k in ("model", "checkpoint", "sha256")} for s in report.sources],
    }
    paths = save_sharded(merged, out, max_shard_size=config.out_shard_size, metadata=metadata)
    paths.append(write_json_atomic(out / CONFIG_NAME, _model_config(model_name, merged, library, config)))
    paths.append(write_text_atomic(out / CONFIG_YAML, _yaml_header(__version__) + config.to_yaml()))
    body = report.to_dict()
    if metrics:
        body["evaluation"] = dict(metrics)
    paths.append(write_json_atomic(out / REPORT_NAME, body))
    sharded = any(p.name.endswith(".index.json") for p in paths)
    paths.append(write_text_atomic(out / CARD_NAME, _model_card(config, report, model_name=model_name,
                                                               library=library, metrics=metrics,
                                                               sharded=sharded, version=__version__)))
    logger.info("wrote %s: %s", out, ", ".join(p.name for p in paths))
    return paths


def _yaml_header(version: str) -> str:
    return (f"# The validated config that produced this folder (mergekit_vision {version}).\n"
            "# Re-run it with: mergekit-vision merge mergekit_vision_config.yml OUT_DIR\n")


def _model_config(model_name: str, merged: nn.Module, library: str, config: Any) -> Dict[str, Any]:
    if library in ("timm", "torchvision"):
        return timm_config(model_name, merged, library=library)
    # this package's reference models: enough to rebuild with mergekit_vision.models.create_model
    head = [m for m in merged.modules() if isinstance(m, nn.Linear)]
    return {"library": "mergekit_vision", "architecture": model_name,
            "model_args": dict(config.models[0].kwargs),
            "num_classes": head[-1].out_features if head else None}


# ---- the model card ----------------------------------------------------------------------------------
def _pct(v: Any) -> str:
    return f"{100 * float(v):.2f}%" if isinstance(v, (int, float)) else "—"


def _data_name(data: Any) -> str:
    split = "" if data.kind == "npz" else f" (split {data.split})"  # an .npz's split may not apply
    return f"{data.kind} `{Path(data.path).name}`{split}"


def _load_snippet(model_name: str, library: str, kwargs: Mapping[str, Any], sharded: bool) -> str:
    args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    if library == "timm" and not sharded:
        overlay = "file='model.safetensors'" + (f", num_classes={kwargs['num_classes']!r}"
                                                if "num_classes" in kwargs else "")
        return ("import timm\n\n"
                f"model = timm.create_model({model_name!r}, pretrained=True{args},\n"
                f"                          pretrained_cfg_overlay=dict({overlay})).eval()\n"
                "# or, from this folder's config.json: timm.create_model('local-dir:.', pretrained=True)")
    if library == "timm":
        build = f"import timm\n\nmodel = timm.create_model({model_name!r}, pretrained=False{args})"
    elif library == "torchvision":
        build = f"import torchvision\n\nmodel = torchvision.models.get_model({model_name!r}, weights=None{args})"
    else:
        build = f"from mergekit_vision.models import create_model\n\nmodel = create_model({model_name!r}{args})"
    return (build + "\n"
            "from mergekit_vision.export import load_into\n"
            "load_into(model, '.').eval()  # this folder: model.safetensors or the shards + index")


def _model_card(config: Any, report: MergeReport, *, model_name: str, library: str,
               metrics: Optional[Mapping[str, Any]], sharded: bool, version: str) -> str:
    """README.md: front matter for model hubs, the merge, its sources, accuracies, report and config."""
    hub = [m.model for m in config.models if m.model.startswith("hf-hub:")]
    front = ["---", f"library_name: {'timm' if library == 'timm' else 'pytorch'}",
             "tags:", "- image-classification", "- mergekit-vision", "- merge"]
    if hub:
        front += ["base_model:"] + [f"- {m[len('hf-hub:'):]}" for m in hub]
    front.append("---")

    cal = config.calibration
    n = len(report.sources) or 2
    tags = "AB" if n == 2 else [f"models[{i}]" for i in range(n)]
    if n == 2:
        what = (f"# {model_name}: a merge of two models", "", f"Made with mergekit_vision {version}: models[1] (B) "
                "was aligned to models[0] (A), interpolated as `(1 - alpha)·A + alpha·B` and corrected; the result "
                "has exactly the architecture of A.")
        share = f"| alpha | {report.alpha:g} (the weight of B) |"
    else:
        what = (f"# {model_name}: a merge of {n} models", "", f"Made with mergekit_vision {version}: every model was "
                "aligned to models[0], averaged with the weights below and corrected; the result has exactly the "
                "architecture of models[0].")
        share = "| weights | " + ", ".join(f"{w:.4g}" for w in report.weights) + " |"
    lines = front + [
        "",
        *what,
        "",
        "| | |",
        "|---|---|",
        f"| method | `{report.method}`: {_METHOD_WORDS.get(report.method, report.method)} |",
        share,
        f"| repair | `{report.repair}`: {_REPAIR_WORDS.get(report.repair, report.repair)} |",
        f"| calibration | {report.calibration_samples} samples, {_data_name(cal)} |",
        f"| dtype | {config.dtype} |",
        "",
        "## Sources",
        "",
        "| | model | checkpoint | sha256 |",
        "|---|---|---|---|",
    ]
    for tag, src in zip(tags, report.sources):
        lines.append(f"| {tag} | `{src.get('model')}` | {src.get('checkpoint') or '(pretrained)'} | "
                     f"`{src.get('sha256') or '—'}` |")
    if metrics:
        ev = config.evaluation
        where = f"{metrics.get('samples', '?')} samples" + (f", {_data_name(ev)}" if ev is not None else "")
        keys = ["model_a", "model_b"] if n == 2 else [f"models[{i}]" for i in range(n)]
        lines += ["", "## Accuracy", "", f"Top-1 on {where}.", "", "| model | top-1 |", "|---|---|"]
        lines += [f"| {t} | {_pct(metrics.get(k))} |" for t, k in zip(tags, keys)]
        lines.append(f"| merged | {_pct(metrics.get('merged'))} |")
    lines += ["", "## Merge report", "", "```text", report.summary(), "```", "",
              "Per-group correlations and per-site variance ratios: `merge_report.json`.",
              "", "## Load it", "", "```python", _load_snippet(model_name, library, config.models[0].kwargs, sharded),
              "```", "", "## Configuration", "", f"`{CONFIG_YAML}`:", "", "```yaml", config.to_yaml().rstrip(), "```",
              ""]
    return "\n".join(lines)
