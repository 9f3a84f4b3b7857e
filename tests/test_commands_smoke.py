"""Every ``pyrovae`` command that README.md and docs/getting-started.md show in a shell block runs as written.

The commands are read from the pages' fenced shell blocks and run in the page's order, in process
(``pyrovae.cli.main``), in a scratch folder, each in a smoke form: the same command with tiny settings put in
(``--epochs 1``, a few importance samples and examples) and, for the binarized MNIST data set, which needs
files from the internet, small stand-in ``.amat`` files where the command reads them. Each must end with exit
code 0. Every flag must be spelt out in full, as argparse would otherwise accept an abbreviation the
reader's copy of argparse may not. The ``python experiments/...`` commands of the pages parse with their
script's own parser, and the benchmark's ``--quick`` form runs (slow).
"""

from __future__ import annotations

import re
import shlex
import time
from pathlib import Path

import numpy as np
import pyro
import pytest
from conftest import ROOT, load_experiment

from pyrovae.cli import build_parser, main
from pyrovae.config import preset_settings

#: the pages whose commands are checked
PAGES = ("README.md", "docs/getting-started.md")
#: fenced-block languages that hold shell commands
SHELLS = ("bash", "sh", "shell", "console", "zsh")
#: data sets a command can use offline, as they are bundled with a dependency
BUNDLED = ("mnist5k", "digits")
#: the smoke form's settings: flag -> value, per command, put in place of the page's value or added
SMOKE = {
    "train": {"--epochs": "1"},
    "evaluate": {"--num-samples": "10", "--num-examples": "20"},
    "compare": {"--num-samples": "10", "--num-examples": "20"},
    "bdmc": {"--num-examples": "4", "--steps": "2", "--chains": "1", "--leapfrog": "2"},
    "sample": {"--num-images": "4"},
}
#: the smoke form's settings of the AIS estimator, where a command asks for it
SMOKE_AIS = {"--ais-steps": "3", "--ais-chains": "1", "--ais-leapfrog": "2"}
#: seconds a smoke command may take before it counts as slow (it then belongs in a @pytest.mark.slow test)
FAST = 60


# --- reading the pages -------------------------------------------------------------------------------


def shell_lines(text: str) -> list[str]:
    """The command lines of ``text``'s fenced shell blocks: continuation lines joined, prompts ($) removed."""
    lines = []
    for block in re.findall(r"^```[ \t]*(\w+)[^\n]*\n(.*?)^```", text, flags=re.S | re.M):
        lang, body = block
        if lang not in SHELLS:
            continue
        body = body.replace("\\\n", " ")
        lines += [re.sub(r"^\$\s+", "", line).strip() for line in body.splitlines() if line.strip()]
    return lines


def split_commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line (split at ``&&``, ``||``, ``;`` and ``|``), comments left out."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token in ("&&", "||", ";", "|", "&"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [c for c in commands + [current] if c]


def pyrovae_argv(words: list[str]) -> list[str] | None:
    """The arguments after ``pyrovae`` (or ``.venv/bin/pyrovae``, ``python -m pyrovae``), else ``None``."""
    if words[0] == "pyrovae" or words[0].endswith("/pyrovae"):
        return words[1:]
    if re.fullmatch(r"(.*/)?python3?", words[0]) and words[1:3] == ["-m", "pyrovae"]:
        return words[3:]
    return None


def documented(page: str) -> list[tuple[str, list[str] | tuple[str, list[str]]]]:
    """(line, argv) of each pyrovae command of ``page`` in order, and (line, (script, argv)) of each
    ``python experiments/NAME.py`` command."""
    found = []
    for line in shell_lines((ROOT / page).read_text()):
        for words in split_commands(line):
            argv = pyrovae_argv(words)
            if argv is not None:
                found.append((line, argv))
            elif re.fullmatch(r"(.*/)?python3?", words[0]) and len(words) > 1 and \
                    re.fullmatch(r"experiments/\w+\.py", words[1]):
                found.append((line, (Path(words[1]).stem, words[2:])))
    return found


# --- checking a command ------------------------------------------------------------------------------


def _commands() -> dict:
    (sub,) = [a for a in build_parser()._actions if a.choices]
    return sub.choices


def spelling_problems(argv: list[str]) -> list[str]:
    """What is misspelt in ``argv``: an unknown command, or a flag that is not one of its own in full."""
    commands = _commands()
    if not argv or argv[0] in ("-h", "--help"):
        return []
    if argv[0] not in commands:
        return [f"no command {argv[0]!r} (commands: {', '.join(commands)})"]
    known = {s for a in commands[argv[0]]._actions for s in a.option_strings}
    return [f"{argv[0]}: no flag {w.split('=')[0]!r}" for w in argv[1:]
            if w.startswith("--") and w.split("=")[0] not in known]


