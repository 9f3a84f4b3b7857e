r"""The generative model p(z) p(x|z) and the guide q(z|x) as Pyro programs, and the
baselines the notes argue from, behind one small interface.

Model kinds (``--model``), all with ``encode``/``decode``/``sample_codes`` for pictures:

- :class:`VAE`: the VAE of the notes.
- :class:`Autoencoder`: the same networks and model with a point-mass guide and the prior
  masked out, so that training optimises the reconstruction term alone.
- :class:`PCAModel`: scikit-learn's PCA, the linear autoencoder of the notes' section 1.
- :class:`MixtureModel`: the finite mixture :math:`P(x) = \sum_m P(m) P(x|m)` the notes
  start from, with the component enumerated exactly.

Nothing here knows about files or the command line.
"""

from __future__ import annotations

import contextlib

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import config_enumerate
from torch import nn

from .distributions import BernoulliImages
from .flows import InverseAutoregressiveFlow
from .likelihoods import GaussianLikelihood, build_likelihood
from .nets import Decoder, Encoder
from .priors import Prior, build_prior

__all__ = ["VAE", "Autoencoder", "PCAModel", "MixtureModel", "MODEL_KINDS", "build_model"]


class VAE(nn.Module):
    r"""Variational autoencoder (Kingma & Welling 2013) as a Pyro ``model``/``guide`` pair.

    .. math::

        \text{model:}\quad z \sim p(z), \qquad x \mid z \sim p_\theta(x \mid z)

        \text{guide:}\quad q_\phi(z \mid x) = \mathcal{N}\big(m(x), \mathrm{diag}\, e^{2\sigma(x)}\big)

    Both share the site names ``"z"`` and ``"x"`` and a ``pyro.plate("data")`` over the batch
    (dim -1), so any Pyro ELBO can score them, vectorised over particles by an outer plate.
    ``kl_scale`` multiplies :math:`\log p(z) - \log q(z|x)` (KL warm-up; ``poutine.scale``).

    With a ``flow`` (:class:`~pyrovae.flows.InverseAutoregressiveFlow`, ``--guide iaf``) the
    guide's Gaussian is the base of a normalizing flow conditioned on a context the encoder
    also outputs; the model, the site names and everything that reads traces are unchanged.
    """

    kind = "vae"
    #: whether q(z|x) is a density, so that importance-sampling estimates of log p(x) apply
    has_posterior = True

    def __init__(self, encoder: Encoder, decoder: Decoder, prior: Prior, likelihood: nn.Module,
                 flow: InverseAutoregressiveFlow | None = None):
        super().__init__()
        self.encoder, self.decoder, self.prior, self.likelihood = encoder, decoder, prior, likelihood
        self.flow = flow

    # --- the Pyro program ------------------------------------------------------------
    def model(self, x: torch.Tensor, kl_scale: float = 1.0) -> None:
        for name in ("decoder", "prior", "likelihood"):
            pyro.module(name, getattr(self, name))
        with pyro.plate("data", x.shape[0], dim=-1):
            with self._latent_weight(kl_scale):
                z = pyro.sample("z", self.prior.dist())
            pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)

    def guide(self, x: torch.Tensor, kl_scale: float = 1.0) -> None:
        pyro.module("encoder", self.encoder)
        if self.flow is not None:
            pyro.module("flow", self.flow)
        with pyro.plate("data", x.shape[0], dim=-1):
            posterior = self.posterior(x)
            with self._latent_weight(kl_scale):
                pyro.sample("z", posterior)

    def posterior(self, x: torch.Tensor) -> dist.TorchDistribution:
        r""":math:`q(z|x) = \mathcal{N}(m, \mathrm{diag}\, s^2)`, event shape ``(D,)``, or with a flow
        that Gaussian pushed through it (a ``TransformedDistribution``)."""
        loc, log_scale, context = self.encoder.with_context(x)
        base = dist.Normal(loc, log_scale.exp()).to_event(1)
        return base if self.flow is None else self.flow.distribution(base, context)

    def _latent_weight(self, kl_scale: float) -> contextlib.AbstractContextManager:
        return poutine.scale(scale=kl_scale) if kl_scale != 1.0 else contextlib.nullcontext()

    # --- pictures and analysis -----------------------------------------------------------
    @property
    def latent_dim(self) -> int:
        return self.encoder.latent_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The code of x, shape ``(B, D)``: the posterior mean m(x), or with a flow the flow's
        image of it (the point its base mean maps to)."""
        loc, _, context = self.encoder.with_context(x)
        return loc if self.flow is None else self.flow(loc, context)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Pixel means of p(x|z), in [0, 1]."""
        return self.likelihood.mean(self.decoder(z))

    def sample_codes(self, n: int) -> torch.Tensor:
        """n codes from the model's generative distribution over z (here the prior)."""
        return self.prior.dist().sample((n,))

    def exact_marginal(self) -> dist.TorchDistribution | None:
        r"""p(x) in closed form where it exists, else ``None``.

        With linear encoder/decoder maps and a Gaussian likelihood, the decoder is
        :math:`x = Wz + b + \epsilon`, :math:`\epsilon \sim \mathcal{N}(0, \mathrm{diag}\,\sigma_x^2)`,
        and every prior here is a Gaussian mixture, so

        .. math:: p(x) = \sum_k \pi_k\, \mathcal{N}(x;\, W\mu_k + b,\; W \Sigma_k W^\top + \mathrm{diag}\,\sigma_x^2)

        (probabilistic PCA for the standard prior; Tipping & Bishop 1999). Built as a
        ``LowRankMultivariateNormal`` (mixture), so its ``log_prob`` costs O(D d^2).
        """
        maps = self.decoder.linear_maps
        if len(maps) != 1 or not isinstance(self.likelihood, GaussianLikelihood):
            return None
        W, b = maps[0].weight, maps[0].bias  # (D, d), (D,)
        logits, loc, scale = self.prior.mixture()  # (K,), (K, d), (K, d)
        sigma_x = self.likelihood.scale.expand(b.shape)
        components = dist.LowRankMultivariateNormal(
            loc=loc @ W.T + b,  # (K, D)
            cov_factor=W.unsqueeze(0) * scale.unsqueeze(1),  # (K, D, d)
            cov_diag=(sigma_x**2).expand(loc.shape[0], -1),
        )
        if logits.shape[0] == 1:
            return dist.LowRankMultivariateNormal(components.loc[0], components.cov_factor[0], components.cov_diag[0])
        return dist.MixtureSameFamily(dist.Categorical(logits=logits), components)

    @classmethod
    def from_config(cls, config, *, data_dim: int, train_images: torch.Tensor | None = None) -> "VAE":
        iaf = getattr(config, "guide", "gaussian") == "iaf"
        context_dim = config.flow_context_dim if iaf else 0
        encoder = Encoder(data_dim, config.hidden_dims, config.latent_dim, config.activation, context_dim)
        decoder = Decoder(config.latent_dim, config.hidden_dims, data_dim, config.activation)
        prior = build_prior(config, latent_dim=config.latent_dim, encoder=encoder, train_images=train_images)
        flow = (InverseAutoregressiveFlow(config.latent_dim, context_dim, config.flow_steps, config.flow_hidden_dims)
                if iaf else None)
        return cls(encoder, decoder, prior, build_likelihood(config.likelihood, data_dim, config.likelihood_scale),
                   flow)


