"""Hostile input, as a user would hit it: every class of bad file, flag, checkpoint, kill and API
call ends in one line (exit code 2 from the command line, ValueError from the API) or works,
with no saved file changed and nothing written outside --out."""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import child_env, cli, fake_mnist, idx_bytes

import pyrovae.training as training
from pyrovae import TrainConfig, estimate_log_px, load_run, train
from pyrovae.data import read_idx
from pyrovae.files import dumps
from pyrovae.runs import load_checkpoint, read_metrics, save_checkpoint
from pyrovae.training import Hook, hooked

TINY = ["--dataset", "digits", "--hidden-dims", "16", "--latent-dim", "3", "--quiet"]


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes' hash (and nothing else may appear)."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    train(TrainConfig(dataset="digits", hidden_dims=(16,), latent_dim=3, epochs=2, out=str(out), name="r",
                      no_tensorboard=True), progress=False)
    return out / "r"


def _copy(run_dir: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(run_dir, dest)
    return dest


# --- 1. a run stopped before its first checkpoint -----------------------------------------------------------


class _StopInFirstEpoch(Hook):
    """Ctrl-C ("interrupt") or a NaN loss ("diverge") as the first epoch starts."""

    def __init__(self, monkeypatch, how):
        self.monkeypatch, self.how = monkeypatch, how

    def epoch_start(self, trainer, e):
        if e == 0:
            if self.how == "interrupt":
                raise KeyboardInterrupt
            import pyro.infer

            self.monkeypatch.setattr(pyro.infer.SVI, "step", lambda *a, **k: math.nan)


@pytest.mark.parametrize("how, code", [("interrupt", 130), ("diverge", 1)])
def test_a_run_stopped_before_its_first_checkpoint_is_no_dead_end(capsys, monkeypatch, tmp_path, how, code):
    args = ["train", *TINY, "--epochs", "2", "--out", str(tmp_path), "--name", "x"]
    with hooked(_StopInFirstEpoch(monkeypatch, how)):
        got, _, err = cli(capsys, *args)
    assert got == code
    line = one_line(err)
    assert "(epoch 0)" not in line  # no checkpoint "of epoch 0" is named: there is none
    if how == "diverge":
        assert "no checkpoint was written yet" in line and "same command" in line
    monkeypatch.undo()
    assert not (tmp_path / "x" / "last.pt").exists() and (tmp_path / "x" / "config.json").exists()
    got, _, err = cli(capsys, *args)  # the same command again takes the directory over
    assert got == 0 and "taking it over" in err
    assert [r["epoch"] for r in read_metrics(tmp_path / "x" / "metrics.jsonl")] == [1, 2]
    # and --resume of such a directory starts it again from its stored settings
    with hooked(_StopInFirstEpoch(monkeypatch, "interrupt")):
        assert cli(capsys, "train", *TINY, "--epochs", "2", "--out", str(tmp_path), "--name", "y")[0] == 130
    got, _, err = cli(capsys, "train", "--resume", str(tmp_path / "y"), "--quiet")
    assert got == 0 and "starting it again from epoch 0" in err
    assert load_checkpoint(tmp_path / "y" / "last.pt")["epoch"] == 2


# --- 2. --name stays inside --out ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../escape", "/tmp/escape-abs", "a/b", "..", ""])
def test_a_run_name_is_one_folder_inside_out(capsys, tmp_path, name):
    out = tmp_path / "out"
    got, _, err = cli(capsys, "train", *TINY, "--epochs", "1", "--out", str(out), "--name", name)
    assert got == 2 and "--name" in one_line(err)
    assert not (tmp_path / "escape").exists() and not Path("/tmp/escape-abs").exists()
    assert not out.exists() or not any(out.rglob("config.json"))


# --- 3. tracebacks become one line ---------------------------------------------------------------------------------


@pytest.mark.parametrize("array, message", [
    (np.float64(3.0), "one example per row"),
    (np.zeros((2, 3, 4, 5)), "one example per row"),
    (np.array([[1 + 1j, 2]] * 12), "real numbers"),
    (np.array([[1, 2]] * 12, dtype="timedelta64[s]"), "real numbers"),
])
def test_shapeless_complex_and_timedelta_arrays_are_refused(capsys, tmp_path, array, message):
    path = tmp_path / "x.npy"
    np.save(path, array)
    got, _, err = cli(capsys, "train", "--dataset", str(path), "--likelihood", "gaussian", "--out", str(tmp_path))
    assert got == 2 and message in one_line(err)


@pytest.mark.parametrize("labels, message", [
    (np.array(["a", "b"] * 10), "whole numbers"),
    (np.array([1e30, 2.0] * 10), "32-bit"),
    (np.array([2**40, 1] * 10), "32-bit"),
])
def test_string_and_huge_labels_are_refused(capsys, tmp_path, labels, message):
    path = tmp_path / "x.npz"
    np.savez(path, x=np.random.default_rng(0).random((20, 4)), y=labels)
    got, _, err = cli(capsys, "train", "--dataset", str(path), "--likelihood", "gaussian", "--out", str(tmp_path))
    assert got == 2 and message in one_line(err)


@pytest.mark.parametrize("edit, message", [
    ({"latent_dim": "3"}, "'latent_dim' must be a whole number"),
    ({"prior": "gan"}, "'prior' must be one of"),
    ({"hidden_dims": [16.5]}, "'hidden_dims' must be a list of whole numbers"),
    ({"lr": None, "epochs": -1}, "--epochs must be at least 1"),
])
def test_a_run_whose_config_json_is_wrong_is_one_line(capsys, run, tmp_path, edit, message):
    d = _copy(run, tmp_path / "r")
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, **edit}))
    for command in (["evaluate", str(d), "--num-samples", "5"], ["sample", str(d)],
                    ["train", "--resume", str(d), "--epochs", "3"]):
        before = snapshot(d)
        got, _, err = cli(capsys, *command, "--quiet") if command[0] != "sample" else cli(capsys, *command)
        assert got == 2 and message in one_line(err) and "config.json" in err, command
        assert snapshot(d) == before


