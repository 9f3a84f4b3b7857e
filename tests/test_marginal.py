r"""The importance-sampling estimator of log p(x) and the IWAE bound, against closed forms.

A VAE with linear encoder and decoder and a Gaussian likelihood is probabilistic PCA
(Tipping & Bishop 1999): :math:`p(x) = \mathcal{N}(b, WW^\top + \sigma^2 I)` and
:math:`p(z|x) = \mathcal{N}(M^{-1}W^\top(x - b), \sigma^2 M^{-1})` with
:math:`M = W^\top W + \sigma^2 I`. With orthogonal columns of W, M is diagonal, so the
linear encoder can hold the exact posterior, or a chosen distortion of it.

Standard errors: every comparison is made per example against that example's exact value
(``d_i = estimate_i - exact_i``), so the spread of ``d_i`` is the Monte Carlo error of the
estimator alone; ``SE = std(d) / sqrt(n)`` over n independent examples.
"""

from __future__ import annotations

import json
import math

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO
from test_model import closed_form_elbo, linear_gaussian_vae

from pyrovae import TrainConfig
from pyrovae.marginal import (
    LOG_WEIGHT_BUDGET,
    default_chunk_size,
    estimate_log_px,
    isolated_params,
    log_weight_terms,
    pass_layout,
)
from pyrovae.model import build_model
from pyrovae.objectives import RecordedIWAE


def ppca_vae(data_dim: int = 6, latent_dim: int = 2, sigma: float = 0.5, seed: int = 0):
    """A linear-Gaussian VAE whose W has orthogonal columns of different lengths."""
    config = TrainConfig(hidden_dims=(), latent_dim=latent_dim, likelihood="gaussian").resolved()
    vae = build_model(config, data_dim=data_dim)
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(data_dim, latent_dim, generator=g))
    lengths = torch.linspace(2.0, 1.0, latent_dim)
    with torch.no_grad():
        vae.decoder.linear_maps[0].weight.copy_(q * lengths)  # (D, d)
        vae.decoder.linear_maps[0].bias.copy_(torch.randn(data_dim, generator=g))
        vae.likelihood.log_scale.fill_(math.log(sigma))
    set_proposal(vae)
    return vae


@torch.no_grad()
def set_proposal(vae, loc_shift: float = 0.0, scale_factor: float = 1.0) -> None:
    r"""Set the linear encoder to the exact PPCA posterior, its mean shifted by ``loc_shift``
    and its standard deviations multiplied by ``scale_factor`` (0 and 1: exact)."""
    W, b = vae.decoder.linear_maps[0].weight.double(), vae.decoder.linear_maps[0].bias.double()
    s2 = float(vae.likelihood.scale) ** 2
    m = (W * W).sum(0) + s2  # diagonal of M = W^T W + s^2 I
    assert torch.allclose(W.T @ W, torch.diag((W * W).sum(0)), atol=1e-5), "W needs orthogonal columns"
    d = W.shape[1]
    enc = vae.encoder.linear_maps[0]
    enc.weight.zero_()
    enc.weight[:d] = (W / m).T
    enc.bias[:d] = -(W / m).T @ b + loc_shift
    enc.bias[d:] = 0.5 * torch.log(s2 / m) + math.log(scale_factor)


@torch.no_grad()
def exact_log_px(vae, x):
    return vae.exact_marginal().log_prob(x).double()


