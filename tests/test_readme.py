"""The README's commands are the ones CI runs, and the Python example of the docs runs."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT


def _quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)


def test_quick_start_has_exactly_two_commands_and_ci_runs_the_second():
    commands = _quick_start_commands()
    assert len(commands) == 2
    assert "pyrovae train" in commands[0]
    assert "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci, "the test command in .ci/run must be the README's, as written"
    assert "rm -rf .venv" in (ROOT / ".ci" / "run").read_text()  # a fresh environment every time


def test_python_api_example_runs_and_its_two_estimates_agree(tmp_path, monkeypatch):
    """The Python example of Getting started, at 1 epoch and K = 10, in a scratch folder: it trains, and
    evaluate's log p(x) and estimate_log_px's, under the same seed, are the same number."""
    text = (ROOT / "docs" / "getting-started.md").read_text()
    section = text.split("## The Python API", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)\n```", section, flags=re.S)
    code = code.replace("epochs=50", "epochs=1").replace("num_samples=1000", "num_samples=10")
    assert "epochs=1" in code and code.count("num_samples=10") == 2
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "docs/getting-started.md", "exec"), scope)
    report, est = scope["report"], scope["est"]
    assert report["num_examples"] == est.log_px.numel() == 500
    assert report["components"]["num_components"] == 10
    # the same seed: the same per-example estimate, whatever path computed it
    assert report["log_px"] == pytest.approx(float(est.log_px.mean()), abs=1e-9)
