"""TensorBoard event files: what a run writes is metrics.jsonl's numbers, once per epoch."""

from __future__ import annotations

import builtins

import pytest
from conftest import interrupted_at
from tensorboard.backend.event_processing import event_accumulator

from pyrovae import TrainConfig, train
from pyrovae.board import SCALARS
from pyrovae.cli import main
from pyrovae.runs import read_metrics


def _events(run_dir):
    ea = event_accumulator.EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def _config(tmp_path, name, **kw):
    settings = dict(dataset="digits", hidden_dims=(16,), latent_dim=3, epochs=4, tensorboard_images_every=2,
                    out=str(tmp_path), name=name, seed=1)
    return TrainConfig(**{**settings, **kw})


def test_scalars_equal_the_metrics_and_images_and_hparams_are_there(tmp_path):
    result = train(_config(tmp_path, "t", warmup_epochs=2), progress=False)
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    ea = _events(result.run_dir)
    for key, tag in SCALARS.items():
        if key not in rows[0]:
            continue
        events = ea.Scalars(tag)
        assert [e.step for e in events] == [r["epoch"] for r in rows], tag
        assert [e.value for e in events] == pytest.approx([r[key] for r in rows], rel=1e-6), tag
    assert [r["kl_scale"] for r in rows][0] < 1 == rows[-1]["kl_scale"]  # the warm-up is there to see
    assert [e.step for e in ea.Images("samples")] == [2, 4] and [e.step for e in ea.Images("reconstructions")] == [2, 4]
    assert ea.Scalars("hparam/test_elbo")[0].value == pytest.approx(result.test["elbo"], rel=1e-6)


def test_a_resumed_run_has_each_epoch_once(tmp_path, monkeypatch):
    """Interrupted after epoch 3, then resumed from a checkpoint of epoch 2 (as when a kill
    lands after an epoch's events but before its checkpoint): epoch 3 is not shown twice."""
    import shutil

    train(_config(tmp_path, "two", epochs=2), progress=False)  # a checkpoint of epoch 2 of the same model
    with interrupted_at(2, after=True):
        train(_config(tmp_path, "r"), progress=False)
    run_dir = tmp_path / "r"
    assert [e.step for e in _events(run_dir).Scalars("elbo/val")] == [1, 2, 3]
    shutil.copy(tmp_path / "two" / "last.pt", run_dir / "last.pt")
    train(_config(tmp_path, "r"), resume=run_dir, progress=False)
    steps = [e.step for e in _events(run_dir).Scalars("elbo/val")]
    assert steps == [1, 2, 3, 4]
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]


def test_no_tensorboard_writes_no_events_and_a_missing_package_is_one_line(tmp_path, capsys, monkeypatch):
    result = train(_config(tmp_path, "off", no_tensorboard=True, epochs=1), progress=False)
    assert not list(result.run_dir.glob("events.out.tfevents.*"))
    _block_tensorboard(monkeypatch)
    capsys.readouterr()
    result = train(_config(tmp_path, "missing", epochs=1), progress=False)
    assert capsys.readouterr().err == "" and result.epochs_done == 1  # no warning: the CLI's summary says it
    assert not list(result.run_dir.glob("events.out.tfevents.*"))


def _block_tensorboard(monkeypatch):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)


@pytest.mark.parametrize("installed", [False, True])
def test_train_without_tensorboard_prints_nothing_to_stderr_and_says_so_in_its_summary(tmp_path, capsys, monkeypatch,
                                                                                     installed):
    """`pyrovae train` as a user runs it (progress bar on): stderr holds the bar and nothing else; the summary's
    last line says how to get TensorBoard, or how to look at the events."""
    if not installed:
        _block_tensorboard(monkeypatch)
    code = main(["train", "--dataset", "digits", "--hidden-dims", "16", "--latent-dim", "2", "--epochs", "1",
                 "--out", str(tmp_path), "--name", "r"])
    out, err = capsys.readouterr()
    assert code == 0
    bar = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert bar and all(line.startswith("train:") for line in bar), err  # the progress bar only
    last = out.splitlines()[-1]
    if installed:
        assert last == f"tensorboard: tensorboard --logdir {tmp_path}"
    else:
        assert last == "tensorboard: off (pip install 'pyrovae[tensorboard]' to log this run)"
