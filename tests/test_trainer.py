"""The public Trainer and its hooks, the model-kind protocol, and the shape rules of the package:
no class over 200 lines, no test of a model kind's name outside the registry."""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import pytest
import torch

from pyrovae import TrainConfig, train
from pyrovae.model import MODEL_KINDS, ModelKind, build_model
from pyrovae.runs import read_metrics
from pyrovae.training import Hook, Trainer, hooked

ROOT = Path(__file__).resolve().parents[1]


def tiny(tmp_path, **kw) -> TrainConfig:
    settings = dict(dataset="digits", hidden_dims=(16,), latent_dim=2, epochs=3, batch_size=256, out=str(tmp_path),
                    name="r", no_tensorboard=True)
    settings.update(kw)
    return TrainConfig(**settings)


class Recording(Hook):
    def __init__(self):
        self.calls = []

    def epoch_start(self, trainer, epoch):
        self.num_examples = trainer.data.train_grey.shape[0]
        self.calls.append(("epoch_start", epoch))

    def step(self, trainer, epoch, step, loss):
        assert math.isfinite(loss)
        self.calls.append(("step", epoch, step))

    def epoch_end(self, trainer, row):
        # the row is written and the checkpoint saved before the hook runs
        assert read_metrics(trainer.run_dir / "metrics.jsonl")[-1]["epoch"] == row["epoch"]
        self.calls.append(("epoch_end", row["epoch"]))

    def end(self, trainer):
        self.calls.append(("end",))


def test_hooks_run_at_each_epoch_step_and_the_end_in_order(tmp_path):
    hook = Recording()
    result = train(tiny(tmp_path), progress=False, hooks=[hook])
    steps = math.ceil(hook.num_examples / 256)
    assert steps >= 2
    expected = []
    for e in range(3):
        expected += [("epoch_start", e)] + [("step", e, s) for s in range(steps)] + [("epoch_end", e + 1)]
    assert hook.calls == expected + [("end",)] and result.epochs_done == 3


def test_hooked_adds_hooks_to_every_trainer_in_its_block_only(tmp_path):
    hook = Recording()
    with hooked(hook):
        train(tiny(tmp_path, name="a", epochs=1), progress=False)
    seen = len(hook.calls)
    train(tiny(tmp_path, name="b", epochs=1), progress=False)
    assert seen > 0 and len(hook.calls) == seen


def test_a_hook_that_raises_ends_the_run_and_keeps_what_was_saved(tmp_path):
    class Fail(Hook):
        def epoch_start(self, trainer, epoch):
            if epoch == 2:
                raise ValueError("stop here")

    with pytest.raises(ValueError, match="stop here"):
        train(tiny(tmp_path), progress=False, hooks=[Fail()])
    assert [r["epoch"] for r in read_metrics(tmp_path / "r" / "metrics.jsonl")] == [1, 2]
    assert not (tmp_path / "r" / "summary.json").exists()
    # the lock was released: the run resumes
    assert train(tiny(tmp_path), resume=tmp_path / "r", progress=False).epochs_done == 3


def test_epochs_driven_by_hand_match_fit_under_one_seed(tmp_path):
    """Two code paths: Trainer.epoch called in a loop (as benchmarks do) and Trainer.fit."""
    strip = lambda rows: [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in rows]  # noqa: E731
    fitted = train(tiny(tmp_path, name="fit"), progress=False)
    with Trainer(tiny(tmp_path, name="hand").resolved(), progress=False, write=False) as trainer:
        rows = [trainer.epoch(e) for e in range(3)]
    assert strip(rows) == strip(read_metrics(fitted.run_dir / "metrics.jsonl"))
    assert trainer.progress.best_epoch == fitted.best_epoch and trainer.progress.best_val == fitted.best_val_elbo


def test_a_trainer_given_its_data_does_not_load_it_again_and_trains_the_same(tmp_path, monkeypatch):
    import pyrovae.training as training

    config = tiny(tmp_path).resolved()
    with Trainer(config, progress=False, write=False) as first:
        data, row = first.data, first.epoch(0)

    def refuse(*a, **k):
        raise AssertionError("loaded again")

    monkeypatch.setattr(training, "load_dataset", refuse)
    with Trainer(config, progress=False, write=False, data=data) as second:
        assert second.data is data
        again = second.epoch(0)
    strip = lambda r: {k: v for k, v in r.items() if k != "epoch_seconds"}  # noqa: E731
    assert strip(again) == strip(row)


