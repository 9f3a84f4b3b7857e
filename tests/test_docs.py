"""The documentation: the site builds with warnings as errors and the tutorial executed, every public name
is documented, the experiments use only documented names, and nothing the old README said was lost."""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

import pyrovae

DOCS = ROOT / "docs"
#: the modules whose ``__all__`` the API reference documents (every module but ``__main__``)
MODULES = sorted(p.stem for p in (ROOT / "pyrovae").glob("*.py") if not p.stem.startswith("_"))
_NUMBER = re.compile(r"[+−-]?\d[\d,]*(?:\.\d+)?(?:\s*±\s*\d+(?:\.\d+)?)?%?")


def _normal(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("−", "-").replace("**", ""))


def figures(text: str) -> list[str]:
    """The figures of a text: signed numbers with their ± part and %, single digits left out."""
    found = (m.group(0).strip().rstrip(",") for m in _NUMBER.finditer(_normal(text)))
    return [f for f in found if not re.fullmatch(r"\d", f)]


def _public_names():
    """(qualified name, object) of everything in ``pyrovae.__all__`` and in each module's ``__all__``."""
    yield from ((f"pyrovae.{n}", getattr(pyrovae, n)) for n in pyrovae.__all__)
    for mod in MODULES:
        module = importlib.import_module(f"pyrovae.{mod}")
        yield from ((f"pyrovae.{mod}.{n}", getattr(module, n)) for n in module.__all__ if n not in pyrovae.__all__)


def test_the_readme_fits_on_two_screens():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150


def test_no_figure_of_the_old_readme_is_lost():
    """Every number (and picture) of the 937-line README is still in README.md or in a page of docs/."""
    wanted = [line for line in (ROOT / "tests/data/readme-e813bb8-figures.txt").read_text().splitlines()
              if line and not line.startswith("#")]
    pages = [ROOT / "README.md", *DOCS.rglob("*.md"), *DOCS.rglob("*.ipynb")]
    have = set(figures("\n".join(p.read_text() for p in pages)))
    images = {(page.parent / ref).resolve() for page in pages if page.suffix == ".md"
              for ref in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", page.read_text())}
    missing = [w for w in wanted if not w.startswith("image ") and w not in have]
    missing += [w for w in wanted if w.startswith("image ") and (DOCS / w[6:]).resolve() not in images]
    assert len(wanted) > 500 and not missing, f"lost from the old README: {missing}"


def test_the_readme_headline_numbers_are_the_quality_reports():
    """The README's headline table is typed by hand: each of its numbers must be the study's own."""
    text = (ROOT / "README.md").read_text()
    table = text.split("<!-- headline", 1)[1].split("<!-- end of headline -->", 1)[0]
    report = (DOCS / "results/quality/quality.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| ")}
    for line in table.splitlines()[3:]:
        command = line.split("`")[1]
        run = {"pyrovae train": "default", "pyrovae train --prior vamp --prior-components 500": "+vamp",
               "pyrovae train --preset best": "best"}[command]
        for figure in figures(line.split("`", 2)[2]):
            assert figure in figures(rows[run]), f"{figure} of README's row {command!r} is not in quality.md's {run}"


def test_the_readme_benchmark_table_is_the_studys_headline():
    """The binarized-MNIST table of the README is copied from the study's headline.md, row for row."""
    text = (ROOT / "README.md").read_text()
    table = text.split("<!-- benchmark: docs/results/benchmark/headline.md -->", 1)[1]
    table = table.split("<!-- end of benchmark -->", 1)[0].strip().splitlines()
    headline = (DOCS / "results/benchmark/headline.md").read_text().strip().splitlines()
    assert len(headline) >= 3 and table == headline


def _render(doc: str) -> list[str]:
    """Problems docutils reports when it renders ``doc`` as Sphinx would (napoleon, then reST)."""
    from docutils import nodes, utils
    from docutils.core import publish_doctree
    from docutils.parsers.rst import roles
    from sphinx.ext.napoleon import Config, NumpyDocstring

    for role in ("func", "class", "meth", "data", "attr", "mod", "obj", "exc"):  # Sphinx's, to docutils
        roles.register_local_role(role, lambda name, raw, text, *a, **k: ([nodes.literal(raw, utils.unescape(text))],
                                                                            []))
    tree = publish_doctree(str(NumpyDocstring(doc, Config(napoleon_use_param=True))),
                           settings_overrides={"report_level": 2, "halt_level": 5, "warning_stream": False})
    return [m.astext() for m in tree.findall(nodes.system_message) if m["level"] >= 2]


def test_every_public_name_has_a_docstring_that_renders():
    names = list(_public_names())
    assert len(names) > 80
    undocumented, broken = [], {}
    for name, obj in names:
        if not (inspect.isclass(obj) or callable(obj)):
            continue  # constants: documented by their ``#:`` comment, which autodoc reads
        doc = inspect.getdoc(obj)
        if not doc or not doc.strip():
            undocumented.append(name)
        elif problems := _render(doc):
            broken[name] = problems
    assert not undocumented, f"public names without a docstring: {undocumented}"
    assert not broken, f"docstrings that do not render: {broken}"


def test_a_broken_docstring_is_caught():
    assert _render("Fine ``literal`` and :math:`x^2` and :func:`f`.") == []
    assert _render("A ``literal``² that never closes.")


