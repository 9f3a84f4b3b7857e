r"""Priors and the finite mixture, checked against the maths.

- a mixture of identical N(0, I) components is the standard prior: same ELBO, same seed;
- the VampPrior's log p(z) is (1/K) sum_k q(z | u_k), computed here from the encoder by hand;
- a linear-Gaussian VAE with a mixture prior is a Gaussian mixture in x: its exact marginal
  against the formula, and the importance-sampling estimate against both;
- the finite mixture's TraceEnum_ELBO loss is -sum log p(x) by brute force;
- k-means initialisation switches the prior after the init epochs, and recovers clusters;
- K = 512 trains; checkpoints resume bit-for-bit with every prior; bad settings exit 2.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import interrupted_at
from pyro.infer import Trace_ELBO, TraceEnum_ELBO

import pyrovae.training as training
from pyrovae import TrainConfig, estimate_log_px, load_run, train
from pyrovae.cli import main
from pyrovae.marginal import isolated_params
from pyrovae.metrics import cluster_scores, evaluate, responsibilities
from pyrovae.model import build_model
from pyrovae.priors import PRIORS, MixtureOfGaussiansPrior
from pyrovae.runs import load_checkpoint, read_metrics

LOG_2PI = math.log(2 * math.pi)


def _log_normal(z, loc, scale):
    """log N(z; loc, diag scale^2) summed over the last dim, written out (float64)."""
    z, loc, scale = z.double(), loc.double(), scale.double()
    return (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - 0.5 * LOG_2PI).sum(-1)


# --- the prior densities -----------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3])
def test_mixture_of_identical_standard_components_gives_the_standard_elbo(k):
    """A MoG whose K components are all N(0, I) is N(0, I), whatever its weights; K = 1 takes
    the single-Gaussian path, K = 3 the MixtureSameFamily one."""
    common = dict(hidden_dims=(16,), latent_dim=4)
    std = build_model(TrainConfig(**common).resolved(), data_dim=30)
    mog = build_model(TrainConfig(**common, prior="mog", prior_components=k, prior_init="random").resolved(),
                      data_dim=30)
    mog.encoder.load_state_dict(std.encoder.state_dict())
    mog.decoder.load_state_dict(std.decoder.state_dict())
    with torch.no_grad():
        mog.prior.loc.zero_()
        mog.prior.log_scale.zero_()
        mog.prior.logits.copy_(torch.randn(k))
    x = torch.bernoulli(torch.full((10, 30), 0.3))

    def loss(vae, seed):
        pyro.set_rng_seed(seed)
        with isolated_params():
            elbo = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
            return elbo.loss(vae.model, vae.guide, x)

    for seed in (0, 1):
        assert loss(mog, seed) == pytest.approx(loss(std, seed), rel=1e-6, abs=1e-4)
    with torch.no_grad():
        mog.prior.loc[0, 0] = 0.5  # one component moved: the ELBO must change (the test has teeth)
    assert abs(loss(mog, 0) - loss(std, 0)) > 1e-2


def test_mog_log_prob_and_responsibilities_are_the_mixture_formula():
    prior = MixtureOfGaussiansPrior(latent_dim=3, num_components=5, seed=1)
    with torch.no_grad():
        prior.log_scale.copy_(0.3 * torch.randn(5, 3))
        prior.logits.copy_(torch.randn(5))
    z = 2 * torch.randn(8, 3)
    log_pi = prior.logits.double().log_softmax(-1)
    log_joint = _log_normal(z[:, None, :], prior.loc, prior.log_scale.exp()) + log_pi  # (8, 5)
    direct = log_joint.logsumexp(-1)
    assert torch.allclose(prior.dist().log_prob(z).double(), direct, atol=1e-5)
    assert torch.allclose(prior.log_responsibilities(z).double(), log_joint - direct[:, None], atol=1e-5)


def test_vamp_prior_log_prob_is_the_mean_of_the_encoder_posteriors():
    r""":math:`\log p(z) = \operatorname{logsumexp}_k \log \mathcal{N}(z; m(u_k), s(u_k)^2) - \log K`,
    with m, s the encoder's outputs at the pseudo-inputs, computed here by hand."""
    cfg = TrainConfig(hidden_dims=(16,), latent_dim=3, prior="vamp", prior_components=7, prior_init="noise").resolved()
    vae = build_model(cfg, data_dim=12, train_images=torch.rand(20, 12))
    z = 2 * torch.randn(9, 3)
    u = vae.prior.pseudo_inputs
    assert u.shape == (7, 12) and bool(((u > 0) & (u < 1)).all())  # in data space
    loc, log_scale = vae.encoder(u)  # (K, D)
    direct = _log_normal(z[:, None, :], loc, log_scale.exp()).logsumexp(-1) - math.log(7)
    log_p = vae.prior.dist().log_prob(z)
    assert torch.allclose(log_p.double(), direct, atol=1e-5)
    # p(z) moves with the encoder and with the pseudo-inputs
    log_p.sum().backward()
    assert vae.encoder.linear_maps[0].weight.grad.abs().sum() > 0
    assert vae.prior.pseudo_logits.grad.abs().sum() > 0


