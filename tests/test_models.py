r"""Stronger models: stochastic layers, convolutional networks, free bits, weight decay, dropout,
spike clipping, components that stay in use, and the linear-Gaussian VAE reaching PPCA.

A two-layer linear-Gaussian VAE is still a Gaussian model,

.. math:: z \sim \mathcal{N}(0, I),\quad z_1 = A z + c + \epsilon_1,\quad x = W z_1 + b + \epsilon,
          \qquad p(x) = \mathcal{N}(W c + b,\; W (A A^\top + \Sigma_1) W^\top + \sigma^2 I),

so the estimator's multi-site path is checked against a closed form.
"""

from __future__ import annotations

import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import cli
from pyro import poutine
from pyro.infer import Trace_ELBO
from test_marginal import mean_se

from pyrovae import TrainConfig, build_model, estimate_log_px, train
from pyrovae.marginal import isolated_params, score_traces, trace_guide
from pyrovae.metrics import evaluate
from pyrovae.objectives import Optimizer, RecordedFreeBitsELBO, RecordedIWAE
from pyrovae.runs import read_metrics


def two_layer_linear_gaussian(seed=0):
    cfg = TrainConfig(hidden_dims=(), lower_latent_dims=(3,), latent_dim=2, layer_hidden_dims=(),
                      likelihood="gaussian").resolved()
    torch.manual_seed(seed)
    vae = build_model(cfg, data_dim=6)
    with torch.no_grad():
        vae.likelihood.log_scale.fill_(math.log(0.4))
    return vae


@torch.no_grad()
def closed_form(vae) -> dist.MultivariateNormal:
    W, b = vae.decoder.linear_maps[0].weight.double(), vae.decoder.linear_maps[0].bias.double()
    down = vae.upper_decoders[0].linear_maps[0]  # z -> (loc, log_scale) of z1: linear in z
    d1 = W.shape[1]
    A, c = down.weight[:d1].double(), down.bias[:d1].double()
    assert torch.allclose(down.weight[d1:], torch.zeros_like(down.weight[d1:])), "constant scale of z1 needed"
    s1 = down.bias[d1:].double().exp()
    s = float(vae.likelihood.scale) ** 2
    cov = W @ (A @ A.T + torch.diag(s1**2)) @ W.T + s * torch.eye(W.shape[0], dtype=torch.float64)
    return dist.MultivariateNormal(W @ c + b, cov)


def _fit_guide(vae, x, steps):
    """Fit only the guide to ``x`` under the fixed model."""
    from pyro.infer import SVI

    fixed = poutine.block(vae.model, hide_types=["param"])
    with isolated_params():
        svi = SVI(fixed, vae.guide, Optimizer(0.01), Trace_ELBO(num_particles=4, vectorize_particles=True,
                                                              max_plate_nesting=1))
        for _ in range(steps):
            svi.step(x)


def test_two_layers_have_one_site_each_in_the_data_plate():
    vae = two_layer_linear_gaussian()
    x = torch.randn(5, 6)
    with isolated_params():
        guide = poutine.trace(vae.guide).get_trace(x)
        model = poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(x)
    assert vae.sites == ["z1", "z"]
    for tr in (guide, model):
        assert tr.nodes["z1"]["value"].shape == (5, 3) and tr.nodes["z"]["value"].shape == (5, 2)
        assert all(f.name == "data" for f in tr.nodes["z1"]["cond_indep_stack"])
    assert vae.latent_dims == {"z1": 3, "z": 2}


def test_multi_site_estimate_agrees_with_the_closed_form_of_a_two_layer_gaussian_model():
    vae = two_layer_linear_gaussian()
    with torch.no_grad():  # z1's scale must not depend on z for the closed form
        vae.upper_decoders[0].linear_maps[0].weight[3:].zero_()
    p = closed_form(vae)
    torch.manual_seed(1)
    x = p.sample((100,)).float()
    exact = p.log_prob(x.double())
    _fit_guide(vae, x, 600)  # a guide near the posterior, so that K = 2000 reaches log p(x)
    est = estimate_log_px(vae, x, 2000, seed=0)
    mean, se = mean_se(est.log_px - exact)
    assert abs(mean) < 3 * se + 1e-3
    assert float((exact - est.elbo).mean()) > 10 * se  # teeth: the ELBO is visibly below
    # chunked draws of a multi-site guide (traced afresh per chunk) give the same estimate per example
    other = estimate_log_px(vae, x[:20], 2000, seed=0, chunk_size=37, batch_size=6)
    assert torch.allclose(other.log_px, est.log_px[:20], atol=1e-4)


