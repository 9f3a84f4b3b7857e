r"""Inverse autoregressive flow (IAF) posteriors: a richer q(z|x) for the same model.

The notes' ELBO gap is :math:`\log p(x) - \mathrm{ELBO} = \mathrm{KL}(q(z|x) \,\|\, p(z|x))`:
a diagonal Gaussian q cannot follow a posterior that is skewed or correlated, and the gap
(and the importance weights' heavy tail, Pareto :math:`\hat k`) stays. Kingma et al. (2016,
"Improved Variational Inference with Inverse Autoregressive Flow", arXiv:1606.04934) keep
the encoder's Gaussian as a base and push its sample through T invertible steps:

.. math::

    z_0 = m(x) + s(x) \odot \epsilon, \qquad
    z_t = \mu_t(z_{t-1}, h) + \sigma_t(z_{t-1}, h) \odot z_{t-1}, \qquad z = z_T,

where :math:`h = h(x)` is a context the encoder outputs beside :math:`m` and :math:`\log s`, and
:math:`(\mu_t, \log \sigma_t)` come from a MADE network (Germain et al. 2015) whose i-th
outputs see only :math:`z_{t-1, <i}`. The Jacobian of each step is triangular, so

.. math:: \log q(z \mid x) = \log \mathcal{N}(z_0; m, \mathrm{diag}\, s^2) - \sum_{t=1}^T \sum_i \log \sigma_{t,i},

and sampling with its density costs one pass per step. The autoregressive order is reversed
between steps (each MADE network's ``permutation``), so that every coordinate depends on
every other after two steps, without permuting the coordinates themselves (so that a flow
at the identity is the identity map).

Built from Pyro's conditional transforms (``ConditionalAffineAutoregressive`` over a
``ConditionalAutoRegressiveNN``) under ``dist.TransformedDistribution``. The
density of a draw is read from the transforms' caches (one entry each: the last draw), so
scoring a draw right after making it is exact and cheap; scoring any other z inverts the
flow exactly, one coordinate at a time (D passes). ``tests/test_flows.py`` checks the density
against the Jacobian computed by autograd, and the estimator's chunked draws against each
other.

Why Pyro's transforms and not Zuko's (``pyro.contrib.zuko``): no extra dependency, MADE with
a context input as in Kingma et al., and bounded memory in the log p(x) estimator, which
draws from one distribution object chunk after chunk: Pyro's transforms keep only the last
draw, while ``ZukoToPyro`` keeps the log density of every draw it made in a dictionary.

The last layer of every MADE network starts at zero, so the flow starts as the identity and
the guide as the Gaussian guide (same ELBO under the same seed); training moves it from there.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.distributions.transforms import ConditionalAffineAutoregressive
from pyro.nn import ConditionalAutoRegressiveNN
from torch import nn

__all__ = ["InverseAutoregressiveFlow"]


class InverseAutoregressiveFlow(nn.Module):
    r"""T conditional affine autoregressive steps over :math:`z \in \mathbb{R}^D` with context
    :math:`h \in \mathbb{R}^C`, the autoregressive order reversed between steps.

    ``hidden_dims`` are the MADE networks' hidden sizes (each at least D). The affine step is
    Kingma et al.'s eq. 10, :math:`z \leftarrow \mu + \sigma \odot z`, with
    :math:`\log \sigma` clipped to [-5, 3] (Pyro's default), so that zero last layers give the
    identity exactly.
    """

    #: ``--init`` leaves the MADE networks at Pyro's start and their zero last layers (the identity)
    keeps_its_start = True

    def __init__(self, latent_dim: int, context_dim: int, steps: int, hidden_dims: tuple[int, ...]):
        super().__init__()
        if steps < 1:
            raise ValueError(f"--flow-steps must be at least 1 (got {steps})")
        if latent_dim < 2:
            raise ValueError(f"--guide iaf needs --latent-dim 2 or more (got {latent_dim}): with one dimension "
                             "there is nothing to be autoregressive over")
        if not hidden_dims or min(hidden_dims) < latent_dim:
            raise ValueError(f"--flow-hidden-dims must be sizes of at least --latent-dim {latent_dim} "
                             f"(got {','.join(map(str, hidden_dims)) or 'none'})")
        self.latent_dim, self.context_dim = latent_dim, context_dim
        order = torch.arange(latent_dim)
        self.steps = nn.ModuleList()
        for t in range(steps):
            made = ConditionalAutoRegressiveNN(latent_dim, context_dim, list(hidden_dims),
                                               permutation=order if t % 2 == 0 else order.flip(0))
            last = made.layers[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            self.steps.append(ConditionalAffineAutoregressive(made))

    def transforms(self, context: torch.Tensor) -> list:
        """The flow's transforms conditioned on ``context`` (fresh objects, with empty caches)."""
        return [step.condition(context) for step in self.steps]

    def distribution(self, base: dist.TorchDistribution, context: torch.Tensor) -> dist.TorchDistribution:
        r""":math:`q(z|x)`: ``base`` (the Gaussian :math:`\mathcal{N}(m, s^2)`, event shape ``(D,)``)
        pushed through the flow."""
        return dist.TransformedDistribution(base, self.transforms(context))

    def forward(self, z0: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """:math:`z = f_T \\circ \\dots \\circ f_1(z_0)` for given base points (the code of x is
        the flow at the base mean)."""
        z = z0
        for t in self.transforms(context):
            z = t(z)
        return z