@pytest.mark.parametrize("damage, message", [
    (lambda s: s.pop("model"), "'model' is missing"),
    (lambda s: s.update(data_dim="64"), "'data_dim' is missing or not a int"),
    (lambda s: s.update(model={"encoder.net.0.weight": [1, 2]}), "not tensors"),
    (lambda s: s["model"].__setitem__(next(iter(s["model"])), s["model"][next(iter(s["model"]))] * math.nan),
     "NaN or infinite"),
])
def test_checkpoints_that_load_but_are_damaged_are_one_line(capsys, run, tmp_path, damage, message):
    d = _copy(run, tmp_path / "r")
    state = load_checkpoint(d / "best.pt")
    damage(state)
    torch.save(state, d / "best.pt")
    got, _, err = cli(capsys, "evaluate", str(d), "--num-samples", "5", "--quiet")
    assert got == 2 and message in one_line(err) and "best.pt" in err


def test_metrics_lines_that_are_not_rows_stop_a_resume_and_change_nothing(capsys, run, tmp_path):
    d = _copy(run, tmp_path / "r")
    lines = (d / "metrics.jsonl").read_text().splitlines()
    (d / "metrics.jsonl").write_text("\n".join([lines[0], "{not json", lines[1]]) + "\n")
    before = snapshot(d)
    got, _, err = cli(capsys, "train", "--resume", str(d), "--epochs", "3")
    assert got == 2 and "line 2" in one_line(err) and "metrics.jsonl" in err
    assert snapshot(d) == before
    # a last line cut off by a kill is dropped, the history before it kept
    (d / "metrics.jsonl").write_text("\n".join(lines) + '\n{"epoch": 3, "tr')
    got, _, err = cli(capsys, "train", "--resume", str(d), "--epochs", "3", "--quiet")
    assert got == 0, err
    assert [r["epoch"] for r in read_metrics(d / "metrics.jsonl")] == [1, 2, 3]


def test_sample_components_0_is_one_line(capsys, run):
    got, _, err = cli(capsys, "sample", str(run), "--by-component", "--components", "0")
    assert got == 2 and "--components" in one_line(err)