def _private_uses(path: "Path", *, public_only: bool) -> list[str]:
    """Where ``path`` reaches past pyrovae's public names: ``from pyrovae.m import _x`` (and, with
    ``public_only``, any name outside ``m.__all__``), ``import pyrovae.m as alias`` followed by ``alias._x``
    (the alias may itself be private), ``monkeypatch.setattr(alias, "_x", ...)``, and (experiments) any
    ``obj._x`` read, whatever ``obj`` is: a private attribute of a pyrovae object is private too."""
    tree = ast.parse(path.read_text())
    modules: set[str] = set()  # local names bound to pyrovae modules
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("pyrovae")}
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pyrovae"):
            module = importlib.import_module(node.module)
            for a in node.names:
                if isinstance(getattr(module, a.name, None), type(ast)):
                    modules.add(a.asname or a.name)  # from pyrovae import training
    wrong = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pyrovae"):
            module = importlib.import_module(node.module)
            public = getattr(module, "__all__", [])
            wrong += [f"from {node.module} import {a.name}" for a in node.names
                      if a.name.startswith("_") or (public_only and a.name not in public
                                                    and not isinstance(getattr(module, a.name, None), type(ast)))]
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in ("self", "cls"):
                continue  # the file's own classes
            if not public_only and not (isinstance(root, ast.Name) and root.id in modules):
                continue
            wrong.append(ast.unparse(node))
        if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("setattr") and len(node.args) >= 2:
            target, name = node.args[0], node.args[1]
            if (isinstance(name, ast.Constant) and isinstance(name.value, str) and name.value.startswith("_")
                    and not name.value.startswith("__") and ast.unparse(target).split(".")[0] in modules):
                wrong.append(ast.unparse(node)[:80])
    return [f"{path.name}: {w}" for w in wrong]


#: private attributes of other libraries that experiments read (each with its reason)
_FOREIGN_PRIVATE = {
    # bench.py's plain-PyTorch loop clips gradients with the fused multi-tensor op that torch.optim itself uses
    "bench.py: torch._foreach_mul_",
}


def test_experiments_use_only_the_public_api():
    """experiments/*.py import only names of ``pyrovae.__all__`` or of a module's ``__all__`` (all of which the
    API reference documents), through no alias, and read no private attribute of any object."""
    wrong = [w for path in sorted((ROOT / "experiments").glob("*.py"))
             for w in _private_uses(path, public_only=True) if w not in _FOREIGN_PRIVATE]
    assert not wrong, f"experiments reaching past the public API: {wrong}"


def test_tests_use_no_private_names_of_pyrovae():
    """tests/*.py import no private name of pyrovae, read none through a module alias, and monkeypatch none:
    they drive training through :class:`pyrovae.training.Hook` and test the maths through public names."""
    wrong = [w for path in sorted((ROOT / "tests").glob("*.py")) for w in _private_uses(path, public_only=False)]
    assert not wrong, f"tests reaching into pyrovae's private names: {wrong}"


def test_the_guard_sees_aliases_private_reads_and_monkeypatches(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("import pyrovae.training as _t\nfrom pyrovae import training\nfrom pyrovae.marginal import "
                       "_helper\n_t._Thing\ntraining._HOOKED\nmonkeypatch.setattr(training, '_x', 1)\n"
                       "mix = object()\nmix._factors\n")
    found = _private_uses(planted, public_only=False)
    assert len(found) == 4 and not any("mix._factors" in w for w in found), found
    assert any("mix._factors" in w for w in _private_uses(planted, public_only=True))


def test_docs_build_strictly_with_the_tutorial_executed_and_every_public_name_in_the_api_reference(tmp_path):
    """``sphinx-build -W``: a broken link, a missing page, a docstring that does not render or a failing
    assertion of the tutorial (the notebook is executed) fails the build."""
    out = tmp_path / "html"
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "-d",
                           str(tmp_path / "doctrees"), str(DOCS), str(out)], capture_output=True, text=True,
                          env={**os.environ, "PYROVAE_DOCS_EXECUTE": "force", "OMP_NUM_THREADS": "1",
                               # this environment's kernel, not one a user registered elsewhere
                               "JUPYTER_DATA_DIR": str(tmp_path / "jupyter")})
    assert proc.returncode == 0, proc.stderr[-5000:]
    tutorial = (out / "tutorial.html").read_text()
    assert "nats per image (K = 1000)" in tutorial and tutorial.count("<img") >= 2  # executed, with its figures
    api = "".join(p.read_text() for p in (out / "api").glob("*.html"))
    missing = [name for name, obj in _public_names() if f'id="{name}"' not in api]
    assert not missing, f"public names missing from the API reference: {missing}"
    assert 'class="math' in api  # the docstrings' maths is rendered (MathJax), not shown as reST
    literal = [p.name for p in out.rglob("*.html") if "_modules" not in p.parts and ":math:" in p.read_text()]
    # every script and style the pages load is part of the built site: the maths renders offline
    remote = sorted({m for p in out.rglob("*.html") for m in re.findall(
        r'<(?:script[^>]*\bsrc|link[^>]*rel="stylesheet"[^>]*\bhref)="((?:https?:)?//[^"]+)"', p.read_text())})
    assert not remote, f"pages load scripts or styles from the network: {remote[:5]}"
    assert (out / "_static" / "mathjax" / "tex-chtml.js").is_file()
    assert not literal, f"reST's :math: role shown as text (MyST pages take $...$): {literal}"


def test_every_link_of_the_readme_leads_to_a_file():
    text = (ROOT / "README.md").read_text()
    links = [link.split("#")[0] for link in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in link]
    assert len(links) > 10
    assert not [link for link in links if not (ROOT / link).exists()]


def test_the_tutorial_is_stored_with_its_outputs():
    """A code host shows the notebook as stored: every code cell ran (the build runs it again and checks it)."""
    import json

    nb = json.loads((DOCS / "tutorial.ipynb").read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(c.get("execution_count") for c in code)
    assert sum("image/png" in o.get("data", {}) for c in code for o in c["outputs"]) >= 2
    text = json.dumps(nb)
    assert "nats per image (K = 1000)" in text and "/work/" not in text and "/home/" not in text
