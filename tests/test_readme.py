"""The README's commands are the ones CI runs, and its numbers come from named commands."""

from __future__ import annotations

import re

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
