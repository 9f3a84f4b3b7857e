"""The command-line reference (docs/api/cli.md) is generated from the parser: every subcommand and every flag
is in it, each flag with its default, and every help text renders as written."""

from __future__ import annotations

import argparse
import importlib.util
import re

import pytest
from conftest import ROOT

from pyrovae.cli import build_parser

sphinxarg_parser = pytest.importorskip("sphinxarg.parser", reason="sphinx-argparse (the docs extra) is not installed")
docutils_core = pytest.importorskip("docutils.core")

PAGE = ROOT / "docs" / "api" / "cli.md"


def _generator():
    """docs/_ext/cli_reference.py, the module the page's ``argparse`` directive reads the parser from."""
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "docs" / "_ext" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flags(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def _generated():
    """What sphinx-argparse renders: the parsed structure of the documented parser, per command."""
    data = sphinxarg_parser.parse_parser(_generator().documented_parser())
    return {child["name"]: child for child in data["children"]}


def test_the_page_is_generated_from_the_parser_not_written_by_hand():
    text = PAGE.read_text()
    assert re.search(r"\.\. argparse::\n\s+:module: cli_reference\n\s+:func: documented_parser", text)
    conf = (ROOT / "docs" / "conf.py").read_text()
    assert '"sphinxarg.ext"' in conf and '"_ext"' in conf
    assert "--epochs" not in text  # no flag is written out by hand
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'docs = \[[^\]]*"sphinx-argparse', pyproject), "sphinx-argparse belongs to the docs extra"


def test_every_subcommand_and_every_flag_is_in_the_generated_reference():
    parser, generated = build_parser(), _generated()
    commands = _generator().subcommands(parser)
    assert set(commands) >= {"train", "evaluate", "compare", "bdmc", "sample", "reconstruct", "interpolate"}
    assert list(generated) == list(commands)
    missing = []
    for name, sub in commands.items():
        shown = {opt for group in generated[name]["action_groups"] for entry in group["options"]
                 for opt in entry["name"]}
        # --help is left out of each command's list (the page says every command takes it)
        missing += [f"{name} {opt}" for action in _flags(sub) for opt in action.option_strings if opt not in shown]
        positional = {a.metavar or a.dest for a in sub._actions if not a.option_strings}
        missing += [f"{name} {p}" for p in positional - shown]
    assert not missing, f"flags of the parser missing from the reference: {missing}"
    assert len(_flags(commands["train"])) > 40  # the TrainConfig flags are there


def test_every_flag_says_its_default_or_that_it_is_required():
    silent = []
    for name, command in _generated().items():
        for group in command["action_groups"]:
            for entry in group["options"]:
                if entry["name"][0] in ("-h", "--help") or not entry["name"][0].startswith("-"):
                    continue
                if not re.search(r"\bdefault\b|\(required\)", entry.get("help", ""), flags=re.I):
                    silent.append(f"{name} {entry['name'][0]}")
    assert not silent, f"flags whose default the reference does not give: {silent}"
    evaluate = {e["name"][0]: e["help"] for g in _generated()["evaluate"]["action_groups"] for e in g["options"]}
    assert evaluate["--num-samples"].endswith("(default: 1000)")
    assert evaluate["--json"].endswith("(default: None)") and evaluate["--quiet"].endswith("(default: False)")
    interpolate = {e["name"][0]: e["help"] for g in _generated()["interpolate"]["action_groups"] for e in g["options"]}
    assert interpolate["--pair"].endswith("(required)")


def test_the_defaults_stated_are_the_parsers():
    """A default the generator adds is the one the parser applies (a train flag left out: False or not set)."""
    reference = _generator()
    commands = reference.subcommands(build_parser())
    for name, sub in commands.items():
        for action in _flags(sub):
            text = reference.default_text(action)
            if text is None or text == "(required)":
                continue
            value = action.default
            if value is argparse.SUPPRESS:
                value = False if isinstance(action, argparse._StoreTrueAction) else None
            assert text == f"(default: {value})", (name, action.option_strings, text)


def _rendered(rst: str) -> str:
    doc = docutils_core.publish_doctree(rst, settings_overrides={"report_level": 5, "halt_level": 5})
    problems = [m.astext() for m in doc.findall(lambda n: n.tagname == "system_message")]
    assert not problems, problems
    return " ".join(doc.astext().split())


def test_every_help_text_renders_as_written():
    """The help goes through reStructuredText: what the page shows is the help's own text, with nothing read
    as markup (a * or _ of a help text, or -- joined into a dash)."""
    reference = _generator()
    documented, plain = reference.documented_parser(), build_parser()
    pairs = [(documented, plain), *zip(reference.subcommands(documented).values(),
                                      reference.subcommands(plain).values())]
    checked = 0
    for doc_parser, parser in pairs:
        assert _rendered(doc_parser.description) == " ".join(parser.description.split())
        for doc_action, action in zip(doc_parser._actions, parser._actions):
            if not action.help:
                continue
            want = " ".join(filter(None, [action.help, reference.default_text(action)]))
            assert _rendered(doc_action.help) == " ".join(want.split()), action.option_strings
            checked += 1
    assert checked > 100
    assert "``--lr-min``" in {a.dest: a.help for a in _flags(reference.subcommands(documented)["train"])}["lr_schedule"]
