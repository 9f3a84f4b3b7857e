r"""Gated dense layers and the VampPrior paper's two-level model (``--net gated``, ``--hierarchy two-level``).

With linear networks, a Gaussian likelihood and a constant scale for :math:`z_1`, the two-level
model is a Gaussian model whose decoder sees both layers:

.. math:: z \sim \mathcal{N}(0, I),\quad z_1 = A z + c + s_1 \epsilon_1,\quad x = B z_1 + C z + b + \sigma\epsilon,

.. math:: p(x) = \mathcal{N}\big(Bc + b,\; (BA + C)(BA + C)^\top + B\,\mathrm{diag}(s_1^2) B^\top + \sigma^2 I\big),

so its estimators are checked against a closed form.
"""

from __future__ import annotations

import json
import math

import pyro.distributions as dist
import pytest
import torch
from conftest import cli
from pyro import poutine
from test_flows import seeded_loss
from test_marginal import mean_se
from test_models import _fit_guide

from pyrovae import TrainConfig, build_model, estimate_log_px, load_run, train
from pyrovae.ais import ais_log_px
from pyrovae.marginal import isolated_params, log_joint
from pyrovae.model import TwoLevelVAE
from pyrovae.nets import Encoder, GatedDense, JointNet
from pyrovae.runs import read_metrics


def test_a_gated_layer_is_a_linear_map_times_a_sigmoid_gate():
    torch.manual_seed(0)
    layer = GatedDense(5, 3)
    x = torch.randn(4, 5)
    W, b = layer.linear.weight, layer.linear.bias  # (6, 5): the map's rows, then the gate's
    expected = (x @ W[:3].T + b[:3]) * torch.sigmoid(x @ W[3:].T + b[3:])
    assert torch.allclose(layer(x), expected, atol=1e-6)
    enc = Encoder(5, (8, 8), 2, net="gated")
    assert [type(m).__name__ for m in enc.net] == ["GatedDense", "GatedDense", "Linear"]
    loc, log_scale = enc(torch.randn(7, 3, 5))
    assert loc.shape == log_scale.shape == (7, 3, 2)


def test_a_joint_net_broadcasts_x_against_samples_of_z_as_if_x_were_copied():
    torch.manual_seed(0)
    net = JointNet([6, 2], (8, 4), 5, net="gated")
    x, z = torch.randn(3, 6), torch.randn(10, 3, 2)
    assert torch.allclose(net(x, z), net(x.expand(10, 3, 6), z), atol=1e-6)
    assert net(x, z).shape == (10, 3, 5) and net.linear_maps[-1].out_features == 5
    linear = JointNet([6, 2], (), 5)  # no hidden layers: one affine map of the concatenation
    W, b = linear.linear_maps[0].weight, linear.linear_maps[0].bias
    assert torch.allclose(linear(x, z[0]), torch.cat([x, z[0]], -1) @ W.T + b, atol=1e-6)


def two_level_linear_gaussian(seed=0, **guide) -> TwoLevelVAE:
    cfg = TrainConfig(hidden_dims=(), hierarchy="two-level", lower_latent_dims=(3,), latent_dim=2,
                      likelihood="gaussian", **guide).resolved()
    torch.manual_seed(seed)
    vae = build_model(cfg, data_dim=6)
    with torch.no_grad():
        vae.likelihood.log_scale.fill_(math.log(0.4))
        vae.z1_prior.linear_maps[0].weight[3:].zero_()  # z1's scale must not depend on z for the closed form
    return vae


@torch.no_grad()
def closed_form(vae: TwoLevelVAE) -> dist.MultivariateNormal:
    down = vae.z1_prior.linear_maps[0]
    A, c, s1 = down.weight[:3].double(), down.bias[:3].double(), down.bias[3:].double().exp()
    out = vae.decoder.linear_maps[0]
    B, C, b = out.weight[:, :3].double(), out.weight[:, 3:].double(), out.bias.double()
    M = B @ A + C
    cov = M @ M.T + B @ torch.diag(s1**2) @ B.T + float(vae.likelihood.scale) ** 2 * torch.eye(6, dtype=torch.float64)
    return dist.MultivariateNormal(B @ c + b, cov)


def test_two_level_sites_are_z_then_z1_in_the_guide_and_the_model():
    vae = two_level_linear_gaussian()
    assert isinstance(vae, TwoLevelVAE) and vae.sites == ["z1", "z"]
    x = torch.randn(5, 6)
    with isolated_params():
        guide = poutine.trace(vae.guide).get_trace(x)
        model = poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(x)
    latent = [n for n, s in guide.nodes.items() if s["type"] == "sample" and n != "data"]
    assert latent == ["z", "z1"]  # q(z|x) first, then q(z1|x, z)
    for tr in (guide, model):
        assert tr.nodes["z1"]["value"].shape == (5, 3) and tr.nodes["z"]["value"].shape == (5, 2)
        assert all(f.name == "data" for f in tr.nodes["z1"]["cond_indep_stack"])
    assert vae.latent_dims == {"z1": 3, "z": 2} and vae.latent_dim == 2
    assert list(vae.encode_layers(x)) == ["z1", "z"] and vae.decode(torch.randn(4, 2)).shape == (4, 6)