@torch.no_grad()
def data_from(vae, n: int, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return vae.exact_marginal().sample((n,))


def mean_se(d: torch.Tensor) -> tuple[float, float]:
    d = d.double()
    return float(d.mean()), float(d.std()) / math.sqrt(d.numel())


# --- agreement with the closed forms -------------------------------------------------------------


def test_estimate_agrees_with_exact_log_px_within_3_se():
    vae = ppca_vae()
    set_proposal(vae, loc_shift=0.3, scale_factor=1.5)  # an imperfect, overdispersed proposal
    x = data_from(vae, 400)
    pyro.set_rng_seed(0)
    est = estimate_log_px(vae, x, 500)
    exact = exact_log_px(vae, x)
    mean, se = mean_se(est.log_px - exact)
    assert abs(mean) < 3 * se, (mean, se)
    # teeth: the check resolves hundredths of a nat, far finer than the ELBO's gap to log p(x)
    assert se < 0.01
    assert float((exact - est.elbo).mean()) > 20 * se
    assert est.summary()["pareto_k"]["num_above_0.7"] == 0


def test_one_sample_is_unbiased_for_the_elbo():
    vae = ppca_vae()
    set_proposal(vae, loc_shift=0.5, scale_factor=0.7)
    x = data_from(vae, 4000)
    pyro.set_rng_seed(0)
    est = estimate_log_px(vae, x, 1)
    elbo = closed_form_elbo(vae, x).double()
    mean, se = mean_se(est.log_px - elbo)
    assert abs(mean) < 3 * se, (mean, se)
    assert torch.equal(est.log_px, est.elbo)  # one sample: the estimate is its own ELBO
    # teeth: the ELBO lies many standard errors below log p(x)
    assert float((exact_log_px(vae, x) - elbo).mean()) > 20 * se


def test_expectation_does_not_decrease_with_k_and_stays_below_exact():
    vae = ppca_vae()
    set_proposal(vae, loc_shift=0.5, scale_factor=0.6)  # underdispersed: the bound tightens slowly
    x = data_from(vae, 300)
    exact = exact_log_px(vae, x)
    pyro.set_rng_seed(0)
    gaps = {k: estimate_log_px(vae, x, k, diagnostics=False).log_px - exact for k in (1, 4, 16, 64, 256)}
    ks = sorted(gaps)
    for small, large in zip(ks[:-1], ks[1:]):
        mean, se = mean_se(gaps[large] - gaps[small])  # independent draws: the MC error of both
        assert mean > -3 * se, (small, large, mean, se)
    for k in ks:
        mean, se = mean_se(gaps[k])
        assert mean < 3 * se, (k, mean, se)
    # teeth: from K = 1 to 256 the bound rises by many standard errors
    mean, se = mean_se(gaps[256] - gaps[1])
    assert mean > 10 * se


def test_exact_posterior_as_proposal_has_zero_variance():
    vae = ppca_vae()
    x = data_from(vae, 20)
    exact = exact_log_px(vae, x)
    with torch.no_grad(), isolated_params():
        t = log_weight_terms(vae, x, 200)
    log_w = (t["log_lik"] + t["log_prior"] - t["log_q"]).double()  # (K, B)
    assert float(log_w.std(0).max()) < 1e-4  # float32 rounding only
    assert torch.allclose(log_w.mean(0), exact, atol=1e-4)
    est = estimate_log_px(vae, x, 200)
    assert torch.allclose(est.log_px, exact, atol=1e-4)
    assert torch.allclose(est.elbo, exact, atol=1e-4)  # the ELBO is tight too
    assert torch.allclose(est.ess, torch.full_like(est.ess, 200.0), rtol=1e-3)
    assert est.pareto_k.isnan().all()  # equal weights: no tail, k-hat undefined, never "unreliable"
    assert est.summary()["pareto_k"]["num_above_0.7"] is None  # left out, not counted as reliable or not
    assert "equal" in est.summary()["pareto_k"]["undefined"]
    # teeth: a proposal 5% too wide already spreads the log-weights
    set_proposal(vae, scale_factor=1.05)
    with torch.no_grad(), isolated_params():
        t = log_weight_terms(vae, x, 200)
    assert float((t["log_lik"] + t["log_prior"] - t["log_q"]).std(0).min()) > 1e-2


# --- exactly K samples, memory bounded by chunk_size ---------------------------------------------


@pytest.mark.parametrize("chunk_size, batch_size", [(1, 100), (5, 3), (7, 3), (10, 3), (30, 7), (12, 100), (100, 3),
                                                     (None, 100)])
def test_exactly_k_samples_whatever_the_chunk(monkeypatch, chunk_size, batch_size):
    vae = ppca_vae()
    x = data_from(vae, 7)
    decoded, encoded = [], []
    decoder_forward, encoder_forward = vae.decoder.forward, vae.encoder.forward
    monkeypatch.setattr(vae.decoder, "forward", lambda z: decoded.append(z.shape[:-1].numel()) or decoder_forward(z))
    monkeypatch.setattr(vae.encoder, "forward", lambda x: encoded.append(x.shape[0]) or encoder_forward(x))
    K = 13
    est = estimate_log_px(vae, x, K, chunk_size=chunk_size, batch_size=batch_size)
    assert sum(decoded) == 7 * K  # (sample, example) pairs decoded: exactly K per example
    assert max(decoded) <= (chunk_size or default_chunk_size("cpu"))  # the memory bound
    assert sum(encoded) <= 7 * 2  # the encoder runs once per batch (twice where K is not a multiple of a pass)
    # -log K with the K draws actually summed: with the exact posterior every estimate is exact
    assert torch.allclose(est.log_px, exact_log_px(vae, x), atol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_estimate_on_cuda_matches_the_closed_form():
    vae = ppca_vae().cuda()
    set_proposal(vae, loc_shift=0.3, scale_factor=1.5)
    x = data_from(vae, 2000)
    pyro.set_rng_seed(0)
    est = estimate_log_px(vae, x, 300)
    assert est.log_px.device.type == "cpu" and est.log_px.shape == (2000,)
    mean, se = mean_se(est.log_px - exact_log_px(vae, x).cpu())
    assert abs(mean) < 3 * se and se < 0.01
    set_proposal(vae)  # exact posterior: every draw gives log p(x)
    assert torch.allclose(estimate_log_px(vae, x, 50).log_px, exact_log_px(vae, x).cpu(), atol=1e-3)


@pytest.mark.parametrize("n, K, chunk, batch", [(10_000, 5000, 2048, 100), (3, 10**7, 2048, 100), (50, 1, 2048, 100),
                                                (7, 13, 5, 3), (1000, 10, 65536, 100)])
def test_layout_respects_chunk_and_log_weight_budget(n, K, chunk, batch):
    b, s = pass_layout(n, K, chunk, batch, keep_log_w=True)
    assert 1 <= b <= batch and 1 <= s <= K
    assert b * s <= chunk or (b == 1 and s == 1)
    assert b * K <= max(LOG_WEIGHT_BUDGET, K)  # log-weights kept for PSIS


# --- the IWAE objective of training -------------------------------------------------------------


@pytest.mark.parametrize("prior", ["standard", "mog"])
def test_renyi_elbo_alpha_0_is_the_per_example_iwae_bound(prior):
    r"""RenyiELBO(alpha=0) against :math:`\sum_b \log \frac1K \sum_k w_{kb}` from traces, one seed:
    the loss and its gradients. pyro-ppl/pyro#3104 warns about local latents."""
    config = TrainConfig(hidden_dims=(8,), latent_dim=3, likelihood="bernoulli", prior=prior,
                         prior_components=4, prior_init="random" if prior == "mog" else "auto").resolved()
    vae = build_model(config, data_dim=10)
    torch.manual_seed(2)
    x = torch.bernoulli(torch.full((20, 10), 0.4))
    K = 20
    params = list(vae.parameters())
    with isolated_params():
        pyro.set_rng_seed(1)
        loss = RecordedIWAE(num_particles=K, vectorize_particles=True, max_plate_nesting=1).loss_and_grads(
            vae.model, vae.guide, x)
        renyi_grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        pyro.set_rng_seed(1)
        t = log_weight_terms(vae, x, K)
        log_w = t["log_lik"] + t["log_prior"] - t["log_q"]  # (K, B)
        per_example = torch.logsumexp(log_w, 0) - math.log(K)
        (-per_example.sum()).backward()
    assert loss == pytest.approx(-per_example.sum().item(), rel=1e-5)
    for g_renyi, p in zip(renyi_grads, params):
        assert torch.allclose(g_renyi, p.grad, rtol=1e-4, atol=1e-5)
    # teeth: one log-sum-exp over the whole batch is a different (looser) number
    joint = torch.logsumexp(log_w.sum(1), 0) - math.log(K)
    assert (per_example.sum() - joint).item() > 1.0


def test_iwae_with_one_particle_is_the_elbo():
    vae = linear_gaussian_vae()
    x = torch.randn(8, 5)
    with isolated_params():
        pyro.set_rng_seed(4)
        iwae = RecordedIWAE(num_particles=1, vectorize_particles=True, max_plate_nesting=1)
        iwae = iwae.loss(vae.model, vae.guide, x)
        pyro.set_rng_seed(4)
        elbo = Trace_ELBO(max_plate_nesting=1).loss(vae.model, vae.guide, x)
    assert iwae == pytest.approx(elbo, rel=1e-6)


def test_train_with_the_iwae_bound_from_the_command_line(tmp_path):
    import json

    from pyrovae.cli import main
    from pyrovae.runs import load_run, read_metrics
    from pyrovae.training import prepare_data

    code = main(["train", "--dataset", "digits", "--elbo", "iwae", "--num-particles", "5", "--epochs", "4",
                 "--hidden-dims", "32", "--latent-dim", "4", "--out", str(tmp_path), "--name", "iw", "--quiet"])
    assert code == 0
    config = json.loads((tmp_path / "iw" / "config.json").read_text())
    assert (config["elbo"], config["num_particles"]) == ("iwae", 5)
    rows = read_metrics(tmp_path / "iw" / "metrics.jsonl")
    assert len(rows) == 4 and all(math.isfinite(r["train_loss"]) for r in rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 5  # it learns: -IWAE_5 per example falls
    run = load_run(tmp_path / "iw")
    x = prepare_data(run.config, "test", run.device).images
    pyro.set_rng_seed(0)
    est = estimate_log_px(run.model, x, 200)
    mean, se = mean_se(est.log_px - est.elbo)
    assert mean > 3 * se  # the IWAE bound at K = 200 lies above the ELBO, beyond noise


def test_an_iwae_run_keeps_the_epoch_of_the_best_validation_iwae_bound_at_its_own_k(tmp_path):
    from pyrovae import TrainConfig, train
    from pyrovae.metrics import split_scores
    from pyrovae.runs import load_checkpoint, load_run, read_metrics
    from pyrovae.training import VAL_SEED, prepare_data

    settings = dict(dataset="digits", hidden_dims=(32,), latent_dim=4, epochs=6, batch_size=128, out=str(tmp_path),
                    no_tensorboard=True)
    result = train(TrainConfig(**settings, name="iw", elbo="iwae", num_particles=4), progress=False)
    rows = read_metrics(tmp_path / "iw" / "metrics.jsonl")
    for r in rows:  # the bound at k lies above the mean of its own k log-weights
        assert r["val_iwae"] > r["val_elbo"]
    best = max(range(len(rows)), key=lambda i: rows[i]["val_iwae"]) + 1
    summary = json.loads((tmp_path / "iw" / "summary.json").read_text())
    assert (result.best_epoch, summary["best_epoch"], summary["selected_by"]) == (best, best, "val_iwae")
    assert summary["best_val_elbo"] == rows[best - 1]["val_iwae"]
    assert load_checkpoint(tmp_path / "iw" / "best.pt")["epoch"] == best
    run = load_run(tmp_path / "iw")  # the figure is the IWAE bound with 4 draws on the validation split
    val = prepare_data(run.config, "val", run.device).images
    with torch.random.fork_rng():
        torch.manual_seed(VAL_SEED)
        again = split_scores(run.model, val, num_samples=4)
    assert again["iwae"] == pytest.approx(rows[best - 1]["val_iwae"], abs=1e-4)
    # the ELBO's runs keep selecting by the validation ELBO, with one draw
    train(TrainConfig(**settings, name="elbo"), progress=False)
    plain = read_metrics(tmp_path / "elbo" / "metrics.jsonl")
    assert all("val_iwae" not in r for r in plain)
    assert json.loads((tmp_path / "elbo" / "summary.json").read_text())["selected_by"] == "val_elbo"


def test_linear_gaussian_vae_on_mnist5k_reaches_the_ppca_maximum_likelihood(tmp_path):
    r"""A linear-Gaussian VAE (latent dim 10) trained on mnist5k grey values is PPCA fitted by SVI:
    its exact log p(x) on the training digits comes within 1% of the maximum likelihood
    ``PCA(10).fit(X).score(X)`` (Tipping & Bishop 1999) and never exceeds it beyond noise.

    The 3-SE noise allowance uses the per-example difference of the two log densities. The
    importance-sampled estimate (K = 100, the trained encoder as proposal) is the IWAE bound
    in expectation: below the exact value but for noise, and within 1% of it."""
    from sklearn.decomposition import PCA

    from pyrovae import load_dataset, load_run, train

    config = TrainConfig(dataset="mnist5k", binarize="none", likelihood="gaussian", hidden_dims=(), latent_dim=10,
                         epochs=15, lr=0.02, out=str(tmp_path), name="ppca")
    result = train(config, progress=False)
    vae = load_run(result.run_dir, which="last").model
    x = load_dataset("mnist5k", "train").images  # the training split, as train() saw it (grey values)
    x64 = x.double().numpy()
    pca = PCA(10).fit(x64)
    ppca_mean = pca.score(x64)  # mean log-likelihood per digit at the maximum
    ppca = torch.from_numpy(pca.score_samples(x64))
    exact = exact_log_px(vae, x)
    assert abs(float(exact.mean()) - ppca_mean) < 0.01 * abs(ppca_mean), (float(exact.mean()), ppca_mean)
    mean, se = mean_se(exact - ppca)
    assert mean < 3 * se, (mean, se)
    pyro.set_rng_seed(0)
    est = estimate_log_px(vae, x[:1000], 100, diagnostics=False)
    mean, se = mean_se(est.log_px - exact[:1000])
    assert mean < 3 * se, (mean, se)
    assert abs(mean) < 0.01 * abs(float(exact[:1000].mean()))
    mean, se = mean_se(est.log_px - ppca[:1000])
    assert mean < 3 * se, (mean, se)
