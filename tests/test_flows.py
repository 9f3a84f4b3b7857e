r"""The inverse autoregressive flow guide: its density against autograd's Jacobian, its start
at the Gaussian guide, exact densities for every chunk of the estimator, and a trained flow
against the exact log p(x) of a 2-D latent model (quadrature)."""

from __future__ import annotations

import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import cli
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO

from pyrovae import TrainConfig, build_model, estimate_log_px, load_run, train
from pyrovae.marginal import isolated_params, score_traces, trace_guide
from pyrovae.objectives import Optimizer, RecordedIWAE
from pyrovae.quadrature import quadrature_log_px
from pyrovae.runs import read_metrics
from pyrovae.training import prepare_data


def iaf_vae(latent_dim=3, data_dim=10, steps=2, scale=0.3, seed=0, **kw):
    """An IAF VAE whose flow is far from the identity (random last layers)."""
    torch.manual_seed(seed)
    cfg = TrainConfig(guide="iaf", hidden_dims=(16,), latent_dim=latent_dim, flow_steps=steps,
                      flow_hidden_dims=(12,), flow_context_dim=4, **kw).resolved()
    vae = build_model(cfg, data_dim=data_dim, train_images=torch.rand(30, data_dim))
    with torch.no_grad():
        for step in vae.flow.steps:
            step.nn.layers[-1].weight.normal_(0, scale)
            step.nn.layers[-1].bias.normal_(0, scale)
    return vae


@pytest.mark.parametrize("latent_dim, steps", [(2, 1), (3, 2), (4, 3)])
def test_flow_density_is_the_base_density_minus_the_log_jacobian(latent_dim, steps):
    vae = iaf_vae(latent_dim, steps=steps)
    x = torch.bernoulli(torch.rand(5, 10))
    loc, log_scale, context = vae.encoder.with_context(x)
    q = vae.posterior(x)
    z = q.rsample()  # (5, D): scored below through the transforms' caches
    log_q_cached = q.log_prob(z).detach()
    log_q_inverted = vae.posterior(x).log_prob(z.detach().clone()).detach()  # fresh caches: the exact inverse
    for i in range(5):
        z0 = z[i].detach()
        # recover z0 by inverting through a fresh distribution, then the Jacobian of the forward map at it
        t = vae.flow.transforms(context[i].detach())
        for tr in reversed(t):
            z0 = tr.inv(z0)
        jac = torch.autograd.functional.jacobian(lambda v, i=i: vae.flow(v, context[i].detach()), z0)
        assert torch.allclose(vae.flow(z0, context[i].detach()), z[i].detach(), atol=1e-5)
        base = dist.Normal(loc[i], log_scale[i].exp()).log_prob(z0).sum()
        expected = (base - torch.linalg.slogdet(jac)[1]).detach()
        assert float(log_q_cached[i]) == pytest.approx(float(expected), abs=1e-4)
        assert float(log_q_inverted[i]) == pytest.approx(float(expected), abs=1e-4)
    # the test can fail: the Jacobian term is far from zero for this flow
    base_only = dist.Normal(loc, log_scale.exp()).log_prob(z).sum(-1).detach()
    assert float((log_q_cached - base_only).abs().max()) > 0.05


def seeded_loss(vae, x, seed, num_particles=6):
    """The negative ELBO of ``vae`` on ``x`` from ``num_particles`` draws made under ``seed``."""
    torch.manual_seed(seed)
    with isolated_params():
        return Trace_ELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1).loss(
            vae.model, vae.guide, x)


def _gaussian_twin(iaf):
    """A Gaussian-guide VAE with the IAF VAE's encoder (without the context rows) and decoder."""
    cfg = TrainConfig(hidden_dims=(16,), latent_dim=iaf.latent_dim).resolved()
    g = build_model(cfg, data_dim=10)
    g.decoder.load_state_dict(iaf.decoder.state_dict())
    d = 2 * iaf.latent_dim
    with torch.no_grad():
        for a, b in zip(g.encoder.linear_maps, iaf.encoder.linear_maps):
            a.weight.copy_(b.weight[: a.weight.shape[0]])
            a.bias.copy_(b.bias[: a.bias.shape[0]])
        assert g.encoder.linear_maps[-1].weight.shape[0] == d
    return g


@pytest.mark.parametrize("init", ["he", "xavier"])
@pytest.mark.parametrize("hierarchy", ["stack", "two-level"])
def test_init_starts_the_networks_but_leaves_every_flow_at_the_identity(init, hierarchy):
    settings = dict(guide="iaf", hidden_dims=(16,), latent_dim=3, lower_latent_dims=(4,), hierarchy=hierarchy,
                    flow_hidden_dims=(12,), flow_context_dim=4)
    torch.manual_seed(0)
    plain = build_model(TrainConfig(**settings).resolved(), data_dim=10)
    torch.manual_seed(0)
    started = build_model(TrainConfig(init=init, **settings).resolved(), data_dim=10)
    flows = [m for m in started.modules() if type(m).__name__ == "InverseAutoregressiveFlow"]
    assert len(flows) == 2
    for flow in flows:
        for step in flow.steps:
            assert not step.nn.layers[-1].weight.any() and not step.nn.layers[-1].bias.any()
    ours, theirs = plain.state_dict(), started.state_dict()
    flow_keys = [k for k in ours if "flow" in k]
    assert flow_keys and all(torch.equal(ours[k], theirs[k]) for k in flow_keys)  # the flows are untouched
    assert not torch.equal(ours["encoder.net.0.weight"], theirs["encoder.net.0.weight"])  # the rest is started


