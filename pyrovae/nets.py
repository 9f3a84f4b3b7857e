r"""Encoder and decoder networks: plain multilayer perceptrons.

With ``hidden_dims=()`` both are single affine maps, which makes the VAE with a Gaussian
likelihood exactly probabilistic PCA (Tipping & Bishop 1999).
"""

from __future__ import annotations

import torch
from torch import nn

from .distributions import softplus

__all__ = ["Encoder", "Decoder", "set_autocast"]


class Softplus(nn.Module):
    """``nn.Softplus`` computed by :func:`pyrovae.distributions.softplus` (same values, faster on a CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return softplus(x)


ACTIVATIONS = {"softplus": Softplus, "relu": nn.ReLU}


def _mlp(sizes: list[int], activation: str) -> nn.Sequential:
    if activation not in ACTIVATIONS:
        raise ValueError(f"--activation must be one of {', '.join(ACTIVATIONS)} (got {activation!r})")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class _Net(nn.Module):
    """An MLP whose matmuls may run under bf16 autocast; its outputs are always float32,
    so every log density downstream is computed in float32."""

    def __init__(self, sizes: list[int], activation: str = "softplus"):
        super().__init__()
        self.net = _mlp(sizes, activation)
        self.autocast_dtype: torch.dtype | None = None

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if self.autocast_dtype is None:
            return self.net(x)
        with torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype):
            return self.net(x).float()

    @property
    def linear_maps(self) -> list[nn.Linear]:
        return [m for m in self.net if isinstance(m, nn.Linear)]


class Encoder(_Net):
    r"""x -> (loc, log_scale) of :math:`q(z|x) = \mathcal{N}(m, \mathrm{diag}\,s^2)`.

    The notes' two outputs: the code :math:`m` and the noise control :math:`\sigma = \log s`,
    so that :math:`c = m + e^{\sigma} \cdot e`, :math:`e \sim \mathcal{N}(0, I)`. With
    ``context_dim`` > 0 a third output, the context :math:`h(x)` a flow posterior is
    conditioned on (:meth:`with_context`).
    """

    def __init__(self, data_dim: int, hidden_dims: tuple[int, ...], latent_dim: int, activation: str = "softplus",
                 context_dim: int = 0):
        super().__init__([data_dim, *hidden_dims, 2 * latent_dim + context_dim], activation)
        self.latent_dim, self.context_dim = latent_dim, context_dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.with_context(x)[:2]

    def with_context(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loc, log_scale, context)``; the context is empty when ``context_dim`` is 0."""
        return self._run(x).split([self.latent_dim, self.latent_dim, self.context_dim], dim=-1)


class Decoder(_Net):
    """z -> the likelihood's parameters (Bernoulli logits or Gaussian means), one per pixel."""

    def __init__(self, latent_dim: int, hidden_dims: tuple[int, ...], data_dim: int, activation: str = "softplus"):
        super().__init__([latent_dim, *reversed(hidden_dims), data_dim], activation)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self._run(z)


def set_autocast(module: nn.Module, dtype: torch.dtype | None) -> None:
    """Run every network inside ``module`` under autocast to ``dtype`` (``None``: float32)."""
    for sub in module.modules():
        if isinstance(sub, _Net):
            sub.autocast_dtype = dtype
