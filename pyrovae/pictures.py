r"""What the decoder makes of codes: samples, reconstructions, interpolations.

Every function returns pixel means, ``(N, D)`` in [0, 1]; :func:`~pyrovae.plots.save_image_grid`
turns them into a PNG. They work on every model kind (VAE, autoencoder, PCA; the finite
mixture has no continuous code to interpolate).
"""

from __future__ import annotations

import torch

from .marginal import isolated_params

__all__ = ["sample_images", "samples_by_component", "component_count", "reconstructions", "interpolation", "code_prior"]


def code_prior(model):
    """The prior p(z) the model's codes were trained against, or ``None``: the autoencoder
    keeps the VAE's prior module, but its objective masks it out, so its codes never saw it
    (and PCA and the finite mixture have none)."""
    return getattr(model, "prior", None) if getattr(model, "has_posterior", False) else None


@torch.no_grad()
def sample_images(model, n: int) -> torch.Tensor:
    """Decode n codes from the model's generative distribution over codes."""
    with isolated_params():
        return model.decode(model.sample_codes(n))


def component_count(model) -> int:
    """How many components the model's mixture has (its prior's, or the finite mixture's own)."""
    n = model.mixture_size()
    if n == 0:
        raise ValueError(f"a {model.kind} model has no prior with components; drop --by-component")
    return n


@torch.no_grad()
def samples_by_component(model, per_component: int = 8, max_components: int = 10) -> tuple[torch.Tensor, list[int]]:
    r"""Rows of samples, one row per mixture component (the heaviest ``max_components``):
    codes :math:`z \sim \mathcal{N}(\mu_k, \mathrm{diag}\,\sigma_k^2)` decoded, or, for the finite
    mixture, draws of each component's pixel distribution. Returns the images and the
    component indices."""
    component_count(model)
    with isolated_params():
        return model.samples_by_component(per_component, max_components)


@torch.no_grad()
def reconstructions(model, images: torch.Tensor) -> torch.Tensor:
    """Originals above their reconstructions decode(encode(x)): ``(2N, D)``."""
    with isolated_params():
        return torch.cat([images, model.decode(model.encode(images))])


@torch.no_grad()
def interpolation(model, x_from: torch.Tensor, x_to: torch.Tensor,
                  steps: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Decode the straight line :math:`z_t = (1-t)\,m(x_a) + t\,m(x_b)`, :math:`t \in [0, 1]`,
    between the codes of two images (the notes' full moon and half moon).

    Returns ``(images, codes)``: ``steps`` decoded images and their codes.
    """
    if not model.has_code:
        raise ValueError(f"a {model.kind} model has a discrete code: there is no straight line to interpolate along")
    if steps < 2:
        raise ValueError(f"--steps must be at least 2 (got {steps})")
    with isolated_params():
        za, zb = model.encode(torch.stack([x_from, x_to]))
        t = torch.linspace(0, 1, steps, device=za.device).unsqueeze(-1)
        z = (1 - t) * za + t * zb
        return model.decode(z), z