def test_the_architecture_pages_hook_example_runs(tmp_path, monkeypatch):
    page = (ROOT / "docs" / "architecture.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", page, re.S) if "Hook" in b)
    monkeypatch.chdir(tmp_path)
    code = block.replace("TrainConfig(epochs=5, warmup_epochs=3)",
                         "TrainConfig(epochs=5, warmup_epochs=3, dataset='digits', hidden_dims=(16,), latent_dim=2, "
                         "no_tensorboard=True)")
    assert code != block  # the page's call is the one adapted here
    scope: dict = {}
    exec(compile(code, "architecture.md", "exec"), scope)
    kl = scope["log"].kl
    assert len(kl) == 5 and all(k > 0 for k in kl)


# --- the model-kind protocol ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(MODEL_KINDS))
def test_every_kind_follows_the_protocol(kind):
    cls = MODEL_KINDS[kind]
    assert issubclass(cls, ModelKind) and cls.kind == kind
    config = TrainConfig(model=kind, hidden_dims=(8,), latent_dim=2, prior_components=3,
                         likelihood="gaussian" if kind == "pca" else "bernoulli").resolved()
    x = torch.bernoulli(torch.full((6, 16), 0.5))
    model = build_model(config, data_dim=16, train_images=x)
    assert model.takes_binary == (kind != "pca")
    if not model.has_posterior:
        terms = model.score_terms(x)
        assert set(terms) == {"elbo", "recon", "kl"}
        for v in terms.values():
            assert v is None or v.shape == (6,)
    if model.mixture_size():
        r = model.log_responsibilities(x).exp()
        assert r.shape == (6, model.mixture_size()) and torch.allclose(r.sum(-1), torch.ones(6))
        images, order = model.samples_by_component(2, 2)
        assert images.shape == (2 * len(order), 16)
    else:
        with pytest.raises(ValueError, match="no prior with components"):
            model.samples_by_component(2, 2)


def test_the_finite_mixtures_score_terms_are_its_exact_log_likelihood():
    config = TrainConfig(model="mixture", prior_components=4).resolved()
    x = torch.bernoulli(torch.full((5, 12), 0.3))
    model = build_model(config, data_dim=12, train_images=x)
    t = model.score_terms(x)
    # log p(x) = log sum_m P(m) prod_d Bernoulli(x_d | theta_md), by hand
    log_lik = torch.distributions.Bernoulli(logits=model.params).log_prob(x[:, None, :]).sum(-1)
    by_hand = (log_lik + model.logits.log_softmax(-1)).logsumexp(-1)
    assert torch.allclose(t["elbo"], by_hand, atol=1e-5)
    assert torch.allclose(t["recon"] - t["kl"], t["elbo"], atol=1e-4)


# --- the shape rules -----------------------------------------------------------------------------------------

def test_no_class_in_the_package_is_over_200_lines():
    """No exceptions: TrainConfig, 52 settings each with its --help text, is the longest at just under."""
    long = []
    for path in sorted((ROOT / "pyrovae").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 200:
                long.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []


def _kind_tests(tree: ast.AST) -> list[str]:
    """Comparisons of ``x.kind`` or ``x.model`` with a string: a branch on a model kind's name."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            names = [s for s in sides if isinstance(s, ast.Attribute) and s.attr in ("kind", "model")
                     and not ast.unparse(s.value).endswith("dtype")]  # (numpy's dtype.kind is no model kind)
            strings = [s for s in sides if isinstance(s, ast.Constant) and isinstance(s.value, str)
                       or isinstance(s, ast.Tuple) and all(isinstance(e, ast.Constant) for e in s.elts)]
            if names and strings:
                found.append(ast.unparse(node))
    return found


def test_no_code_outside_the_registry_branches_on_a_model_kinds_name():
    """Only model.py (the registry) and config.py (which settings apply to which --model) may."""
    wrong = [f"{p.name}: {t}" for p in sorted((ROOT / "pyrovae").glob("*.py"))
             if p.name not in ("model.py", "config.py") for t in _kind_tests(ast.parse(p.read_text()))]
    assert not wrong
    assert _kind_tests(ast.parse("if model.kind == 'mixture': pass\nok = config.model in ('vae',)")) != []
