"""experiments/prior_fit.py: E log p(z) of the training images' own posteriors is the aggregate posterior's
density written out, a refit raises E log p(z) without touching the encoder, the counts of stuck pixels and
of components in use match hand counts, and the script runs on a finished VampPrior run only."""

import json
import math

import pyro.distributions as dist
import pytest
import torch
from conftest import load_experiment

from pyrovae import TrainConfig, build_model
from pyrovae.priors import MixtureOfGaussiansPrior, VampPrior

fit = load_experiment("prior_fit")


def vamp_model(squash="hardtanh", **changes):
    torch.manual_seed(0)
    config = TrainConfig(hidden_dims=(8,), latent_dim=2, prior="vamp", prior_components=3, pseudo_inputs=squash,
                         **changes)
    return build_model(config, data_dim=12)


def test_training_posteriors_prior_is_the_aggregate_posterior_written_out():
    model = vamp_model()
    encoder = model.prior.encoder
    train = (torch.rand(5, 12) > 0.5).float()
    held = (torch.rand(7, 12) > 0.5).float()
    prior = VampPrior(encoder, train, squash="none", margin=0.0)
    loc, scale = fit.posterior_params(encoder, held)
    got = fit.mean_log_prior(prior, loc, scale, seed=4)

    z = loc + scale * torch.randn(loc.shape, generator=torch.Generator().manual_seed(4))  # the same draws
    with torch.no_grad():
        mu, log_s = encoder(train)
    per_component = dist.Normal(mu.double(), log_s.exp().double()).log_prob(z.double()[:, None, :]).sum(-1)  # (7, 5)
    expected = (per_component.logsumexp(-1) - math.log(5)).mean().item()
    assert got == pytest.approx(expected, abs=1e-4)


class CornerEncoder(torch.nn.Module):
    """q(z|u) = N(4u - 2, 0.3^2 I) on 2-D inputs: a pseudo-input at a corner of [0, 1]^2 puts its component
    at that corner's code."""

    in_dim = 2

    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(4.0))

    def forward(self, u):
        return self.gain * u - 2.0, torch.full_like(u, math.log(0.3))


@pytest.mark.parametrize("free", [False, True])
def test_refit_moves_the_components_onto_the_codes_and_leaves_the_encoder_and_the_learned_prior_alone(free):
    encoder = CornerEncoder()
    start_u = torch.tensor([[0.4, 0.5], [0.5, 0.6], [0.6, 0.4]])
    learned = VampPrior(encoder, start_u, squash="hardtanh", margin=0.0)
    corners = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    loc, scale = (4 * corners - 2).repeat(100, 1), torch.full((300, 2), 0.05)  # the codes of three images
    start = fit.mean_log_prior(learned, loc, scale, seed=0)
    new = fit.refit(learned, loc, scale, free=free, steps=400, lr=0.05, batch=100, seed=0)
    assert fit.mean_log_prior(new, loc, scale, seed=0) > start + 2.0
    with torch.no_grad():
        means = encoder(new.pseudo_inputs)[0]
    for code in 4 * corners - 2:  # every code has a component within 0.4 of it (start: 1.4 or more away)
        assert (means - code).norm(dim=-1).min() < 0.4
    assert new.squash == ("sigmoid" if free else "hardtanh")
    assert encoder.gain.item() == 4.0 and encoder.gain.requires_grad
    assert torch.equal(learned.pseudo_params, start_u)


def test_stuck_pixels_are_counted_past_each_bound():
    prior = VampPrior(torch.nn.Identity(), torch.zeros(3, 4), squash="hardtanh", margin=0.0)
    with torch.no_grad():
        prior.pseudo_params.copy_(torch.tensor([[-1.0, 0.5, 2.0, 0.0], [0.2, 0.3, -0.1, 1.0], [-1, -2, 3, 4]]))
    state = fit.pseudo_input_state(prior)
    assert state["below_0"] == pytest.approx(5 / 12) and state["above_1"] == pytest.approx(4 / 12)
    assert state["stuck"] == pytest.approx(9 / 12) and state["pseudo_inputs_fully_stuck"] == 1
    assert state["stuck_median_per_pseudo_input"] == pytest.approx(3 / 4)
    assert fit.pseudo_input_state(VampPrior(torch.nn.Identity(), torch.zeros(3, 4))) == {"squash": "sigmoid"}


def test_components_used_is_the_number_of_components_the_codes_fall_in():
    prior = MixtureOfGaussiansPrior(latent_dim=2, num_components=4)
    with torch.no_grad():
        prior.loc.copy_(torch.tensor([[0.0, 0.0], [50.0, 0.0], [0.0, 50.0], [50.0, 50.0]]))
    two = torch.tensor([[0.0, 0.0], [50.0, 0.0]]).repeat(10, 1)  # half in each of two components
    assert fit.components_used(prior, two) == pytest.approx(2.0, rel=1e-6)
    assert fit.components_used(prior, prior.loc.detach().repeat(3, 1)) == pytest.approx(4.0, rel=1e-6)
    skewed = torch.tensor([[0.0, 0.0]] * 3 + [[50.0, 50.0]])  # shares 3/4, 1/4
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert fit.components_used(prior, skewed) == pytest.approx(math.exp(entropy), rel=1e-6)


def test_the_script_scores_a_finished_vamp_run_and_refuses_another_prior(tmp_path, capsys):
    from pyrovae import train

    common = {"dataset": "digits", "binarize": "static", "epochs": 1, "out": str(tmp_path), "no_tensorboard": True,
              "hidden_dims": (16,), "latent_dim": 2}
    run = train(TrainConfig(prior="vamp", prior_components=5, pseudo_inputs="hardtanh", prior_init="normal",
                            name="vamp", **common), progress=False)
    out_json = tmp_path / "fit.json"
    args = [str(run.run_dir), "--data-dir", str(tmp_path), "--num-examples", "20", "--num-samples", "5",
            "--steps", "5", "--batch-size", "50", "--json", str(out_json)]
    assert fit.main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads(out_json.read_text())
    assert list(result["priors"]) == ["learned", "refit", "refit-free", "training-posteriors"]
    assert result["num_examples"] == 20 and result["priors"]["learned"]["vs_learned"] == 0.0
    assert result["priors"]["training-posteriors"]["train_log_pz"] is None
    assert 0 < result["priors"]["refit"]["components_used"] <= 5
    assert 0 <= result["pseudo_inputs"]["stuck"] <= 1 and printed.count("vs learned") == 4

    plain = train(TrainConfig(name="plain", **common), progress=False)
    assert fit.main([str(plain.run_dir), "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--prior standard" in err[0] and "--prior vamp" in err[0]
    assert fit.main([str(run.run_dir), "--data-dir", str(tmp_path), "--lr", "0"]) == 2
    assert "--lr must be positive" in capsys.readouterr().err
