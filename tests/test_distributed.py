"""Data-parallel training: 2 CPU processes on gloo (loopback) against one process.

Both runs see the same global batches: ``DistributedSampler`` splits each epoch's
permutation so that the union of the ranks' i-th local batches is the single process's i-th
batch (the training split here holds 160 examples, a multiple of the world size, so no
example is padded in). The loss is a sum over examples, so the summed gradients equal the
single process's gradient up to the order of floating-point additions.

Tolerances, and why:

- ``--model ae`` (point-mass guide), and the VAE with its noise made a fixed function of
  each example, have no randomness that differs between the runs: parameters and Adam's
  moments must agree to float32 rounding (relative 1e-4 after 10 Adam steps; Adam divides
  by the gradient's running RMS, which amplifies rounding in near-zero gradients a little).
- the VAE proper draws the guide's noise per rank (each rank seeds its own generator), so
  its noise is not the single process's: its parameters can only agree as well as two
  single-process runs that differ in their noise alone, and that is what is checked
  (Euclidean distance over all parameters under 2x that; when written, 0.230 against 0.232,
  while training moved them 0.99 from the start).
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import pyrovae.training as training
from pyrovae import TrainConfig, train
from pyrovae.runs import load_checkpoint, read_metrics

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _digits_file(tmp_path: Path) -> Path:
    """200 digits (train split: 160 = 5 global batches of 32, no padding at 2 ranks)."""
    from sklearn.datasets import load_digits

    path = tmp_path / "digits200.npy"
    np.save(path, load_digits().data[:200] / 16.0)
    return path


def _config(tmp_path, data, name, **kw) -> dict:
    settings = dict(dataset=str(data), hidden_dims=[32], latent_dim=4, epochs=2, batch_size=32, seed=3,
                    out=str(tmp_path / "runs"), name=name, device="cpu", lr_schedule="constant")
    settings.update(kw)
    return settings


def _fixed_noise_rsample(self, sample_shape=torch.Size()):
    """Normal.rsample with the noise a fixed smooth function of the mean: every example gets
    the same "noise" in any process, whatever the generator (the ELBO is then biased, which
    does not matter for comparing two ways of computing it)."""
    eps = torch.sin(3.0 * self.loc.detach() + 1.0).expand(self._extended_shape(sample_shape))
    return self.loc + eps * self.scale


def _fix_the_noise() -> None:
    import pyro.distributions as dist

    dist.Normal.rsample = _fixed_noise_rsample


def _worker(rank: int, world: int, jobs: list[dict], results: str) -> None:
    """One rank: run the jobs in order; record each outcome and this rank's final parameters."""
    os.environ.update(MASTER_ADDR="127.0.0.1", WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import pyrovae.training as tr

    class KeepParams(tr.Hook):
        """Each rank's final parameters (before the best epoch's are restored) and whether it writes."""

        def end(self, trainer):
            params = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
            torch.save({"params": params, "writes": trainer.write},
                       Path(results) / f"{trainer.config.name}-rank{rank}.pt")
    load = tr.load_dataset

    def load_counting_downloads(*args, **kwargs):
        if kwargs.get("download"):
            with open(Path(results) / f"downloads-rank{rank}", "a") as f:
                f.write("x")
        return load(*args, **kwargs)

    tr.load_dataset = load_counting_downloads
    for job in jobs:
        if job.get("fixed_noise"):
            _fix_the_noise()
        os.environ["MASTER_PORT"] = str(job["port"])
        outcome = "ok"
        try:
            tr.train(TrainConfig.from_dict(job["config"]), resume=job.get("resume"), progress=False,
                     hooks=[KeepParams()])
        except ValueError as e:
            outcome = f"ValueError: {e}"
        (Path(results) / f"{job['id']}-rank{rank}.json").write_text(json.dumps(outcome))


def _run_ranks(jobs: list[dict], results: Path, timeout: float = 120) -> None:
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_worker, args=(WORLD, jobs, str(results)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.time() + timeout
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {WORLD} processes did not finish within {timeout} s (a collective left waiting?)")


def _single(tmp_path, settings: dict, **kw):
    assert "WORLD_SIZE" not in os.environ
    return train(TrainConfig.from_dict(settings), progress=False, **kw)


def _state(run_dir: Path) -> tuple[dict, dict]:
    state = load_checkpoint(run_dir / "last.pt")
    return state["model"], state["optimizer"]["adam"]["state"]


def _assert_close(a: dict, b: dict, rtol=1e-4, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor) and a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def _assert_same_run(single_dir: Path, ddp_dir: Path, keys) -> None:
    """Parameters, Adam's moments and the metrics ``keys`` of every epoch agree."""
    (m1, o1), (m2, o2) = _state(single_dir), _state(ddp_dir)
    _assert_close(m2, m1)
    for i in o1:
        _assert_close(o2[i], o1[i])
    rows1, rows2 = read_metrics(single_dir / "metrics.jsonl"), read_metrics(ddp_dir / "metrics.jsonl")
    assert len(rows1) == len(rows2)
    for a, b in zip(rows1, rows2):
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-5), key


def _distance(a: dict, b: dict) -> float:
    return math.sqrt(sum(float((a[k] - b[k]).double().square().sum()) for k in a if a[k].is_floating_point()))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny networks: one thread each, here as in the workers (threads only add waiting on a
    busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """All 2-process runs in one spawn of 2 processes (start-up dominates the cost)."""
    tmp = tmp_path_factory.mktemp("dist")
    data = _digits_file(tmp)
    results = tmp / "results"
    results.mkdir()
    c = lambda name, **kw: _config(tmp, data, name, **kw)  # noqa: E731
    (tmp / "runs" / "taken").mkdir(parents=True)
    (tmp / "runs" / "taken" / "notes.txt").write_text("not a pyrovae file")
    jobs = [
        {"id": "ae", "config": c("ae", model="ae"), "port": _free_port()},
        {"id": "vae", "config": c("vae"), "port": _free_port()},
        {"id": "resumed-1", "config": c("resumed", epochs=1), "port": _free_port()},
        {"id": "resumed-2", "config": c("resumed", epochs=2), "resume": str(tmp / "runs" / "resumed"),
         "port": _free_port()},
        {"id": "taken", "config": c("taken"), "port": _free_port()},
        {"id": "download", "config": c("download", epochs=1, download=True), "port": _free_port()},
        # last: it patches the guide's sampling for the rest of the process
        {"id": "fixed-noise", "config": c("fixed-noise"), "fixed_noise": True, "port": _free_port()},
    ]
    _run_ranks(jobs, results)
    return tmp, data, results


def _outcome(results: Path, job: str) -> list[str]:
    return [json.loads((results / f"{job}-rank{r}.json").read_text()) for r in range(WORLD)]


def test_two_processes_train_the_autoencoder_exactly_like_one(two_process_runs, tmp_path):
    tmp, data, results = two_process_runs
    assert _outcome(results, "ae") == ["ok", "ok"]
    single = _single(tmp_path, _config(tmp_path, data, "ae", model="ae"))
    # parameters and Adam's moments (a mean instead of a sum of gradients would show in them)
    _assert_same_run(single.run_dir, tmp / "runs" / "ae", ("train_loss", "train_elbo", "val_elbo"))
    # every rank holds the same parameters, bit for bit (the all-reduce gives them one gradient)
    r0, r1 = (torch.load(results / f"ae-rank{r}.pt", weights_only=True)["params"] for r in range(WORLD))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    # the metrics are global: summed over the ranks, they are the single process's
    assert [r["epoch"] for r in read_metrics(tmp / "runs" / "ae" / "metrics.jsonl")] == [1, 2]


def test_two_processes_train_a_vae_with_fixed_noise_exactly_like_one(two_process_runs, tmp_path, monkeypatch):
    tmp, data, results = two_process_runs
    assert _outcome(results, "fixed-noise") == ["ok", "ok"]
    import pyro.distributions as dist

    monkeypatch.setattr(dist.Normal, "rsample", _fixed_noise_rsample)
    single = _single(tmp_path, _config(tmp_path, data, "fixed-noise"))
    _assert_same_run(single.run_dir, tmp / "runs" / "fixed-noise", ("train_elbo", "train_kl", "val_elbo"))


def test_two_processes_train_the_vae_as_closely_as_its_noise_allows(two_process_runs, tmp_path, monkeypatch):
    tmp, data, results = two_process_runs
    assert _outcome(results, "vae") == ["ok", "ok"]
    # ~ the initial parameters
    init = _single(tmp_path, _config(tmp_path, data, "init", epochs=1, lr=1e-30))
    single = _single(tmp_path, _config(tmp_path, data, "vae"))
    # the same single-process run with only the guide's noise reseeded after the model is built
    build = training.build_model

    def reseeded(*args, **kwargs):
        model = build(*args, **kwargs)
        torch.manual_seed(12345)
        return model

    monkeypatch.setattr(training, "build_model", reseeded)
    other_noise = _single(tmp_path, _config(tmp_path, data, "vae-other-noise"))
    monkeypatch.undo()
    m0, m1, m1b, m2 = (_state(r)[0] for r in (init.run_dir, single.run_dir, other_noise.run_dir, tmp / "runs" / "vae"))
    moved, noise, dist = _distance(m1, m0), _distance(m1, m1b), _distance(m1, m2)
    assert noise > 0 and dist > 0  # the noise does differ ...
    assert noise < 0.5 * moved  # ... but training, not noise, moves the parameters
    assert dist < 2.0 * noise, f"2 processes vs 1: {dist:.3g}; 1 vs 1 with other noise: {noise:.3g}"
    r0, r1 = (torch.load(results / f"vae-rank{r}.pt", weights_only=True)["params"] for r in range(WORLD))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)


def test_resume_under_two_processes_continues_exactly(two_process_runs):
    tmp, data, results = two_process_runs
    assert _outcome(results, "resumed-1") == ["ok", "ok"] and _outcome(results, "resumed-2") == ["ok", "ok"]
    (m1, o1), (m2, o2) = _state(tmp / "runs" / "vae"), _state(tmp / "runs" / "resumed")
    # each rank's generator state was saved and restored: the same noise, the same numbers
    assert all(torch.equal(m1[k], m2[k]) for k in m1)
    assert o1.keys() == o2.keys()
    assert all(torch.equal(o1[i][k], o2[i][k]) for i in o1 for k in o1[i])
    strip = lambda p: [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in read_metrics(p)]  # noqa: E731
    assert strip(tmp / "runs" / "vae" / "metrics.jsonl") == strip(tmp / "runs" / "resumed" / "metrics.jsonl")
    assert len(load_checkpoint(tmp / "runs" / "resumed" / "last.pt")["rng"]) == WORLD


def test_an_error_on_rank_0_stops_every_rank(two_process_runs):
    tmp, data, results = two_process_runs
    outcomes = _outcome(results, "taken")
    assert all(o.startswith("ValueError:") and "not a pyrovae run's" in o for o in outcomes), outcomes


def test_with_download_rank_0_fetches_while_the_others_wait(two_process_runs):
    tmp, data, results = two_process_runs
    assert _outcome(results, "download") == ["ok", "ok"]
    assert (results / "downloads-rank0").exists()  # before training (and for the test split at the end)
    assert not (results / "downloads-rank1").exists()


def test_only_rank_0_writes(two_process_runs):
    tmp, data, results = two_process_runs
    names = {p.name for p in (tmp / "runs").iterdir()}
    assert names == {"ae", "vae", "resumed", "taken", "download", "fixed-noise"}
    for name in ("ae", "vae", "fixed-noise"):
        assert [torch.load(results / f"{name}-rank{r}.pt", weights_only=True)["writes"] for r in range(WORLD)] == [
            True, False]
    assert sorted(p.name for p in (tmp / "runs" / "ae").iterdir() if not p.name.startswith("events.")) == [
        "best.pt", "config.json", "elbo.png", "last.pt", "metrics.jsonl", "summary.json"]


def test_batch_size_not_divisible_by_the_processes_is_one_line_and_exit_2(tmp_path):
    import subprocess

    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    r = subprocess.run([sys.executable, "-m", "pyrovae", "train", "--dataset", "digits", "--batch-size", "33",
                        "--out", str(tmp_path), "--quiet"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--batch-size 33 must be divisible by the 2 processes" in lines[0], r.stderr


@pytest.mark.slow
def test_torchrun_cli_trains_and_resumes(tmp_path):
    """The documented command, end to end: torchrun, 2 processes, then --resume."""
    import subprocess

    base = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    train_args = ["-m", "pyrovae", "train", "--dataset", "digits", "--hidden-dims", "32", "--latent-dim", "4",
                  "--batch-size", "64", "--out", str(tmp_path), "--name", "r", "--quiet"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    r = subprocess.run([*base, "--master-port", str(_free_port()), *train_args, "--epochs", "2"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("run: ") == 1  # rank 0 alone reports
    resume_args = ["-m", "pyrovae", "train", "--resume", str(tmp_path / "r"), "--epochs", "3", "--quiet"]
    r = subprocess.run([*base, "--master-port", str(_free_port()), *resume_args], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [row["epoch"] for row in read_metrics(tmp_path / "r" / "metrics.jsonl")] == [1, 2, 3]
    assert len(load_checkpoint(tmp_path / "r" / "last.pt")["rng"]) == 2


def test_torchrun_evaluate_on_fewer_examples_than_processes_finishes_like_one_process(tmp_path, capsys):
    """2 processes, 1 example: one process has no share of the examples, yet joins every collective
    (it used to wait forever for a process that had already failed on its empty share)."""
    import signal
    import subprocess

    from conftest import cli
    from sklearn.datasets import load_digits

    run = train(TrainConfig(dataset="digits", hidden_dims=(8,), latent_dim=2, epochs=1, out=str(tmp_path), name="r",
                            no_tensorboard=True), progress=False).run_dir
    one = tmp_path / "one.npy"
    np.save(one, load_digits().data[:1] / 16.0)
    args = ["-m", "pyrovae", "evaluate", str(run), "--dataset", str(one), "--split", "all", "--num-samples", "20",
            "--quiet", "--json"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD),
                          "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *args,
                          str(tmp_path / "two.json")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env, start_new_session=True)
    try:
        _, err = p.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # torchrun and both workers
        p.communicate()
        pytest.fail(f"{WORLD} processes on 1 example did not finish within 180 s (a collective left waiting)")
    assert p.returncode == 0, err[-3000:]
    code, _, err = cli(capsys, *args[2:], str(tmp_path / "one.json"))
    assert code == 0, err
    two, single = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one"))
    assert two["processes"] == WORLD and two["num_examples"] == single["num_examples"] == 1
    assert two["log_px"] == single["log_px"] and two["elbo"] == single["elbo"]  # the same per-example streams