class Autoencoder(VAE):
    r"""Deterministic autoencoder: the VAE's model with a point-mass guide
    :math:`q(z|x) = \delta(z - m(x))` and :math:`\log p(z)` masked out, so that
    :math:`\mathrm{ELBO} = \log p(x \mid m(x))`, the reconstruction term alone.

    It has no generative distribution of its own; :meth:`sample_codes` draws from the
    Gaussian fitted to the training codes (:meth:`fit_code_distribution`), the fairest
    generative use of its code space.
    """

    kind = "ae"
    has_posterior = False

    def __init__(self, encoder, decoder, prior, likelihood, flow=None):
        if flow is not None:
            raise ValueError("--guide iaf applies to --model vae only: an autoencoder has a point-mass guide")
        super().__init__(encoder, decoder, prior, likelihood)
        d = encoder.latent_dim
        self.register_buffer("code_loc", torch.zeros(d))
        self.register_buffer("code_scale_tril", torch.eye(d))

    def posterior(self, x):
        return dist.Delta(self.encode(x)).to_event(1)

    def _latent_weight(self, kl_scale):
        return poutine.mask(mask=False)

    def sample_codes(self, n):
        return dist.MultivariateNormal(self.code_loc, scale_tril=self.code_scale_tril).sample((n,))

    @torch.no_grad()
    def fit_code_distribution(self, images: torch.Tensor) -> None:
        """Fit N(mean, cov) to the codes of ``images`` (the training split)."""
        codes = torch.cat([self.encode(chunk) for chunk in images.split(4096)]).double()
        cov = torch.cov(codes.T).reshape(codes.shape[1], codes.shape[1])
        eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
        cov = cov + 1e-6 * cov.diagonal().mean().clamp_min(1e-12) * eye
        self.code_loc.copy_(codes.mean(0))
        self.code_scale_tril.copy_(torch.linalg.cholesky(cov))


