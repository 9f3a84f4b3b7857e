r"""Two densities that ``pyro.distributions`` has, written as matrix products.

Both are ``pyro.distributions`` objects (batch shape, event shape ``(D,)``, lazy ``expand``
under ``pyro.plate``), numerically the same as Pyro's own, and exist only because the way
Pyro's versions broadcast costs memory and time at the sizes pyrovae uses:

- :class:`DiagonalGaussianMixture` is ``MixtureSameFamily(Categorical(logits),
  Normal(loc, scale).to_event(1))``. Pyro's broadcasts every code against every component,
  an (N, K, D) tensor (10 GB for N = 100,000 codes, K = 500, D = 50); here the same numbers
  are one (N, 2D) x (2D, K) product, O(N K) memory.
- :class:`BernoulliImages` is ``Bernoulli(logits).to_event(1)``, its log density
  :math:`x^\top \ell - \sum_d \mathrm{softplus}(\ell_d)` taken as one contraction and one
  softplus pass instead of Pyro's elementwise binary cross-entropy (about half the time of
  the likelihood on (samples x examples x 784) logits; ``experiments/bench_marginal.py``).
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.torch_distribution import ExpandedDistribution
from torch.distributions.utils import lazy_property

__all__ = ["DiagonalGaussianMixture", "BernoulliImages", "softplus", "FLOAT32_ERROR_BUDGET"]

#: largest error (nats) the float32 matmul form of a mixture's log density may make, by the
#: bound of :meth:`DiagonalGaussianMixture._float32_error`; above it the products run in float64.
#: A hundredth of a nat is below the Monte Carlo noise of any log p(x) estimate pyrovae reports.
FLOAT32_ERROR_BUDGET = 1e-2
_EPS32 = float(torch.finfo(torch.float32).eps)


class _Softplus(torch.autograd.Function):
    r""":math:`\mathrm{softplus}(x) = \max(x, 0) + \log(1 + e^{-|x|})`, with gradient :math:`\sigma(x)`."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.exp(-x.abs()).add_(1).log_().add_(torch.relu(x))

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x)


def softplus(x: torch.Tensor) -> torch.Tensor:
    r""":math:`\log(1 + e^x)`, as ``torch.nn.functional.softplus`` to float rounding, about three
    times faster on a CPU: torch's kernel calls ``log1p``, which is not vectorised there, while
    :math:`\max(x, 0) + \log(1 + e^{-|x|})` needs only ``exp`` and ``log``, computed in place
    (and, where :math:`e^{-|x|}` is below float epsilon, :math:`\log(1 + e^{-|x|})` rounds to 0
    instead of :math:`e^{-|x|}`: at most 1.2e-7 per element). The elementwise work of the
    decoder's units and of the Bernoulli density is most of what the log p(x) estimator
    spends outside its matrix products."""
    return _Softplus.apply(x)


#: terms more than this many nats below the largest are raised to it before ``exp`` (see :func:`logsumexp_in`)
_LSE_FLOOR = -80.0


