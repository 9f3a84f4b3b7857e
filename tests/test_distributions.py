"""The matmul-form densities against Pyro's own (float64), their precision, gradients,
memory, and the runs written before they existed."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import textwrap

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import ROOT
from pyro.infer import SVI, Trace_ELBO

from pyrovae import TrainConfig, build_model, estimate_log_px, load_run
from pyrovae.distributions import FLOAT32_ERROR_BUDGET, BernoulliImages, DiagonalGaussianMixture
from pyrovae.marginal import isolated_params
from pyrovae.objectives import Optimizer
from pyrovae.priors import Prior
from pyrovae.training import prepare_data


def _mixture(k, d, scale, spread=1.0, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(k, generator=gen, dtype=dtype)
    loc = spread * torch.randn(k, d, generator=gen, dtype=dtype)
    sc = scale * torch.exp(0.3 * torch.randn(k, d, generator=gen, dtype=dtype))
    return logits, loc, sc


def _pyros(logits, loc, scale):
    return dist.MixtureSameFamily(dist.Categorical(logits=logits), dist.Normal(loc, scale).to_event(1))


def _codes_near(loc, scale, n, seed=1):
    """Codes drawn from the components themselves, so that the cancellation-prone region is hit."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randint(loc.shape[0], (n,), generator=gen)
    return loc[k] + scale[k] * torch.randn(n, loc.shape[1], generator=gen, dtype=loc.dtype)


@pytest.mark.parametrize("k", [1, 7, 512])
@pytest.mark.parametrize("d", [2, 50])
@pytest.mark.parametrize("scale", [0.01, 1.0])
def test_mixture_density_and_gradients_equal_pyros_mixture_same_family(k, d, scale):
    logits, loc, sc = (t.requires_grad_() for t in _mixture(k, d, scale))
    z = _codes_near(loc.detach(), sc.detach(), 40).reshape(4, 10, d).requires_grad_()  # (S, B, D)
    ours = DiagonalGaussianMixture(logits, loc, sc).log_prob(z)
    ref = _pyros(logits, loc, sc).log_prob(z)
    assert ours.shape == ref.shape == (4, 10)
    assert torch.allclose(ours, ref, rtol=1e-9, atol=1e-7)
    g_ours = torch.autograd.grad(ours.sum(), (z, logits, loc, sc))
    g_ref = torch.autograd.grad(ref.sum(), (z, logits, loc, sc))
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-6)


@pytest.mark.parametrize("scale, spread, narrow", [(0.01, 3.0, True), (0.03, 1.0, True), (0.3, 1.0, False),
                                                   (1.0, 1.0, False)])
def test_float32_error_stays_within_budget_for_narrow_and_wide_components(scale, spread, narrow):
    """In float32 the expanded quadratic cancels for codes near a narrow component far from the
    centre; the density must then switch to float64 products and stay within the budget."""
    k, d = 512, 50
    logits, loc, sc = _mixture(k, d, scale, spread)
    z = _codes_near(loc, sc, 2000)
    ref = _pyros(logits, loc, sc).log_prob(z)  # float64
    mix32 = DiagonalGaussianMixture(logits.float(), loc.float(), sc.float())
    err = (mix32.log_prob(z.float()).double() - ref).abs().max().item()
    assert err < FLOAT32_ERROR_BUDGET
    # the test can tell: the plain float32 expansion is far off for the narrowest components
    centre = loc.float().mean(0)
    u, nu, p = z.float() - centre, loc.float() - centre, sc.float().pow(-2)
    naive = (-0.5 * (u * u) @ p.T + u @ (nu * p).T - 0.5 * (nu * nu * p).sum(-1) - sc.float().log().sum(-1)
             - 0.5 * d * math.log(2 * math.pi) + logits.float().log_softmax(-1)).logsumexp(-1)
    naive_err = (naive.double() - ref).abs().max().item()
    if narrow:
        assert naive_err > 3 * FLOAT32_ERROR_BUDGET and mix32._factors[1].dtype == torch.float64
    else:  # wide components keep float32 products, and float32 is good enough there
        assert naive_err < FLOAT32_ERROR_BUDGET and mix32._factors[1].dtype == torch.float32