class PCAModel(nn.Module):
    r"""PCA (scikit-learn) as a linear autoencoder: code :math:`c = V(x - \bar{x})`,
    reconstruction :math:`\hat{x} = V^\top c + \bar{x}`.

    Its probabilistic reading (PPCA, Tipping & Bishop 1999) gives the exact density
    :math:`p(x) = \mathcal{N}(\bar{x}, W W^\top + \sigma^2 I)`, reported for grey data.
    Codes are sampled from :math:`\mathcal{N}(0, \mathrm{diag}\,\lambda)`, the Gaussian
    fitted to the training codes.
    """

    kind = "pca"
    has_posterior = False

    def __init__(self, latent_dim: int, data_dim: int, gaussian: bool = True):
        super().__init__()
        self.register_buffer("mean", torch.zeros(data_dim))
        self.register_buffer("components", torch.zeros(latent_dim, data_dim))
        self.register_buffer("explained_variance", torch.ones(latent_dim))
        self.register_buffer("noise_variance", torch.ones(()))
        self.gaussian = gaussian

    @property
    def latent_dim(self) -> int:
        return self.components.shape[0]

    def fit(self, images: torch.Tensor, seed: int = 0) -> "PCAModel":
        from sklearn.decomposition import PCA

        if images.shape[0] <= self.latent_dim:
            raise ValueError(
                f"--model pca with --latent-dim {self.latent_dim} needs more than {self.latent_dim} training examples"
            )
        pca = PCA(n_components=self.latent_dim, random_state=seed).fit(images.double().cpu().numpy())
        for name, value in [
            ("mean", pca.mean_),
            ("components", pca.components_),
            ("explained_variance", pca.explained_variance_),
            ("noise_variance", pca.noise_variance_),
        ]:
            buf = getattr(self, name)
            buf.copy_(torch.as_tensor(value, dtype=buf.dtype).reshape(buf.shape))
        return self

    def encode(self, x):
        return (x - self.mean) @ self.components.T

    def decode(self, z):
        return (z @ self.components + self.mean).clamp(0.0, 1.0)

    def sample_codes(self, n):
        return torch.randn(n, self.latent_dim, device=self.mean.device) * self.explained_variance.sqrt()

    def exact_marginal(self):
        if not self.gaussian:
            return None
        sigma2 = self.noise_variance.clamp_min(1e-12)
        factor = self.components.T * (self.explained_variance - sigma2).clamp_min(0).sqrt()
        return dist.LowRankMultivariateNormal(self.mean, factor, sigma2.expand_as(self.mean))

    @classmethod
    def from_config(cls, config, *, data_dim, train_images=None):
        model = cls(config.latent_dim, data_dim, gaussian=config.likelihood == "gaussian")
        return model if train_images is None else model.fit(train_images, seed=config.seed)


