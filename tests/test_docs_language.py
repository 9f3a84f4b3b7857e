"""The documentation reads for a newcomer: no in-house words a stranger cannot know, no sentence too long to
hold, and figures that differ between pages either agree or say why they differ.

Each test reads the files as they are (no build), so it runs in a second; each check is written so that a
planted phrase or a changed figure makes it fail."""

from __future__ import annotations

import json
import re

import pytest
from conftest import ROOT

DOCS = ROOT / "docs"

# --- what the tests read --------------------------------------------------------------------------------------


def _pages() -> dict[str, str]:
    """README.md, every Markdown page under docs/ (the generated study reports the pages include among them) and
    the tutorial's Markdown cells, by path relative to the repository root."""
    pages = {"README.md": (ROOT / "README.md").read_text(encoding="utf-8")}
    for path in sorted(DOCS.rglob("*.md")):
        if "_build" not in path.relative_to(DOCS).parts:
            pages[str(path.relative_to(ROOT))] = path.read_text(encoding="utf-8")
    nb = json.loads((DOCS / "tutorial.ipynb").read_text(encoding="utf-8"))
    cells = [c for c in nb["cells"] if c["cell_type"] == "markdown"]
    pages["docs/tutorial.ipynb"] = "\n\n".join("".join(c["source"]) for c in cells)
    return pages


def _help_texts() -> dict[str, str]:
    """The text of ``pyrovae --help`` and of every subcommand's ``--help``, from the parser the CLI builds."""
    import argparse

    from pyrovae.cli import build_parser

    root = build_parser()
    texts = {"pyrovae --help": root.format_help()}
    for action in root._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                texts[f"pyrovae {name} --help"] = sub.format_help()
    return texts


def _normal(text: str) -> str:
    """One space for every run of whitespace (a phrase may break across lines), ASCII minus, no bold."""
    return re.sub(r"\s+", " ", text.replace("−", "-").replace("**", ""))


# --- 1. in-house words ----------------------------------------------------------------------------------------

#: (pattern, case-sensitive?): words that point at a lab notebook the reader does not have
IN_HOUSE = [
    ("the issue", False),     # an issue tracker's thread: say what was measured, and where
    ("the notes", False),     # the design notes: the theory page, docs/theory.md
    ("design notes", False),
    ("Issue ", True),         # "Issue 4": say what it measured
]

#: quotations that may keep such a phrase: (page, phrase) -> what the page quotes. Empty today; an entry names
#: the page and the quotation, so that no other page can hide behind it.
QUOTATIONS: dict[tuple[str, str], str] = {}


def in_house_words(texts: dict[str, str]) -> list[str]:
    """``where: 'phrase' in '…context…'`` for every in-house phrase not allowed as a quotation."""
    found = []
    for where, text in texts.items():
        flat = _normal(text)
        for phrase, case in IN_HOUSE:
            for m in re.finditer(re.escape(phrase), flat, flags=0 if case else re.IGNORECASE):
                if (where, phrase) in QUOTATIONS:
                    continue
                found.append(f"{where}: {phrase!r} in '…{flat[max(0, m.start() - 60):m.end() + 60]}…'")
    return found


def test_no_page_and_no_help_text_uses_in_house_words():
    texts = {**_pages(), **_help_texts()}
    assert len(texts) > 40 and "pyrovae interpolate --help" in texts and "docs/theory.md" in texts
    found = in_house_words(texts)
    assert not found, "words a newcomer cannot know (write what they mean):\n" + "\n".join(found)


def test_every_quotation_allowed_is_still_quoted():
    """An allow-list entry whose page no longer holds the phrase is stale: remove it."""
    texts = {**_pages(), **_help_texts()}
    stale = [key for key in QUOTATIONS if key[0] not in texts or key[1] not in _normal(texts[key[0]])]
    assert not stale, f"allow-list entries whose quotation is gone: {stale}"


def test_the_in_house_check_catches_a_planted_phrase():
    assert in_house_words({"x.md": "Clean text about the theory page."}) == []
    assert in_house_words({"x.md": "as the design\n  notes say"})  # across a line break
    assert in_house_words({"x.md": "The Issue 4 reference"})
    assert in_house_words({"x.md": "The\nnotes' argument"})
    assert not in_house_words({"x.md": "an issue of the journal"})  # "Issue " is case-sensitive


