r"""Likelihoods p(x|z): decoder output -> a distribution over x with event dim 1.

A likelihood is an ``nn.Module`` (it may own parameters, such as a learned Gaussian scale)
that maps the decoder's output to a ``pyro.distributions`` object; the model never switches
on its name.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import nn

from .distributions import BernoulliImages

__all__ = ["BernoulliLikelihood", "GaussianLikelihood", "build_likelihood"]


class BernoulliLikelihood(nn.Module):
    r""":math:`p(x|z) = \prod_d \mathrm{Bernoulli}(x_d; \sigma(\ell_d(z)))` with logits :math:`\ell`
    (:class:`~pyrovae.distributions.BernoulliImages`, Pyro's ``Bernoulli(logits).to_event(1)``
    computed as one contraction and one softplus pass)."""

    def forward(self, logits: torch.Tensor) -> dist.TorchDistribution:
        return BernoulliImages(logits)

    def mean(self, logits: torch.Tensor) -> torch.Tensor:
        """Pixel means in [0, 1], for pictures."""
        return torch.sigmoid(logits)


class GaussianLikelihood(nn.Module):
    r""":math:`p(x|z) = \mathcal{N}(x; \mu(z), \mathrm{diag}\,\sigma^2)` with a learned :math:`\sigma`.

    ``scale="shared"`` learns one :math:`\sigma` for all pixels (with a linear decoder this is
    probabilistic PCA), ``scale="pixel"`` one per pixel. :math:`\sigma` is kept above
    ``min_scale`` so that constant pixels (MNIST's borders) cannot drive the density to
    infinity.
    """

    def __init__(self, data_dim: int, scale: str = "shared", init_scale: float = 0.3, min_scale: float = 1e-3):
        super().__init__()
        if scale not in ("shared", "pixel"):
            raise ValueError(f"Gaussian scale must be 'shared' or 'pixel' (got {scale!r})")
        n = 1 if scale == "shared" else data_dim
        self.log_scale = nn.Parameter(torch.full((n,), math.log(init_scale)))
        self.min_scale = min_scale

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp().clamp_min(self.min_scale)

    def forward(self, loc: torch.Tensor) -> dist.TorchDistribution:
        return dist.Normal(loc, self.scale.expand(loc.shape[-1:])).to_event(1)

    def mean(self, loc: torch.Tensor) -> torch.Tensor:
        return loc.clamp(0.0, 1.0)


def build_likelihood(name: str, data_dim: int, scale: str = "shared") -> nn.Module:
    """The likelihood of ``--likelihood name``: :class:`BernoulliLikelihood`, or :class:`GaussianLikelihood`
    over ``data_dim`` values with one learned scale (``scale="shared"``) or one per value (``"pixel"``)."""
    if name == "bernoulli":
        return BernoulliLikelihood()
    if name == "gaussian":
        return GaussianLikelihood(data_dim, scale)
    raise ValueError(f"--likelihood must be bernoulli or gaussian (got {name!r})")