def test_log_joint_of_the_two_level_model_is_the_sum_of_its_densities():
    vae = two_level_linear_gaussian()
    torch.manual_seed(2)
    x, z, z1 = torch.randn(4, 6), torch.randn(7, 4, 2), torch.randn(7, 4, 3)
    with isolated_params(), torch.no_grad():
        got = log_joint(vae, x, {"z": z, "z1": z1})
        loc, log_scale = vae.z1_prior(z)
        expected = (dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
                    + dist.Normal(loc, log_scale.exp()).log_prob(z1).sum(-1)
                    + vae.likelihood(vae.decoder(z1, z)).log_prob(x))
    assert got.shape == (7, 4) and torch.allclose(got, expected, atol=1e-4)


def test_importance_sampling_and_ais_reach_the_closed_form_of_a_two_level_gaussian_model():
    vae = two_level_linear_gaussian()
    p = closed_form(vae)
    torch.manual_seed(1)
    x = p.sample((60,)).float()
    exact = p.log_prob(x.double())
    _fit_guide(vae, x, 600)
    est = estimate_log_px(vae, x, 2000, seed=0)
    mean, se = mean_se(est.log_px - exact)
    assert abs(mean) < 3 * se + 1e-3
    assert float((exact - est.elbo).mean()) > 10 * se  # the ELBO is visibly below: the check has teeth
    with isolated_params():
        ais = ais_log_px(vae, x[:20], num_steps=200, num_chains=4, seed=0)
    mean, se = mean_se(ais.log_px.double() - exact[:20])
    assert abs(mean) < 3 * se + 0.02


IAF = {"guide": "iaf", "flow_hidden_dims": (8,), "flow_context_dim": 4}


def _move_flows(vae, scale=0.4):
    """Random last layers: both flows far from the identity."""
    with torch.no_grad():
        for flow in (vae.flow, vae.z1_flow):
            for step in flow.steps:
                step.nn.layers[-1].weight.normal_(0, scale)
                step.nn.layers[-1].bias.normal_(0, scale)


def test_an_iaf_two_level_guide_starts_as_the_gaussian_guide_and_its_flows_move_it():
    iaf, gauss = two_level_linear_gaussian(**IAF), two_level_linear_gaussian()
    assert iaf.flow.latent_dim == 2 and iaf.z1_flow.latent_dim == 3
    state = gauss.state_dict()  # the Gaussian twin: the same model, and the guide's rows without the context
    for name, value in iaf.state_dict().items():
        if name in state:
            state[name] = value[: state[name].shape[0]] if value.shape != state[name].shape else value
    gauss.load_state_dict(state)
    x = torch.randn(8, 6)
    for seed in (1, 2):
        assert seeded_loss(iaf, x, seed) == pytest.approx(seeded_loss(gauss, x, seed), abs=1e-4)
    codes = iaf.encode_layers(x)
    assert torch.allclose(codes["z1"], gauss.encode_layers(x)["z1"], atol=1e-5)
    _move_flows(iaf)
    assert abs(seeded_loss(iaf, x, 1) - seeded_loss(gauss, x, 1)) > 1e-2
    moved = iaf.encode_layers(x)  # the codes are the flows' images of the base means
    loc, _, context = iaf.encoder.with_context(x)
    assert torch.allclose(moved["z"], iaf.flow(loc, context), atol=1e-6)
    assert not torch.allclose(moved["z"], loc, atol=1e-3)


def test_importance_sampling_through_both_flows_reaches_the_closed_form_of_a_two_level_gaussian_model():
    """IS is unbiased only if log q(z, z1 | x) is each flow's exact density: a wrong Jacobian or a
    context read from the wrong rows moves the estimate off the closed form."""
    vae = two_level_linear_gaussian(**IAF)
    p = closed_form(vae)
    torch.manual_seed(1)
    x = p.sample((60,)).float()
    exact = p.log_prob(x.double())
    _move_flows(vae)
    _fit_guide(vae, x, 600)
    est = estimate_log_px(vae, x, 2000, seed=0)
    mean, se = mean_se(est.log_px - exact)
    assert abs(mean) < 3 * se + 1e-3
    assert float((exact - est.elbo).mean()) > 10 * se  # the ELBO is visibly below: the check has teeth


