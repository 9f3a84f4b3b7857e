"""Training: the bound improves, runs are reproducible and resumable, checkpoints are safe."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import pyrovae.training as training
from pyrovae import TrainConfig, load_run, train
from pyrovae.runs import load_checkpoint, read_metrics, save_checkpoint
from pyrovae.training import Hook


def tiny(tmp_path, **kw) -> TrainConfig:
    settings = dict(dataset="digits", hidden_dims=(32,), latent_dim=4, epochs=3, batch_size=64,
                    out=str(tmp_path), name="run", seed=1)
    settings.update(kw)
    return TrainConfig(**settings)


def test_few_epochs_on_mnist5k_raise_the_validation_elbo(tmp_path):
    result = train(TrainConfig(epochs=3, out=str(tmp_path), name="m"), progress=False)
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[2]["val_elbo"] > rows[0]["val_elbo"] + 10  # nats per example
    for key in ("train_elbo", "val_elbo", "train_kl", "val_kl", "train_recon", "val_recon", "epoch_seconds"):
        assert all(key in r for r in rows), key
    # the reported ELBO is reconstruction minus KL
    assert rows[2]["val_elbo"] == pytest.approx(rows[2]["val_recon"] - rows[2]["val_kl"], abs=1e-3)
    for name in ("config.json", "metrics.jsonl", "last.pt", "best.pt", "elbo.png", "summary.json"):
        assert (result.run_dir / name).is_file(), name
    state = torch.load(result.run_dir / "last.pt", weights_only=True)
    assert state["epoch"] == 3 and "optimizer" in state and "rng" in state
    assert result.test["num_examples"] == 500 and result.test["elbo"] < 0


def _params(path):
    return load_checkpoint(path)["model"]


def test_same_seed_same_numbers(tmp_path):
    a = train(tiny(tmp_path, name="a"), progress=False)
    b = train(tiny(tmp_path, name="b"), progress=False)
    c = train(tiny(tmp_path, name="c", seed=2), progress=False)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in rows]  # noqa: E731
    ra, rb, rc = (strip(read_metrics(r.run_dir / "metrics.jsonl")) for r in (a, b, c))
    assert ra == rb and ra != rc
    pa, pb = _params(a.run_dir / "last.pt"), _params(b.run_dir / "last.pt")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_resume_gives_the_parameters_of_an_uninterrupted_run(tmp_path, monkeypatch):
    straight = train(tiny(tmp_path, name="straight", epochs=4), progress=False)
    class CtrlC(Hook):
        def epoch_start(self, trainer, epoch):
            if epoch == 2:
                raise KeyboardInterrupt  # Ctrl-C as the third epoch starts

    with pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path, name="split", epochs=4), progress=False, hooks=[CtrlC()])
    assert load_checkpoint(tmp_path / "split" / "last.pt")["epoch"] == 2
    resumed = train(tiny(tmp_path, name="split", epochs=4), resume=tmp_path / "split", progress=False)
    assert resumed.epochs_done == 4
    p1, p2 = _params(straight.run_dir / "last.pt"), _params(resumed.run_dir / "last.pt")
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    o1 = load_checkpoint(straight.run_dir / "last.pt")["optimizer"]["adam"]["state"]
    o2 = load_checkpoint(resumed.run_dir / "last.pt")["optimizer"]["adam"]["state"]
    assert all(torch.equal(o1[i]["exp_avg_sq"], o2[i]["exp_avg_sq"]) for i in o1)
    strip = lambda p: [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in read_metrics(p)]  # noqa: E731
    assert strip(straight.run_dir / "metrics.jsonl") == strip(resumed.run_dir / "metrics.jsonl")


def test_kill_9_mid_training_loses_at_most_the_current_epoch(tmp_path):
    """kill -9 once a checkpoint of epoch 3 or later exists, at whatever moment the process is
    in: the checkpoint is intact, at most the epoch under way is lost, and the resumed run is
    bit for bit the uninterrupted one."""
    common = ["--dataset", "digits", "--hidden-dims", "64", "--latent-dim", "4", "--batch-size", "16",
              "--lr-schedule", "constant", "--out", str(tmp_path), "--quiet", "--no-tensorboard"]
    cmd = [sys.executable, "-m", "pyrovae", "train", *common, "--epochs", "40", "--name", "k"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "k"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if load_checkpoint(run / "last.pt")["epoch"] >= 3:
                break
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.02)
    rows_at_kill = len(read_metrics(run / "metrics.jsonl"))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = load_checkpoint(run / "last.pt")["epoch"]  # never a broken file
    assert done >= 3 and rows_at_kill - done <= 1  # at most the epoch under way is lost
    target = done + 2
    r = subprocess.run([sys.executable, "-m", "pyrovae", "train", *common, "--epochs", str(target), "--name", "k",
                        "--resume", str(run)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    straight = subprocess.run([sys.executable, "-m", "pyrovae", "train", *common, "--epochs", str(target), "--name",
                               "s"], capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr
    assert [row["epoch"] for row in read_metrics(run / "metrics.jsonl")] == list(range(1, target + 1))
    a, b = load_checkpoint(run / "last.pt")["model"], load_checkpoint(tmp_path / "s" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    full = {"config": {}, "kind": "vae", "data_dim": 3, "image_shape": [1, 3], "epoch": 1}
    save_checkpoint({"format": 1, "model": {"w": torch.ones(3)}, **full}, path)

    def broken_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(ValueError, match="last.pt: cannot be written"):
        save_checkpoint({"format": 1, "model": {"w": torch.zeros(3)}, **full}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_checkpoints_cannot_run_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "model": _Payload()}, path)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(ValueError, match="not a pyrovae checkpoint: it holds Python objects") as e:
            load_checkpoint(path)
    finally:
        os.chdir(cwd)
    assert not (tmp_path / "PWNED").exists()
    assert "weights_only" not in str(e.value)  # never advice to load it unsafely


def test_architecture_mismatch_is_a_clear_error(tmp_path):
    result = train(tiny(tmp_path, epochs=1), progress=False)
    cfg = json.loads((result.run_dir / "config.json").read_text())
    cfg["hidden_dims"] = [16]
    (result.run_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not match the architecture in config.json"):
        load_run(result.run_dir)


def test_nan_stops_training_naming_epoch_step_and_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = training.SVI.step

    def step(self, *args, **kwargs):
        calls["n"] += 1
        return float("nan") if calls["n"] == 30 else original(self, *args, **kwargs)

    monkeypatch.setattr(training.SVI, "step", step)
    with pytest.raises(training.TrainingDiverged) as e:
        train(tiny(tmp_path, epochs=5), progress=False)
    msg = str(e.value)
    assert "epoch 2, step 7" in msg and "last.pt (epoch 1)" in msg  # 23 steps per epoch at batch 64
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1


def test_early_stopping_keeps_the_best_epoch(tmp_path, monkeypatch):
    scores = iter([-50.0, -40.0, -45.0, -46.0, -47.0, -48.0])

    def fake_scores(model, images, num_samples=1):
        return {"elbo": next(scores, -99.0), "recon": -1.0, "kl": 1.0}

    monkeypatch.setattr(training, "split_scores", fake_scores)
    result = train(tiny(tmp_path, epochs=20, patience=2), progress=False)
    assert result.stopped_early and result.epochs_done == 4 and result.best_epoch == 2
    assert load_checkpoint(result.run_dir / "best.pt")["epoch"] == 2
    assert load_checkpoint(result.run_dir / "last.pt")["epoch"] == 4


def test_warmup_reports_the_unscaled_elbo(tmp_path):
    result = train(tiny(tmp_path, epochs=3, warmup_epochs=2), progress=False)
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    # during warm-up the optimised loss weights the KL by less than 1 ...
    assert rows[0]["train_loss"] < -rows[0]["train_elbo"] - 0.1
    # ... and after it the loss is the negative ELBO
    assert rows[2]["train_loss"] == pytest.approx(-rows[2]["train_elbo"], rel=1e-4)


def test_existing_run_directory_is_never_overwritten(tmp_path):
    result = train(tiny(tmp_path, epochs=1), progress=False)
    before = (result.run_dir / "last.pt").read_bytes()
    with pytest.raises(ValueError, match="already exists: continue it with --resume"):
        train(tiny(tmp_path, epochs=1), progress=False)
    assert (result.run_dir / "last.pt").read_bytes() == before


def test_no_test_score_leaves_the_test_split_unread_until_evaluate(tmp_path, capsys, monkeypatch):
    """The literature's protocol scores test once, on the finished model: with --no-test-score training
    never reads the test split (not at the end, not at the end of a resumed stretch), and says nothing of it;
    the flag may be given on resume. Without it the test ELBO is scored and printed as before."""
    from conftest import cli

    read = []
    real = training.prepare_data
    monkeypatch.setattr(training, "prepare_data", lambda config, split, *a, **k: read.append(split) or
                        real(config, split, *a, **k))
    run = tmp_path / "run"
    code, out, err = cli(capsys, "train", "--dataset", "digits", "--hidden-dims", "16", "--latent-dim", "2",
                         "--epochs", "1", "--out", str(tmp_path), "--name", "run", "--no-tensorboard", "--quiet",
                         "--no-test-score")
    assert code == 0, err
    assert "test" not in read and "test ELBO" not in out
    assert json.loads((run / "summary.json").read_text())["test"] is None
    assert json.loads((run / "config.json").read_text())["no_test_score"] is True
    code, out, err = cli(capsys, "train", "--resume", str(run), "--epochs", "2", "--quiet")
    assert code == 0, err
    assert "test" not in read and "test ELBO" not in out  # the stored setting holds on resume
    code, out, err = cli(capsys, "train", "--dataset", "digits", "--hidden-dims", "16", "--latent-dim", "2",
                         "--epochs", "1", "--out", str(tmp_path), "--name", "scored", "--no-tensorboard", "--quiet")
    assert code == 0, err
    assert read.count("test") == 1 and "test ELBO:" in out
    assert json.loads((tmp_path / "scored" / "summary.json").read_text())["test"]["num_examples"] > 0