def logsumexp_in(a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    r""":math:`\log \sum_k e^{a_k}` over the last dimension, as ``torch.logsumexp`` up to a
    relative error below :math:`K e^{-80}`, with the exponentials in ``dtype`` (float32 where
    only the products needed float64: the sum's rounding is then that of a float32 result):
    each :math:`a_k - \max_j a_j` is floored at −80 nats before ``exp``. Far components would
    otherwise give subnormal float32 results, which a CPU computes many times slower (a
    VampPrior's log-sum-exp over 500 components took four times its matrix product). A
    floored term's gradient, under :math:`e^{-80}` of the largest one's, is dropped."""
    top = a.detach().amax(-1, keepdim=True)
    if a.requires_grad and torch.is_grad_enabled():
        s = torch.exp(torch.clamp(a - top, min=_LSE_FLOOR).to(dtype)).sum(-1)
    else:  # in place: no graph to keep
        s = (a - top).clamp_(min=_LSE_FLOOR).to(dtype).exp_().sum(-1)
    return s.log() + top.squeeze(-1).to(dtype)


class DiagonalGaussianMixture(dist.TorchDistribution):
    r"""Mixture of K diagonal Gaussians over :math:`z \in \mathbb{R}^D`:

    .. math::

        p(z) = \sum_{k=1}^K \pi_k\, \mathcal{N}(z; \mu_k, \mathrm{diag}\,\sigma_k^2),
        \qquad \pi = \mathrm{softmax}(\text{logits}).

    Each component's log density is a quadratic in z, so with :math:`u = z - c` and
    :math:`\nu_k = \mu_k - c` for a centre :math:`c` (the mean of the :math:`\mu_k`) and
    :math:`p_{kd} = \sigma_{kd}^{-2}`,

    .. math::

        \log \pi_k \mathcal{N}(z; \mu_k, \sigma_k^2) =
        \underbrace{\textstyle\sum_d u_d\, \nu_{kd} p_{kd} - \tfrac12 \sum_d u_d^2 p_{kd}}_{
            [u,\; u^2] \cdot [\nu p,\; -p/2]_k}
        \; \underbrace{- \tfrac12 \textstyle\sum_d \nu_{kd}^2 p_{kd} - \sum_d \log \sigma_{kd}
        - \tfrac{D}{2}\log 2\pi + \log \pi_k}_{\text{per component}},

    one matrix product of the (N, 2D) rows :math:`[u, u^2]` with a (2D, K) matrix, then a
    log-sum-exp over k: memory O(N K), never O(N K D).

    Precision: the expanded quadratic loses digits where it cancels, when z lies close to a
    narrow component far from the centre. In float32 its error is at most about
    :math:`\epsilon_{32} \max_k \sum_d (r_d^2 + \nu_{kd}^2) p_{kd}` with :math:`r_d` the
    spread of the component means (:meth:`_float32_error`); where that exceeds
    :data:`FLOAT32_ERROR_BUDGET` the products run in float64 (``tests/test_distributions.py``
    bounds the error of both paths against the direct formula in float64). On a GPU they
    always run in float64: deciding would cost a host sync per step.

    Gradients flow to z and to logits, loc and scale; z itself is not reparameterised
    here (a prior is scored, not sampled, in the ELBO); :meth:`sample` draws a component,
    then a Gaussian.
    """

    arg_constraints = {"logits": constraints.real_vector, "loc": constraints.real, "scale": constraints.positive}
    support = constraints.real_vector
    has_rsample = False

    def __init__(self, logits: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, validate_args=None):
        if loc.dim() != 2 or scale.shape != loc.shape or logits.shape != loc.shape[:1]:
            raise ValueError(f"expected logits (K,), loc and scale (K, D); got {tuple(logits.shape)}, "
                             f"{tuple(loc.shape)}, {tuple(scale.shape)}")
        self.logits, self.loc, self.scale = logits, loc, scale
        super().__init__(torch.Size(), loc.shape[-1:], validate_args=validate_args)

    @property
    def num_components(self) -> int:
        return self.loc.shape[0]

    def expand(self, batch_shape, _instance=None):
        return ExpandedDistribution(self, batch_shape)  # lazy: codes broadcast in log_prob, nothing is copied

    def _float32_error(self) -> float:
        with torch.no_grad():
            loc, prec = self.loc.double(), self.scale.double().pow(-2)
            nu = loc - loc.mean(0)
            spread = nu.pow(2).amax(0)  # (D,): how far codes near some component lie from the centre
            return _EPS32 * float(((spread + nu.pow(2)) * prec).sum(-1).max())

    @lazy_property
    def _factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(centre (D,), W (2D, K), const (K,))`` in the dtype the products run in."""
        dtype = self.loc.dtype
        if dtype != torch.float64 and (self.loc.device.type != "cpu" or self._float32_error() > FLOAT32_ERROR_BUDGET):
            dtype = torch.float64
        centre = self.loc.detach().mean(0)  # any centre is exact; this one keeps u and nu small
        nu = (self.loc - centre).to(dtype)  # (K, D)
        scale = self.scale.to(dtype)
        prec = scale.pow(-2)
        a = nu * prec
        const = (-0.5 * (nu * a).sum(-1) - scale.log().sum(-1) - 0.5 * nu.shape[-1] * math.log(2 * math.pi)
                 + self.logits.to(dtype).log_softmax(-1))
        return centre, torch.cat([a, -0.5 * prec], -1).T, const

    @property
    def products_dtype(self) -> torch.dtype:
        """The dtype :meth:`log_joint` computes its products in: the components' own, or float64 where
        float32 would lose more than :data:`FLOAT32_ERROR_BUDGET` nats (always float64 on a GPU)."""
        return self._factors[1].dtype

    def log_joint(self, z: torch.Tensor) -> torch.Tensor:
        r""":math:`\log \pi_k + \log \mathcal{N}(z; \mu_k, \sigma_k^2)` for every component, shape ``(..., K)``."""
        centre, w, const = self._factors
        u = (z - centre).to(w.dtype).reshape(-1, z.shape[-1])  # (N, D)
        out = torch.addmm(const, torch.cat([u, u * u], -1), w)  # (N, K)
        return out.reshape(z.shape[:-1] + (self.num_components,))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return logsumexp_in(self.log_joint(value), value.dtype)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            shape = torch.Size(sample_shape)
            k = dist.Categorical(logits=self.logits).sample(shape)  # (*shape,)
            eps = torch.randn(shape + self.event_shape, dtype=self.loc.dtype, device=self.loc.device)
            return self.loc[k] + self.scale[k] * eps


class BernoulliImages(dist.TorchDistribution):
    r"""Independent Bernoulli pixels with logits :math:`\ell`, event shape ``(D,)``:

    .. math:: \log p(x) = \sum_d x_d \ell_d - \log(1 + e^{\ell_d}) = x^\top \ell - \sum_d \mathrm{softplus}(\ell_d),

    the density of ``Bernoulli(logits=ℓ).to_event(1)`` (checked against it in the tests), with
    the sum over pixels taken as one contraction that broadcasts x unexpanded: scoring B images
    under K mixture components costs a (B, D) x (D, K) product and O(BK) memory, and S
    samples of logits for B images a batched product, with one softplus pass over the logits.
    """

    arg_constraints = {"logits": constraints.real}
    support = constraints.independent(constraints.boolean, 1)

    def __init__(self, logits: torch.Tensor, validate_args=None):
        self.logits = logits
        super().__init__(logits.shape[:-1], logits.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        return ExpandedDistribution(self, batch_shape)  # lazy: no (B, K, D) copy

    @property
    def mean(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            return torch.bernoulli(self.mean.expand(self._extended_shape(sample_shape)))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return torch.einsum("...d,...d->...", self.logits, value) - softplus(self.logits).sum(-1)
