"""experiments/bernoulli_clamp.py: the reference code's clamped Bernoulli density, and a paired difference
that is exactly zero when no logit reaches the bound and not zero when one does."""

import pyro.distributions as dist
import pytest
import torch
from conftest import load_experiment

from pyrovae import TrainConfig, build_model
from pyrovae.distributions import BernoulliImages

clamp = load_experiment("bernoulli_clamp")


def test_clamped_density_is_bernoulli_of_clamped_probabilities():
    logits = torch.tensor([[-30.0, -5.0, 0.3, 12.0, 40.0], [20.0, -20.0, 1.0, -11.0, 11.6]])
    x = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0, 0.0]])
    probs = torch.sigmoid(logits.double()).clamp(clamp.EPSILON, 1 - clamp.EPSILON)
    expected = dist.Bernoulli(probs=probs).to_event(1).log_prob(x.double())
    with clamp.clamped_bernoulli():
        got = BernoulliImages(logits).log_prob(x)
    assert torch.allclose(got.double(), expected, atol=1e-4)
    # outside the context the plain density is back
    plain = BernoulliImages(logits).log_prob(x)
    assert torch.allclose(plain.double(), dist.Bernoulli(logits=logits.double()).to_event(1).log_prob(x.double()))


@pytest.mark.parametrize("shift, zero", [(0.0, True), (40.0, False)])
def test_paired_difference_is_zero_inside_the_bound_only(shift, zero):
    torch.manual_seed(0)
    model = build_model(TrainConfig(hidden_dims=(16,), latent_dim=2), data_dim=12)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.bias.add_(shift)  # the decoder's logits, pushed past the bound when shift = 40
    images = (torch.rand(30, 12) > 0.5).float()
    r = clamp.paired_difference(model, images, num_samples=8, seed=3)
    if zero:
        assert r["difference"] == 0.0 and r["largest"] == 0.0
    else:  # every 0-pixel under a logit > 11.5 loses less with the clamp: the clamped density is higher
        assert r["difference"] > 1.0 and r["clamped"] > r["plain"]


def test_bad_run_is_one_line_and_exit_2(tmp_path, capsys):
    assert clamp.main([str(tmp_path / "missing"), "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0]