def test_iwae_bound_with_two_layers_is_the_per_example_bound_from_traces():
    vae = two_layer_linear_gaussian()
    x = torch.randn(7, 6)
    K = 9
    torch.manual_seed(3)
    with isolated_params():
        loss = RecordedIWAE(num_particles=K, vectorize_particles=True, max_plate_nesting=1).loss(vae.model, vae.guide,
                                                                                                   x)
    torch.manual_seed(3)
    with isolated_params(), torch.no_grad():
        t = score_traces(vae, x, trace_guide(vae, x, K), K)
    log_w = (t["log_lik"] + t["log_prior"] - t["log_q"]).double()
    assert -loss == pytest.approx(float((torch.logsumexp(log_w, 0) - math.log(K)).sum()), abs=1e-3)


def test_active_units_are_reported_per_layer(tmp_path):
    result = train(TrainConfig(dataset="digits", hidden_dims=(32,), lower_latent_dims=(6,), latent_dim=3,
                               layer_hidden_dims=(16,), epochs=3, out=str(tmp_path), name="h"), progress=False)
    from pyrovae import load_run
    from pyrovae.training import prepare_data

    run = load_run(result.run_dir)
    test = prepare_data(run.config, "test", "cpu")
    report = evaluate(run.model, test.images, num_samples=20, seed=0)
    layers = report["active_units_by_layer"]
    assert list(layers) == ["z1", "z"] and [d for _, d in layers.values()] == [6, 3]
    assert report["active_units"] == sum(n for n, _ in layers.values()) and report["latent_dim"] == 9
    assert report["log_px"] >= report["elbo"] - 0.05


# --- convolutional networks --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(28, 28), (8, 8)])
def test_conv_networks_keep_the_shapes_of_the_mlps(shape):
    d = shape[0] * shape[1]
    cfg = TrainConfig(net="conv", hidden_dims=(64,), latent_dim=5, lower_latent_dims=(7,), guide="iaf",
                      flow_hidden_dims=(16,)).resolved()
    vae = build_model(cfg, data_dim=d, image_shape=shape)
    x = torch.bernoulli(torch.rand(4, d))
    assert vae.encoder(x)[0].shape == (4, 7)
    assert vae.decoder(torch.randn(3, 4, 7)).shape == (3, 4, d)  # (samples, batch, latent) in, as the estimator uses
    est = estimate_log_px(vae, x, 6, seed=0, chunk_size=10, batch_size=2)
    assert est.log_px.shape == (4,) and bool(torch.isfinite(est.log_px).all())
    assert any(isinstance(m, torch.nn.Conv2d) for m in vae.encoder.modules())


def test_conv_on_data_without_an_image_shape_is_one_line_and_exit_2(capsys, tmp_path):
    import numpy as np

    path = tmp_path / "rows.npy"
    np.save(path, np.random.default_rng(0).random((40, 10)))
    code, _, err = cli(capsys, "train", "--dataset", str(path), "--net", "conv", "--likelihood", "gaussian",
                       "--out", str(tmp_path), "--epochs", "1")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--net conv" in err and "1x10" in err


def test_conv_vae_trains_on_the_8x8_digits(tmp_path):
    result = train(TrainConfig(dataset="digits", net="conv", hidden_dims=(32,), latent_dim=4, epochs=4,
                               out=str(tmp_path), name="c"), progress=False)
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    assert rows[-1]["val_elbo"] > rows[0]["val_elbo"] + 1


# --- regularisers --------------------------------------------------------------------------------------


def _grads(vae, elbo, x, seed=1):
    torch.manual_seed(seed)
    with isolated_params():
        loss = elbo.loss_and_grads(vae.model, vae.guide, x)
    grads = {k: p.grad.clone() for k, p in vae.named_parameters() if p.grad is not None}
    vae.zero_grad(set_to_none=True)
    return loss, grads