def test_vamp_pseudo_inputs_start_at_distinct_training_images_and_can_move():
    """Binary training images sit where a hard tanh has zero gradient; ours must still move."""
    images = torch.bernoulli(torch.full((30, 12), 0.5))
    cfg = TrainConfig(hidden_dims=(16,), latent_dim=3, prior="vamp", prior_components=10).resolved()
    vae = build_model(cfg, data_dim=12, train_images=images)
    u = vae.prior.pseudo_inputs.detach()
    back = ((u - 0.05) / 0.9).round()  # undo the documented margin
    assert all(bool((back[i] == images).all(-1).any()) for i in range(10))
    assert torch.unique(back, dim=0).shape[0] == 10
    vae.prior.dist().log_prob(torch.randn(5, 3)).sum().backward()
    assert bool((vae.prior.pseudo_logits.grad != 0).all())


# --- exact marginals ---------------------------------------------------------------------


def _linear_gaussian_vae(prior: str, k: int, data_dim=6, latent_dim=2, seed=0):
    """A linear-Gaussian VAE with a well-spread mixture prior and an encoder close to the
    posterior, so that importance sampling converges but its weights still vary."""
    cfg = TrainConfig(hidden_dims=(), latent_dim=latent_dim, likelihood="gaussian", prior=prior,
                      prior_components=k, prior_init={"vamp": "noise", "mog": "random"}.get(prior, "auto")).resolved()
    vae = build_model(cfg, data_dim=data_dim, train_images=torch.rand(50, data_dim))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vae.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        vae.likelihood.log_scale.fill_(math.log(0.6))
        if prior == "mog":
            vae.prior.loc.mul_(1.5)
            vae.prior.log_scale.mul_(0.3)
        W, b = vae.decoder.linear_maps[0].weight.double(), vae.decoder.linear_maps[0].bias.double()
        s2 = float(vae.likelihood.scale) ** 2
        # encoder: the posterior under N(0, I), widened 1.5x to cover a mixture's modes
        M = W.T @ W + s2 * torch.eye(latent_dim, dtype=torch.float64)
        A = torch.linalg.solve(M, W.T)  # (d, D)
        enc = vae.encoder.linear_maps[0]
        enc.weight.zero_()
        enc.bias.zero_()
        enc.weight[:latent_dim] = A.float()
        enc.bias[:latent_dim] = (-A @ b).float()
        enc.bias[latent_dim:] = (1.5 * (s2 * torch.linalg.inv(M).diagonal()).sqrt()).log().float()
    return vae


@torch.no_grad()
def _direct_log_px(vae, x):
    r""":math:`\log \sum_k \pi_k \mathcal{N}(x; W\mu_k + b, W \Sigma_k W^\top + \sigma^2 I)` in float64."""
    W, b = vae.decoder.linear_maps[0].weight.double(), vae.decoder.linear_maps[0].bias.double()
    s2 = float(vae.likelihood.scale) ** 2
    logits, loc, scale = (t.double() for t in vae.prior.mixture())
    eye = torch.eye(W.shape[0], dtype=torch.float64)
    per_k = torch.stack([
        dist.MultivariateNormal(W @ loc[k] + b, W @ torch.diag(scale[k] ** 2) @ W.T + s2 * eye).log_prob(x.double())
        for k in range(loc.shape[0])
    ], -1)
    return (per_k + logits.log_softmax(-1)).logsumexp(-1)


