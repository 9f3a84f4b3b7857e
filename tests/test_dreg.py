"""The doubly reparameterised gradient of the IWAE bound (``--iwae-gradient dreg``): the same loss and model
gradient as Pyro's ``RenyiELBO`` under one seed, the same expected guide gradient, and a guide gradient that is
exactly zero where q(z|x) is the true posterior (a linear-Gaussian model, where the posterior is known)."""

import math

import pytest
import torch

from pyrovae import TrainConfig, build_model, train
from pyrovae.marginal import isolated_params
from pyrovae.objectives import RecordedIWAE, RecordedIWAEDReG, build_elbo
from pyrovae.runs import read_metrics


class _PlainWeights(RecordedIWAEDReG):
    """A plausible mistake, a negative control: the plain weight w~ on the path gradient, not DReG's w~^2
    (the biased "sticking the landing" estimator for the IWAE bound)."""

    @staticmethod
    def ratio(weights, beta):
        return torch.ones_like(weights)


class _WarmupIgnored(RecordedIWAEDReG):
    """Another: w~^2 whatever the KL warm-up scale beta."""

    @staticmethod
    def ratio(weights, beta):
        return weights


def _two_level_vamp():
    cfg = TrainConfig(hidden_dims=(8,), latent_dim=2, lower_latent_dims=(3,), hierarchy="two-level", prior="vamp",
                      prior_components=4, elbo="iwae", num_particles=8).resolved()
    torch.manual_seed(0)
    vae = build_model(cfg, data_dim=6)
    x = (torch.rand(1, 6) < 0.5).float()
    return vae, x


def _step(cls, vae, x, k, seed, kl_scale=1.0, vectorize=True):
    """(loss, {name: gradient}) of one step of ``cls`` with k particles."""
    elbo = cls(num_particles=k, vectorize_particles=vectorize, max_plate_nesting=1)
    for p in vae.parameters():
        p.grad = None
    torch.manual_seed(seed)
    with isolated_params():
        loss = elbo.loss_and_grads(vae.model, vae.guide, x, kl_scale=kl_scale)
    return loss, {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                  for n, p in vae.named_parameters()}


def test_the_loss_and_the_models_gradient_are_the_iwae_ones_under_one_seed():
    vae, x = _two_level_vamp()
    x = x.expand(3, 6)
    loss, grads = _step(RecordedIWAE, vae, x, k=8, seed=1)
    dreg_loss, dreg_grads = _step(RecordedIWAEDReG, vae, x, k=8, seed=1)
    assert dreg_loss == pytest.approx(loss, abs=1e-4)
    model_only = [n for n in grads if "encoder" not in n]  # decoder, p(z1|z), pseudo-inputs
    assert "prior.pseudo_logits" in model_only and any(n.startswith("decoder") for n in model_only)
    for n in model_only:
        torch.testing.assert_close(dreg_grads[n], grads[n], rtol=1e-4, atol=1e-6)
    guide = [n for n in grads if "encoder" in n]  # the estimator changes these draw by draw
    assert max(float((dreg_grads[n] - grads[n]).abs().max()) for n in guide) > 1e-2


@pytest.mark.parametrize("kl_scale", [1.0, 0.3])
def test_the_guides_gradient_has_the_iwae_expectation(kl_scale):
    """Mean guide gradients over 40 steps of 300 independent copies of one image, against Pyro's: the squared
    z-scores of the 250 guide parameters average about 1 for DReG (0.9 over 200 steps; the parameters are
    correlated, so 40 steps can give 2) and thousands for the two mistakes above (under KL warm-up too,
    where the coefficient is (1 - beta) w~ + beta w~^2)."""
    vae, x = _two_level_vamp()
    steps, copies = 40, 300

    def sampled(cls):
        rows = []
        for seed in range(steps):
            _, g = _step(cls, vae, x.expand(copies, 6), k=8, seed=seed, kl_scale=kl_scale)
            rows.append(torch.cat([g[n].flatten() / copies for n in g if "encoder" in n]))
        return torch.stack(rows)

    reference = sampled(RecordedIWAE)

    def chi2(cls):
        other = sampled(cls)
        se = ((reference.var(0) + other.var(0)) / steps).sqrt()
        z = ((reference.mean(0) - other.mean(0)) / se)[se > 0]
        return float((z ** 2).mean())

    assert chi2(RecordedIWAEDReG) < 4
    assert chi2(_PlainWeights if kl_scale == 1.0 else _WarmupIgnored) > 100