class MixtureModel(nn.Module):
    r"""The finite mixture the notes start from (NOTES.md section 3):

    .. math:: P(x) = \sum_{m=1}^{K} P(m)\, P(x \mid m), \qquad m \sim \mathrm{Categorical}(\mathrm{softmax}\,\alpha)

    with :math:`P(x|m)` a product of Bernoulli pixels with logits :math:`\theta_m` (Gaussian
    pixels :math:`\mathcal{N}(\theta_m, \sigma^2)` for grey data). The model's ``"m"`` site is
    enumerated (``config_enumerate`` + ``TraceEnum_ELBO``), so the guide is empty and the
    loss is :math:`-\sum_x \log P(x)` itself, exactly; SVI then does gradient ascent on the
    likelihood that EM climbs by coordinate steps (both stop at its stationary points).
    Components start at K distinct training images, softened to :math:`0.25 + 0.5x`.
    """

    kind = "mixture"
    has_posterior = False

    def __init__(self, num_components: int, data_dim: int, likelihood: nn.Module,
                 init_images: torch.Tensor | None = None, seed: int = 0):
        super().__init__()
        if num_components < 1:
            raise ValueError(f"--prior-components must be at least 1 (got {num_components})")
        self.likelihood = likelihood
        self.logits = nn.Parameter(torch.zeros(num_components))
        gen = torch.Generator().manual_seed(seed)
        if init_images is None:
            params = torch.zeros(num_components, data_dim)
        else:
            n = init_images.shape[0]
            if n < num_components:
                raise ValueError(
                    f"--model mixture with --prior-components {num_components} is initialised from as many "
                    f"training images, the training split has {n}: use --prior-components {n} or fewer"
                )
            x = init_images[torch.randperm(n, generator=gen)[:num_components].to(init_images.device)].float().cpu()
            # start each component at a softened training image, to break the symmetry
            params = torch.logit(0.25 + 0.5 * x) if not isinstance(likelihood, GaussianLikelihood) else x
        self.params = nn.Parameter(params)

    @property
    def num_components(self) -> int:
        return self.logits.shape[0]

    def components(self, params: torch.Tensor | None = None) -> dist.TorchDistribution:
        r""":math:`P(x \mid m)` for the rows of ``params`` (default: all K), event shape ``(D,)``."""
        params = self.params if params is None else params
        if isinstance(self.likelihood, GaussianLikelihood):
            return self.likelihood(params)
        return BernoulliImages(params)

    @config_enumerate
    def model(self, x: torch.Tensor, kl_scale: float = 1.0) -> None:
        pyro.module("mixture", self)
        with pyro.plate("data", x.shape[0], dim=-1):
            m = pyro.sample("m", dist.Categorical(logits=self.logits))
            pyro.sample("x", self.components(self.params[m]), obs=x)

    def guide(self, x: torch.Tensor, kl_scale: float = 1.0) -> None:
        pyro.module("mixture", self)  # m is summed out exactly: nothing to sample

    def exact_marginal(self) -> dist.TorchDistribution:
        r""":math:`P(x)` as a ``MixtureSameFamily``; its ``log_prob`` is exact."""
        return dist.MixtureSameFamily(dist.Categorical(logits=self.logits), self.components())

    def log_responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`\log P(m | x)`, shape ``(B, K)``."""
        log_joint = self.components().log_prob(x.unsqueeze(-2)) + self.logits.log_softmax(-1)
        return log_joint - log_joint.logsumexp(-1, keepdim=True)

    def encode(self, x):
        """The most probable component of each x, shape ``(B,)``."""
        return self.log_responsibilities(x).argmax(-1)

    def decode(self, m):
        return self.likelihood.mean(self.params[m])

    def sample_codes(self, n):
        return dist.Categorical(logits=self.logits).sample((n,))

    @classmethod
    def from_config(cls, config, *, data_dim, train_images=None):
        likelihood = build_likelihood(config.likelihood, data_dim, config.likelihood_scale)
        return cls(config.prior_components, data_dim, likelihood, train_images, config.seed)


MODEL_KINDS: dict[str, type[nn.Module]] = {
    "vae": VAE,
    "ae": Autoencoder,
    "pca": PCAModel,
    "mixture": MixtureModel,
}


def build_model(config, *, data_dim: int, train_images: torch.Tensor | None = None) -> nn.Module:
    """The model named by ``config.model``; ``train_images=None`` builds shapes only (for loading)."""
    if config.model not in MODEL_KINDS:
        raise ValueError(f"--model must be one of {', '.join(MODEL_KINDS)} (got {config.model!r})")
    return MODEL_KINDS[config.model].from_config(config, data_dim=data_dim, train_images=train_images)