@pytest.mark.parametrize("prior, k", [("mog", 4), ("vamp", 3), ("standard", 1)])
def test_linear_gaussian_marginal_is_the_gaussian_mixture_and_importance_sampling_agrees(prior, k):
    r"""``exact_marginal()`` against the formula, then ``estimate_log_px`` against it.

    SE is the Monte Carlo standard error of one example's estimate
    :math:`\log \hat p(x) = \log \frac1K \sum_k w_k` (delta method):
    :math:`\mathrm{SE} = \sqrt{\mathrm{Var}(w)/K} / \bar w = \sqrt{(K/\mathrm{ESS} - 1)/K}`,
    from the estimator's own weights (``ESS`` = :math:`(\sum w)^2 / \sum w^2`). Its bias,
    about :math:`-\mathrm{SE}^2/2`, is far below SE here. (Not the ``log_px_se`` of reports,
    which is the spread of log p(x) over examples.)
    """
    vae = _linear_gaussian_vae(prior, k)
    torch.manual_seed(1)
    with torch.no_grad():
        z = vae.prior.dist().sample((12,))
        x = vae.likelihood(vae.decoder(z)).sample()  # data from the model itself
    exact = vae.exact_marginal().log_prob(x).double()
    direct = _direct_log_px(vae, x)
    assert torch.allclose(exact, direct, atol=1e-4)

    num_samples = 20000
    est = estimate_log_px(vae, x, num_samples=num_samples, batch_size=12)
    se = ((num_samples / est.ess - 1).clamp_min(0) / num_samples).sqrt()
    err = est.log_px - direct
    if prior != "standard":  # the posterior of a mixture prior is no Gaussian: q is not exact
        assert float(se.min()) > 1e-4
    assert float(se.max()) < 0.05  # tight enough to catch a wrong density
    # the mean error over the examples within 3 of its SEs; each example within 4 of its own
    # (with 12 independent examples, one beyond 3 SE is a 3% event, one beyond 4 SE is not)
    assert abs(float(err.mean())) < 3 * float(se.pow(2).sum().sqrt()) / len(se)
    assert bool((err.abs() < 4 * se).all()), (err / se).tolist()
    assert float(est.pareto_k.max()) < 0.7


# --- the finite mixture --------------------------------------------------------------------


def _mixture(likelihood: str, k=4, data_dim=9, seed=0):
    cfg = TrainConfig(model="mixture", prior_components=k, likelihood=likelihood).resolved()
    images = torch.rand(20, data_dim) if likelihood == "gaussian" else torch.bernoulli(torch.full((20, data_dim), 0.4))
    model = build_model(cfg, data_dim=data_dim, train_images=images)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.logits.copy_(torch.randn(k, generator=g))
        model.params.copy_(2 * torch.randn(model.params.shape, generator=g))
    return model


@torch.no_grad()
def _brute_force_log_px(model, x):
    """log sum_m pi_m prod_d p(x_d | m), looping over components, float64, densities by hand."""
    log_pi = model.logits.double().log_softmax(-1)
    theta = model.params.double()
    x = x.double()
    terms = []
    for m in range(model.num_components):
        if model.likelihood.__class__.__name__ == "GaussianLikelihood":
            s = model.likelihood.scale.double()
            log_lik = (-0.5 * ((x - theta[m]) / s) ** 2 - s.log() - 0.5 * LOG_2PI).sum(-1)
        else:
            p = torch.sigmoid(theta[m])
            log_lik = (x * p.log() + (1 - x) * (1 - p).log()).sum(-1)
        terms.append(log_pi[m] + log_lik)
    return torch.stack(terms, -1).logsumexp(-1)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_finite_mixture_enumerated_loss_is_minus_log_px(likelihood):
    model = _mixture(likelihood)
    x = torch.rand(7, 9) if likelihood == "gaussian" else torch.bernoulli(torch.full((7, 9), 0.5))
    brute = _brute_force_log_px(model, x)
    with isolated_params():
        loss = TraceEnum_ELBO(max_plate_nesting=1).loss(model.model, model.guide, x)
    assert loss == pytest.approx(-float(brute.sum()), rel=1e-5)
    assert torch.allclose(model.exact_marginal().log_prob(x).double(), brute, atol=1e-4)
    # posterior responsibilities by Bayes' rule, and log p(x) = E_r log p(x|m) - KL(r || pi)
    report = evaluate(model, x)
    assert report["log_px"] == pytest.approx(float(brute.mean()), abs=1e-4)
    assert report["recon"] - report["kl"] == pytest.approx(report["log_px"], abs=1e-4)
    assert report["exact_log_px"] == pytest.approx(report["log_px"], abs=1e-4)


