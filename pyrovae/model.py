r"""The generative model p(z) p(x|z) and the guide q(z|x) as Pyro programs, and the
baselines the notes argue from, behind one small interface.

Model kinds (``--model``), all with ``encode``/``decode``/``sample_codes`` for pictures:

- :class:`VAE`: the VAE of the notes (with ``--lower-latent-dims``, Burda et al.'s stack), or
  :class:`TwoLevelVAE`, the VampPrior paper's two-level model (``--hierarchy two-level``).
- :class:`Autoencoder`: the same networks and model with a point-mass guide and the prior
  masked out, so that training optimises the reconstruction term alone.
- :class:`PCAModel`: scikit-learn's PCA, the linear autoencoder of the notes' section 1.
- :class:`MixtureModel`: the finite mixture :math:`P(x) = \sum_m P(m) P(x|m)` the notes
  start from, with the component enumerated exactly.

Nothing here knows about files or the command line.
"""

from __future__ import annotations

import contextlib
import math

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import config_enumerate
from torch import nn

from .config import MODELS
from .distributions import BernoulliImages
from .flows import InverseAutoregressiveFlow
from .likelihoods import BernoulliLikelihood, GaussianLikelihood, build_likelihood
from .nets import Decoder, Encoder, JointNet, init_weights_, log_scale_from, mark_fused
from .priors import Prior, build_prior

__all__ = ["ModelKind", "VAE", "linear_gaussian_marginal", "TwoLevelVAE", "Autoencoder", "PCAModel", "MixtureModel",
           "MODEL_KINDS", "build_model"]


def _diagonal_gaussian(loc: torch.Tensor, log_scale: torch.Tensor) -> dist.TorchDistribution:
    """N(loc, diag exp(log_scale)^2), event shape ``(d,)``: every layer's Gaussian, in the model and the guide."""
    return dist.Normal(loc, log_scale.exp()).to_event(1)


def _layer_q(loc: torch.Tensor, log_scale: torch.Tensor, context: torch.Tensor,
             flow: InverseAutoregressiveFlow | None) -> dist.TorchDistribution:
    """One guide layer: its diagonal Gaussian, or with a flow that Gaussian pushed through it,
    conditioned on ``context``."""
    base = _diagonal_gaussian(loc, log_scale)
    return base if flow is None else flow.distribution(base, context)


def _layer_code(loc: torch.Tensor, context: torch.Tensor, flow: InverseAutoregressiveFlow | None) -> torch.Tensor:
    """One guide layer's code: its Gaussian's mean, or with a flow the flow's image of that mean."""
    return loc if flow is None else flow(loc, context)