# --- 2. sentences a reader can hold ---------------------------------------------------------------------------

MAX_WORDS = 60


def prose(markdown: str) -> list[str]:
    """The blocks of running text of a Markdown page: code blocks, directives, HTML comments, tables, maths,
    images and link URLs removed; a heading, a blank line or a list item ends a block."""
    text = re.sub(r"<!--.*?-->", "\n\n", markdown, flags=re.S)
    text = re.sub(r"^(\s*)(```|~~~).*?^\1\2\s*$", "\n\n", text, flags=re.S | re.M)  # fenced code and directives
    text = re.sub(r"\$\$.*?\$\$", " MATH ", text, flags=re.S)
    text = re.sub(r"(?<![\\\w])\$[^$\n]+\$", " MATH ", text)
    text = re.sub(r"!\[[^\]]*\]\([^)]*\)", " ", text)                                  # images
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)                                # links: their words only
    text = re.sub(r"`[^`\n]*`", " CODE ", text)
    blocks, current = [], []
    for line in text.splitlines():
        stripped = line.strip()
        starts_item = re.match(r"(?:[-*+]|\d+\.)\s", stripped)
        if not stripped or stripped.startswith(("#", "|", ":")) or starts_item:
            if current:
                blocks.append(" ".join(current))
            current = []
            if starts_item:
                current = [stripped[starts_item.end():]]
            continue
        current.append(stripped)
    if current:
        blocks.append(" ".join(current))
    return blocks


def sentences(markdown: str) -> list[str]:
    return [s for block in prose(markdown) for s in re.split(r"(?<=[.!?])[\"')\]*]*\s+", block) if s.strip()]


def words(sentence: str) -> int:
    return sum(1 for token in sentence.split() if re.search(r"[A-Za-z0-9]", token))


def long_sentences(markdown: str, limit: int = MAX_WORDS) -> list[str]:
    return [f"{words(s)} words: {s[:160]}…" for s in sentences(markdown) if words(s) > limit]


def test_no_sentence_of_the_readme_or_the_user_guide_exceeds_sixty_words():
    pages = [ROOT / "README.md", *sorted((DOCS / "guide").glob("*.md"))]
    assert len(pages) > 5
    found = [f"{p.relative_to(ROOT)}: {s}" for p in pages for s in long_sentences(p.read_text(encoding="utf-8"))]
    assert not found, "sentences over 60 words (split them):\n" + "\n".join(found)


def test_the_sentence_check_counts_prose_only_and_catches_a_long_sentence():
    long = " ".join(["word"] * 61) + "."
    assert long_sentences(long)
    assert not long_sentences(" ".join(["word"] * 30) + ". " + " ".join(["word"] * 30) + ".")
    ignored = (f"```bash\n{long}\n```\n\n| {long} |\n\n$$ {long} $$\n\n<!-- {long} -->\n\n"
               f"[a link](https://example.org/{'a/' * 80})")
    assert not long_sentences(ignored)
    assert not long_sentences(f"- {' '.join(['word'] * 40)}\n- {' '.join(['word'] * 40)}")  # two list items


# --- 3. figures across pages: equal, or labelled with why they differ -----------------------------------------

def _page(name: str) -> str:
    if name == "docs/tutorial.ipynb":
        return _pages()[name]
    return (ROOT / name).read_text(encoding="utf-8")


def labelled(text: str, figure: str, labels: list[str], window: int = 400) -> bool:
    """Whether ``figure`` occurs in ``text`` and every occurrence has one of ``labels`` within ``window``
    characters (both normalised as :func:`_normal` does)."""
    flat = _normal(text)
    spots = [m.start() for m in re.finditer(r"(?<![\d.])" + re.escape(_normal(figure)) + r"(?![\d])", flat)]
    return bool(spots) and all(any(label in flat[max(0, i - window):i + window] for label in labels)
                               for i in spots)