def test_bernoulli_images_density_is_pyros_bernoulli():
    """The matmul form of the Bernoulli image density, under the broadcasts enumeration uses."""
    model = _mixture("bernoulli", k=5)
    x = torch.bernoulli(torch.full((6, 9), 0.5))
    ours = model.components().log_prob(x.unsqueeze(-2))  # (6, 5)
    pyros = dist.Bernoulli(logits=model.params).to_event(1).log_prob(x.unsqueeze(-2))
    assert ours.shape == (6, 5) and torch.allclose(ours, pyros, atol=1e-5)
    m = torch.arange(5).unsqueeze(-1)  # an enumerated site's values, (K, 1)
    ours = model.components(model.params[m]).expand((5, 6)).log_prob(x)
    assert ours.shape == (5, 6) and torch.allclose(ours, pyros.T, atol=1e-5)


# --- clustering scores -------------------------------------------------------------------------


def test_cluster_scores_match_components_to_classes():
    labels = torch.arange(10).repeat(30)
    perm = torch.randperm(10)
    assert cluster_scores(labels, perm[labels], 10) == pytest.approx({"cluster_accuracy": 1.0, "nmi": 1.0})
    # K > classes: two components per class is still a perfect many-to-one clustering
    split = labels * 2 + (torch.arange(300) % 2)
    assert cluster_scores(labels, split, 20)["cluster_accuracy"] == 1.0
    # K < classes: at most K classes can be matched one-to-one
    assert cluster_scores(labels, labels % 5, 5)["cluster_accuracy"] == pytest.approx(0.5)


# --- k-means initialisation -----------------------------------------------------------------


def test_kmeans_init_recovers_clusters_of_the_codes():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[-6.0, 0.0], [0.0, 6.0], [6.0, -2.0]])
    sizes = [300, 200, 100]
    spread = torch.tensor([[0.5, 1.0], [1.5, 0.3], [0.8, 0.8]])
    codes = torch.cat([centres[i] + spread[i] * torch.randn(n, 2, generator=g) for i, n in enumerate(sizes)])
    prior = MixtureOfGaussiansPrior(latent_dim=2, num_components=3, init="kmeans", init_epochs=2)
    for epoch in (0, 1):
        prior.before_epoch(epoch, lambda: codes)
        logits, loc, scale = prior.mixture()
        assert logits.shape == (1,) and torch.equal(loc, torch.zeros(1, 2)) and torch.equal(scale, torch.ones(1, 2))
    prior.before_epoch(2, lambda: codes)
    logits, loc, scale = prior.mixture()
    order = loc[:, 0].argsort()
    assert torch.allclose(loc[order], centres, atol=0.2)
    assert torch.allclose(scale[order], spread, rtol=0.15)
    assert torch.allclose(logits[order].softmax(-1), torch.tensor(sizes) / 600.0, atol=0.01)
    before = loc.clone()
    prior.before_epoch(3, lambda: codes + 100)  # fitted once, never again
    assert torch.equal(prior.mixture()[1], before)


def test_kmeans_needs_as_many_codes_as_components():
    prior = MixtureOfGaussiansPrior(latent_dim=2, num_components=5, init="kmeans", init_epochs=0)
    with pytest.raises(ValueError, match="needs at least 5 training examples"):
        prior.before_epoch(0, lambda: torch.randn(4, 2))


def test_kmeans_switches_the_prior_after_the_init_epochs_in_training(tmp_path):
    cfg = _tiny(tmp_path, "k", prior="mog", prior_components=10, prior_init="kmeans", prior_init_epochs=2, epochs=2)
    train(cfg, progress=False)
    run = load_run(tmp_path / "k", which="last")
    assert not bool(run.model.prior.fitted) and run.model.prior.num_components == 1
    images = training.prepare_data(run.config, "test", "cpu").images
    assert responsibilities(run.model, images) is None  # a single Gaussian: nothing to cluster
    train(dataclass_replace(cfg, epochs=3), resume=tmp_path / "k", progress=False)
    run = load_run(tmp_path / "k", which="last")
    assert bool(run.model.prior.fitted) and run.model.prior.num_components == 10
    resp = responsibilities(run.model, images)
    assert resp.shape == (len(images), 10) and torch.allclose(resp.sum(1), torch.ones(len(images)), atol=1e-5)
    assert (resp.mean(0) > 0.01).sum() >= 5  # k-means spread the codes over the components
    rows = read_metrics(tmp_path / "k" / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3]


# --- training and checkpoints with every prior -------------------------------------------------