def test_mixture_under_plates_and_vectorised_particles_matches_pyro():
    """As the model uses it: expanded by pyro.plate over examples and particles."""
    logits, loc, sc = (t.float() for t in _mixture(5, 3, 0.5))
    z = torch.randn(6, 4, 3)

    def model(fn):
        with pyro.plate("particles", 6, dim=-2), pyro.plate("data", 4, dim=-1):
            return pyro.sample("z", fn, obs=z)

    tr_ours = pyro.poutine.trace(model).get_trace(DiagonalGaussianMixture(logits, loc, sc))
    tr_ref = pyro.poutine.trace(model).get_trace(_pyros(logits, loc, sc))
    tr_ours.compute_log_prob()
    tr_ref.compute_log_prob()
    a, b = tr_ours.nodes["z"]["log_prob"], tr_ref.nodes["z"]["log_prob"]
    assert a.shape == b.shape == (6, 4) and torch.allclose(a, b, atol=1e-5)
    draws = DiagonalGaussianMixture(logits, loc, sc).expand((4,)).sample((6,))
    assert draws.shape == (6, 4, 3)


def test_mixture_samples_have_the_mixture_moments():
    logits, loc, sc = (t.float() for t in _mixture(3, 2, 0.3, spread=2.0))
    draws = DiagonalGaussianMixture(logits, loc, sc).sample((200_000,)).double()
    w = logits.double().softmax(-1)
    mean = (w[:, None] * loc.double()).sum(0)
    second = (w[:, None] * (sc.double() ** 2 + loc.double() ** 2)).sum(0)
    assert torch.allclose(draws.mean(0), mean, atol=0.02)
    assert torch.allclose(draws.pow(2).mean(0), second, atol=0.05)


def test_bernoulli_images_density_and_gradient_equal_pyros_bernoulli():
    logits = torch.randn(5, 7, 30, dtype=torch.float64, requires_grad=True)  # (S, B, D)
    x = torch.bernoulli(torch.full((7, 30), 0.4, dtype=torch.float64))
    ours = BernoulliImages(logits).log_prob(x)
    ref = dist.Bernoulli(logits=logits).to_event(1).log_prob(x)
    assert ours.shape == (5, 7) and torch.allclose(ours, ref, atol=1e-10)
    g1, = torch.autograd.grad(ours.sum(), logits)
    g2, = torch.autograd.grad(ref.sum(), logits)
    assert torch.allclose(g1, g2, atol=1e-10)


def _old_dist(prior: Prior):
    """The density every prior used before (Pyro's broadcasting MixtureSameFamily)."""
    logits, loc, scale = prior.mixture()
    if logits.shape[-1] == 1:
        return dist.Normal(loc[0], scale[0]).to_event(1)
    return _pyros(logits, loc, scale)


@pytest.mark.parametrize("prior", ["mog", "vamp"])
def test_training_steps_give_the_parameters_of_the_old_density(prior, monkeypatch):
    cfg = TrainConfig(dataset="digits", hidden_dims=(16,), latent_dim=4, prior=prior, prior_components=6,
                      prior_init="random" if prior == "mog" else "noise").resolved()
    x = torch.bernoulli(torch.rand(32, 64, generator=torch.Generator().manual_seed(2)))

    def steps(patch: bool) -> dict:
        torch.manual_seed(0)
        vae = build_model(cfg, data_dim=64, train_images=torch.rand(40, 64))
        if patch:
            monkeypatch.setattr(type(vae.prior), "dist", _old_dist)
        with isolated_params():
            svi = SVI(vae.model, vae.guide, Optimizer(0.01), Trace_ELBO())
            for _ in range(5):
                svi.step(x)
        monkeypatch.undo()
        return {k: v.detach().clone() for k, v in vae.state_dict().items()}

    new, old = steps(False), steps(True)
    for k in new:
        assert torch.allclose(new[k], old[k], rtol=1e-4, atol=1e-5), k
    assert any(not torch.allclose(new[k], old[k], rtol=1e-4, atol=1e-5) for k in new) is False
    start = build_model(cfg, data_dim=64, train_images=torch.rand(40, 64)).state_dict()
    assert any(not torch.allclose(new[k], start[k], atol=1e-3) for k in new)  # the steps moved the parameters