@pytest.mark.parametrize("k", [1, 5])
def test_the_guides_gradient_is_zero_at_every_draw_when_q_is_the_true_posterior(k):
    """A linear-Gaussian VAE with orthogonal decoder columns has a diagonal Gaussian posterior, set here as
    the encoder; then log w = log p(x) at every z, so DReG's guide gradient vanishes draw by draw while the
    reparameterised one is zero only on average."""
    cfg = TrainConfig(hidden_dims=(), latent_dim=2, likelihood="gaussian", elbo="iwae", num_particles=k).resolved()
    vae = build_model(cfg, data_dim=4)
    W = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([0.1, -0.2, 0.3, 0.0])
    s2 = 0.25
    cov = torch.diag(1.0 / (1.0 + (W.T @ W).diagonal() / s2))  # (I + W'W / s^2)^-1, diagonal
    with torch.no_grad():
        vae.decoder.net[0].weight.copy_(W)
        vae.decoder.net[0].bias.copy_(b)
        vae.likelihood.log_scale.fill_(0.5 * math.log(s2))
        enc = vae.encoder.net[0]
        enc.weight.zero_()
        enc.weight[:2] = cov @ W.T / s2
        enc.bias[:2] = -(cov @ W.T @ b) / s2
        enc.bias[2:] = 0.5 * cov.diagonal().log()
    x = torch.randn(7, 4)
    loss, grads = _step(RecordedIWAE, vae, x, k=k, seed=0)
    dreg_loss, dreg_grads = _step(RecordedIWAEDReG, vae, x, k=k, seed=0)
    assert dreg_loss == pytest.approx(loss, abs=1e-4)
    assert max(float(dreg_grads[n].abs().max()) for n in grads if n.startswith("encoder")) < 1e-4
    assert max(float(grads[n].abs().max()) for n in grads if n.startswith("encoder")) > 1e-2


def test_a_flow_guide_is_refused_in_words():
    with pytest.raises(ValueError, match="--iwae-gradient dreg needs log q"):
        TrainConfig(guide="iaf", elbo="iwae", num_particles=4, iwae_gradient="dreg").resolved()
    cfg = TrainConfig(guide="iaf", elbo="iwae", num_particles=4, hidden_dims=(8,), latent_dim=2).resolved()
    vae = build_model(cfg, data_dim=6)
    with pytest.raises(ValueError, match="diagonal-Gaussian guide"):
        _step(RecordedIWAEDReG, vae, torch.ones(2, 6), k=4, seed=0)


def test_particles_drawn_one_at_a_time_are_refused():
    """The step draws all k particles in one vectorised pass; a loop of k passes would silently train on one."""
    with pytest.raises(ValueError, match="vectorize_particles=True"):
        RecordedIWAEDReG(num_particles=4, vectorize_particles=False, max_plate_nesting=1)
    vae, x = _two_level_vamp()
    plain, _ = _step(RecordedIWAEDReG, vae, x, k=1, seed=0)
    assert _step(RecordedIWAEDReG, vae, x, k=1, seed=0, vectorize=False)[0] == pytest.approx(plain)


def test_it_is_built_for_iwae_and_trains(tmp_path):
    cfg = TrainConfig(dataset="digits", hidden_dims=(16,), latent_dim=3, elbo="iwae", num_particles=4,
                      iwae_gradient="dreg", epochs=2, out=str(tmp_path), name="dreg").resolved()
    assert type(build_elbo(cfg)) is RecordedIWAEDReG
    assert type(build_elbo(TrainConfig(elbo="iwae", num_particles=4).resolved())) is RecordedIWAE
    result = train(cfg, progress=False)
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    assert len(rows) == 2 and all(math.isfinite(r["val_iwae"]) and math.isfinite(r["train_elbo"]) for r in rows)
    assert rows[1]["val_iwae"] > rows[0]["val_iwae"]