def test_free_bits_keep_the_true_elbo_and_floor_only_the_kl():
    cfg = TrainConfig(hidden_dims=(16,), latent_dim=3).resolved()
    torch.manual_seed(0)
    vae = build_model(cfg, data_dim=12)
    x = torch.bernoulli(torch.rand(10, 12))
    kw = dict(num_particles=2, vectorize_particles=True, max_plate_nesting=1)
    true_loss, true_grads = _grads(vae, Trace_ELBO(**kw), x)
    loss0, grads0 = _grads(vae, RecordedFreeBitsELBO(1e-9, **kw), x)
    assert loss0 == pytest.approx(true_loss, rel=1e-6)
    for k in true_grads:  # a floor below every KL changes nothing
        assert torch.allclose(grads0[k], true_grads[k], rtol=1e-4, atol=1e-5), k
    loss_big, grads_big = _grads(vae, RecordedFreeBitsELBO(1e3, **kw), x)
    assert loss_big == pytest.approx(true_loss, rel=1e-6)  # the reported loss is the true -ELBO
    # a floor above every KL: the encoder's gradient loses the KL's share, the decoder's (which
    # comes from the reconstruction term alone) stays as it was
    assert not torch.allclose(grads_big["encoder.net.0.weight"], true_grads["encoder.net.0.weight"], atol=1e-3)
    assert torch.allclose(grads_big["decoder.net.0.weight"], true_grads["decoder.net.0.weight"], rtol=1e-4, atol=1e-5)


def test_weight_decay_is_decoupled_adamw():
    p = torch.nn.Parameter(torch.ones(3))
    with isolated_params():
        pyro.param("p", p)
        opt = Optimizer(0.1, weight_decay=0.5)
        p.grad = torch.zeros(3)
        opt([p])
    assert torch.allclose(p.detach(), torch.full((3,), 1 - 0.1 * 0.5))  # no gradient, only the decay
    assert isinstance(opt._optim, torch.optim.AdamW)


def test_encoder_dropout_acts_in_training_only():
    cfg = TrainConfig(hidden_dims=(64,), latent_dim=3, encoder_dropout=0.5).resolved()
    vae = build_model(cfg, data_dim=12)
    x = torch.rand(4, 12)
    vae.train()
    assert not torch.equal(vae.encoder(x)[0], vae.encoder(x)[0])
    vae.eval()
    assert torch.equal(vae.encoder(x)[0], vae.encoder(x)[0])
    assert not any(isinstance(m, torch.nn.Dropout) for m in vae.decoder.modules())


# --- mixture priors keep their components -----------------------------------------------------------------


def test_a_mixture_that_loses_components_says_so(tmp_path, capsys, monkeypatch):
    code, out, err = cli(capsys, "train", "--dataset", "digits", "--hidden-dims", "16", "--latent-dim", "2",
                         "--prior", "mog", "--prior-components", "30", "--prior-init", "random", "--epochs", "3",
                         "--out", str(tmp_path), "--name", "m", "--quiet")
    assert code == 0, err
    rows = read_metrics(tmp_path / "m" / "metrics.jsonl")
    used = [r["val_components_used"] for r in rows]
    assert all(1 <= u <= 30 for u in used) and min(used) < 30
    assert err.count("warning:") == 1 and "components hold" in err and "--prior-init kmeans or fewer" in err
    # a VampPrior has no k-means start: its line does not advise one (its components made to starve here)
    import pyrovae.training as training

    monkeypatch.setattr(training, "component_usage", lambda resp, share=None: {"components_used": 1})
    code, out, err = cli(capsys, "train", "--dataset", "digits", "--hidden-dims", "16", "--latent-dim", "2",
                         "--prior", "vamp", "--prior-components", "20", "--epochs", "2",
                         "--out", str(tmp_path), "--name", "v", "--quiet")
    assert code == 0 and err.count("warning:") == 1 and "kmeans" not in err and "fewer components" in err, err


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_mog_10_on_mnist5k_keeps_at_least_8_components(tmp_path, seed):
    """`pyrovae train --prior mog --prior-components 10 --epochs 100 --seed S`: with the default
    (k-means) start at least 8 of the 10 components hold 1% or more of the test codes."""
    from pyrovae import load_run
    from pyrovae.metrics import component_usage, responsibilities
    from pyrovae.training import prepare_data

    result = train(TrainConfig(prior="mog", prior_components=10, epochs=100, seed=seed, out=str(tmp_path),
                               name="mog"), progress=False)
    run = load_run(result.run_dir)
    test = prepare_data(run.config, "test", "cpu")
    usage = component_usage(responsibilities(run.model, test.images))
    assert usage["components_used"] >= 8, usage


