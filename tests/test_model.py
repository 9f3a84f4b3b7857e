"""The Pyro program: site names and shapes, and the ELBO against its closed form."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.poutine.util import prune_subsample_sites

from pyrovae import TrainConfig
from pyrovae.model import build_model


def linear_gaussian_vae(data_dim=5, latent_dim=2, seed=0):
    """A VAE with linear encoder/decoder and Gaussian likelihood, random parameters."""
    config = TrainConfig(hidden_dims=(), latent_dim=latent_dim, likelihood="gaussian").resolved()
    vae = build_model(config, data_dim=data_dim)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vae.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
        vae.likelihood.log_scale.fill_(math.log(0.7))
    return vae


@torch.no_grad()
def closed_form_elbo(vae, x):
    r"""E_q[log N(x; Wz + b, s^2 I)] - KL(N(m, diag v) || N(0, I)) for the linear-Gaussian VAE, by hand."""
    W, b = vae.decoder.linear_maps[0].weight, vae.decoder.linear_maps[0].bias
    loc, log_scale = vae.encoder(x)
    var = (2 * log_scale).exp()
    s2 = float(vae.likelihood.scale) ** 2
    d = x.shape[1]
    resid = x - loc @ W.T - b
    expected_log_lik = -0.5 * d * math.log(2 * math.pi * s2) - 0.5 / s2 * (
        (resid**2).sum(-1) + (var * (W**2).sum(0)).sum(-1))
    kl = 0.5 * (var + loc**2 - 1 - 2 * log_scale).sum(-1)
    return expected_log_lik - kl


def test_model_and_guide_share_sites_and_shapes():
    config = TrainConfig(latent_dim=7, hidden_dims=(32,)).resolved()
    vae = build_model(config, data_dim=20)
    x = torch.bernoulli(torch.full((6, 20), 0.3))
    guide_tr = prune_subsample_sites(poutine.trace(vae.guide).get_trace(x))
    model_tr = prune_subsample_sites(poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x))
    g_sites = {n: s for n, s in guide_tr.nodes.items() if s["type"] == "sample"}
    m_sites = {n: s for n, s in model_tr.nodes.items() if s["type"] == "sample"}
    assert set(g_sites) == {"z"} and set(m_sites) == {"z", "x"}
    assert m_sites["x"]["is_observed"] and torch.equal(m_sites["x"]["value"], x)
    assert g_sites["z"]["value"].shape == (6, 7)
    for site in (g_sites["z"], m_sites["z"], m_sites["x"]):
        assert site["fn"].batch_shape == (6,)  # the "data" plate
        assert [f.name for f in site["cond_indep_stack"]] == ["data"]
    assert m_sites["z"]["fn"].event_shape == (7,) and m_sites["x"]["fn"].event_shape == (20,)
    # the guide's code is m + exp(sigma) * e, with the encoder's two outputs
    loc, log_scale = vae.encoder(x)
    assert torch.allclose(g_sites["z"]["fn"].base_dist.loc, loc)
    assert torch.allclose(g_sites["z"]["fn"].base_dist.scale, log_scale.exp())


def test_vectorised_particles_broadcast_over_an_outer_plate():
    vae = build_model(TrainConfig(latent_dim=3, hidden_dims=(8,)).resolved(), data_dim=10)
    x = torch.bernoulli(torch.full((4, 10), 0.5))
    with pyro.plate("particles", 5, dim=-2):
        tr = poutine.trace(vae.guide).get_trace(x)
        mtr = poutine.trace(poutine.replay(vae.model, trace=tr)).get_trace(x)
    assert tr.nodes["z"]["value"].shape == (5, 4, 3)
    assert mtr.nodes["x"]["fn"].log_prob(x).shape == (5, 4)


@pytest.mark.parametrize("elbo_cls", [Trace_ELBO, TraceMeanField_ELBO])
def test_elbo_of_linear_gaussian_model_matches_closed_form(elbo_cls):
    vae = linear_gaussian_vae()
    x = torch.randn(8, 5)
    exact = closed_form_elbo(vae, x).sum()
    estimates = []
    for seed in range(10):
        pyro.set_rng_seed(seed)
        elbo = elbo_cls(num_particles=2000, vectorize_particles=True, max_plate_nesting=1)
        estimates.append(-elbo.loss(vae.model, vae.guide, x))
    est = torch.tensor(estimates, dtype=torch.float64)
    se = float(est.std()) / math.sqrt(len(est))
    assert abs(float(est.mean()) - float(exact)) < 4 * se + 1e-3
    if elbo_cls is Trace_ELBO:
        assert se > 0  # the sampled KL is noisy: the check has teeth


@torch.no_grad()
def test_exact_marginal_is_ppca():
    vae = linear_gaussian_vae(data_dim=6, latent_dim=3)
    W, b = vae.decoder.linear_maps[0].weight, vae.decoder.linear_maps[0].bias
    s2 = float(vae.likelihood.scale) ** 2
    direct = dist.MultivariateNormal(b, W @ W.T + s2 * torch.eye(6))
    x = torch.randn(10, 6)
    assert torch.allclose(vae.exact_marginal().log_prob(x), direct.log_prob(x), atol=1e-4)


def test_exact_marginal_only_for_linear_gaussian():
    assert build_model(TrainConfig().resolved(), data_dim=784).exact_marginal() is None
    cfg = TrainConfig(likelihood="gaussian").resolved()  # hidden layer: no closed form
    assert build_model(cfg, data_dim=784).exact_marginal() is None


@torch.no_grad()
def test_kl_warmup_scales_only_the_latent_terms():
    vae = linear_gaussian_vae()
    x = torch.randn(4, 5)
    pyro.set_rng_seed(3)
    full = Trace_ELBO(max_plate_nesting=1).loss(vae.model, vae.guide, x, 1.0)
    pyro.set_rng_seed(3)
    tr = poutine.trace(vae.guide).get_trace(x)
    mtr = poutine.trace(poutine.replay(vae.model, trace=tr)).get_trace(x)
    recon = float(mtr.nodes["x"]["fn"].log_prob(x).sum())
    kl = float((tr.nodes["z"]["fn"].log_prob(tr.nodes["z"]["value"]) -
                mtr.nodes["z"]["fn"].log_prob(tr.nodes["z"]["value"])).sum())
    pyro.set_rng_seed(3)
    scaled = Trace_ELBO(max_plate_nesting=1).loss(vae.model, vae.guide, x, 0.25)
    assert full == pytest.approx(-(recon - kl), rel=1e-5)
    assert scaled == pytest.approx(-(recon - 0.25 * kl), rel=1e-5)


@torch.no_grad()
def test_autoencoder_objective_is_reconstruction_alone():
    config = TrainConfig(model="ae", hidden_dims=(16,), latent_dim=3).resolved()
    ae = build_model(config, data_dim=12)
    x = torch.bernoulli(torch.full((5, 12), 0.4))
    loss = Trace_ELBO(max_plate_nesting=1).loss(ae.model, ae.guide, x)
    recon = ae.likelihood(ae.decoder(ae.encode(x))).log_prob(x).sum()
    assert loss == pytest.approx(-float(recon), rel=1e-5)
