r"""Priors p(z): every prior here is a mixture of diagonal Gaussians.

.. math::

    p(z) = \sum_{k=1}^{K} \pi_k \, \mathcal{N}(z; \mu_k, \mathrm{diag}\,\sigma_k^2)

- :class:`StandardNormalPrior`: :math:`K = 1`, :math:`\mu = 0`, :math:`\sigma = 1`.
- :class:`MixtureOfGaussiansPrior`: :math:`\pi`, :math:`\mu_k`, :math:`\sigma_k` all learned
  (the notes' mixture-of-Gaussians view, up to hundreds of components).
- :class:`VampPrior`: :math:`\pi_k = 1/K` and :math:`(\mu_k, \sigma_k)` are the encoder's
  output at learned pseudo-inputs :math:`u_k` (Tomczak & Welling 2018).

The interface a model uses is small: :meth:`Prior.dist` returns a ``pyro.distributions``
object over z (batch shape ``()``, event shape ``(D,)``; ``pyro.plate`` broadcasts it), and
:meth:`Prior.mixture` returns the components, which the exact linear-Gaussian marginal and the
component-usage metrics read. To add a prior, subclass :class:`Prior` and add it to :data:`PRIORS`;
the command line and the model pick it up from there:

- a mixture of diagonal Gaussians implements :meth:`Prior._mixture` (its weights, means and scales);
- any other density sets ``is_mixture = False`` and implements :meth:`Prior.dist` (its log-density and
  sampler are the distribution's): training, importance sampling, AIS and the pictures use it as they
  are; the mixture-only reports (component usage, clusters, samples by component) leave it out. For
  example, a product of Laplace densities::

      class LaplacePrior(Prior):
          is_mixture = False

          def __init__(self, latent_dim):
              super().__init__()
              self.register_buffer("loc", torch.zeros(latent_dim))
              self.register_buffer("scale", torch.ones(latent_dim))

          def dist(self):
              return pyro.distributions.Laplace(self.loc, self.scale).to_event(1)

          @classmethod
          def from_config(cls, config, *, latent_dim, encoder, train_images):
              return cls(latent_dim)

      PRIORS["laplace"] = LaplacePrior   # then TrainConfig(prior="laplace")
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import pyro.distributions as dist
import torch
from torch import nn

from .config import PSEUDO_INPUTS
from .distributions import DiagonalGaussianMixture

__all__ = ["Prior", "StandardNormalPrior", "MixtureOfGaussiansPrior", "VampPrior", "PRIORS", "build_prior"]


class Prior(nn.Module):
    """Base class. Subclasses set ``inits`` (first = default) and implement :meth:`_mixture`."""

    #: accepted values of ``--prior-init``; the first is the default
    inits: tuple[str, ...] = ("random",)
    #: whether the prior is a mixture of diagonal Gaussians (:meth:`_mixture`); ``False``: only :meth:`dist`
    is_mixture: bool = True

    def __init__(self):
        super().__init__()
        self._frozen: tuple | None = None

    @property
    def num_components(self) -> int:
        """K of a mixture; 1 for a prior that is not a mixture (one density, no components)."""
        return self.mixture()[0].shape[-1] if self.is_mixture else 1

    def _mixture(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def mixture(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits (K,), loc (K, D), scale (K, D))`` of the mixture."""
        return self._frozen[0] if self._frozen is not None else self._mixture()

    def dist(self) -> dist.TorchDistribution:
        """p(z) as a distribution with event shape ``(D,)``; the component is summed out
        (:class:`~pyrovae.distributions.DiagonalGaussianMixture`, O(N K) memory)."""
        if self._frozen is not None:
            return self._frozen[1]
        return self._dist(*self._mixture())

    @staticmethod
    def _dist(logits, loc, scale) -> dist.TorchDistribution:
        if logits.shape[-1] == 1:
            return dist.Normal(loc[0], scale[0]).to_event(1)
        return DiagonalGaussianMixture(logits, loc, scale)

    @contextlib.contextmanager
    def frozen(self):
        """Within this block the prior's components are computed once and reused (no
        gradients): for evaluation, where they do not change, so that the VampPrior's
        encoder pass over its pseudo-inputs and the mixture's matmul factors are not
        recomputed for every chunk of samples."""
        if self._frozen is not None or not self.is_mixture:  # nested (the outer block's), or nothing to freeze
            yield self
            return
        with torch.no_grad():
            mix = tuple(t.detach() for t in self._mixture())
            d = self._dist(*mix)
            if isinstance(d, DiagonalGaussianMixture):
                d._factors  # noqa: B018 -- computed now, once
        self._frozen = (mix, d)
        try:
            yield self
        finally:
            self._frozen = None

    def log_responsibilities(self, z: torch.Tensor) -> torch.Tensor:
        r"""Bayes' rule over the components, shape ``(..., K)``:

        .. math:: \log p(k \mid z) = \log \pi_k + \log \mathcal{N}(z; \mu_k, \mathrm{diag}\,\sigma_k^2) - \log p(z)

        (VaDE reads it as the cluster assignment of x, at z sampled from q(z|x); Jiang et al. 2017).
        """
        log_joint = DiagonalGaussianMixture(*self.mixture()).log_joint(z)
        return (log_joint - log_joint.logsumexp(-1, keepdim=True)).to(z.dtype)

    def before_epoch(self, epochs_done: int, encode_train: Callable[[], torch.Tensor]) -> None:
        """Hook called by the trainer before every epoch; ``encode_train()`` returns the
        encoder means of the training data. Default: nothing."""

    @classmethod
    def from_config(cls, config, *, latent_dim: int, encoder: nn.Module, train_images: torch.Tensor | None) -> "Prior":
        """Build from a :class:`~pyrovae.config.TrainConfig`. ``train_images=None`` builds the
        shapes only (values then come from a checkpoint)."""
        raise NotImplementedError