def dataclass_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def _tiny(tmp_path, name, **kw) -> TrainConfig:
    settings = dict(dataset="digits", hidden_dims=(32,), latent_dim=4, epochs=3, batch_size=256, out=str(tmp_path),
                    name=name, seed=1)
    settings.update(kw)
    return TrainConfig(**settings)


EVERY_PRIOR = [
    dict(prior="standard"),
    dict(prior="mog", prior_components=5, prior_init="random"),
    dict(prior="mog", prior_components=5, prior_init="kmeans", prior_init_epochs=2),  # k-means right after resume
    dict(prior="vamp", prior_components=6),
    dict(prior="vamp", prior_components=6, prior_init="noise", elbo="iwae", num_particles=3),
    dict(model="mixture", prior_components=8),
    # flow guides (tests/test_flows.py): with KL warm-up, and with the VampPrior under the IWAE bound
    dict(prior="standard", guide="iaf", flow_hidden_dims=(16,), flow_context_dim=8, warmup_epochs=2),
    dict(prior="vamp", prior_components=6, guide="iaf", flow_hidden_dims=(16,), elbo="iwae", num_particles=3),
]


@pytest.mark.parametrize("settings", EVERY_PRIOR, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_resume_with_every_prior_gives_the_uninterrupted_run(tmp_path, monkeypatch, settings):
    straight = train(_tiny(tmp_path, "straight", **settings), progress=False)
    with interrupted_at(2):
        train(_tiny(tmp_path, "split", **settings), progress=False)
    resumed = train(_tiny(tmp_path, "split", **settings), resume=tmp_path / "split", progress=False)
    p1 = load_checkpoint(straight.run_dir / "last.pt")["model"]
    p2 = load_checkpoint(resumed.run_dir / "last.pt")["model"]
    assert p1.keys() == p2.keys()
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    strip = lambda p: [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in read_metrics(p)]  # noqa: E731
    assert strip(straight.run_dir / "metrics.jsonl") == strip(resumed.run_dir / "metrics.jsonl")
    # the loaded run scores like the trained one, sampling included
    run = load_run(resumed.run_dir, which="last")
    assert straight.test["elbo"] == pytest.approx(resumed.test["elbo"], rel=1e-6)
    with isolated_params():
        codes = run.model.sample_codes(5)
        assert torch.isfinite(run.model.decode(codes)).all()


@pytest.mark.parametrize("settings", [
    dict(prior="mog", prior_components=512, prior_init="random", hidden_dims=(100,), latent_dim=10),
    dict(model="mixture", prior_components=512),
    pytest.param(dict(prior="vamp", prior_components=500, hidden_dims=(100,), latent_dim=10), marks=pytest.mark.slow),
], ids=["mog-512", "mixture-512", "vamp-500"])
def test_512_components_train_on_mnist5k_without_nan(tmp_path, settings):
    result = train(TrainConfig(epochs=2, out=str(tmp_path), name="big", **settings), progress=False)
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    assert all(math.isfinite(r["train_elbo"]) and math.isfinite(r["val_elbo"]) for r in rows)
    assert rows[1]["val_elbo"] > rows[0]["val_elbo"]
    run = load_run(result.run_dir)
    assert all(bool(torch.isfinite(t).all()) for t in run.model.state_dict().values())
    assert math.isfinite(result.test["elbo"])


# --- bad settings ------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--prior", "vamp", "--prior-components", "0"], "--prior-components must be at least 1"),
    (["--model", "mixture", "--prior-components", "-3"], "--prior-components must be at least 1"),
    (["--dataset", "digits", "--model", "mixture", "--prior-components", "1500"],
     "--prior-components 1437 or fewer"),
    (["--dataset", "digits", "--prior", "vamp", "--prior-components", "1438"], "use --prior-components 1437 or fewer"),
    (["--dataset", "digits", "--prior", "mog", "--prior-init", "kmeans", "--prior-components", "1438"],
     "the training split has 1437"),
    (["--prior", "mog", "--prior-init", "noise"], "--prior-init noise does not apply to --prior mog"),
    (["--model", "mixture", "--prior", "vamp"], "--model mixture has no latent code"),
])
def test_bad_prior_settings_are_one_line_and_exit_2(capsys, tmp_path, args, message):
    code = main(["train", *args, "--out", str(tmp_path), "--epochs", "1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyrovae train: error:"), err
    assert message in lines[0]
    assert not any(tmp_path.iterdir())


def test_every_registered_prior_is_a_cli_choice(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "{" + ",".join(PRIORS) + "}" in out


def test_a_prior_that_is_not_a_mixture_trains_and_is_scored_by_is_ais_and_quadrature(tmp_path, monkeypatch):
    """The documented way to add a prior that is not a mixture (``is_mixture = False`` and :meth:`dist`): a product
    of Laplace densities trains, and importance sampling, AIS and quadrature (2-D code) agree on its log p(x)."""
    import pyro.distributions as pdist

    from pyrovae import TrainConfig, estimate_log_px, load_dataset, load_run, train
    from pyrovae.ais import ais_log_px
    from pyrovae.data import static_binarized
    from pyrovae.marginal import isolated_params
    from pyrovae.priors import PRIORS, Prior
    from pyrovae.quadrature import quadrature_log_px

    class Laplace(Prior):
        is_mixture = False

        def __init__(self, latent_dim):
            super().__init__()
            self.register_buffer("loc", torch.zeros(latent_dim))
            self.register_buffer("scale", torch.ones(latent_dim))

        def dist(self):
            return pdist.Laplace(self.loc, self.scale).to_event(1)

        @classmethod
        def from_config(cls, config, *, latent_dim, encoder, train_images):
            return cls(latent_dim)

    monkeypatch.setitem(PRIORS, "laplace", Laplace)
    result = train(TrainConfig(dataset="digits", prior="laplace", hidden_dims=(32,), latent_dim=2, epochs=8,
                               out=str(tmp_path), name="lap", no_tensorboard=True), progress=False)
    run = load_run(result.run_dir)
    assert isinstance(run.model.prior, Laplace) and run.model.prior.num_components == 1
    x = static_binarized(load_dataset("digits", "test")).images[:20]
    with isolated_params():
        est = estimate_log_px(run.model, x, 2000, seed=0)
        ais = ais_log_px(run.model, x, num_steps=100, num_chains=4, seed=0)
        exact = quadrature_log_px(run.model, x, resolution=128)
    assert float((est.log_px - est.elbo).min()) > 0  # IS above the ELBO, per image
    assert abs(float((est.log_px.double() - exact).mean())) < 0.05
    assert abs(float((ais.log_px.double() - exact).mean())) < 0.2


def test_components_used_counts_a_tenth_of_an_even_share_whatever_k():
    """One rule for training's val_components_used and evaluate's report: component k is in use while
    its mean responsibility is at least 1/(10K). K = 500 evenly used components all count (a fixed 1%
    would count none), and a component below the line is left out."""
    from pyrovae.metrics import COMPONENT_SHARE, component_usage

    even = component_usage(torch.full((7, 500), 1 / 500))
    assert even["components_used"] == 500 and even["threshold"] == pytest.approx(COMPONENT_SHARE / 500)
    assert even["usage_perplexity"] == pytest.approx(500)
    # K = 4: the line is 0.025; masses 0.70, 0.26, 0.03, 0.01 -> three in use
    resp = torch.tensor([[0.70, 0.26, 0.03, 0.01]]).expand(3, 4)
    assert component_usage(resp)["components_used"] == 3
    assert component_usage(resp, share=0.5)["components_used"] == 2  # line 0.125


def test_the_report_names_the_line_the_count_uses(monkeypatch):
    """evaluate's printed label is made from COMPONENT_SHARE, so it cannot drift from the rule."""
    from pyrovae import metrics

    report = {"components": {**metrics.component_usage(torch.full((2, 4), 0.25)), "num_components": 4}}
    assert "components used (mass >= 0.1/K)" in metrics.format_report(report)
    monkeypatch.setattr(metrics, "COMPONENT_SHARE", 0.5)
    assert "components used (mass >= 0.5/K)" in metrics.format_report(report)


def test_training_and_evaluate_count_the_same_components(tmp_path):
    """The last epoch's val_components_used in metrics.jsonl equals evaluate's count on the same
    validation images with the same weights (K = 300: an even share is 0.33%, so a fixed 1% line counts
    none of them)."""
    result = train(TrainConfig(dataset="digits", prior="vamp", prior_components=300, hidden_dims=(32,), latent_dim=4,
                               epochs=2, out=str(tmp_path), name="v", no_tensorboard=True), progress=False)
    run = load_run(result.run_dir, which="last")
    val = training.prepare_data(run.config, "val", "cpu").images
    counted = training.components_in_use(run.model, val)
    reported = evaluate(run.model, val, num_samples=2, seed=0)["components"]["components_used"]
    assert counted > 200
    assert counted == reported == read_metrics(result.run_dir / "metrics.jsonl")[-1]["val_components_used"]
