"""README.md's Python example runs as written, on checkpoint files and data made here."""
import re
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch

from mergekit_vision.errors import CalibrationWarning
from mergekit_vision.testing import randomize_model

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("\n## Python\n"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "README's ## Python section should hold one python example"
    return blocks[0]


@pytest.mark.slow
def test_the_readme_python_example_runs_as_written(tmp_path, monkeypatch, one_thread, capsys):
    trained = []
    for seed, name in ((1, "a"), (2, "b")):  # stand-ins for two trained checkpoints: every tensor random
        m = randomize_model(timm.create_model("resnet18", num_classes=10).eval(), seed=seed)
        safetensors.torch.save_file(m.state_dict(), tmp_path / f"{name}.safetensors")
        trained.append(m.state_dict())
    g = np.random.default_rng(0)
    # fewer images than the README asks for, to keep the test short: the warning it mentions comes
    np.savez(tmp_path / "calib.npz", x=g.integers(0, 256, (96, 32, 32, 3), dtype=np.uint8))
    monkeypatch.chdir(tmp_path)

    ns: dict = {}
    with pytest.warns(CalibrationWarning, match=r"at least 512 calibration samples \(got 96\)"):
        exec(compile(_python_example(), str(README), "exec"), ns)

    # the checkpoints were loaded whole, the classifier included (not timm's freshly initialized head)
    for model, sd in ((ns["model_a"], trained[0]), (ns["model_b"], trained[1])):
        assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    merged, report = ns["merged"], ns["report"]
    assert report.calibration_samples == 96 and report.repair == "repair"
    # the classes are not permuted and REPAIR does not touch the logits: the head's bias is the average
    assert torch.allclose(merged.fc.bias, (trained[0]["fc.bias"] + trained[1]["fc.bias"]) / 2)
    saved, meta = __import__("mergekit_vision").load_safetensors(tmp_path / "merged.safetensors")
    assert meta["merge_method"] == "activation" and meta["alpha"] == 0.5 and meta["calibration_samples"] == 96
    assert all(torch.equal(v, merged.state_dict()[k]) for k, v in saved.items())
    printed = capsys.readouterr().out
    assert "merge: method=activation" in printed


def test_readme_test_command_is_what_ci_runs():
    """README's test command and .ci/run are the same steps (the lint, then the tests)."""
    line = next(s for s in README.read_text(encoding="utf-8").splitlines() if "pytest" in s and "pip install" in s)
    readme = [step.strip() for step in line.split("&&")]
    ci_lines = (README.parent / ".ci" / "run").read_text().splitlines()
    ci = [s.strip().replace("python -m pip install -q", "pip install") for s in ci_lines
          if s.strip() and not s.startswith(("#", "set ", "cd "))]
    assert ci == readme == ['pip install -e ".[test]"', "ruff check .", "python -m pytest"]