def test_a_flow_started_at_the_identity_gives_the_gaussian_guides_elbo_under_one_seed():
    torch.manual_seed(0)
    cfg = TrainConfig(guide="iaf", hidden_dims=(16,), latent_dim=3, flow_hidden_dims=(12,), flow_context_dim=4)
    iaf = build_model(cfg.resolved(), data_dim=10)
    gauss = _gaussian_twin(iaf)
    x = torch.bernoulli(torch.rand(8, 10))
    for seed in (1, 2):
        assert seeded_loss(iaf, x, seed) == pytest.approx(seeded_loss(gauss, x, seed), abs=1e-4)
    with torch.no_grad():  # teeth: a flow moved from the identity changes the ELBO
        iaf.flow.steps[0].nn.layers[-1].bias.normal_(0, 0.5)
    assert abs(seeded_loss(iaf, x, 1) - seeded_loss(gauss, x, 1)) > 1e-2


@pytest.mark.parametrize("prior", ["standard", "mog", "vamp"])
def test_estimates_are_the_same_for_chunk_layouts_1_7_and_k(prior):
    """Every chunk after the first is a new draw from the same distribution object; its log
    q must be its own (read from the transforms' caches), never a stale entry's."""
    kw = {"prior": prior, "prior_components": 3} if prior != "standard" else {}
    if prior == "vamp":
        kw["prior_init"] = "noise"
    vae = iaf_vae(**kw)
    x = torch.bernoulli(torch.rand(6, 10))
    K = 40
    runs = [estimate_log_px(vae, x, K, chunk_size=c, batch_size=b, seed=11) for c, b in ((1, 100), (7, 3), (K * 6, 6))]
    for other in runs[1:]:
        for name in ("log_px", "elbo", "kl", "pareto_k", "ess"):
            assert torch.allclose(getattr(other, name), getattr(runs[0], name), atol=1e-4, equal_nan=True), name
    # teeth: another seed gives other draws
    assert not torch.allclose(estimate_log_px(vae, x, K, seed=12).elbo, runs[0].elbo, atol=1e-3)


def test_every_chunked_draw_is_scored_with_its_own_exact_density(monkeypatch):
    vae = iaf_vae()
    x = torch.bernoulli(torch.rand(4, 10))
    seen = []
    import pyrovae.marginal as marginal

    def spy(model, xb, guide_trace, num_samples):
        terms = score_traces(model, xb, guide_trace, num_samples)
        seen.append((xb, guide_trace.nodes["z"]["value"].detach().clone(), terms["log_q"].detach().clone()))
        return terms

    monkeypatch.setattr(marginal, "score_traces", spy)
    estimate_log_px(vae, x, 9, chunk_size=8, batch_size=4)  # 2 samples per pass: 5 passes
    assert len(seen) == 5
    for xb, z, log_q in seen:
        exact = vae.posterior(xb).log_prob(z.clone())  # fresh distribution: inverted exactly
        assert torch.allclose(log_q, exact, atol=1e-4)


def test_one_sample_estimate_is_unbiased_for_the_elbo():
    vae = iaf_vae()
    x = torch.bernoulli(torch.rand(3, 10))
    elbo = estimate_log_px(vae, x, 40_000, seed=0).elbo  # E_q[log w], precise
    reps = 4000
    one = estimate_log_px(vae, x.repeat(reps, 1), 1, seed=1).log_px.reshape(reps, 3)
    mean, se = one.mean(0), one.std(0) / math.sqrt(reps)
    assert bool(((mean - elbo).abs() < 3.5 * se + 1e-3).all())
    assert float(se.max()) < 0.2


def test_iwae_bound_with_a_flow_guide_is_the_per_example_bound_from_traces():
    vae = iaf_vae()
    x = torch.bernoulli(torch.rand(5, 10))
    K = 7
    torch.manual_seed(3)
    with isolated_params():
        iwae = RecordedIWAE(num_particles=K, vectorize_particles=True, max_plate_nesting=1)
        loss = iwae.loss(vae.model, vae.guide, x)
    torch.manual_seed(3)
    with isolated_params(), torch.no_grad():
        trace = trace_guide(vae, x, K)
        t = score_traces(vae, x, trace, K)
    log_w = (t["log_lik"] + t["log_prior"] - t["log_q"]).double()
    by_hand = float((torch.logsumexp(log_w, 0) - math.log(K)).sum())
    assert -loss == pytest.approx(by_hand, abs=1e-3)