class StandardNormalPrior(Prior):
    r""":math:`p(z) = \mathcal{N}(0, I)`."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.register_buffer("loc", torch.zeros(1, latent_dim))
        self.register_buffer("scale", torch.ones(1, latent_dim))
        self.register_buffer("logits", torch.zeros(1))

    def _mixture(self):
        return self.logits, self.loc, self.scale

    @classmethod
    def from_config(cls, config, *, latent_dim, encoder, train_images):
        return cls(latent_dim)


class MixtureOfGaussiansPrior(Prior):
    r"""Learnable mixture of :math:`K` diagonal Gaussians:

    .. math::

        p_\lambda(z) = \sum_{k=1}^{K} \mathrm{softmax}(\alpha)_k\,
        \mathcal{N}\big(z;\, \mu_k,\, \mathrm{diag}\, e^{2\rho_k}\big),
        \qquad \lambda = (\alpha, \mu, \rho) \text{ all learned.}

    The component is summed out inside :math:`\log p(z)` (a log-sum-exp over k), so z stays a
    reparameterised continuous site of the guide and no discrete site is needed; the KL of
    the ELBO has no closed form and is estimated by sampling. This is the notes' finite
    mixture of Gaussians moved from x to the code z, and the prior of VaDE (Jiang et al.
    2017), which reads :math:`p(k \mid z)` as a soft clustering.

    ``init="kmeans"`` (the default): the prior is :math:`\mathcal{N}(0, I)` for the first ``init_epochs``
    epochs; then the means, scales and weights are set from k-means (scikit-learn) on the
    encoder means of the training data (each cluster's centre, per-dimension spread and
    size), and training continues under the mixture; VaDE initialises its mixture from a
    pretrained autoencoder's codes in the same spirit. ``init="random"``: means
    :math:`\mu_k \sim \mathcal{N}(0, I)`, unit scales, equal weights, from the first step; in 50
    dimensions those means lie about 10 apart and far from where the codes start, so the
    component nearest the codes takes all of them and the others starve (on mnist5k, K = 10,
    100 epochs: 1 component of 10 in use), which is why k-means is the default.
    """

    inits = ("kmeans", "random")

    def __init__(self, latent_dim: int, num_components: int, init: str = "random", init_epochs: int = 10,
                 seed: int = 0):
        super().__init__()
        if num_components < 1:
            raise ValueError(f"--prior-components must be at least 1 (got {num_components})")
        if init not in self.inits:
            raise ValueError(f"--prior-init for --prior mog must be random or kmeans (got {init!r})")
        gen = torch.Generator().manual_seed(seed)
        self.logits = nn.Parameter(torch.zeros(num_components))
        self.loc = nn.Parameter(torch.randn(num_components, latent_dim, generator=gen))
        self.log_scale = nn.Parameter(torch.zeros(num_components, latent_dim))
        self.init, self.init_epochs, self.seed = init, init_epochs, seed
        # whether the mixture is in use; False only while waiting for k-means
        self.register_buffer("fitted", torch.tensor(init != "kmeans"))
        self.register_buffer("_std_loc", torch.zeros(1, latent_dim))

    def _mixture(self):
        if not bool(self.fitted):
            return self._std_loc[:, 0], self._std_loc, torch.ones_like(self._std_loc)
        return self.logits, self.loc, self.log_scale.exp()

    def before_epoch(self, epochs_done, encode_train):
        if bool(self.fitted) or epochs_done < self.init_epochs:
            return
        from sklearn.cluster import KMeans

        codes = encode_train().detach().double().cpu()  # (N, D)
        k = self.logits.shape[0]
        if codes.shape[0] < k:
            raise ValueError(f"--prior-init kmeans needs at least {k} training examples for {k} components, "
                             f"got {codes.shape[0]}")
        km = KMeans(n_clusters=k, n_init=3, random_state=self.seed).fit(codes.numpy())
        assign = torch.from_numpy(km.labels_).long()
        counts = torch.bincount(assign, minlength=k).double()
        centers = torch.from_numpy(km.cluster_centers_)
        sq = torch.zeros_like(centers).index_add_(0, assign, (codes - centers[assign]) ** 2)
        var = torch.where(counts[:, None] > 1, sq / counts.clamp_min(1)[:, None], codes.var(0))
        with torch.no_grad():
            self.loc.copy_(centers)
            self.log_scale.copy_(0.5 * var.clamp_min(1e-4).log())
            self.logits.copy_((counts + 1).log())
            self.fitted.fill_(True)

    @classmethod
    def from_config(cls, config, *, latent_dim, encoder, train_images):
        k = config.prior_components
        if config.prior_init == "kmeans" and train_images is not None and train_images.shape[0] < k:
            raise ValueError(
                f"--prior-init kmeans with --prior-components {k} needs at least {k} training examples, "
                f"the training split has {train_images.shape[0]}: use fewer components or --prior-init random"
            )
        return cls(latent_dim, k, config.prior_init, config.prior_init_epochs, config.seed)


class VampPrior(Prior):
    r"""Variational mixture of posteriors, the VampPrior (Tomczak & Welling 2018, eq. 9):

    .. math:: p_\lambda(z) = \frac{1}{K} \sum_{k=1}^{K} q_\phi(z \mid u_k)

    where :math:`q_\phi` is the guide's encoder (shared, so the prior moves with it; with a flow guide
    its Gaussian base, with stochastic layers the guide's mean path up to the top layer) and the
    pseudo-inputs :math:`u_k` are learned points in data space, kept in [0, 1] by ``squash``
    (``--pseudo-inputs``):

    - ``"sigmoid"`` (default): :math:`u_k = \mathrm{sigmoid}(a_k)` with unconstrained :math:`a_k`;
    - ``"hardtanh"``: :math:`u_k = \mathrm{hardtanh}(a_k, 0, 1) = \min(1, \max(0, a_k))`, the paper's code
      (a bias-free linear layer from one-hot inputs, whose weights are the :math:`a_k`). Its gradient is
      exactly zero outside (0, 1), so a pseudo-input pixel pushed past a bound never moves again;
    - ``"none"``: :math:`u_k = a_k`, unbounded: the bias-free linear layer alone, as in the first public
      version of the paper's code (its pseudo-inputs may leave [0, 1], where no image lies).

    Starts (``--prior-init``): ``"data"``, K distinct random training images, pulled into
    [0.05, 0.95] (:data:`_MARGIN`) so that neither map is saturated; ``"noise"``, uniform noise pulled
    the same way; ``"normal"``, every :math:`a_k` pixel drawn from :math:`\mathcal{N}(0.05, 0.01^2)`
    (:data:`NORMAL_START`, the paper's code for binary images: grey pseudo-inputs near black);
    ``"xavier"``, every :math:`a_k` pixel from :math:`\mathcal{N}(0, 2 / (K + D))` for D pixels, the
    Xavier start that the code's first version gave its pseudo-input layer (a map of K inputs and D outputs).
    The encoder is shared with the guide, not owned: it is not a submodule.
    """

    inits = ("data", "noise", "normal", "xavier")
    #: values of ``--pseudo-inputs``
    squashes = PSEUDO_INPUTS
    #: how far inside (0, 1) the data and noise starts are pulled
    _MARGIN = 0.05
    #: mean and standard deviation of ``--prior-init normal`` (the paper's code, binary datasets)
    NORMAL_START = (0.05, 0.01)

    def __init__(self, encoder: nn.Module, pseudo_inputs: torch.Tensor, squash: str = "sigmoid",
                 margin: float | None = None):
        super().__init__()
        if squash not in self.squashes:
            raise ValueError(f"--pseudo-inputs must be one of {', '.join(self.squashes)} (got {squash!r})")
        self.__dict__["_encoder"] = encoder  # shared, not registered twice
        self.squash = squash
        margin = self._MARGIN if margin is None else margin
        u = margin + (1 - 2 * margin) * pseudo_inputs.clamp(0.0, 1.0) if margin > 0 else pseudo_inputs
        if squash == "sigmoid":
            self.pseudo_logits = nn.Parameter(torch.logit(u.clamp(1e-4, 1 - 1e-4) if margin <= 0 else u))
        else:
            self.pseudo_params = nn.Parameter(u.clone())  # (K, data_dim)

    @property
    def encoder(self) -> nn.Module:
        r"""The encoder :math:`q_\phi` whose outputs at the pseudo-inputs are the components (the guide's,
        shared: moving it moves the prior)."""
        return self._encoder

    @property
    def pseudo_inputs(self) -> torch.Tensor:
        """The pseudo-inputs :math:`u_k` in data space, ``(K, data_dim)``."""
        if self.squash == "sigmoid":
            return torch.sigmoid(self.pseudo_logits)
        if self.squash == "hardtanh":
            return torch.nn.functional.hardtanh(self.pseudo_params, 0.0, 1.0)
        return self.pseudo_params

    def _mixture(self):
        loc, log_scale = self._encoder(self.pseudo_inputs)  # (K, D) each
        return torch.zeros_like(loc[:, 0]), loc, log_scale.exp()

    @classmethod
    def from_config(cls, config, *, latent_dim, encoder, train_images):
        k = config.prior_components
        if k < 1:
            raise ValueError(f"--prior-components must be at least 1 (got {k})")
        data_dim = encoder.in_dim
        gen = torch.Generator().manual_seed(config.seed)
        margin = None
        if train_images is None:
            u = torch.full((k, data_dim), 0.5)
        elif config.prior_init == "data":
            n = train_images.shape[0]
            if n < k:
                raise ValueError(
                    f"--prior vamp with --prior-components {k} initialised from data needs {k} distinct "
                    f"training images, the training split has {n}: use --prior-components {n} or fewer, "
                    "or --prior-init noise"
                )
            u = train_images[torch.randperm(n, generator=gen)[:k].to(train_images.device)].float().cpu()
        elif config.prior_init == "normal":
            mean, std = cls.NORMAL_START
            u, margin = mean + std * torch.randn(k, data_dim, generator=gen), 0.0
        elif config.prior_init == "xavier":
            u, margin = math.sqrt(2.0 / (k + data_dim)) * torch.randn(k, data_dim, generator=gen), 0.0
        else:
            u = torch.rand(k, data_dim, generator=gen)
        return cls(encoder, u, config.pseudo_inputs, margin)


#: name -> class; the source of ``--prior`` choices
PRIORS: dict[str, type[Prior]] = {
    "standard": StandardNormalPrior,
    "mog": MixtureOfGaussiansPrior,
    "vamp": VampPrior,
}


def build_prior(config, *, latent_dim: int, encoder: nn.Module, train_images: torch.Tensor | None) -> Prior:
    """The prior named by ``config.prior``."""
    return PRIORS[config.prior].from_config(config, latent_dim=latent_dim, encoder=encoder, train_images=train_images)