def test_memory_of_scoring_codes_grows_as_n_times_k_not_n_times_k_times_d():
    """20,000 codes against 512 components in 400 dimensions: Pyro's broadcast would hold
    (N, K, D) float32 = 16 GB; the matmul form needs (N, K) = 41 MB and (N, 2D)."""
    code = textwrap.dedent("""
        import resource, torch
        from pyrovae.distributions import DiagonalGaussianMixture
        torch.set_num_threads(1)
        n, k, d = 20_000, 512, 400
        loc, scale, logits = torch.randn(k, d), torch.rand(k, d) + 0.5, torch.zeros(k)
        z = torch.randn(n, d)
        mix = DiagonalGaussianMixture(logits, loc, scale)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        lp = mix.log_prob(z)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) / 1024, float(lp.mean()))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    grown_mb, mean_lp = map(float, out.stdout.split())
    n_k_d_mb = 20_000 * 512 * 400 * 4 / 2**20
    n_k_mb = 20_000 * 512 * 4 / 2**20
    assert math.isfinite(mean_lp)
    assert grown_mb < 6 * n_k_mb < n_k_d_mb / 50  # a few (N, K) buffers at most


def test_frozen_prior_computes_the_vamp_components_once_per_estimate(monkeypatch):
    cfg = TrainConfig(dataset="digits", hidden_dims=(16,), latent_dim=3, prior="vamp", prior_components=5,
                      prior_init="noise").resolved()
    vae = build_model(cfg, data_dim=64, train_images=torch.rand(20, 64))
    x = torch.bernoulli(torch.rand(30, 64))
    calls = []
    original = type(vae.prior)._mixture
    monkeypatch.setattr(type(vae.prior), "_mixture", lambda self: calls.append(1) or original(self))
    torch.manual_seed(0)
    frozen = estimate_log_px(vae, x, 40, chunk_size=50, batch_size=7)  # many chunks
    assert len(calls) == 1
    # the same numbers as computing the components afresh each time
    monkeypatch.setattr(Prior, "frozen", lambda self: __import__("contextlib").nullcontext(self))
    torch.manual_seed(0)
    fresh = estimate_log_px(vae, x, 40, chunk_size=50, batch_size=7)
    assert len(calls) > 10
    assert torch.allclose(frozen.log_px, fresh.log_px, atol=1e-5)


@pytest.mark.parametrize("prior", ["mog", "vamp"])
def test_runs_written_before_the_matmul_density_load_score_and_resume(prior, tmp_path):
    """Runs saved by pyrovae before this density (tests/data/v1-runs) load unchanged, give the
    log p(x) estimates the old code gave under the same seed, and resume."""
    src = ROOT / "tests" / "data" / "v1-runs"
    run = load_run(src / prior)
    test = prepare_data(run.config, "test", "cpu").images[:20]
    torch.manual_seed(0)
    est = estimate_log_px(run.model, test, 50)
    old = torch.tensor(json.loads((src / "log_px_by_v1.json").read_text())[prior], dtype=torch.float64)
    assert torch.allclose(est.log_px, old, atol=1e-3)
    copy = tmp_path / prior
    shutil.copytree(src / prior, copy)
    from pyrovae import train

    result = train(TrainConfig(epochs=3), resume=copy, progress=False)
    assert result.epochs_done == 3


def test_fast_softplus_equals_torchs_in_value_and_gradient():
    from pyrovae.distributions import softplus

    x = torch.cat([torch.linspace(-100, 100, 2001, dtype=torch.float64), torch.tensor([0.0, -1e-8, 1e-8, 30, -30])])
    x.requires_grad_()
    exact = torch.logaddexp(x.detach(), torch.zeros(()))  # torch's softplus returns x above 20: off by e^-20
    eps = torch.finfo(torch.float64).eps  # where e^{-|x|} < eps it rounds to 0: an absolute error below eps
    assert bool(((softplus(x) - exact).abs() <= 4 * eps * (1 + x.detach().abs())).all())
    assert torch.autograd.gradcheck(softplus, (x[::50].detach().clone().requires_grad_(),))
    g, = torch.autograd.grad(softplus(x).sum(), x)
    assert torch.allclose(g, torch.sigmoid(x.detach()))
    x32 = 5 * torch.randn(1000, 784)
    err = (softplus(x32).double() - torch.logaddexp(x32.double(), torch.zeros((), dtype=torch.float64))).abs().max()
    assert err < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_floored_log_sum_exp_equals_torchs_within_its_bound(dtype):
    """Terms 80 nats or more below the largest are floored there (no subnormal exp): the result
    and the gradient equal torch.logsumexp's up to K e^-80 relative, with and without a graph."""
    from pyrovae.distributions import logsumexp_in

    g = torch.Generator().manual_seed(0)
    a = torch.cat([torch.randn(64, 500, generator=g, dtype=torch.float64) * 60,  # gaps far beyond 80 nats
                   torch.full((64, 3), -math.inf, dtype=torch.float64)], -1)  # and zero-weight terms
    ref, rtol = torch.logsumexp(a, -1), 1e-6 if dtype == torch.float32 else 1e-12
    with torch.no_grad():
        assert torch.allclose(logsumexp_in(a.clone(), dtype).double(), ref, rtol=rtol)
    leaf = a.clone().requires_grad_()
    ours = logsumexp_in(leaf, dtype)
    assert torch.allclose(ours.double(), ref, rtol=rtol)
    (grad,) = torch.autograd.grad(ours.sum(), leaf)
    assert torch.allclose(grad, torch.softmax(a, -1), atol=1e-6)
