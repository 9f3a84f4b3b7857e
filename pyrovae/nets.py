r"""Encoder and decoder networks: multilayer perceptrons, or small convolutional networks for images.

With ``hidden_dims=()`` the MLPs are single affine maps, which makes the VAE with a Gaussian
likelihood exactly probabilistic PCA (Tipping & Bishop 1999).

``net="gated"`` (``--net gated``) makes every hidden layer a gated dense layer
(:class:`GatedDense`, the MLP of the VampPrior paper). ``net="conv"`` (``--net conv``) puts two
stride-2 convolutions (16 and 32 channels, 4x4 kernels) in front of the encoder's MLP and two
stride-2 transposed convolutions after the decoder's, with ReLU units (:data:`CONV_ACTIVATION`),
for images whose height and width are multiples of 4 (28x28, 8x8): the images are ``(N, H*W)``
rows everywhere else in pyrovae, and the networks reshape them. Every kind keeps the same
shapes outside, ``(..., D)`` in and ``(..., out)`` out, so models never see the kind.
:class:`JointNet` takes several inputs (the two-level model's networks).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import INITS, SCALE_HEADS
from .distributions import softplus

# set_autocast and init_weights_, helpers of the trainer and the models, stay importable but are not public
__all__ = ["Encoder", "Decoder", "JointNet", "GatedDense", "log_scale_from", "mark_fused", "FUSED_PARTS"]

#: the VampPrior code's bounds on every log-variance (its ``Hardtanh(-6, 2)``)
LOG_VAR_BOUNDS = (-6.0, 2.0)
#: channels of the two convolutions of ``--net conv``
CONV_CHANNELS = (16, 32)
#: the units of ``--net conv``, whatever ``--activation`` says: with softplus units the convolutional
#: VAE collapsed its posterior within its first epochs on mnist5k (KL 0.0 nats, validation ELBO
#: -205.6 after 8 epochs, the independent-pixel model), with ReLU units it did not (-184.6, KL 5.4)
CONV_ACTIVATION = "relu"


def log_scale_from(raw: torch.Tensor, head: str = "log-scale") -> torch.Tensor:
    r"""The log standard deviation :math:`\log s` a Gaussian head reads from its raw output :math:`r`:

    - ``"log-scale"``: :math:`\log s = r`, unbounded (pyrovae's default);
    - ``"clipped-log-var"``: :math:`r` is a log-variance clipped to :data:`LOG_VAR_BOUNDS`,
      :math:`\log s = \tfrac12 \mathrm{hardtanh}(r, -6, 2)`, so :math:`s \in [e^{-3}, e]` (the VampPrior
      code's ``NonLinear(..., Hardtanh(-6, 2))`` heads; the gradient is zero outside the bounds).
    """
    if head == "log-scale":
        return raw
    if head == "clipped-log-var":
        return 0.5 * torch.nn.functional.hardtanh(raw, *LOG_VAR_BOUNDS)
    raise ValueError(f"--scale-head must be one of {', '.join(SCALE_HEADS)} (got {head!r})")


@torch.no_grad()
def init_weights_(module: nn.Module, init: str) -> None:
    r"""Start every ``nn.Linear`` inside ``module`` as ``--init`` says (biases keep PyTorch's start):

    - ``"torch"``: PyTorch's own start, uniform on :math:`\pm 1/\sqrt{\text{fan-in}}` (left as it is);
    - ``"he"``: weights :math:`\sim \mathcal{N}(0, 2 / \text{fan-in})`, the VampPrior code's ``he_init``,
      which it applies to every linear map, gates and heads included;
    - ``"xavier"``: weights :math:`\sim \mathcal{N}(0, 2 / (\text{fan-in} + \text{fan-out}))`, the
      ``xavier_init`` of that code's first public version. A map that stacks several maps
      (:func:`mark_fused`: a gated layer's value and gate, a head's mean and scale) takes each part's own
      fan-out, as the reference code's separate layers do.

    A module with ``keeps_its_start = True`` (a ``--guide iaf`` flow, which starts as the identity)
    is left as it is, with everything inside it.
    """
    if init not in INITS:
        raise ValueError(f"--init must be one of {', '.join(INITS)} (got {init!r})")
    if init == "torch":
        return
    kept = {id(m) for owner in module.modules() if getattr(owner, "keeps_its_start", False) for m in owner.modules()}
    for m in module.modules():
        if not isinstance(m, nn.Linear) or id(m) in kept:
            continue
        if init == "he":  # fan-in only, so drawn whole: one draw keeps the shipped he runs' random stream
            m.weight.normal_(0.0, math.sqrt(2.0 / m.in_features))
            continue
        for part in m.weight.split(list(getattr(m.weight, FUSED_PARTS, (m.out_features,))), dim=0):
            part.normal_(0.0, math.sqrt(2.0 / (m.in_features + part.shape[0])))


class Softplus(nn.Module):
    """``nn.Softplus`` computed by :func:`pyrovae.distributions.softplus` (same values, faster on a CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return softplus(x)


ACTIVATIONS = {"softplus": Softplus, "relu": nn.ReLU}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"--activation must be one of {', '.join(ACTIVATIONS)} (got {name!r})")
    return ACTIVATIONS[name]()


#: the attribute of a parameter tensor that stacks several maps along its first dimension: their sizes
#: (``--norm-grad-by map`` normalises each map's gradient on its own)
FUSED_PARTS = "fused_parts"


def mark_fused(linear: nn.Linear, sizes: tuple[int, ...]) -> None:
    """Record that ``linear`` stacks maps of ``sizes`` outputs (in order) in its weight and bias, so that
    ``--norm-grad-by map`` normalises each map's gradient on its own.

    Examples
    --------
    >>> from torch import nn
    >>> from pyrovae.nets import FUSED_PARTS, mark_fused
    >>> both = nn.Linear(3, 4)  # a mean map and a log-scale map of 2 outputs each, in one product
    >>> mark_fused(both, (2, 2))
    >>> getattr(both.weight, FUSED_PARTS), getattr(both.bias, FUSED_PARTS)
    ((2, 2), (2, 2))
    """
    if sum(sizes) != linear.out_features:
        raise ValueError(f"fused parts {sizes} do not add up to {linear.out_features} outputs")
    for p in (linear.weight, linear.bias):
        if p is not None:
            setattr(p, FUSED_PARTS, tuple(sizes))


class GatedDense(nn.Module):
    r"""A gated dense layer (Dauphin et al. 2017; the hidden layers of Tomczak & Welling 2018):

    .. math:: h = (W_1 x + b_1) \odot \sigma(W_2 x + b_2)

    The gate is the layer's nonlinearity. Both maps are one ``nn.Linear`` of twice the width,
    so a layer costs one matrix product (marked :func:`mark_fused`: two maps)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, 2 * out_features)
        mark_fused(self.linear, (out_features, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.linear(x).chunk(2, dim=-1)
        return h * torch.sigmoid(gate)


def _mlp(sizes: list[int], activation: str, dropout: float = 0.0, last_activation: bool = False,
         gated: bool = False) -> list[nn.Module]:
    """Layers from ``sizes[0]`` to ``sizes[-1]``: hidden layers are affine + ``activation``, or
    :class:`GatedDense` with ``gated``; the last is affine (hidden too, with ``last_activation``)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        hidden = i < len(sizes) - 2 or last_activation
        if hidden and gated:
            layers.append(GatedDense(a, b))
        else:
            layers.append(nn.Linear(a, b))
            if hidden:
                layers.append(_activation(activation))
        if hidden and dropout > 0:
            layers.append(nn.Dropout(dropout))
    return layers


def _conv_grid(image_shape) -> tuple[int, int]:
    if image_shape is None or len(image_shape) != 2 or min(image_shape) < 4 or any(s % 4 for s in image_shape):
        shape = "x".join(map(str, image_shape)) if image_shape else "no image shape"
        raise ValueError(f"--net conv needs images whose height and width are multiples of 4 (such as 28x28 or 8x8); "
                         f"this data is {shape}: use --net mlp")
    return image_shape[0] // 4, image_shape[1] // 4


def _conv_encoder(image_shape, hidden_dims, out_dim, activation, dropout) -> list[nn.Module]:
    h, w = _conv_grid(image_shape)
    c1, c2 = CONV_CHANNELS
    return [nn.Unflatten(-1, (1, *image_shape)),
            nn.Conv2d(1, c1, 4, stride=2, padding=1), _activation(activation),
            nn.Conv2d(c1, c2, 4, stride=2, padding=1), _activation(activation), nn.Flatten(),
            *([nn.Dropout(dropout)] if dropout > 0 else []),
            *_mlp([c2 * h * w, *hidden_dims, out_dim], activation, dropout)]


def _conv_decoder(image_shape, hidden_dims, in_dim, activation) -> list[nn.Module]:
    h, w = _conv_grid(image_shape)
    c1, c2 = CONV_CHANNELS
    return [*_mlp([in_dim, *reversed(hidden_dims), c2 * h * w], activation, last_activation=True),
            nn.Unflatten(-1, (c2, h, w)),
            nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1), _activation(activation),
            nn.ConvTranspose2d(c1, 1, 4, stride=2, padding=1), nn.Flatten()]


class _Net(nn.Module):
    """A network from ``(..., in)`` rows to ``(..., out)`` rows, whose products may run under
    bf16 autocast; its outputs are always float32, so every log density downstream is
    computed in float32."""

    def __init__(self, layers: list[nn.Module], in_dim: int):
        super().__init__()
        self.net = nn.Sequential(*layers)
        self.in_dim = in_dim
        self.autocast_dtype: torch.dtype | None = None
        self._flat = not any(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in layers)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        if not self._flat:  # convolutions want (N, D) rows: fold the sample and batch dims together
            x = x.reshape(math.prod(lead) if lead else 1, x.shape[-1])
        if self.autocast_dtype is None:
            out = self.net(x)
        else:
            with torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype):
                out = self.net(x).float()
        return out if self._flat else out.reshape(*lead, out.shape[-1])

    @property
    def linear_maps(self) -> list[nn.Linear]:
        """The affine maps, in order (all of the network only when it is an MLP)."""
        return [m for m in self.net if isinstance(m, nn.Linear)]

    @property
    def is_linear(self) -> bool:
        """Whether the whole network is one affine map."""
        return len(self.net) == 1 and isinstance(self.net[0], nn.Linear)


class Encoder(_Net):
    r"""x -> (loc, log_scale) of :math:`q(z|x) = \mathcal{N}(m, \mathrm{diag}\,s^2)`.

    The notes' two outputs: the code :math:`m` and the noise control :math:`\sigma = \log s`,
    so that :math:`c = m + e^{\sigma} \cdot e`, :math:`e \sim \mathcal{N}(0, I)`. With
    ``context_dim`` > 0 a third output, the context :math:`h(x)` a flow posterior is
    conditioned on (:meth:`with_context`). ``dropout`` follows every hidden layer (training only).
    The networks between stochastic layers, and the model's from one layer down to the next,
    are Encoders of the layer above or below.
    """

    def __init__(self, data_dim: int, hidden_dims: tuple[int, ...], latent_dim: int, activation: str = "softplus",
                 context_dim: int = 0, net: str = "mlp", image_shape: tuple[int, int] | None = None,
                 dropout: float = 0.0, scale_head: str = "log-scale"):
        out = 2 * latent_dim + context_dim
        if net == "conv":
            layers = _conv_encoder(image_shape, hidden_dims, out, CONV_ACTIVATION, dropout)
        else:
            layers = _mlp([data_dim, *hidden_dims, out], activation, dropout, gated=net == "gated")
        super().__init__(layers, data_dim)
        # the mean, the log-scale and the context maps share the last affine map
        mark_fused(self.linear_maps[-1], (latent_dim, latent_dim) + ((context_dim,) if context_dim else ()))
        log_scale_from(torch.zeros(()), scale_head)  # (checks the name)
        self.latent_dim, self.context_dim, self.scale_head = latent_dim, context_dim, scale_head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.with_context(x)[:2]

    def with_context(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loc, log_scale, context)``; the context is empty when ``context_dim`` is 0; ``log_scale``
        as ``scale_head`` reads it (:func:`log_scale_from`)."""
        loc, raw, context = self._run(x).split([self.latent_dim, self.latent_dim, self.context_dim], dim=-1)
        return loc, log_scale_from(raw, self.scale_head), context


class Decoder(_Net):
    """z -> the likelihood's parameters (Bernoulli logits or Gaussian means), one per pixel."""

    def __init__(self, latent_dim: int, hidden_dims: tuple[int, ...], data_dim: int, activation: str = "softplus",
                 net: str = "mlp", image_shape: tuple[int, int] | None = None):
        if net == "conv":
            layers = _conv_decoder(image_shape, hidden_dims, latent_dim, CONV_ACTIVATION)
        else:
            layers = _mlp([latent_dim, *reversed(hidden_dims), data_dim], activation, gated=net == "gated")
        super().__init__(layers, latent_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self._run(z)


class JointNet(nn.Module):
    r"""A network of several inputs, ``(u_1, ..., u_n) -> (..., out)``: each input passes a first
    hidden layer of its own (``hidden_dims[0]`` units), their concatenation the remaining hidden
    layers and an affine output. These are the VampPrior paper's :math:`q(z_1 \mid x, z_2)` and
    :math:`p(x \mid z_1, z_2)` (Tomczak & Welling 2018, appendix). With ``hidden_dims=()`` it is
    one affine map of the concatenation. Leading (sample, batch) dimensions broadcast, and each
    input's first layer runs before broadcasting, so x is not copied per sample of z.
    """

    def __init__(self, in_dims: list[int], hidden_dims: tuple[int, ...], out_dim: int, activation: str = "softplus",
                 net: str = "mlp"):
        super().__init__()
        gated = net == "gated"
        if hidden_dims:
            self.branches = nn.ModuleList(_Net(_mlp([d, hidden_dims[0]], activation, last_activation=True,
                                                    gated=gated), d) for d in in_dims)
            joint_in = len(in_dims) * hidden_dims[0]
            self.joint = _Net(_mlp([joint_in, *hidden_dims[1:], out_dim], activation, gated=gated), joint_in)
        else:
            self.branches = None
            self.joint = _Net([nn.Linear(sum(in_dims), out_dim)], sum(in_dims))
        self.in_dims, self.out_dim = list(in_dims), out_dim

    @property
    def linear_maps(self) -> list[nn.Linear]:
        """The affine maps after the concatenation, in order (the last one gives the outputs)."""
        return self.joint.linear_maps

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        h = inputs if self.branches is None else [b._run(u) for b, u in zip(self.branches, inputs)]
        lead = torch.broadcast_shapes(*(t.shape[:-1] for t in h))
        return self.joint._run(torch.cat([t.expand(*lead, t.shape[-1]) for t in h], dim=-1))


def set_autocast(module: nn.Module, dtype: torch.dtype | None) -> None:
    """Run every network inside ``module`` under autocast to ``dtype`` (``None``: float32)."""
    for sub in module.modules():
        if isinstance(sub, _Net):
            sub.autocast_dtype = dtype
