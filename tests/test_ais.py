r"""Annealed importance sampling, BDMC and quadrature against exact values.

Exact references: the linear-Gaussian VAE (probabilistic PCA, ``exact_marginal()``), and for a
nonlinear decoder with a 2-D latent the quadrature of ``pyrovae.quadrature``, itself checked
for convergence. Standard errors are paired: each example's estimate minus its exact value.
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys

import pyro
import pytest
import torch
from conftest import child_env, cli
from test_marginal import data_from, exact_log_px, mean_se, ppca_vae, set_proposal

from pyrovae import TrainConfig, estimate_log_px, load_run, train
from pyrovae.ais import ChainStart, ais_log_px, bdmc, chain_state, hmc_move, sigmoidal_schedule, simulate
from pyrovae.marginal import ExampleNoise, isolated_params
from pyrovae.quadrature import quadrature_log_px
from pyrovae.training import prepare_data


def test_schedule_is_sigmoidal_from_0_to_1():
    b = sigmoidal_schedule(100)
    assert b[0] == 0 and b[-1] == 1 and bool((b[1:] > b[:-1]).all())
    steps = b[1:] - b[:-1]
    assert steps[0] < steps[50] / 5 and steps[-1] < steps[50] / 5  # small steps at both ends


# --- probabilistic PCA: the exact log p(x) --------------------------------------------------------


def test_ais_agrees_with_the_exact_log_px_within_3_se():
    vae = ppca_vae(data_dim=8, latent_dim=3, sigma=0.4)
    x = data_from(vae, 300)
    set_proposal(vae, loc_shift=0.4, scale_factor=1.8)  # a poor start, so that the annealing has work to do
    exact = exact_log_px(vae, x)
    r = ais_log_px(vae, x, num_steps=200, num_chains=4, leapfrog=5, seed=0, batch_size=300)
    mean, se = mean_se(r.log_px - exact)
    assert abs(mean) < 3 * se and se < 0.02
    assert 0.4 < float(r.acceptance.mean()) < 0.95  # adapted towards 0.65
    # teeth: the same proposal used for plain importance sampling with a few samples is visibly biased
    is_mean, is_se = mean_se(estimate_log_px(vae, x, 3, seed=0).log_px - exact)
    assert is_mean < -5 * max(is_se, se)


def test_with_the_exact_posterior_as_start_every_ais_weight_is_equal():
    vae = ppca_vae(data_dim=6, latent_dim=2, sigma=0.5)
    x = data_from(vae, 50)
    r = ais_log_px(vae, x, num_steps=30, num_chains=5, seed=1)
    assert torch.allclose(r.log_px, exact_log_px(vae, x), atol=1e-4)
    assert torch.allclose(r.ess, torch.full_like(r.ess, 5.0), atol=1e-5)
    set_proposal(vae, scale_factor=1.05)  # teeth: 5% too wide already spreads the weights
    assert float(ais_log_px(vae, x, num_steps=30, num_chains=5, seed=1).ess.min()) < 5 - 1e-3


def test_hmc_at_beta_1_leaves_the_gaussian_posterior_invariant():
    """Chains started at exact posterior draws of a PPCA model, moved by HMC transitions at
    beta = 1 with a mass and step size that do not match the posterior: their mean, variances and
    correlation stay those of the Gaussian posterior."""
    vae = ppca_vae(data_dim=6, latent_dim=2, sigma=0.5)
    x = data_from(vae, 1)
    set_proposal(vae, loc_shift=1.0, scale_factor=2.0)  # the mass and q0 are not the posterior
    W = vae.decoder.linear_maps[0].weight.detach().double()
    b = vae.decoder.linear_maps[0].bias.detach().double()
    s2 = float(vae.likelihood.scale.detach()) ** 2
    M = W.T @ W + s2 * torch.eye(2, dtype=torch.float64)
    post_mean = torch.linalg.solve(M, W.T @ (x[0].double() - b))
    post_cov = s2 * torch.linalg.inv(M)
    chains = 4000
    noise = ExampleNoise(0, 0, 1, "cpu")
    with isolated_params(), pyro.validation_enabled(False):
        start = ChainStart(vae, x, chains, "guide", noise)
        z0 = post_mean + torch.randn(chains, 1, 2, dtype=torch.float64) @ torch.linalg.cholesky(post_cov).T
        state = chain_state(vae, x, {"z": z0.float()}, start)
        step = torch.full((1,), 0.5)
        for _ in range(20):
            state, _ = hmc_move(vae, x, state, torch.tensor(1.0), start, step, 5, noise, chains)
    z = state.z["z"][:, 0].double()
    se_mean = post_cov.diagonal().sqrt() / math.sqrt(chains)
    assert bool(((z.mean(0) - post_mean).abs() < 4 * se_mean).all())
    assert torch.allclose(z.var(0), post_cov.diagonal(), rtol=0.1)
    assert abs(float(torch.corrcoef(z.T)[0, 1]) - float(post_cov[0, 1] / post_cov.diagonal().prod().sqrt())) < 0.06


def test_estimates_do_not_depend_on_the_batch_an_example_was_in():
    vae = ppca_vae(data_dim=6, latent_dim=2, sigma=0.5)
    set_proposal(vae, loc_shift=0.3, scale_factor=1.5)
    x = data_from(vae, 7)
    a = ais_log_px(vae, x, num_steps=15, num_chains=3, seed=4, batch_size=7)
    b = ais_log_px(vae, x, num_steps=15, num_chains=3, seed=4, batch_size=3)
    assert torch.allclose(a.log_px, b.log_px, atol=1e-4) and torch.allclose(a.acceptance, b.acceptance)
    assert not torch.allclose(a.log_px, ais_log_px(vae, x, num_steps=15, num_chains=3, seed=5).log_px, atol=1e-4)


# --- a nonlinear 2-D model against quadrature -------------------------------------------------------


@pytest.fixture(scope="module")
def model_2d(tmp_path_factory):
    out = tmp_path_factory.mktemp("d2")
    run = train(TrainConfig(dataset="digits", hidden_dims=(64,), latent_dim=2, epochs=20, out=str(out), name="d2",
                            seed=3), progress=False)
    loaded = load_run(run.run_dir)
    test = prepare_data(loaded.config, "test", "cpu").images[:40]
    return loaded, test, quadrature_log_px(loaded.model, test)


def test_quadrature_is_converged_and_ais_agrees_with_it(model_2d):
    run, x, exact = model_2d
    model = run.model
    assert torch.allclose(quadrature_log_px(model, x, resolution=160), exact, atol=1e-3)
    r = ais_log_px(model, x, num_steps=100, num_chains=4, seed=0)
    mean, se = mean_se(r.log_px - exact)
    assert abs(mean) < 3 * se + 1e-3
    is_mean, is_se = mean_se(estimate_log_px(model, x, 200, seed=0).log_px - exact)
    assert is_mean < 3 * is_se + 1e-3  # importance sampling is not above the exact value beyond noise


def test_quadrature_of_the_linear_gaussian_model_is_its_closed_form():
    vae = ppca_vae(data_dim=6, latent_dim=2, sigma=0.3)
    x = data_from(vae, 20)
    assert torch.allclose(quadrature_log_px(vae, x, resolution=64), exact_log_px(vae, x), atol=2e-4)


def test_quadrature_refuses_a_latent_that_is_not_2d():
    vae = ppca_vae(data_dim=6, latent_dim=3)
    with pytest.raises(ValueError, match="one 2-D latent"):
        quadrature_log_px(vae, data_from(vae, 2))


def test_bdmc_brackets_the_exact_value_and_its_gap_shrinks_with_t(model_2d):
    run, _, _ = model_2d
    model = run.model
    # from the prior, so that few steps leave a wide gap to close
    result = bdmc(model, num_examples=30, steps=(2, 20, 200), num_chains=4, init="prior", seed=0)
    x, _ = simulate(model, 30, seed=0)
    exact = quadrature_log_px(model, x)
    rows = result["rows"]
    for r in rows:
        lower = torch.tensor(r["per_example"]["lower"])
        upper = torch.tensor(r["per_example"]["upper"])
        lo_mean, lo_se = mean_se(lower - exact)
        up_mean, up_se = mean_se(upper - exact)
        assert lo_mean < 3 * lo_se + 1e-3 and up_mean > -3 * up_se - 1e-3, r["num_steps"]
    gaps = [r["gap"] for r in rows]
    assert gaps[0] > gaps[1] > gaps[2] >= -3 * rows[2]["gap_se"]
    assert gaps[0] > 10 * max(rows[2]["gap_se"], 1e-3)  # teeth: T = 2 is visibly loose


def test_evaluate_and_bdmc_from_the_command_line(capsys, model_2d, tmp_path):
    run, _, _ = model_2d
    out = tmp_path / "ais.json"
    code, text, err = cli(capsys, "evaluate", str(run.dir), "--estimator", "ais", "--ais-steps", "20",
                          "--num-samples", "50", "--json", str(out), "--quiet")
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["estimator"] == "ais" and len(report["per_example"]["log_px"]) == report["num_examples"]
    assert 0 < report["ais"]["acceptance"] <= 1 and 1 <= report["ais"]["ess"]["min"] <= 4
    assert "AIS, T=20" in text
    code, text, err = cli(capsys, "evaluate", str(run.dir), "--estimator", "quadrature", "--num-samples", "10",
                          "--quadrature-resolution", "48", "--quiet")
    assert code == 0 and "quadrature" in text, err
    code, text, err = cli(capsys, "bdmc", str(run.dir), "--num-examples", "5", "--steps", "2,5", "--quiet")
    assert code == 0 and "reverse AIS" in text, err
    code, _, err = cli(capsys, "bdmc", str(run.dir), "--steps", "0")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--steps" in err


# --- sharded evaluation ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("estimator", ["is", "ais"])
def test_two_processes_give_the_per_example_numbers_of_one(model_2d, tmp_path, estimator):
    run, _, _ = model_2d
    args = ["evaluate", str(run.dir), "--estimator", estimator, "--ais-steps", "10", "--num-samples", "40",
            "--batch-size", "16", "--quiet", "--seed", "5"]
    env = child_env(OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "pyrovae", *args, "--json", str(tmp_path / "one.json")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                          "127.0.0.1", "--master-port", str(_free_port()), "-m", "pyrovae", *args, "--json",
                          str(tmp_path / "two.json")], capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert a["processes"] == 1 and b["processes"] == 2
    for key in ("log_px", "elbo", "kl"):
        assert torch.allclose(torch.tensor(a["per_example"][key]), torch.tensor(b["per_example"][key]), atol=1e-4)
    assert two.stdout.count("log p(x) estimate") == 1  # only rank 0 reports


def test_estimators_study_quick_writes_its_tables_and_reuses_its_cache(tmp_path):
    from conftest import load_experiment

    study = load_experiment("estimators")
    out = tmp_path / "est"
    assert study.main(["--quick", "--quiet", "--out", str(out), "--models", "default,iaf-4"]) == 0
    result = json.loads((out / "estimators.json").read_text())
    row = result["table"][0]
    per = result["is_vs_ais"]["default"]
    ais = torch.tensor(per["ais"][-1]["per_image"], dtype=torch.float64)
    # the table's AIS − IS is the paired mean of the per-image estimates it was built from
    cached = json.loads(next((out / "cache").glob("default-*-is-K100.json")).read_text())
    is_k = torch.tensor(cached["per_image"], dtype=torch.float64)
    assert abs(row["ais_minus_is"] - float((ais - is_k).mean())) < 1e-9
    assert [r["num_steps"] for r in result["bdmc"]["default"]["rows"]] == [3, 10]
    assert (out / "estimators.png").stat().st_size > 0 and "| default |" in (out / "estimators.md").read_text()
    stamps = {p: p.stat().st_mtime for p in (out / "cache").iterdir()}
    assert study.main(["--quick", "--quiet", "--out", str(out), "--models", "default,iaf-4"]) == 0
    assert {p: p.stat().st_mtime for p in (out / "cache").iterdir()} == stamps  # every estimate reused