def test_two_level_vampprior_trains_resumes_and_answers_every_command(tmp_path, capsys):
    common = ["--dataset", "digits", "--hierarchy", "two-level", "--lower-latent-dims", "6", "--latent-dim", "3",
              "--net", "gated", "--hidden-dims", "32,32", "--prior", "vamp", "--prior-components", "20",
              "--out", str(tmp_path), "--name", "h", "--quiet", "--no-tensorboard"]
    code, _, err = cli(capsys, "train", *common, "--epochs", "4")
    assert code == 0, err
    rows = read_metrics(tmp_path / "h" / "metrics.jsonl")
    assert rows[-1]["val_elbo"] > rows[0]["val_elbo"] + 1  # it learns
    code, _, err = cli(capsys, "train", "--resume", str(tmp_path / "h"), "--epochs", "5", "--quiet")
    assert code == 0, err
    assert len(read_metrics(tmp_path / "h" / "metrics.jsonl")) == 5
    code, out, err = cli(capsys, "evaluate", str(tmp_path / "h"), "--num-samples", "20", "--json", "-")
    assert code == 0, err
    report = json.loads(out[out.index("{"):])
    assert list(report["active_units_by_layer"]) == ["z1", "z"] and report["log_px"] >= report["elbo"] - 0.5
    code, _, err = cli(capsys, "sample", str(tmp_path / "h"), "--num-images", "4", "--output", str(tmp_path / "s.png"))
    assert code == 0, err
    assert (tmp_path / "s.png").stat().st_size > 0


def test_an_iaf_two_level_vampprior_trains_by_the_iwae_bound_and_every_command_reads_it(tmp_path, capsys):
    code, _, err = cli(capsys, "train", "--dataset", "digits", "--hierarchy", "two-level", "--lower-latent-dims", "4",
                       "--latent-dim", "3", "--net", "gated", "--hidden-dims", "32", "--prior", "vamp",
                       "--prior-components", "10", "--guide", "iaf", "--flow-hidden-dims", "16", "--flow-context-dim",
                       "6", "--elbo", "iwae", "--num-particles", "3", "--epochs", "4", "--out", str(tmp_path),
                       "--name", "h", "--quiet", "--no-tensorboard")
    assert code == 0, err
    rows = read_metrics(tmp_path / "h" / "metrics.jsonl")
    assert rows[-1]["val_iwae"] > rows[0]["val_iwae"] + 1  # it learns
    vae = load_run(tmp_path / "h").model
    assert vae.flow.context_dim == 6 and vae.z1_flow.latent_dim == 4  # both flows come back from the checkpoint
    assert any(float(p.detach().abs().max()) > 0 for p in vae.z1_flow.steps[0].nn.layers[-1].parameters())  # trained
    code, out, err = cli(capsys, "evaluate", str(tmp_path / "h"), "--num-samples", "20", "--json", "-")
    assert code == 0, err
    report = json.loads(out[out.index("{"):])
    assert list(report["active_units_by_layer"]) == ["z1", "z"] and report["log_px"] >= report["elbo"] - 0.5
    for command in (["sample", "--output", str(tmp_path / "s.png")], ["interpolate", "--pair", "0", "1"]):
        code, _, err = cli(capsys, *command, str(tmp_path / "h"))
        assert code == 0, err


@pytest.mark.parametrize("flags, words", [
    (["--hierarchy", "two-level"], "--lower-latent-dims"),
    (["--hierarchy", "two-level", "--lower-latent-dims", "4,4"], "one"),
    (["--hierarchy", "two-level", "--lower-latent-dims", "4", "--net", "conv"], "--net mlp or gated"),
    (["--hierarchy", "three"], "--hierarchy"),
])
def test_impossible_two_level_settings_are_one_line_and_exit_2(capsys, tmp_path, flags, words):
    code, _, err = cli(capsys, "train", "--dataset", "digits", "--epochs", "1", "--out", str(tmp_path), *flags)
    assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, err
    assert not any(tmp_path.iterdir())


def test_the_paper_presets_hold_the_papers_settings():
    from pyrovae.config import preset_settings

    one = TrainConfig.from_dict(preset_settings("vampprior-paper")).resolved()
    two = TrainConfig.from_dict(preset_settings("hvae-vampprior-paper")).resolved()
    for c in (one, two):  # Tomczak & Welling's experiment.py defaults
        assert (c.lr, c.batch_size, c.epochs, c.patience, c.warmup_epochs) == (5e-4, 100, 2000, 50, 100)
        assert (c.net, c.hidden_dims, c.latent_dim, c.prior, c.prior_components) == ("gated", (300, 300), 40, "vamp",
                                                                                       500)
        assert c.dataset == "binarized-mnist" and c.binarize == "none" and c.lr_schedule == "constant"
    assert one.hierarchy == "stack" and not one.lower_latent_dims
    assert two.hierarchy == "two-level" and two.lower_latent_dims == (40,)
    model = build_model(two, data_dim=784)
    assert isinstance(model, TwoLevelVAE)


def test_gated_nets_train_through_the_python_api(tmp_path):
    result = train(TrainConfig(dataset="digits", net="gated", hidden_dims=(32,), latent_dim=3, epochs=3,
                               out=str(tmp_path), name="g", no_tensorboard=True), progress=False)
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    assert rows[-1]["val_elbo"] > rows[0]["val_elbo"]
