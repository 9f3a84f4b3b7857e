"""The parser the command-line reference (``docs/api/cli.md``) is generated from.

``documented_parser()`` is :func:`pyrovae.cli.build_parser` with two changes, made at every build so
that the reference cannot fall behind the code:

- every flag's help ends with its default, as ``pyrovae COMMAND --help`` shows most of them
  (``(default: ...)``); the flags whose help does not say it get it from the parser (a switch is
  ``False``, a flag without a default ``None``), and a required flag says ``(required)``;
- the help is escaped for reStructuredText, which sphinx-argparse renders it as, and the flags it names
  are marked up as code, so that ``--lr`` shows as typed (not with its two hyphens joined into a dash).

sphinx-argparse's ``argparse`` directive renders the result (its own ``Default:`` line is turned off
by this function, which has already put the default into the help).
"""

from __future__ import annotations

import argparse
import re

from pyrovae.cli import build_parser

__all__ = ["documented_parser", "subcommands", "default_text"]

#: a flag named in a help string (--lr, --prior-init-epochs)
_FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
#: characters that mean markup in reStructuredText: escaped, so that help is shown as written
_SPECIAL = re.compile(r"([\\*`|_\[\]])")


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """name -> parser of each subcommand of ``parser``, in the order of ``pyrovae --help``."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def default_text(action: argparse.Action) -> str | None:
    """What the reference says of ``action``'s default: ``None`` where its help already says it (or it
    has none to say: ``--help`` and positional arguments), else ``"(required)"`` or ``"(default: X)"``."""
    if isinstance(action, argparse._HelpAction) or not action.option_strings:
        return None
    if action.required:
        return "(required)"
    if re.search(r"\bdefault\b", action.help or "", flags=re.I):
        return None
    default = action.default
    if default is argparse.SUPPRESS:  # pyrovae train: a flag left out keeps the TrainConfig / preset value
        default = False if isinstance(action, argparse._StoreTrueAction) else None
    if isinstance(default, (tuple, list)):
        default = ",".join(map(str, default))
    return f"(default: {default})"


def _markup(text: str) -> str:
    """``text`` as reStructuredText that shows it as written: markup characters escaped, flags as
    inline code."""
    return _FLAG.sub(lambda m: f"``{m.group(0)}``", _SPECIAL.sub(r"\\\1", text))


def documented_parser() -> argparse.ArgumentParser:
    """:func:`pyrovae.cli.build_parser`, each flag's help ending in its default and marked up for
    reStructuredText (see the module's docstring)."""
    parser = build_parser()
    for p in (parser, *subcommands(parser).values()):
        p.description = _markup(p.description or "")
        for action in p._actions:
            if isinstance(action, (argparse._SubParsersAction, argparse._HelpAction)):
                continue
            extra = default_text(action)
            action.help = _markup(" ".join(filter(None, [action.help, extra])))
            if action.option_strings:
                action.default = argparse.SUPPRESS  # shown in the help already
    return parser