#: (page, figure, label phrases: at least one within reach of every occurrence): figures another page gives
#: differently, each with the words that say why
LABELLED = [
    # the VampPrior's gain: +4.30 after 100 epochs (priors study), +1.55 after 450 (quality study, README)
    ("README.md", "+4.30", ["trains for 100"]),
    ("docs/tutorial.ipynb", "gains 4.3", ["after 100 epochs"]),
    ("docs/results/priors.md", "4.30 ± 0.27 nats above N(0, I) on the same test images", ["after 100 epochs"]),
    ("docs/results/priors.md", "+1.55 ± 0.29", ["450 epochs"]),
    ("docs/results/quality.md", "+4.30", ["after 100"]),
    # published one-layer figures: Burda et al.'s dynamically binarised MNIST against the static benchmark's
    ("docs/results/quality/quality.md", "-86.76", ["dynamically binarised"]),
    ("docs/results/iwae/iwae.md", "Table 1 (one stochastic layer", ["dynamically binarised"]),
    ("docs/results/iwae.md", "-85.54", ["statically binarised", "dynamically binarised"]),
    ("docs/results/benchmark.md", "-86.76", ["dynamically binarized"]),
    ("docs/results/benchmark/benchmark.md", "Published figures are on the test split",
     ["statically binarized"]),
    # two validation ELBOs of the two-level rows: training's best (one draw) and the table's re-scored one
    ("docs/results/benchmark.md", "-89.95", ["best validation ELBO"]),
    ("docs/results/benchmark.md", "-89.98", ["mean of 1,000 draws"]),
    # a median of per-round ratios is not the ratio of the medians beside it
    ("docs/results/speed.md", "1.03× (≤ 1.3×)", ["median per-round ratio"]),
    # every figure is from a CPU machine, but for the GPU table of the scaling guide
    ("docs/results/index.md", "with no GPU", ["H200"]),
]


@pytest.mark.parametrize("page, figure, labels", LABELLED, ids=[f"{p}:{f}" for p, f, _ in LABELLED])
def test_a_figure_that_differs_between_pages_says_why(page, figure, labels):
    assert labelled(_page(page), figure, labels), f"{page}: {figure!r} without {labels} near it"


def test_the_default_run_takes_the_same_time_on_every_page():
    """Getting started measures the default run (134 s of training, 2 min 19 s in all); every page and help
    text that times it gives those figures, and none gives another."""
    table = _page("docs/getting-started.md")
    row = next(line for line in table.splitlines() if line.startswith("| 450 (450)"))
    training, wall = (cell.strip() for cell in row.split("|")[2:4])
    assert re.fullmatch(r"\d+ s", training) and re.fullmatch(r"\d+ min \d+ s", wall), row
    help_epochs = _help_texts()["pyrovae train --help"]
    fast = (ROOT / "pyrovae/presets/fast.toml").read_text(encoding="utf-8").splitlines()[0]
    for where, text in [("README.md", _page("README.md")), ("docs/guide/config.md", _page("docs/guide/config.md")),
                        ("pyrovae train --help", help_epochs), ("pyrovae/presets/fast.toml", fast)]:
        flat = _normal(text)
        assert training in flat and wall in flat, f"{where} does not give the measured {training} / {wall}"
        stale = re.findall(r"about [23] minutes on 2 (?:CPU )?cores|\b165 s\b", flat)
        assert not stale, f"{where} times the default run as {stale}, not as measured"


def _table_value(report: str, title: str, setting: str) -> float:
    """The mean log p(x) of one estimator setting (``K=5000``) in the table under ``**title**``."""
    section = report.split(f"**{title}**", 1)[1]
    row = next(line for line in section.splitlines() if line.startswith(f"| IS | {setting} |"))
    return float(row.split("|")[4].replace("−", "-"))


def test_the_estimators_prose_matches_its_table():
    """The IAF guide's lead over the Gaussian guide, at K = 5000, is the difference of the report's means."""
    report = _page("docs/results/estimators/estimators.md")
    lead = _table_value(report, "iaf-4", "K=5000") - _table_value(report, "default", "K=5000")
    text = _normal(_page("docs/results/estimators.md"))
    said = re.search(r"IS at K = 5000 puts the IAF guide (\d+\.\d+) nats above", text)
    assert said and float(said.group(1)) == round(lead, 2), (said and said.group(1), round(lead, 2))


def test_the_figure_checks_can_fail():
    assert not labelled("the gain is +4.30 here", "+4.30", ["trains for 100"])
    assert labelled("it trains for 100 epochs, where the gain is +4.30", "+4.30", ["trains for 100"])
    assert not labelled("no such figure", "+4.30", ["anything"])  # a figure that disappeared is a failure too
    far = "trains for 100 " + "x " * 400 + "+4.30"
    assert not labelled(far, "+4.30", ["trains for 100"])
