"""Every name of ``pyrovae.__all__`` has a numpy-style ``Examples`` section, and its examples run as doctests."""

from __future__ import annotations

import doctest
import inspect
import io
import re

import pytest

import pyrovae

#: doctest options of every example: ``...`` stands for any text where an example says so
OPTIONS = doctest.NORMALIZE_WHITESPACE


def examples_section(obj) -> str | None:
    """The text of ``obj``'s ``Examples`` section (numpy style: the title underlined), or ``None``."""
    doc = inspect.getdoc(obj) or ""
    found = re.search(r"^Examples\n-{8,}\n(.*?)(?=^\S[^\n]*\n-{3,}\n|\Z)", doc, flags=re.S | re.M)
    return found.group(1) if found else None


def run_examples(obj, name: str) -> tuple[int, int, str]:
    """Run the doctests of ``obj``'s own docstring (not its methods'): (examples, failures, report)."""
    finder = doctest.DocTestFinder(recurse=False)
    tests = finder.find(obj, name=name, module=False, globs={})
    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    out = io.StringIO()
    for test in tests:
        runner.run(test, out=out.write)
    return sum(len(t.examples) for t in tests), runner.failures, out.getvalue()


@pytest.mark.parametrize("name", pyrovae.__all__)
def test_every_public_name_has_an_examples_section_with_doctests(name):
    section = examples_section(getattr(pyrovae, name))
    assert section is not None, f"pyrovae.{name} has no Examples section (numpy style: 'Examples' over '--------')"
    assert ">>> " in section, f"pyrovae.{name}'s Examples section has no doctest (>>> lines)"


@pytest.mark.parametrize("name", pyrovae.__all__)
def test_the_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever an example writes by mistake lands in a scratch folder
    count, failures, report = run_examples(getattr(pyrovae, name), f"pyrovae.{name}")
    assert count >= 2, f"pyrovae.{name}: {count} doctest examples"
    assert failures == 0, report
    assert not list(tmp_path.iterdir()), "an example left files in the current folder"


def test_a_missing_section_and_a_wrong_example_are_caught():
    def documented():
        """Add one.

        Examples
        --------
        >>> 1 + 1
        3
        """

    def undocumented():
        """Add one (no examples)."""

    assert examples_section(undocumented) is None
    assert examples_section(documented).strip().startswith(">>> 1 + 1")
    count, failures, report = run_examples(documented, "documented")
    assert (count, failures) == (1, 1) and "Expected:\n    3\nGot:\n    2" in report