def _peak_mb_of(args: list[str]) -> tuple[int, str, float]:
    """Run the command line in a fresh process; return its exit code, stderr and peak resident MB
    (VmHWM: getrusage's maximum would carry over the forking parent's across exec)."""
    code = ("import re, sys; from pyrovae.cli import main\n"
            f"c = main({args!r})\n"
            "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
            "print(int(hwm) / 1024, file=sys.stdout)\n"
            "sys.exit(c)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=child_env())
    return r.returncode, r.stderr, float(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("flags, flag", [
    (["--hidden-dims", "1000000000"], "--hidden-dims"),
    (["--latent-dim", "2000000000"], "--latent-dim"),
    (["--prior", "mog", "--prior-components", "1000000000"], "--prior-components"),
    (["--num-particles", "100000000"], "--num-particles"),
])
def test_sizes_beyond_memory_are_refused_before_allocating(tmp_path, flags, flag):
    code, err, peak = _peak_mb_of(["train", *TINY, *flags, "--out", str(tmp_path), "--epochs", "1"])
    assert code == 2 and flag in one_line(err)
    assert peak < 1500  # nothing large was allocated (the interpreter, torch and the data are about 400 MB)


@pytest.mark.parametrize("command, flag", [
    (["sample", "--num-images", "10000000000"], "--num-images"),
    (["interpolate", "--pair", "0", "1", "--steps", "10000000000"], "--steps"),
    (["evaluate", "--num-samples", "1000000000000", "--allow-long"], "--num-samples"),
])
def test_picture_and_sample_sizes_beyond_memory_are_refused(run, command, flag):
    code, err, peak = _peak_mb_of([command[0], str(run), *command[1:]])
    assert code == 2 and flag in one_line(err)
    assert peak < 1500


def _no_space(monkeypatch, name_part: str):
    """Writes of files whose name contains ``name_part`` fail as on a full disk."""
    import pyrovae.files as files

    real = files.os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, *a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fdopen(fd, *a, **k):
        f = real(fd, *a, **k)
        return Full(f) if name_part in os.readlink(f"/proc/self/fd/{fd}") else f

    monkeypatch.setattr(files.os, "fdopen", fdopen)


@pytest.mark.parametrize("name_part, command", [
    ("last.pt", ["train", *TINY, "--epochs", "2", "--no-tensorboard"]),
    ("report.json", ["evaluate", "RUN", "--num-samples", "5", "--quiet", "--json", "OUT/report.json"]),
    ("grid.png", ["sample", "RUN", "--output", "OUT/grid.png"]),
])
def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_empty_file(capsys, monkeypatch, run, tmp_path,
                                                                            name_part, command):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to tell which file is written")
    d = _copy(run, tmp_path / "r")
    out = tmp_path / "out"
    out.mkdir()
    command = [c.replace("RUN", str(d)).replace("OUT", str(out)) for c in command]
    if command[0] == "train":
        command += ["--out", str(out), "--name", "full"]
    before = snapshot(d)
    _no_space(monkeypatch, name_part)
    got, _, err = cli(capsys, *command)
    assert got == 2 and name_part in one_line(err) and "disk is full" in err
    monkeypatch.undo()
    assert not [p for p in out.rglob("*") if p.is_file() and p.stat().st_size == 0 and p.suffix != ".jsonl"]
    assert not list(out.rglob(".*.tmp"))
    assert snapshot(d) == before


def test_ctrl_c_during_start_up_is_one_line_and_130(capsys, monkeypatch, run, tmp_path):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "load_dataset", interrupted)
    got, _, err = cli(capsys, "train", *TINY, "--out", str(tmp_path))
    assert got == 130 and "interrupted" in one_line(err)
    import pyrovae.runs as runs

    monkeypatch.setattr(runs, "load_checkpoint", interrupted)
    got, _, err = cli(capsys, "evaluate", str(run))
    assert got == 130 and "epoch" not in one_line(err) and "nothing was written" in err


def test_ctrl_c_in_the_middle_of_an_estimate_is_one_line_and_130_and_writes_nothing(capsys, monkeypatch, run,
                                                                                   tmp_path):
    import pyrovae.marginal as marginal

    scored, score = [], marginal.score_traces

    def interrupted_on_the_second_chunk(*a, **k):
        scored.append(1)
        if len(scored) == 2:
            raise KeyboardInterrupt
        return score(*a, **k)

    monkeypatch.setattr(marginal, "score_traces", interrupted_on_the_second_chunk)
    got, out, err = cli(capsys, "evaluate", str(run), "--num-samples", "50", "--chunk-size", "50", "--quiet",
                        "--json", str(tmp_path / "r.json"))
    assert len(scored) == 2 and got == 130, err
    assert "epoch" not in one_line(err) and "nothing was written" in err
    assert not (tmp_path / "r.json").exists() and list(tmp_path.iterdir()) == []


# --- 4, 13. a failed resume changes nothing; a successful one cleans up -------------------------------------------


def test_a_resume_that_fails_before_its_first_epoch_changes_no_file(capsys, monkeypatch, run, tmp_path):
    d = _copy(run, tmp_path / "r")
    (d / ".last.pt.abc123.tmp").write_bytes(b"left by a killed write")
    before = snapshot(d)

    class Fail(Hook):
        def epoch_start(self, trainer, epoch):
            raise ValueError("the data went away")

    with hooked(Fail()):
        got, _, err = cli(capsys, "train", "--resume", str(d), "--epochs", "5", "--quiet")
    assert got == 2 and "the data went away" in one_line(err)
    assert snapshot(d) == before  # config.json still says 2 epochs; metrics untouched
    got, _, err = cli(capsys, "train", "--resume", str(d), "--epochs", "3", "--quiet", "--no-tensorboard")
    assert got == 0, err
    assert json.loads((d / "config.json").read_text())["epochs"] == 3
    assert not list(d.glob(".*.tmp"))  # leftovers of killed writes are gone


# --- 6. one process per run ------------------------------------------------------------------------------------


def test_a_second_training_of_the_same_run_is_refused_naming_the_first(run, tmp_path):
    d = _copy(run, tmp_path / "r")
    env = child_env(OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, "-m", "pyrovae", "train", "--resume", str(d), "--epochs", "100000",
                              "--quiet", "--no-tensorboard"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=env)
    lock = tmp_path / ".r.lock"
    deadline = time.time() + 60
    while time.time() < deadline and not (lock.exists() and lock.read_text().strip() == str(first.pid)):
        time.sleep(0.05)
    try:
        second = subprocess.run([sys.executable, "-m", "pyrovae", "train", "--resume", str(d), "--epochs", "5"],
                                capture_output=True, text=True, timeout=120, env=env)
        assert second.returncode == 2 and f"process {first.pid}" in one_line(second.stderr)
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    third = subprocess.run([sys.executable, "-m", "pyrovae", "train", "--resume", str(d), "--epochs",
                            str(load_checkpoint(d / "last.pt")["epoch"] + 1), "--quiet", "--no-tensorboard"],
                           capture_output=True, text=True, timeout=120, env=env)
    assert third.returncode == 0, third.stderr  # the killed process left no stale lock


# --- 7. decompression bombs --------------------------------------------------------------------------------------


def test_an_idx_file_that_inflates_beyond_its_header_is_refused_without_inflating_it(tmp_path):
    images, _ = fake_mnist(10)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(idx_bytes(images))
        zeros = bytes(1 << 20)
        for _ in range(200):  # 200 MB of trailing zeros, a few hundred KB compressed
            f.write(zeros)
    assert path.stat().st_size < 2 << 20
    tracemalloc.start()
    with pytest.raises(ValueError, match="more data than the 10 images"):
        read_idx(path, "images")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 << 20


# --- 8. work that would take days -------------------------------------------------------------------------------


def test_work_that_would_take_days_asks_for_a_flag_first(capsys, run):
    t = time.time()
    got, _, err = cli(capsys, "evaluate", str(run), "--num-samples", "1000000000")
    assert got == 2 and "--num-samples" in one_line(err) and "--allow-long" in err
    # the estimate follows this machine's measured speed: a day on a slow one, hours on a fast one
    assert re.search(r"about [\d.,]+ (hours|days) at the [\d,]+ passes/s measured here", err)
    assert time.time() - t < 60


# --- 9, 10. questionable input, misleading lines -------------------------------------------------------------------


def test_lr_inf_and_seed_out_of_range_are_one_line(capsys, tmp_path, run):
    got, _, err = cli(capsys, "train", *TINY, "--lr", "inf", "--out", str(tmp_path))
    assert got == 2 and "--lr" in one_line(err)
    got, _, err = cli(capsys, "train", *TINY, "--seed", str(2**64), "--out", str(tmp_path))
    assert got == 2 and "--seed" in one_line(err)
    got, _, err = cli(capsys, "sample", str(run), "--seed", "-3")
    assert got == 2 and "--seed" in one_line(err)


def test_files_that_are_not_utf8_are_named(capsys, run, tmp_path):
    d = _copy(run, tmp_path / "r")
    (d / "config.json").write_bytes(b"\xff\xfe{not utf-8")
    got, _, err = cli(capsys, "evaluate", str(d))
    assert got == 2 and "config.json" in one_line(err) and "UTF-8" in err
    d = _copy(run, tmp_path / "s")
    (d / "metrics.jsonl").write_bytes(b"\xff\xfe\xfd")
    got, _, err = cli(capsys, "train", "--resume", str(d), "--epochs", "3")
    assert got == 2 and "metrics.jsonl" in one_line(err) and "UTF-8" in err


def test_an_output_without_an_image_type_is_one_line(capsys, run, tmp_path):
    got, _, err = cli(capsys, "sample", str(run), "--output", str(tmp_path / "grid.txt"))
    assert got == 2 and "--output" in one_line(err) and ".png" in err
    assert not (tmp_path / "grid.txt").exists()


# --- 11. third-party warnings -----------------------------------------------------------------------------------------


def test_error_lines_stand_alone_and_successful_commands_print_no_warnings(tmp_path, run):
    env = child_env(PYTHONWARNINGS="default")
    (tmp_path / "empty.csv").write_text("")
    for args, code in ((["train", "--dataset", str(tmp_path / "empty.csv"), "--out", str(tmp_path)], 2),
                       (["train", *TINY, "--latent-dim", "0", "--out", str(tmp_path)], 2)):
        r = subprocess.run([sys.executable, "-m", "pyrovae", *args], capture_output=True, text=True, env=env)
        assert r.returncode == code and len(r.stderr.strip().splitlines()) == 1, r.stderr
    two_d = tmp_path / "d2"
    train(TrainConfig(dataset="digits", hidden_dims=(8,), latent_dim=2, epochs=1, out=str(tmp_path), name="d2",
                      no_tensorboard=True), progress=False)
    r = subprocess.run([sys.executable, "-m", "pyrovae", "evaluate", str(two_d), "--num-samples", "5", "--quiet"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "Warning" not in r.stderr and "latent map" in r.stdout, r.stderr


# --- 12. training-data flags stay with the training data ----------------------------------------------------------


def test_evaluate_on_another_file_does_not_take_the_runs_label_column(capsys, tmp_path):
    rng = np.random.default_rng(0)
    csv = tmp_path / "train.csv"
    np.savetxt(csv, np.column_stack([rng.integers(0, 3, 60), rng.random((60, 9))]), delimiter=",")
    train(TrainConfig(dataset=str(csv), label_column=0, likelihood="gaussian", hidden_dims=(8,), latent_dim=2,
                      epochs=1, out=str(tmp_path), name="c", no_tensorboard=True), progress=False)
    other = tmp_path / "other.npy"
    np.save(other, rng.random((30, 9)))
    got, out, err = cli(capsys, "evaluate", str(tmp_path / "c"), "--dataset", str(other), "--split", "all",
                        "--num-samples", "5", "--quiet", "--json", str(tmp_path / "r.json"))
    assert got == 0, err
    # all 30 rows of 9 values scored: had the label column leaked, column 0 would have been taken
    # away (8 values per row, refused as the wrong width)
    assert json.loads((tmp_path / "r.json").read_text())["num_examples"] == 30


# --- 14. the Python API checks its arguments ------------------------------------------------------------------------


@pytest.mark.parametrize("images, message", [
    (torch.zeros(0, 64), "no examples"),
    (torch.zeros(64), "one example per row"),
    (torch.full((3, 64), math.nan), "NaN"),
    (torch.full((3, 64), 0.5), "Bernoulli"),
    (torch.full((3, 64), 2.0), "Bernoulli"),
    (torch.full((3, 64), -1.0), "Bernoulli"),
    (torch.zeros(3, 64, dtype=torch.long), "floating point"),
    (torch.zeros(3, 10), "values per example"),
    (np.zeros((3, 64), dtype=np.float32), "torch tensor"),
])
def test_the_api_refuses_bad_images_with_the_clis_lines(run, images, message):
    model = load_run(run).model
    with pytest.raises(ValueError, match=message):
        estimate_log_px(model, images, 5)
    from pyrovae import evaluate

    with pytest.raises(ValueError, match=message):
        evaluate(model, images, num_samples=5)


def test_train_with_an_unknown_model_is_a_value_error():
    with pytest.raises(ValueError, match="--model must be one of"):
        train(TrainConfig(model="gan"), progress=False)


# --- 15. strict JSON everywhere ------------------------------------------------------------------------------------


def _strict(text: str):
    def refuse(name):
        raise AssertionError(f"{name} in JSON")

    return json.loads(text, parse_constant=refuse)


def test_every_json_file_is_strict_and_undefined_values_are_null_with_a_reason(capsys, run, tmp_path):
    got, _, err = cli(capsys, "evaluate", str(run), "--num-samples", "1", "--quiet", "--json", str(tmp_path / "r.json"))
    assert got == 0, err
    report = _strict((tmp_path / "r.json").read_text())
    assert report["pareto_k"]["mean"] is None and "K too small for PSIS" in report["pareto_k"]["undefined"]
    for name in ("config.json", "summary.json"):
        _strict((run / name).read_text())
    # the issue's own example: an infinite k-hat (and its negative) is null too, with the reason
    text = dumps({"pareto_k": {"max": math.inf, "per_example": [0.3, -math.inf]}}, explain=True)
    assert _strict(text) == {"pareto_k": {"max": None, "per_example": [0.3, None]},
                             "null_values": {"pareto_k.max": "inf", "pareto_k.per_example[1]": "-inf"}}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        _strict(line)


def test_save_checkpoint_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    full = {"format": 1, "config": {}, "kind": "vae", "data_dim": 3, "image_shape": [1, 3], "epoch": 1,
            "model": {"w": torch.ones(3)}}
    save_checkpoint(full, path)
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(ValueError, match="disk is full"):
        save_checkpoint({**full, "model": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3)) and len(list(tmp_path.iterdir())) == 1


# --- third round: every estimator checked for memory and time, distributed evaluation, a strict API ----------------


def _with_run(command: list[str], run: Path, out: Path) -> list[str]:
    """``command`` with RUN standing for ``run``, and a training's --out in ``out``."""
    command = [c.replace("RUN", str(run)) for c in command]
    return command + ["--out", str(out)] if command[0] == "train" else command


@pytest.fixture(scope="module")
def runs_2d(tmp_path_factory):
    """Runs with a 2-D latent (quadrature applies) of every model kind bdmc must refuse, and one with a
    mixture prior (labels are scored against its components)."""
    out = tmp_path_factory.mktemp("kinds")
    common = dict(dataset="digits", hidden_dims=(16,), latent_dim=2, epochs=1, out=str(out), no_tensorboard=True)
    for name, extra in (("vae", {}), ("pca", {"model": "pca"}), ("ae", {"model": "ae"}),
                        ("mixture", {"model": "mixture", "prior_components": 3}),
                        ("mog", {"prior": "mog", "prior_components": 3})):
        train(TrainConfig(name=name, **common, **extra), progress=False)
    return out


@pytest.mark.parametrize("command, flag, not_named", [
    (["train", *TINY, "--guide", "iaf", "--flow-steps", "100000000"], "--flow-steps", "--flow-hidden-dims"),
    (["train", *TINY, "--guide", "iaf", "--flow-context-dim", "1000000000"], "--flow-context-dim",
     "--flow-hidden-dims"),
    (["train", *TINY, "--batch-size", "1000000000"], "--batch-size", "--num-particles"),
    (["evaluate", "RUN", "--estimator", "ais", "--ais-chains", "1000000000"], "--ais-chains", "--ais-steps"),
    (["bdmc", "RUN", "--leapfrog", "100000000"], "--leapfrog", "--steps"),
])
def test_a_refusal_for_size_names_the_setting_that_causes_it(capsys, run, tmp_path, command, flag, not_named):
    command = _with_run(command, run, tmp_path)
    got, _, err = cli(capsys, *command)
    line = one_line(err)
    assert got == 2 and (f"lower {flag}" in line or f"smaller {flag}" in line), line
    assert not_named not in line.replace(flag, "")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("command, flag", [
    (["evaluate", "VAE", "--estimator", "ais", "--ais-chains", "10000000000", "--allow-long"], "--ais-chains"),
    (["evaluate", "VAE", "--estimator", "ais", "--ais-steps", "10000000000", "--allow-long"], "--ais-steps"),
    (["evaluate", "VAE", "--estimator", "quadrature", "--quadrature-resolution", "1000000", "--allow-long"],
     "--quadrature-resolution"),
    (["evaluate", "VAE", "--num-samples", "100000000", "--chunk-size", "1000000000000", "--allow-long"],
     "--chunk-size"),
    (["bdmc", "VAE", "--num-examples", "10000000000"], "--num-examples"),
    (["bdmc", "VAE", "--num-examples", "10000000000", "--allow-long"], "--num-examples"),
])
def test_estimator_sizes_beyond_memory_are_refused_before_allocating_even_with_allow_long(runs_2d, command, flag):
    d = runs_2d / "vae"
    before = snapshot(d)
    code, err, peak = _peak_mb_of([c.replace("VAE", str(d)) for c in command])
    line = one_line(err)
    assert code == 2 and f"smaller {flag}" in line and "GiB" in line, line
    assert peak < 1500
    assert snapshot(d) == before


@pytest.mark.parametrize("kind", ["pca", "mixture", "ae"])
def test_bdmc_on_a_model_without_a_guide_is_one_line_in_its_own_words(capsys, runs_2d, kind):
    d = runs_2d / kind
    before = snapshot(d)
    got, _, err = cli(capsys, "bdmc", str(d), "--num-examples", "2", "--steps", "2", "--quiet")
    line = one_line(err)
    assert got == 2 and "pyrovae bdmc needs a VAE" in line and f"a {kind} model" in line
    assert "--estimator" not in line
    assert snapshot(d) == before


@pytest.mark.parametrize("flags, flag", [
    (["--chains", "0"], "--chains"),
    (["--leapfrog", "0"], "--leapfrog"),
    (["--steps", "3,0"], "--steps"),
    (["--batch-size", "0"], "--batch-size"),
    (["--num-examples", "0"], "--num-examples"),
])
def test_bdmc_errors_name_bdmcs_flags(capsys, run, flags, flag):
    got, _, err = cli(capsys, "bdmc", str(run), *flags, "--quiet")
    line = one_line(err)
    assert got == 2 and line.startswith(f"pyrovae bdmc: error: {flag} ") and "--ais-" not in line, line


def test_evaluate_on_grey_data_names_its_own_remedy_not_trainings_flags(capsys, tmp_path):
    from sklearn.datasets import load_digits

    np.save(tmp_path / "binary.npy", (load_digits().data / 16.0 > 0.5).astype(np.float32))
    train(TrainConfig(dataset=str(tmp_path / "binary.npy"), binarize="none", hidden_dims=(8,), latent_dim=2,
                      epochs=1, out=str(tmp_path), name="b", no_tensorboard=True), progress=False)
    got, _, err = cli(capsys, "evaluate", str(tmp_path / "b"), "--dataset", "digits", "--num-samples", "5", "--quiet")
    line = one_line(err)
    assert got == 2 and "grey values" in line and "give it binary data (--dataset)" in line
    assert "--binarize dynamic" not in line  # a training flag: evaluate has no --binarize


HUGE = "1" + "0" * 400


@pytest.mark.parametrize("edit", [{"lr": 10**400}, {"lr_min": -(10**400)}, {"latent_dim": 10**400}])
def test_a_huge_integer_in_a_run_or_settings_file_is_one_line(capsys, run, tmp_path, edit):
    d = _copy(run, tmp_path / "r")
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, **edit}))
    key = next(iter(edit))
    for command in (["evaluate", str(d), "--num-samples", "5", "--quiet"], ["sample", str(d)],
                    ["train", "--resume", str(d), "--epochs", "3", "--quiet"],
                    ["train", "--config", str(d / "config.json"), "--out", str(tmp_path / "new"), "--quiet"]):
        before = snapshot(d)
        got, _, err = cli(capsys, *command)
        line = one_line(err)
        assert got == 2 and (repr(key) in line or f"--{key.replace('_', '-')}" in line), (command, line)
        assert "config.json" in line and "Error" not in line
        assert snapshot(d) == before
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("command, flag", [
    (["train", *TINY, "--latent-dim", HUGE], "--latent-dim"),
    (["train", *TINY, "--hidden-dims", f"16,{HUGE}"], "--hidden-dims"),
    (["evaluate", "RUN", "--num-samples", HUGE], "--num-samples"),
    (["evaluate", "RUN", "--estimator", "ais", "--ais-chains", HUGE, "--allow-long"], "--ais-chains"),
    (["sample", "RUN", "--num-images", HUGE], "--num-images"),
    (["bdmc", "RUN", "--steps", HUGE], "--steps"),
])
def test_a_huge_integer_flag_is_one_line_naming_it(capsys, run, tmp_path, command, flag):
    command = _with_run(command, run, tmp_path)
    before = snapshot(run)
    got, _, err = cli(capsys, *command)
    line = one_line(err)
    assert got == 2 and flag in line and "below 2^63" in line and HUGE not in line, line
    assert snapshot(run) == before and not list(tmp_path.iterdir())