class _MeanPath(nn.Module):
    """u -> (loc, log_scale) of the top layer's Gaussian (base) in the guide, every layer below at
    its code (its mean, or a flow's image of it): the VampPrior's components q(z|u_k) for a
    model with stochastic layers. Holds references, owns nothing."""

    def __init__(self, vae_layers):
        super().__init__()
        self.__dict__["_layers"] = vae_layers  # [(encoder, flow or None)], bottom up; not registered twice

    @property
    def in_dim(self) -> int:
        return self._layers[0][0].in_dim

    def forward(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = u
        for encoder, flow in self._layers[:-1]:
            loc, _, context = encoder.with_context(h)
            h = _layer_code(loc, context, flow)
        return self._layers[-1][0](h)


class ModelKind:
    r"""What the rest of pyrovae asks of a model kind: the protocol every class in
    :data:`MODEL_KINDS` follows, so that training, the estimators, the pictures and the command line
    never test a kind's name. A new kind subclasses ``nn.Module`` and this class, sets the flags,
    implements the methods its flags promise, and joins :data:`MODEL_KINDS` (its ``kind`` is the
    value of ``--model``, named once in :data:`pyrovae.config.MODELS`).

    Every kind has ``encode`` (images to codes), ``decode`` (codes to pixel means),
    ``sample_codes`` (n codes from its generative distribution), ``exact_marginal`` (p(x) in
    closed form, or ``None``) and the classmethod ``from_config``.
    """

    #: the value of ``--model`` that builds this kind
    kind: str = ""
    #: q(z|x) is a density: the ELBO, importance sampling, AIS, quadrature and active units apply
    has_posterior = False
    #: trained by SVI over epochs; ``False``: fitted in closed form when built (PCA), one pass
    trains_by_svi = True
    #: its discrete latent is summed out exactly (``TraceEnum_ELBO``), so its loss is -log p(x) itself
    enumerated = False
    #: a continuous code, to interpolate along and to plot
    has_code = True

    @property
    def takes_binary(self) -> bool:
        """Whether its likelihood takes only 0/1 pixels (Bernoulli)."""
        return isinstance(getattr(self, "likelihood", None), BernoulliLikelihood)

    def score_terms(self, images: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """Per-example ``elbo``, ``recon`` and ``kl`` (nats) of a kind without a posterior density,
        each ``(N,)`` or ``None``: the bound it optimises, computed without sampling. (A kind
        with ``has_posterior`` is scored by importance sampling instead.)"""
        raise NotImplementedError(f"a {self.kind} model is scored by importance sampling")

    def mixture_size(self) -> int:
        """How many components its mixture has (its code prior's, or its own); 0 without one."""
        return 0

    def log_responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`\log p(k \mid x)` over its mixture's components, ``(B, K)`` (kinds with
        :meth:`mixture_size` > 0)."""
        raise ValueError(f"a {self.kind} model has no mixture")

    def samples_by_component(self, per_component: int, max_components: int) -> tuple[torch.Tensor, list[int]]:
        """``per_component`` draws of each of its heaviest ``max_components`` components, decoded to
        pixel means, one component after another; and the components' indices."""
        raise ValueError(f"a {self.kind} model has no prior with components; drop --by-component")


class VAE(ModelKind, nn.Module):
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

    With stochastic layers below z (``--lower-latent-dims``; Burda et al. 2015, section 5) the
    sites are ``"z1"`` (nearest x), ..., ``"z{L-1}"`` and the top ``"z"``:

    .. math::

        \text{model:}\quad z \sim p(z),\;\; z_{l} \mid z_{l+1} \sim \mathcal{N}(\mu_l(z_{l+1}),
        \mathrm{diag}\,\sigma_l^2(z_{l+1})),\;\; x \mid z_1 \sim p_\theta(x \mid z_1)

        \text{guide:}\quad q(z_1 \mid x)\, q(z_2 \mid z_1) \cdots q(z \mid z_{L-1}) \quad\text{(bottom-up)}

    each conditional a diagonal Gaussian (with ``--guide iaf``, each through its own flow), every
    site inside the data plate, so the ELBOs, the estimators and active units read them all.

    Examples
    --------
    :func:`build_model` builds one from a :class:`~pyrovae.config.TrainConfig`; Pyro's poutine
    traces the guide and replays the model against it, as every ELBO does:

    >>> import torch
    >>> from pyro import poutine
    >>> from pyrovae import TrainConfig, VAE, build_model
    >>> model = build_model(TrainConfig(hidden_dims=(32,), latent_dim=2), data_dim=784)
    >>> isinstance(model, VAE)
    True
    >>> x = torch.bernoulli(torch.full((3, 784), 0.2))  # three binary "images"
    >>> guide = poutine.trace(model.guide).get_trace(x)
    >>> guide.nodes["z"]["value"].shape  # z ~ q(z|x): one 2-D code per image
    torch.Size([3, 2])
    >>> joint = poutine.trace(poutine.replay(model.model, trace=guide)).get_trace(x)
    >>> joint.nodes["x"]["is_observed"], joint.nodes["x"]["fn"].log_prob(x).shape
    (True, torch.Size([3]))
    """

    kind = "vae"
    #: whether q(z|x) is a density, so that importance-sampling estimates of log p(x) apply
    has_posterior = True

    def __init__(self, encoder: Encoder, decoder: Decoder, prior: Prior, likelihood: nn.Module,
                 flow: InverseAutoregressiveFlow | None = None, upper_encoders: nn.ModuleList | None = None,
                 upper_decoders: nn.ModuleList | None = None, upper_flows: nn.ModuleList | None = None):
        super().__init__()
        self.encoder, self.decoder, self.prior, self.likelihood = encoder, decoder, prior, likelihood
        self.flow = flow
        if upper_encoders is not None and len(upper_encoders):
            self.upper_encoders, self.upper_decoders = upper_encoders, upper_decoders
            self.upper_flows = upper_flows
        else:
            self.upper_encoders = self.upper_decoders = self.upper_flows = None
        n = len(self.upper_encoders) if self.upper_encoders is not None else 0
        #: sample sites of the latent layers, bottom up; the top one, drawn from the prior, is "z"
        self.sites = [f"z{i + 1}" for i in range(n)] + ["z"]

    def _layers(self) -> list[tuple[Encoder, InverseAutoregressiveFlow | None]]:
        """(guide network, flow or None) of every latent layer, bottom up."""
        out = [(self.encoder, self.flow)]
        for i in range(len(self.sites) - 1):
            out.append((self.upper_encoders[i], self.upper_flows[i] if self.upper_flows is not None else None))
        return out

    # --- the Pyro program ------------------------------------------------------------
    def model(self, x: torch.Tensor, kl_scale: float = 1.0) -> None:
        for name in ("decoder", "prior", "likelihood", "upper_decoders"):
            if getattr(self, name) is not None:
                pyro.module(name, getattr(self, name))
        with pyro.plate("data", x.shape[0], dim=-1):
            with self._latent_weight(kl_scale):
                z = pyro.sample("z", self.prior.dist())
                for i in reversed(range(len(self.sites) - 1)):  # down to the layer nearest x
                    z = pyro.sample(self.sites[i], _diagonal_gaussian(*self.upper_decoders[i](z)))
            pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)

    def guide(self, x: torch.Tensor, kl_scale: float = 1.0) -> None:
        for name in ("encoder", "flow", "upper_encoders", "upper_flows"):
            if getattr(self, name) is not None:
                pyro.module(name, getattr(self, name))
        with pyro.plate("data", x.shape[0], dim=-1):
            h = x
            for i, site in enumerate(self.sites):
                posterior = self.posterior(h) if i == 0 else self._layer_posterior(i, h)  # (a subclass's own q)
                with self._latent_weight(kl_scale):
                    h = pyro.sample(site, posterior)

    def _layer_posterior(self, i: int, h: torch.Tensor) -> dist.TorchDistribution:
        encoder, flow = self._layers()[i]
        return _layer_q(*encoder.with_context(h), flow)

    def posterior(self, x: torch.Tensor) -> dist.TorchDistribution:
        r""":math:`q(z|x) = \mathcal{N}(m, \mathrm{diag}\, s^2)`, event shape ``(D,)``, or with a flow
        that Gaussian pushed through it (a ``TransformedDistribution``); with stochastic layers,
        :math:`q(z_1|x)` of the layer nearest x."""
        return self._layer_posterior(0, x)

    def _latent_weight(self, kl_scale: float) -> contextlib.AbstractContextManager:
        return poutine.scale(scale=kl_scale) if kl_scale != 1.0 else contextlib.nullcontext()

    # --- pictures and analysis -----------------------------------------------------------
    @property
    def latent_dim(self) -> int:
        """Dimension of the top code z (the prior's)."""
        return self._layers()[-1][0].latent_dim

    @property
    def latent_dims(self) -> dict[str, int]:
        """Dimension of every latent site, bottom up."""
        return {site: enc.latent_dim for site, (enc, _) in zip(self.sites, self._layers())}

    def encode_layers(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The code of x in every layer, bottom up, each from the code below: the posterior mean
        m(x), or with a flow the flow's image of it (the point its base mean maps to)."""
        out, h = {}, x
        for site, (encoder, flow) in zip(self.sites, self._layers()):
            loc, _, context = encoder.with_context(h)
            h = out[site] = _layer_code(loc, context, flow)
        return out

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The code of x in the top layer z, shape ``(B, D)`` (see :meth:`encode_layers`)."""
        return self.encode_layers(x)["z"]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Pixel means of p(x|z), in [0, 1]; from a top code z through every lower layer's mean."""
        for i in reversed(range(len(self.sites) - 1)):
            z = self.upper_decoders[i](z)[0]
        return self.likelihood.mean(self.decoder(z))

    def sample_codes(self, n: int) -> torch.Tensor:
        """n codes from the model's generative distribution over z (here the prior)."""
        return self.prior.dist().sample((n,))

    def mixture_size(self) -> int:
        return self.prior.num_components if self.has_posterior and self.prior.is_mixture else 0

    def log_responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`\log p(k \mid z = m(x))`: the prior's responsibilities at the code of x."""
        return self.prior.log_responsibilities(self.encode(x))

    def samples_by_component(self, per_component: int, max_components: int) -> tuple[torch.Tensor, list[int]]:
        r"""Codes :math:`z \sim \mathcal{N}(\mu_k, \mathrm{diag}\,\sigma_k^2)` of the prior's heaviest
        components, decoded."""
        if self.mixture_size() == 0:
            return super().samples_by_component(per_component, max_components)
        logits, loc, scale = self.prior.mixture()
        order = logits.argsort(descending=True)[:max_components]
        eps = torch.randn(len(order), per_component, loc.shape[1], device=loc.device)
        z = loc[order, None, :] + scale[order, None, :] * eps  # (k, per, D)
        return self.decode(z.reshape(-1, loc.shape[1])), order.tolist()

    def exact_marginal(self) -> dist.TorchDistribution | None:
        """p(x) in closed form where it exists (:func:`linear_gaussian_marginal`), else ``None``."""
        return linear_gaussian_marginal(self)

    @classmethod
    def from_config(cls, config, *, data_dim: int, train_images: torch.Tensor | None = None,
                    image_shape: tuple[int, int] | None = None) -> "VAE":
        if config.hierarchy == "two-level" and cls is VAE:
            return TwoLevelVAE.from_config(config, data_dim=data_dim, train_images=train_images,
                                           image_shape=image_shape)
        return cls(*vae_parts(config, data_dim, train_images, image_shape))


def build_flow(config, latent_dim: int) -> InverseAutoregressiveFlow:
    """The ``--guide iaf`` flow over one latent layer of ``latent_dim`` dimensions, from ``config``'s flow settings."""
    return InverseAutoregressiveFlow(latent_dim, config.flow_context_dim, config.flow_steps, config.flow_hidden_dims)


def vae_parts(config, data_dim: int, train_images: torch.Tensor | None, image_shape: tuple[int, int] | None) -> tuple:
    """The arguments of :class:`VAE` for ``config``: encoder, decoder, prior, likelihood, the bottom flow, and the
    upper layers' encoders, decoders and flows (``--lower-latent-dims``)."""
    iaf = config.guide == "iaf"
    context_dim = config.flow_context_dim if iaf else 0
    dims = [*config.lower_latent_dims, config.latent_dim]  # bottom up
    net = config.net
    dropout = config.encoder_dropout

    head = config.scale_head
    encoder = Encoder(data_dim, config.hidden_dims, dims[0], config.activation, context_dim, net, image_shape,
                      dropout, head)
    decoder = Decoder(dims[0], config.hidden_dims, data_dim, config.activation, net, image_shape)
    hidden = config.layer_hidden_dims
    upper_net = "gated" if net == "gated" else "mlp"
    upper_encoders = nn.ModuleList([Encoder(a, hidden, b, config.activation, context_dim, upper_net,
                                            dropout=dropout, scale_head=head) for a, b in zip(dims[:-1], dims[1:])])
    upper_decoders = nn.ModuleList([Encoder(b, hidden, a, config.activation, net=upper_net, scale_head=head)
                                    for a, b in zip(dims[:-1], dims[1:])])
    upper_flows = nn.ModuleList([build_flow(config, b) for b in dims[1:]]) if iaf and len(dims) > 1 else None
    bottom_flow = build_flow(config, dims[0]) if iaf else None
    top = encoder if len(dims) == 1 else _MeanPath(
        [(encoder, bottom_flow)] + [(e, upper_flows[i] if upper_flows is not None else None)
                                    for i, e in enumerate(upper_encoders)])
    prior = build_prior(config, latent_dim=config.latent_dim, encoder=top, train_images=train_images)
    likelihood = build_likelihood(config.likelihood, data_dim, config.likelihood_scale)
    return encoder, decoder, prior, likelihood, bottom_flow, upper_encoders, upper_decoders, upper_flows


def linear_gaussian_marginal(vae: VAE) -> dist.TorchDistribution | None:
    r"""p(x) in closed form where it exists, else ``None``.

    With linear encoder/decoder maps and a Gaussian likelihood, the decoder is
    :math:`x = Wz + b + \epsilon`, :math:`\epsilon \sim \mathcal{N}(0, \mathrm{diag}\,\sigma_x^2)`,
    and every prior here is a Gaussian mixture, so

    .. math:: p(x) = \sum_k \pi_k\, \mathcal{N}(x;\, W\mu_k + b,\; W \Sigma_k W^\top + \mathrm{diag}\,\sigma_x^2)

    (probabilistic PCA for the standard prior; Tipping & Bishop 1999). Built as a
    ``LowRankMultivariateNormal`` (mixture), so its ``log_prob`` costs O(D d^2).
    """
    if (not vae.decoder.is_linear or len(vae.sites) > 1 or not isinstance(vae.likelihood, GaussianLikelihood)
            or not vae.prior.is_mixture):
        return None
    maps = vae.decoder.linear_maps
    W, b = maps[0].weight, maps[0].bias  # (D, d), (D,)
    logits, loc, scale = vae.prior.mixture()  # (K,), (K, d), (K, d)
    sigma_x = vae.likelihood.scale.expand(b.shape)
    components = dist.LowRankMultivariateNormal(
        loc=loc @ W.T + b,  # (K, D)
        cov_factor=W.unsqueeze(0) * scale.unsqueeze(1),  # (K, D, d)
        cov_diag=(sigma_x**2).expand(loc.shape[0], -1),
    )
    if logits.shape[0] == 1:
        return dist.LowRankMultivariateNormal(components.loc[0], components.cov_factor[0], components.cov_diag[0])
    return dist.MixtureSameFamily(dist.Categorical(logits=logits), components)


class TwoLevelVAE(VAE):
    r"""The two-level VAE of the VampPrior paper (Tomczak & Welling 2018, section 3.2; their
    ``HVAE_2level``), ``--hierarchy two-level``:

    .. math::

        \text{model:}\quad z \sim p(z),\;\; z_1 \mid z \sim \mathcal{N}(\mu(z), \mathrm{diag}\,\sigma^2(z)),
        \;\; x \mid z_1, z \sim p_\theta(x \mid z_1, z)

        \text{guide:}\quad q(z \mid x)\; q(z_1 \mid x, z)

    The top code z (their :math:`z_2`) keeps the site name ``"z"`` and takes any prior (with
    ``--prior vamp``, :math:`p(z) = \frac{1}{K}\sum_k q(z \mid u_k)`, the encoder of z read at the
    pseudo-inputs); ``"z1"`` is the lower layer. Unlike the bottom-up stack, the decoder sees both
    layers and the guide infers z first, from x alone. :math:`p(x|z_1, z)` and
    :math:`q(z_1|x, z)` are :class:`~pyrovae.nets.JointNet` networks; every conditional is a
    diagonal Gaussian whose log-scale a network outputs, read as ``--scale-head`` says (free by
    default; ``clipped-log-var``, the paper's log-variances through hardtanh(-6, 2), in its presets).

    With ``--guide iaf`` each of the guide's two Gaussians is the base of its own inverse
    autoregressive flow (``flow`` for z, ``z1_flow`` for z1), conditioned on a context that
    its network outputs beside the mean and log-scale, as in the one-level model. The
    VampPrior's components stay the Gaussians :math:`q_0(z \mid u_k)` of the top layer's base.
    """

    def __init__(self, encoder: Encoder, z1_encoder: JointNet, z1_prior: Encoder, decoder: JointNet, prior: Prior,
                 likelihood: nn.Module, flow: InverseAutoregressiveFlow | None = None,
                 z1_flow: InverseAutoregressiveFlow | None = None):
        super().__init__(encoder, decoder, prior, likelihood, flow)
        self.z1_encoder, self.z1_prior, self.z1_flow = z1_encoder, z1_prior, z1_flow
        self.scale_head = encoder.scale_head  # (how z1_encoder's raw log-scales are read, as the Encoders read theirs)
        self.sites = ["z1", "z"]

    def model(self, x: torch.Tensor, kl_scale: float = 1.0) -> None:
        for name in ("decoder", "prior", "likelihood", "z1_prior"):
            pyro.module(name, getattr(self, name))
        with pyro.plate("data", x.shape[0], dim=-1):
            with self._latent_weight(kl_scale):
                z = pyro.sample("z", self.prior.dist())
                z1 = pyro.sample("z1", _diagonal_gaussian(*self.z1_prior(z)))
            pyro.sample("x", self.likelihood(self.decoder(z1, z)), obs=x)

    def guide(self, x: torch.Tensor, kl_scale: float = 1.0) -> None:
        for name in ("encoder", "z1_encoder", "flow", "z1_flow"):
            if getattr(self, name) is not None:
                pyro.module(name, getattr(self, name))
        with pyro.plate("data", x.shape[0], dim=-1):
            with self._latent_weight(kl_scale):
                z = pyro.sample("z", self.posterior(x))
                pyro.sample("z1", self.z1_posterior(x, z))

    def posterior(self, x: torch.Tensor) -> dist.TorchDistribution:
        r""":math:`q(z|x)`, the top layer's Gaussian, event shape ``(D,)``, or with a flow that
        Gaussian pushed through it."""
        return _layer_q(*self.encoder.with_context(x), self.flow)

    def _z1_heads(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d1 = self.z1_prior.latent_dim
        loc, raw, context = self.z1_encoder(x, z).split([d1, d1, self.z1_encoder.out_dim - 2 * d1], dim=-1)
        return loc, log_scale_from(raw, self.scale_head), context

    def z1_posterior(self, x: torch.Tensor, z: torch.Tensor) -> dist.TorchDistribution:
        r""":math:`q(z_1|x, z)`, a diagonal Gaussian (or with ``z1_flow`` that Gaussian pushed
        through it); x ``(B, D)`` broadcasts against z ``(..., B, d)``."""
        return _layer_q(*self._z1_heads(x, z), self.z1_flow)

    @property
    def latent_dim(self) -> int:
        return self.encoder.latent_dim

    @property
    def latent_dims(self) -> dict[str, int]:
        return {"z1": self.z1_prior.latent_dim, "z": self.encoder.latent_dim}

    def encode_layers(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The codes of x, bottom up: the mean of q(z|x) (with a flow, the flow's image of its base
        mean), then z1's, given x and that z, the same way."""
        loc, _, context = self.encoder.with_context(x)
        z = _layer_code(loc, context, self.flow)
        loc1, _, context1 = self._z1_heads(x, z)
        return {"z1": _layer_code(loc1, context1, self.z1_flow), "z": z}

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Pixel means of p(x|z1, z) at z1 = the mean of p(z1|z)."""
        return self.likelihood.mean(self.decoder(self.z1_prior(z)[0], z))

    def exact_marginal(self) -> None:
        return None

    @classmethod
    def from_config(cls, config, *, data_dim: int, train_images: torch.Tensor | None = None,
                    image_shape: tuple[int, int] | None = None) -> "TwoLevelVAE":
        (d1,), d = config.lower_latent_dims, config.latent_dim
        h, act, net = tuple(config.hidden_dims), config.activation, config.net
        iaf = config.guide == "iaf"
        c = config.flow_context_dim if iaf else 0
        encoder = Encoder(data_dim, h, d, act, c, net, image_shape, config.encoder_dropout, config.scale_head)
        z1_encoder = JointNet([data_dim, d], h, 2 * d1 + c, act, net)
        mark_fused(z1_encoder.linear_maps[-1], (d1, d1) + ((c,) if c else ()))  # its mean, log-scale, context maps
        z1_prior = Encoder(d, h, d1, act, net=net, scale_head=config.scale_head)
        decoder = JointNet([d1, d], h, data_dim, act, net)
        prior = build_prior(config, latent_dim=d, encoder=encoder, train_images=train_images)
        likelihood = build_likelihood(config.likelihood, data_dim, config.likelihood_scale)
        flows = (build_flow(config, d), build_flow(config, d1)) if iaf else (None, None)
        return cls(encoder, z1_encoder, z1_prior, decoder, prior, likelihood, *flows)


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

    def __init__(self, encoder, decoder, prior, likelihood, flow=None, upper_encoders=None, upper_decoders=None,
                 upper_flows=None):
        if flow is not None or (upper_encoders is not None and len(upper_encoders)):
            raise ValueError("--guide iaf and --lower-latent-dims apply to --model vae only")
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

    def score_terms(self, images):
        r"""The reconstruction term :math:`\log p(x \mid m(x))`, its whole objective (no KL)."""
        recon = torch.cat([self.likelihood(self.decoder(self.encode(x))).log_prob(x) for x in images.split(4096)])
        return {"elbo": recon, "recon": recon, "kl": None}

    @torch.no_grad()
    def fit_code_distribution(self, images: torch.Tensor) -> None:
        """Fit N(mean, cov) to the codes of ``images`` (the training split)."""
        codes = torch.cat([self.encode(chunk) for chunk in images.split(4096)]).double()
        cov = torch.cov(codes.T).reshape(codes.shape[1], codes.shape[1])
        eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
        cov = cov + 1e-6 * cov.diagonal().mean().clamp_min(1e-12) * eye
        self.code_loc.copy_(codes.mean(0))
        self.code_scale_tril.copy_(torch.linalg.cholesky(cov))


class PCAModel(ModelKind, nn.Module):
    r"""PCA (scikit-learn) as a linear autoencoder: code :math:`c = V(x - \bar{x})`,
    reconstruction :math:`\hat{x} = V^\top c + \bar{x}`.

    Its probabilistic reading (PPCA, Tipping & Bishop 1999) gives the exact density
    :math:`p(x) = \mathcal{N}(\bar{x}, W W^\top + \sigma^2 I)`, reported for grey data.
    Codes are sampled from :math:`\mathcal{N}(0, \mathrm{diag}\,\lambda)`, the Gaussian
    fitted to the training codes.
    """

    kind = "pca"
    trains_by_svi = False

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

    @property
    def takes_binary(self) -> bool:
        return False

    def score_terms(self, images):
        """The PPCA log-density as ``elbo`` (exact; grey data only, else ``None``)."""
        marginal = self.exact_marginal()
        return {"elbo": marginal.log_prob(images) if marginal is not None else None, "recon": None, "kl": None}

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


class MixtureModel(ModelKind, nn.Module):
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
    enumerated = True
    has_code = False

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

    @property
    def takes_binary(self) -> bool:
        return not isinstance(self.likelihood, GaussianLikelihood)

    def mixture_size(self) -> int:
        return self.num_components

    def score_terms(self, images):
        r"""Exactly: ``elbo`` = :math:`\log P(x)`, ``recon`` = :math:`\mathbb{E}_{P(m|x)} \log P(x|m)`
        and ``kl`` = :math:`\mathrm{KL}(P(m|x) \,\|\, P(m))`, so that ``elbo = recon - kl``."""
        out = {"elbo": [], "recon": [], "kl": []}
        comps, marginal = self.components(), self.exact_marginal()
        prior = dist.Categorical(logits=self.logits)
        for x in images.split(max(1, 2**16 // max(1, self.num_components))):
            log_lik = comps.log_prob(x.unsqueeze(-2))  # (B, K)
            log_r = self.log_responsibilities(x)
            out["elbo"].append(marginal.log_prob(x))
            out["recon"].append((log_r.exp() * log_lik).sum(-1))
            out["kl"].append(torch.distributions.kl_divergence(dist.Categorical(logits=log_r), prior))
        return {k: torch.cat(v) for k, v in out.items()}

    def samples_by_component(self, per_component: int, max_components: int) -> tuple[torch.Tensor, list[int]]:
        """Draws of each heaviest component's pixel distribution."""
        order = self.logits.argsort(descending=True)[:max_components]
        comp = self.likelihood(self.params[order])
        return comp.sample((per_component,)).transpose(0, 1).reshape(-1, self.params.shape[1]), order.tolist()

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


#: values of ``--model`` -> the class that builds it (``build_model`` looks the kind up here)
MODEL_KINDS: dict[str, type[nn.Module]] = {cls.kind: cls for cls in (VAE, Autoencoder, PCAModel, MixtureModel)}
assert tuple(MODEL_KINDS) == MODELS, "pyrovae.config.MODELS names the kinds, in the order --help shows them"


def check_sizes(config, data_dim: int) -> None:
    """Refuse, with one line naming the flag, a model whose parameters (with their gradients and
    Adam's two moments: 16 bytes each) or whose activations for one training step would not fit
    in half of this machine's memory: before anything is allocated."""
    from .config import TrainConfig, most_raised, refuse_if_too_big

    h = list(config.hidden_dims)
    dims = [*config.lower_latent_dims, config.latent_dim]
    mlp = sum(a * b for a, b in zip([data_dim, *h[:-1]], h))  # encoder layers up to the code; the decoder mirrors
    code = (h[-1] if h else data_dim) * 3 * dims[0]  # the encoder's (loc, log_scale), the decoder's first layer
    layer = list(config.layer_hidden_dims)
    upper = sum(sum(a * b for a, b in zip([lo, *layer], [*layer, 2 * hi])) for lo, hi in zip(dims[:-1], dims[1:]))
    k = config.prior_components if (config.prior != "standard" or config.model == "mixture") else 0
    per_component = data_dim if (config.prior == "vamp" or config.model == "mixture") else 2 * config.latent_dim
    flows, flow_flag = 0, "--flow-hidden-dims"
    if config.guide == "iaf":
        fh = list(config.flow_hidden_dims)
        flows = config.flow_steps * len(dims) * sum(a * b for a, b in zip(
            [max(dims) + config.flow_context_dim, *fh], [*fh, 2 * max(dims)]))
        # the steps multiply the MADE networks, whose first layer the context widens: name the one raised most
        flow_flag = most_raised({"--flow-steps": (config.flow_steps, TrainConfig.flow_steps),
                                 "--flow-context-dim": (config.flow_context_dim, TrainConfig.flow_context_dim),
                                 "--flow-hidden-dims": (max(fh), max(TrainConfig.flow_hidden_dims))})
    # a gated layer holds two maps; the two-level model's guide and decoder see x or z twice
    widen = (2 if config.net == "gated" else 1) * (
        2 if config.hierarchy == "two-level" else 1)
    mlp, upper = widen * mlp, widen * upper
    width = max([data_dim, *h, *layer, *dims])
    rows_flag = most_raised({"--num-particles": (config.num_particles, TrainConfig.num_particles),
                             "--batch-size": (config.batch_size, TrainConfig.batch_size)})
    code_flag = "--lower-latent-dims" if len(dims) > 1 else "--latent-dim"
    upper_flag = most_raised({"--lower-latent-dims": (max(dims[:-1], default=0), 1),
                              "--layer-hidden-dims": (max(layer, default=0), max(TrainConfig.layer_hidden_dims))})
    refuse_if_too_big([("--hidden-dims", 16.0 * 2 * mlp), (code_flag, 16.0 * code), (upper_flag, 16.0 * 2 * upper),
                       ("--prior-components", 16.0 * k * per_component), (flow_flag, 16.0 * flows)], "the model")
    refuse_if_too_big({rows_flag: 4.0 * 8 * config.batch_size * config.num_particles * width * (len(h) + 2)},
                      "one training step")


def build_model(config, *, data_dim: int, train_images: torch.Tensor | None = None,
                image_shape: tuple[int, int] | None = None) -> nn.Module:
    """The model named by ``config.model``; ``train_images=None`` builds shapes only (for loading).
    ``image_shape`` (H, W) is what convolutional networks need (default: square images of
    ``data_dim`` pixels, when ``data_dim`` is a square).

    Examples
    --------
    >>> from pyrovae import TrainConfig, build_model
    >>> model = build_model(TrainConfig(hidden_dims=(32,), latent_dim=2), data_dim=784)
    >>> type(model).__name__, model.latent_dim, type(model.prior).__name__
    ('VAE', 2, 'StandardNormalPrior')
    >>> vamp = build_model(TrainConfig(prior="vamp", prior_components=10), data_dim=784)
    >>> type(vamp.prior).__name__
    'VampPrior'
    >>> sum(p.numel() for p in model.parameters()) > 0
    True
    """
    from .config import TrainConfig, whole

    if not isinstance(config, TrainConfig):
        raise TypeError(f"build_model() takes a TrainConfig as its config (got {type(config).__name__}): build one "
                        "with TrainConfig(...) or TrainConfig.from_dict(...)")
    data_dim = whole(data_dim, "data_dim")
    if image_shape is not None:
        if (not isinstance(image_shape, (tuple, list)) or len(image_shape) != 2
                or math.prod(whole(s, "image_shape") for s in image_shape) != data_dim):
            raise ValueError(f"image_shape must be (height, width) with height x width = data_dim {data_dim} "
                             f"(got {image_shape!r})")
    if config.model not in MODEL_KINDS:
        raise ValueError(f"--model must be one of {', '.join(MODEL_KINDS)} (got {config.model!r})")
    check_sizes(config, data_dim)
    if image_shape is None:
        side = int(round(data_dim**0.5))
        image_shape = (side, side) if side * side == data_dim else None
    kind = MODEL_KINDS[config.model]
    if kind is VAE or issubclass(kind, VAE):
        model = kind.from_config(config, data_dim=data_dim, train_images=train_images,
                                 image_shape=tuple(image_shape) if image_shape else None)
        init_weights_(model, config.init)
        return model
    return kind.from_config(config, data_dim=data_dim, train_images=train_images)
