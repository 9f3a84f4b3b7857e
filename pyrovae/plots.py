"""Pictures: image grids (torchvision) and curves and maps (matplotlib, no GUI backend)."""

from __future__ import annotations

from pathlib import Path

import torch

from .files import write_atomic

# image_path, the commands' check of a picture's file name, stays importable but is not public
__all__ = ["save_image_grid", "plot_training_curves", "plot_latent_2d", "figure", "IMAGE_SUFFIXES"]

#: image files a picture may be written to (what PIL writes)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def image_path(flag: str, path: str | Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> Path:
    """``path`` as a ``Path``, or ``ValueError`` naming ``flag`` unless its name ends in one of
    ``suffixes`` (a picture is never written into a file whose name says it is something else)."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"{flag} {path}: the file name must end in an image type ({', '.join(suffixes)})")
    return path


def save_image_grid(images: torch.Tensor, image_shape: tuple[int, int], path: str | Path, nrow: int = 8) -> Path:
    """Save ``images`` ``(N, H*W)`` in [0, 1] as one PNG grid, ``nrow`` images per row."""
    from torchvision.utils import save_image

    h, w = image_shape
    grid = images.detach().float().clamp(0, 1).reshape(-1, 1, h, w).cpu()
    path = Path(path)
    fmt = {".jpg": "jpeg", ".tif": "tiff"}.get(path.suffix.lower(), path.suffix.lower().lstrip(".") or "png")
    return write_atomic(path, lambda f: save_image(grid, f, nrow=nrow, padding=2, pad_value=0.5, format=fmt))


def figure(width: float, height: float, dpi: int = 100):
    """A matplotlib ``Figure`` of ``width`` x ``height`` inches at ``dpi`` on the Agg canvas: no GUI backend, no
    global ``pyplot`` state, so that it is safe in scripts, tests and worker processes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _plot_columns(ax, rows: list[dict], epochs: list[int], columns) -> None:
    """One line per ``(key, label)`` of ``columns`` that any row has."""
    for key, label in columns:
        ys = [r.get(key) for r in rows]
        if any(y is not None for y in ys):
            ax.plot(epochs, ys, label=label)


def plot_training_curves(rows: list[dict], path: str | Path) -> Path:
    """ELBO (train and validation) and KL per epoch, from ``metrics.jsonl`` rows."""
    fig = figure(9, 3.5)
    ax1, ax2 = fig.subplots(1, 2)
    epochs = [r["epoch"] for r in rows]
    _plot_columns(ax1, rows, epochs, (("train_elbo", "train"), ("val_elbo", "validation")))
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("ELBO (nats per example)")
    if ax1.lines:  # PCA on binary data has no ELBO to draw
        ax1.legend()
    finite = [r.get("val_elbo") for r in rows if r.get("val_elbo") is not None]
    if len(finite) > 5:  # zoom past the first epochs
        lo = sorted(finite)[len(finite) // 10]
        ax1.set_ylim(bottom=lo - 0.5 * (max(finite) - lo + 1e-9))
    _plot_columns(ax2, rows, epochs, (("train_kl", "train KL"), ("val_kl", "validation KL")))
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("KL (nats per example)")
    if ax2.lines:
        ax2.legend()
    fig.tight_layout()
    return write_atomic(path, lambda f: fig.savefig(f, format="png"))


def plot_latent_2d(codes: torch.Tensor, labels: torch.Tensor | None, path: str | Path, *,
                   mixture: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, title: str = "") -> Path:
    """Scatter of 2-D codes coloured by label, with each mixture component's 2-sigma ellipse
    (line width proportional to its weight)."""
    from matplotlib.patches import Ellipse

    codes = codes.detach().cpu()
    fig = figure(5.5, 5)
    ax = fig.subplots()
    c = None if labels is None else labels.cpu().numpy()
    # a colormap only where there are labels to colour by (matplotlib warns otherwise)
    sc = ax.scatter(codes[:, 0], codes[:, 1], c=c, cmap="tab10" if c is not None else None, s=4, alpha=0.7)
    if labels is not None:
        fig.colorbar(sc, ax=ax, label="label")
    if mixture is not None:
        logits, loc, scale = (t.detach().cpu() for t in mixture)
        weights = logits.softmax(-1)
        for w, m, s in zip(weights, loc, scale):
            ax.add_patch(Ellipse((float(m[0]), float(m[1])), 4 * float(s[0]), 4 * float(s[1]), fill=False,
                                 color="black", lw=0.5 + 3 * float(w) * len(weights) ** 0.5))
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return write_atomic(path, lambda f: fig.savefig(f, format="png"))