def test_a_3d_array_keeps_its_image_shape(capsys, tmp_path):
    images = (np.random.default_rng(0).random((200, 4, 12)) > 0.5).astype(np.float32)
    np.save(tmp_path / "wide.npy", images)
    from pyrovae import load_dataset

    ds = load_dataset(str(tmp_path / "wide.npy"), "all")
    assert ds.image_shape == (4, 12) and torch.equal(ds.images, torch.from_numpy(images.reshape(200, 48)))
    got, _, err = cli(capsys, "train", "--dataset", str(tmp_path / "wide.npy"), "--net", "conv", "--hidden-dims", "8",
                      "--latent-dim", "2", "--epochs", "1", "--out", str(tmp_path), "--name", "c", "--quiet",
                      "--no-tensorboard")
    assert got == 0, err
    assert load_checkpoint(tmp_path / "c" / "last.pt")["image_shape"] == [4, 12]
    got, _, err = cli(capsys, "sample", str(tmp_path / "c"), "--num-images", "4")
    assert got == 0, err
    from PIL import Image

    with Image.open(tmp_path / "c" / "samples.png") as grid:  # 2 x 2 images 3 times as wide as high
        assert grid.width > 2 * grid.height


@pytest.mark.parametrize("flags, flag", [
    (["--plot", "OUT/diff.txt"], "--plot"),
    (["--plot", ""], "--plot"),
    (["--markdown", ""], "--markdown"),
    (["--json", ""], "--json"),
    (["--baseline", ""], "--baseline"),
])
def test_compare_refuses_a_plot_that_is_not_a_png_and_empty_paths_before_any_work(capsys, monkeypatch, run, tmp_path,
                                                                                  flags, flag):
    import pyrovae.compare as compare

    monkeypatch.setattr(compare, "score_run", lambda *a, **k: pytest.fail("scored before the flags were checked"))
    got, _, err = cli(capsys, "compare", str(run), str(run), "--num-samples", "5", "--quiet",
                      *[f.replace("OUT", str(tmp_path)) for f in flags])
    assert got == 2 and flag in one_line(err)
    assert not list(tmp_path.iterdir())