@pytest.mark.parametrize("settings", [
    {"elbo": "trace", "prior": "standard", "warmup_epochs": 2},
    {"elbo": "iwae", "num_particles": 3, "prior": "mog", "prior_components": 3},
    {"elbo": "trace", "prior": "vamp", "prior_components": 4},
], ids=["trace-warmup", "iwae-mog", "vamp"])
def test_flow_guides_train_with_every_objective_and_prior_and_every_command_reads_them(capsys, tmp_path, settings):
    """(Resume with a flow guide is bit-exact: tests/test_priors.py::test_resume_with_every_prior...)"""
    cfg = TrainConfig(dataset="digits", hidden_dims=(32,), latent_dim=4, guide="iaf", flow_hidden_dims=(16,),
                      flow_context_dim=8, epochs=4, out=str(tmp_path), name="run", seed=2, **settings)
    result = train(cfg, progress=False)
    rows = [r["val_elbo"] for r in read_metrics(result.run_dir / "metrics.jsonl")]
    assert rows[-1] > rows[0] and math.isfinite(result.test["elbo"])
    code, out, err = cli(capsys, "evaluate", str(result.run_dir), "--num-samples", "30", "--json", "-", "--quiet")
    assert code == 0, err
    report = json.loads(out[out.index("{"):])
    assert report["log_px"] >= report["elbo"] - 0.1 and 0 <= report["active_units"] <= 4
    assert report["pareto_k"]["num_above_0.7"] <= report["num_examples"]
    for command in (["sample"], ["reconstruct"], ["interpolate", "--pair", "0", "1"]):
        code, out, err = cli(capsys, *command, str(result.run_dir))
        assert code == 0, err


def test_meanfield_elbo_with_a_flow_guide_is_one_line_and_exit_2(capsys, tmp_path):
    code, _, err = cli(capsys, "train", "--dataset", "digits", "--guide", "iaf", "--elbo", "meanfield",
                       "--out", str(tmp_path), "--epochs", "1")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--elbo meanfield" in err and "--guide iaf" in err


# --- against the exact log p(x) of a 2-D latent model ------------------------------------------------


def _fit_guide(vae, images, steps, lr=1e-3, particles=8):
    """Fit only the guide (encoder and flow) to ``images`` under the fixed model: full-batch steps
    on the very images scored, so that what remains of the ELBO gap is the family's own
    (approximation) gap, not the encoder's generalisation error (Cremer et al. 2018)."""
    torch.manual_seed(0)
    fixed_model = poutine.block(vae.model, hide_types=["param"])  # SVI steps only the guide's parameters
    with isolated_params(), pyro.validation_enabled(False):
        svi = SVI(fixed_model, vae.guide, Optimizer(lr, 1e4),
                  Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1))
        for _ in range(steps):
            svi.step(images)
    return vae.eval()


def test_trained_flow_guide_closes_the_gap_to_the_exact_log_px_of_a_2d_model(tmp_path):
    """A 2-D latent VAE on the 8x8 digits; its log p(x) by quadrature. The Gaussian and the IAF
    guide (started from the trained encoder) are then fitted to the same fixed model on the
    same test images for the same steps: the IAF's ELBO gap is smaller (paired over images),
    and both importance-sampling estimates agree with the exact value within their errors."""
    run = train(TrainConfig(dataset="digits", hidden_dims=(64,), latent_dim=2, epochs=60, out=str(tmp_path),
                            name="d2", seed=0), progress=False)
    loaded = load_run(run.run_dir)
    model, config = loaded.model, loaded.config
    test = prepare_data(config, "test", "cpu").images[:60]
    exact = quadrature_log_px(model, test)
    assert torch.allclose(quadrature_log_px(model, test, resolution=128), exact, atol=1e-3)  # converged

    iaf_cfg = TrainConfig(**{**config.to_dict(), "guide": "iaf", "flow_steps": 4, "flow_hidden_dims": [32],
                             "flow_context_dim": 16}).resolved()
    torch.manual_seed(0)
    iaf = build_model(iaf_cfg, data_dim=64)
    iaf.decoder.load_state_dict(model.decoder.state_dict())
    with torch.no_grad():  # the trained encoder's Gaussian as the flow's base
        for a, b in zip(model.encoder.linear_maps, iaf.encoder.linear_maps):
            b.weight[: a.weight.shape[0]] = a.weight
            b.bias[: a.bias.shape[0]] = a.bias
    gauss = load_run(run.run_dir).model
    _fit_guide(gauss, test, 500)
    _fit_guide(iaf, test, 500)

    gaps = {}
    for name, vae in (("gaussian", gauss), ("iaf", iaf)):
        est = estimate_log_px(vae, test, 2000, seed=0)
        gaps[name] = exact - est.elbo
        assert float(gaps[name].mean()) > 0  # the ELBO is below log p(x)
        d = est.log_px - exact
        mean, se = float(d.mean()), float(d.std() / math.sqrt(d.numel()))
        assert abs(mean) < 3 * se + 1e-3, (name, mean, se)  # importance sampling agrees with quadrature
    diff = gaps["gaussian"] - gaps["iaf"]
    se = float(diff.std() / math.sqrt(diff.numel()))
    assert float(diff.mean()) > 3 * se, (float(gaps["gaussian"].mean()), float(gaps["iaf"].mean()), se)