# --- the linear-Gaussian VAE reaches the PPCA optimum ----------------------------------------------------


def _ppca_data(path, n=5000, seed=0):
    """A few strong directions (standard deviations 4, 2, 1, 0.5 in 64 dimensions) and small
    isotropic noise (0.02), scaled into [0, 1]."""
    import numpy as np

    rng = np.random.default_rng(seed)
    W, _ = np.linalg.qr(rng.normal(size=(64, 4)))
    x = (rng.normal(size=(n, 4)) * np.array([4.0, 2.0, 1.0, 0.5])) @ W.T + 0.02 * rng.normal(size=(n, 64))
    np.save(path, ((x - x.min()) / (x.max() - x.min())).astype(np.float32))
    return path


@pytest.mark.slow
def test_linear_gaussian_vae_reaches_the_ppca_optimum(tmp_path):
    """With the defaults for a linear-Gaussian VAE (--lr 0.03), 500 epochs end within 1% of
    PCA(4).score; at the networks' --lr 2e-3 its weakest latent unit stays collapsed at a saddle."""
    from sklearn.decomposition import PCA

    from pyrovae import load_dataset, load_run

    data = _ppca_data(tmp_path / "ppca.npy")
    x = load_dataset(str(data), "train").images
    optimum = PCA(4).fit(x.double().numpy()).score(x.double().numpy())
    common = dict(dataset=str(data), binarize="none", likelihood="gaussian", hidden_dims=(), latent_dim=4,
                  out=str(tmp_path))
    result = train(TrainConfig(**common, epochs=500, name="ppca"), progress=False)
    vae = load_run(result.run_dir, "last").model
    with torch.no_grad():
        reached = float(vae.exact_marginal().log_prob(x).mean())
    assert optimum - reached < 0.01 * abs(optimum), (reached, optimum)
    old = train(TrainConfig(**common, epochs=300, lr=2e-3, name="old"), progress=False)
    with torch.no_grad():
        stalled = float(load_run(old.run_dir, "last").model.exact_marginal().log_prob(x).mean())
    assert optimum - stalled > 0.1 * abs(optimum)  # teeth: the old defaults stall far below


def test_presets_fast_is_the_default_and_flags_override(capsys, tmp_path):
    code, out, err = cli(capsys, "train", "--help")
    assert "--preset" in out and "fast:" in out and "best:" in out
    from pyrovae.config import preset_settings

    fast = TrainConfig.from_dict(preset_settings("fast")).resolved()
    assert fast == TrainConfig().resolved()
    best = TrainConfig.from_dict(preset_settings("best")).resolved()
    assert best != fast
    code, _, err = cli(capsys, "train", "--preset", "best", "--dataset", "digits", "--epochs", "1", "--hidden-dims",
                       "16", "--net", "mlp", "--latent-dim", "4", "--lower-latent-dims", "", "--prior-components",
                       "20", "--out", str(tmp_path), "--name", "b", "--quiet")
    assert code == 0, err
    stored = json.loads((tmp_path / "b" / "config.json").read_text())
    assert stored["epochs"] == 1 and stored["prior"] == best.prior and stored["dataset"] == "digits"
    code, _, err = cli(capsys, "train", "--preset", "huge")
    assert code == 2 and "huge" in err and "fast" in err


def test_quality_study_quick_compares_every_rung_with_the_default(tmp_path):
    from conftest import load_experiment

    study = load_experiment("quality")
    out = tmp_path / "q"
    assert study.main(["--quick", "--quiet", "--out", str(out), "--rows", "default,+vamp,+2-layers,conv,best"]) == 0
    result = json.loads((out / "quality.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    two = rows["+2-layers"]
    assert list(two["report"]["active_units_by_layer"]) == ["z1", "z"]
    base = rows["default"]["report"]["per_example"]["log_px"]
    d = [a - b for a, b in zip(two["report"]["per_example"]["log_px"], base)]
    assert abs(two["log_px_diff"][0] - sum(d) / len(d)) < 1e-9
    assert rows["best"]["settings"]["prior"] == "vamp" and rows["+vamp"]["settings"]["prior_components"] == 20
    assert "| +2-layers |" in (out / "quality.md").read_text()