def _value(argv: list[str], flag: str) -> str | None:
    for i, w in enumerate(argv):
        if w == flag and i + 1 < len(argv):
            return argv[i + 1]
        if w.startswith(flag + "="):
            return w.split("=", 1)[1]
    return None


def _with(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` with ``flag`` set to ``value`` (replaced where given, else added)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == flag:
            i += 2
            continue
        if argv[i].startswith(flag + "="):
            i += 1
            continue
        out.append(argv[i])
        i += 1
    return out + [flag, value]


def _amat_files(folder: Path) -> None:
    """binarized_mnist_{train,valid,test}.amat with 200/60/30 random binary images (as
    tests/test_binarized_mnist.py writes them)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", 200), ("valid", 60), ("test", 30)):
        x = (rng.random((n, 784)) < 0.15).astype(np.uint8)
        (folder / f"binarized_mnist_{name}.amat").write_text("".join(" ".join(map(str, r)) + "\n" for r in x))


def smoke_form(argv: list[str], cwd: Path) -> tuple[list[str] | None, str]:
    """The smoke form of ``argv`` (run in ``cwd``), or ``None`` and the reason it cannot run here."""
    if not argv or "--help" in argv or "-h" in argv:
        return argv, ""
    command, argv = argv[0], list(argv)
    for flag, value in SMOKE.get(command, {}).items():
        argv = _with(argv, flag, value)
    if command in ("train", "evaluate", "compare", "bdmc"):
        argv += [] if "--quiet" in argv else ["--quiet"]
    if _value(argv, "--estimator") == "ais":
        for flag, value in SMOKE_AIS.items():
            argv = _with(argv, flag, value)
    dataset = _value(argv, "--dataset")
    preset = _value(argv, "--preset")
    if dataset is None and preset is not None:
        dataset = preset_settings(preset).get("dataset")
    if dataset == "binarized-mnist":
        # stand-in files where the command reads them; --download would fetch the real ones from the internet
        _amat_files(cwd / (_value(argv, "--data-dir") or "data"))
        argv = [w for w in argv if w != "--download"]
    elif dataset is not None and dataset not in BUNDLED:
        return None, f"--dataset {dataset} needs its files, which this test does not fake"
    if command == "train" and "--resume" in argv:
        return None, "--resume needs an interrupted run"
    return argv, ""


def run(argv: list[str], capsys) -> tuple[int, str]:
    """``pyrovae ARGV`` in process, as a fresh process would: its exit code and the end of its stderr."""
    pyro.clear_param_store()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse: --help, or a flag it refuses
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    return code, capsys.readouterr().err[-2000:]


def run_page(text_commands, cwd: Path, capsys) -> tuple[list[str], list[str], dict[str, float]]:
    """Run each documented command's smoke form in order: (failures, skipped with reasons, seconds each)."""
    failures, skipped, seconds = [], [], {}
    for line, argv in text_commands:
        if isinstance(argv, tuple):  # python experiments/NAME.py: its --help runs, the rest only parses
            script, args = argv
            if "--help" in args:
                with pytest.raises(SystemExit) as stop:
                    load_experiment(script).main(args)
                if stop.value.code not in (0, None):
                    failures.append(f"{line}: exit code {stop.value.code}")
            continue
        if problems := spelling_problems(argv):
            failures.append(f"{line}: {'; '.join(problems)}")
            continue
        smoke, why = smoke_form(argv, cwd)
        if smoke is None:
            skipped.append(f"{line}: {why}")
            continue
        start = time.perf_counter()
        code, err = run(smoke, capsys)
        seconds[line] = time.perf_counter() - start
        if code != 0:
            failures.append(f"{line} (run as pyrovae {shlex.join(smoke)}): exit code {code}\n{err}")
    return failures, skipped, seconds


# --- the tests ---------------------------------------------------------------------------------------


def test_the_pages_show_the_commands_of_a_first_session():
    readme = [argv for _, argv in documented("README.md") if isinstance(argv, list)]
    assert readme and readme[0][:1] == ["train"], "the README's quick start trains"
    guide = [argv[0] for _, argv in documented("docs/getting-started.md") if isinstance(argv, list)]
    for command in ("train", "evaluate", "sample", "reconstruct", "compare"):
        assert command in guide, f"docs/getting-started.md shows no pyrovae {command}"
    scripts = [argv for _, argv in documented("docs/getting-started.md") if isinstance(argv, tuple)]
    assert ("benchmark", ["--help"]) in scripts and any("--quick" in a for s, a in scripts if s == "benchmark")


@pytest.mark.parametrize("page", PAGES)
def test_every_documented_command_parses_with_its_flags_spelt_in_full(page):
    wrong = []
    for line, argv in documented(page):
        if isinstance(argv, tuple):
            script, args = argv
            parser = load_experiment(script)._parser()
            if "--help" not in args:
                try:
                    parser.parse_args(args)
                except SystemExit:
                    wrong.append(line)
                known = {s for a in parser._actions for s in a.option_strings}
                wrong += [f"{line}: no flag {w}" for w in args if w.startswith("--") and w.split("=")[0] not in known]
            continue
        wrong += [f"{line}: {p}" for p in spelling_problems(argv)]
        try:
            build_parser().parse_args(argv)
        except SystemExit as e:
            if e.code not in (0, None):
                wrong.append(f"{line}: refused by the parser")
    assert not wrong, f"{page}: commands that do not parse as written: {wrong}"


@pytest.mark.parametrize("page", PAGES)
def test_every_documented_command_runs_in_its_smoke_form(page, tmp_path, monkeypatch, capsys):
    """The page's commands, in its order (a later one reads what an earlier one wrote), in a scratch folder."""
    monkeypatch.chdir(tmp_path)
    commands = documented(page)
    failures, skipped, seconds = run_page(commands, tmp_path, capsys)
    assert not failures, f"{page}: commands that fail:\n" + "\n".join(failures)
    assert not skipped, f"{page}: commands this test cannot run (fake their data here): {skipped}"
    assert len(seconds) == sum(isinstance(a, list) for _, a in commands)
    slow = {line: round(s) for line, s in seconds.items() if s > FAST}
    assert not slow, f"smoke forms slower than {FAST} s: {slow}"


@pytest.mark.slow
def test_the_documented_benchmark_quick_form_runs(tmp_path, monkeypatch, capsys):
    """``python experiments/benchmark.py ... --quick`` of Getting started, as written, on stand-in files."""
    monkeypatch.chdir(tmp_path)
    quick = [argv for _, argv in documented("docs/getting-started.md")
             if isinstance(argv, tuple) and argv[0] == "benchmark" and "--quick" in argv[1]]
    assert quick
    for _, args in quick:
        _amat_files(tmp_path / _value(args, "--data-dir"))
        assert load_experiment("benchmark").main(args + ["--quiet"]) == 0
        assert (tmp_path / _value(args, "--out") / "benchmark.md").is_file()


def test_a_misspelt_command_fails(tmp_path, monkeypatch, capsys):
    """The checks above fail on a misspelt command, a misspelt or abbreviated flag, and a wrong path."""
    text = "```bash\npyrovae evalute runs/first\npyrovae train --epoch 1 --name first\n```\n"
    assert [argv for argv in map(pyrovae_argv, split_commands(shell_lines(text)[0]))] == [["evalute", "runs/first"]]
    assert spelling_problems(["evalute", "runs/first"]) == [
        "no command 'evalute' (commands: train, evaluate, compare, bdmc, sample, reconstruct, interpolate, export)"]
    assert spelling_problems(["train", "--epoch", "1"]) == ["train: no flag '--epoch'"]
    assert spelling_problems(["evaluate", "runs/first", "--num-sample=10"]) == ["evaluate: no flag '--num-sample'"]
    monkeypatch.chdir(tmp_path)
    page = [("pyrovae train --epochs 3 --name first", ["train", "--epochs", "3", "--name", "first"]),
            ("pyrovae sample runs/frist", ["sample", "runs/frist"]),
            ("pyrovae evalute runs/first", ["evalute", "runs/first"])]
    failures, skipped, seconds = run_page(page, tmp_path, capsys)
    assert len(seconds) == 2 and not skipped
    assert len(failures) == 2
    assert failures[0].startswith("pyrovae sample runs/frist (run as pyrovae sample runs/frist --num-images 4): "
                                  "exit code 2") and "runs/frist" in failures[0]
    assert "no command 'evalute'" in failures[1]
    assert (tmp_path / "runs" / "first" / "best.pt").is_file()  # the train that was spelt right ran


def test_the_smoke_form_puts_in_tiny_settings_and_stand_in_data(tmp_path):
    argv, why = smoke_form(["train", "--dataset", "binarized-mnist", "--data-dir", "data/bm", "--download",
                            "--epochs", "450"], tmp_path)
    assert argv == ["train", "--dataset", "binarized-mnist", "--data-dir", "data/bm", "--epochs", "1", "--quiet"]
    assert sorted(p.name for p in (tmp_path / "data" / "bm").iterdir()) == [
        f"binarized_mnist_{s}.amat" for s in ("test", "train", "valid")]
    argv, _ = smoke_form(["evaluate", "runs/x", "--estimator", "ais", "--num-samples=5000"], tmp_path)
    assert _value(argv, "--num-samples") == "10" and _value(argv, "--ais-steps") == "3"
    assert smoke_form(["train", "--dataset", "mnist", "--data-dir", "mnist"], tmp_path)[0] is None
    assert smoke_form(["train", "--preset", "bmnist-45m", "--data-dir", "bm2"], tmp_path)[0] is not None
    assert (tmp_path / "bm2" / "binarized_mnist_train.amat").is_file()