def test_plot_differences_from_python_refuses_a_name_that_is_not_png(tmp_path):
    from pyrovae.compare import plot_differences

    with pytest.raises(ValueError, match=r"--plot .*d\.txt: the file name must end in an image type \(\.png\)"):
        plot_differences({"rows": []}, tmp_path / "d.txt")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("command, flag", [
    (["train", *TINY, "--preset", ""], "--preset"),
    (["train", *TINY, "--config", ""], "--config"),
    (["train", "--resume", ""], "--resume"),
    (["evaluate", "RUN", "--json", ""], "--json"),
    (["evaluate", "RUN", "--data-dir", ""], "--data-dir"),
    (["sample", "RUN", "--output", ""], "--output"),
    (["reconstruct", "RUN", "--output", ""], "--output"),
])
def test_an_empty_name_is_refused_like_a_wrong_one(capsys, run, tmp_path, command, flag):
    command = _with_run(command, run, tmp_path)
    before = snapshot(run)
    got, _, err = cli(capsys, *command)
    assert got == 2 and flag in one_line(err)
    assert snapshot(run) == before and not list(tmp_path.iterdir())


def test_the_api_converts_float64_images_and_refuses_what_the_cli_would(runs_2d):
    from pyrovae import evaluate
    from pyrovae.training import prepare_data

    mog = load_run(runs_2d / "mog")
    model, images = mog.model, prepare_data(mog.config, "test", "cpu").images[:6]
    single = estimate_log_px(model, images, 5, seed=0).log_px
    assert torch.equal(estimate_log_px(model, images.double(), 5, seed=0).log_px, single)
    report = evaluate(model, images.double(), torch.arange(6), num_samples=5, seed=0)
    assert report["log_px"] == pytest.approx(float(single.mean()), rel=1e-12)
    for call, message in [
        (lambda: estimate_log_px(model, images, 2.5), "--num-samples must be a whole number"),
        (lambda: evaluate(model, images, num_samples=2.5), "--num-samples must be a whole number"),
        (lambda: evaluate(model, images, num_samples=5, seed=1.5), "--seed must be a whole number"),
        (lambda: evaluate(model, images, num_samples=5, estimator="ais", ais_options={"steps": 3}),
         "ais_options: unknown key 'steps'"),
        (lambda: evaluate(model, images, num_samples=5, estimator="ais", ais_options={"num_chains": 0}),
         "--ais-chains must be at least 1"),
        (lambda: evaluate(model, images, torch.arange(5), num_samples=5), "6 images but labels of shape"),
        (lambda: evaluate(model, images, torch.arange(7), num_samples=5), "6 images but labels of shape"),
        (lambda: evaluate(model, images, torch.zeros(6), num_samples=5), "labels must be whole numbers"),
        (lambda: evaluate(model, images, num_samples=5, estimator="quadrature", quadrature_resolution=2.5),
         "--quadrature-resolution must be a whole number"),
    ]:
        with pytest.raises(ValueError, match=message):
            call()


def test_the_api_checks_a_train_configs_types_as_a_settings_file_is_checked():
    for setting, value in (("num_particles", 2.5), ("batch_size", 32.0), ("lr", "0.1"), ("hidden_dims", 16)):
        with pytest.raises(ValueError, match=f"setting '{setting}' must be"):
            train(TrainConfig(dataset="digits", **{setting: value}), progress=False, write=False)


def test_nan_weights_set_through_the_api_are_named_not_estimated(runs_2d):
    from pyrovae import evaluate
    from pyrovae.ais import ais_log_px
    from pyrovae.quadrature import quadrature_log_px

    run2 = load_run(runs_2d / "vae")
    from pyrovae.training import prepare_data

    images = prepare_data(run2.config, "test", "cpu").images[:4]
    with torch.no_grad():
        run2.model.decoder.linear_maps[-1].weight[0, 0] = math.nan
    for call in (lambda: estimate_log_px(run2.model, images, 5), lambda: evaluate(run2.model, images, num_samples=5),
                 lambda: ais_log_px(run2.model, images, num_steps=2), lambda: quadrature_log_px(run2.model, images)):
        with pytest.raises(ValueError, match="weights hold NaN or infinite values .*decoder"):
            call()
