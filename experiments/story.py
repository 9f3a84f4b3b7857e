r"""The notes' argument (§1), run and measured: PCA -> deep autoencoder -> VAE.

The argument, step by step, and what this script measures for each step:

1. **PCA is a linear autoencoder.** A matrix :math:`W` maps an image to a code
   :math:`c = W(x - \bar x)` and :math:`W^\top` maps it back, :math:`\hat x = W^\top c + \bar x`;
   PCA picks the :math:`W` with orthonormal rows that minimises :math:`\sum_n \|x_n - \hat x_n\|^2`.
2. **A deep autoencoder** replaces :math:`W` and :math:`W^\top` by networks and reconstructs
   784 pixels from a 30-number code (Hinton & Salakhutdinov, Science 2006, 784-1000-500-250-30).
   *Measured:* test-split reconstruction error (MSE per pixel, binary cross-entropy in nats
   per image) against code size 2, 5, 10, 30, 50 for PCA, AE and VAE.
3. **An autoencoder is not generative.** Its decoder has only learned the points where training
   codes lie; between the codes of a "full moon" and a "half moon" it need not produce a
   "three-quarter moon", and far from every code it produces garbage.
   *Measured:* decode the straight line :math:`z_t = (1-t)\,m(x_a) + t\,m(x_b)` between the
   codes of two test images of different classes, and decode random codes drawn from each
   model's generative distribution; at every image, the confidence
   :math:`\max_k p(y = k \mid \hat x)` of a fixed digit classifier (logistic regression trained
   on the training split), the distance to the nearest training image, and the ELBO that an
   independently trained VAE (the *judge*) gives the image.
4. **The VAE's noise** makes every image own a region of code space,
   :math:`q(z|x) = \mathcal{N}(m(x), \mathrm{diag}\, s(x)^2)`, and the KL term
   :math:`\mathrm{KL}(q(z|x) \,\|\, \mathcal{N}(0, I))` stretches the regions over the whole
   space, so that codes drawn from the prior decode to digits (Kingma & Welling 2013).
   *Measured:* as in 3, plus the map: a 2-D VAE's code space decoded on a grid through the
   inverse Gaussian CDF (Kingma & Welling 2013, Fig. 4), and the test codes of the 2-D AE and
   VAE coloured by label.

The notes predict two verdicts, which the report checks at every code size: the VAE's
random-code samples get a higher classifier confidence than the AE's, and the AE's
interpolation midpoints (:math:`t = 1/2`) a lower one than the VAE's. It checks them on the
judge's ELBO and the nearest-image distance too, and first reads all three yardsticks on
images of known nature (real digits, blurred digits, pixel averages of two digits, digits with
their pixels permuted, noise), so that a verdict can be read against what garbage and what a
compromise of two digits score.

Fair use of the autoencoder and PCA as generators: codes are drawn from the Gaussian fitted to
their training codes (full covariance for the AE, :math:`\mathcal{N}(0, \mathrm{diag}\,\lambda)`
for PCA, whose codes are uncorrelated), the best a Gaussian can do with their code spaces.

Every model is a pyrovae run (``pyrovae train --model pca|ae|vae``) kept under
``OUT/runs/``, so a rerun reuses them (``--retrain`` trains afresh) and every run can be
inspected with ``pyrovae evaluate|sample|reconstruct|interpolate``.

Usage::

    python experiments/story.py            # the full study (41 minutes on 2 shared CPU cores)
    python experiments/story.py --quick    # every step on tiny settings, in well under a minute
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pyrovae import TrainConfig, load_dataset, load_run
from pyrovae.data import static_binarized
from pyrovae.marginal import estimate_log_px, isolated_params
from pyrovae.metrics import reconstruction_errors
from pyrovae.pictures import interpolation, sample_images
from pyrovae.plots import figure, save_image_grid
from pyrovae.training import train_or_reuse

KINDS = ("pca", "ae", "vae")
LABEL = {"pca": "PCA", "ae": "AE", "vae": "VAE"}
COLOR = {"pca": "tab:gray", "ae": "tab:red", "vae": "tab:blue"}
#: (key, axis label, +1 where higher is better, -1 where lower is)
YARDSTICKS = (("confidence", "classifier confidence", 1), ("judge_elbo", "second-VAE ELBO (nats)", 1),
              ("nearest", "RMS distance to the\nnearest training image", -1))
SHORT = {"confidence": "confidence", "judge_elbo": "second-VAE ELBO", "nearest": "nearest", "greyness": "greyness"}
PAIR_MASS = "pair mass (post hoc)"


@dataclass(frozen=True)
class StorySettings:
    """Every setting of the study, with its default (the full run)."""

    dataset: str = "mnist5k"
    data_dir: str = "data"
    sizes: tuple[int, ...] = (2, 5, 10, 30, 50)  # code sizes of the sweep
    main_size: int = 30  # the 784 -> 30 of Hinton & Salakhutdinov 2006: AE and VAE side by side here
    hidden_dims: tuple[int, ...] = (400,)  # encoder and decoder of every AE and VAE of the sweep
    deep_dims: tuple[int, ...] = (1000, 500, 250)  # Hinton & Salakhutdinov's 784-1000-500-250-30, one extra row
    judge_size: int = 50  # the judge VAE: 784-400-50, trained with judge_seed
    judge_seed: int = 1  # another seed than the sweep's, so no model judges its own decodes
    epochs: int = 100  # per AE/VAE training (cosine learning rate over them, best validation epoch kept)
    seed: int = 0  # training seed of the sweep, and of pairs, codes and binarisation of decodes
    num_pairs: int = 50  # test-image pairs of different classes for the interpolations
    steps: int = 11  # images along each line: t = 0, 0.1, ..., 1, so that t = 1/2 is one of them
    num_codes: int = 1000  # random codes decoded per model
    grid_size: int = 20  # the map: grid_size x grid_size codes
    elbo_samples: int = 10  # draws from q(z|x) per image for the judge's ELBO
    shown_pairs: int = 3  # interpolations drawn in the figure: the first pairs of the seeded draw


QUICK = dict(sizes=(2, 5), main_size=5, hidden_dims=(32,), deep_dims=(64, 32), judge_size=5, epochs=2,
             num_pairs=6, num_codes=200, grid_size=6, elbo_samples=2)


# --- training, cached under OUT/runs -----------------------------------------------------------


def _run_configs(s: StorySettings, runs_dir: Path) -> dict[str, TrainConfig]:
    """Every run the study needs, by name."""
    base = dict(dataset=s.dataset, data_dir=s.data_dir, epochs=s.epochs, seed=s.seed, out=str(runs_dir))
    configs = {}
    for d in s.sizes:
        for kind in KINDS:
            hidden = s.hidden_dims if kind != "pca" else TrainConfig().hidden_dims
            configs[f"{kind}-d{d}"] = TrainConfig(**base, model=kind, latent_dim=d, hidden_dims=hidden,
                                                  name=f"{kind}-d{d}")
    for kind in ("ae", "vae"):
        name = f"{kind}-deep-d{s.main_size}"
        configs[name] = TrainConfig(**base, model=kind, latent_dim=s.main_size, hidden_dims=s.deep_dims, name=name)
    configs["judge"] = TrainConfig(**{**base, "seed": s.judge_seed}, model="vae", latent_dim=s.judge_size,
                                   hidden_dims=s.hidden_dims, name=f"judge-vae-d{s.judge_size}")
    return configs


def _train_or_load(config: TrainConfig, retrain: bool, progress: bool):
    """The run of ``config``: reused when OUT/runs holds it finished with the same settings,
    continued when it was interrupted, trained otherwise (``--retrain``: trained again)."""
    run_dir = Path(config.out) / config.name
    if retrain and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir, _ = train_or_reuse(config, progress=progress, fix="rerun with --retrain, or choose another --out",
                                ignore=("out", "name", "device"))
    return load_run(run_dir)


# --- measurements ------------------------------------------------------------------------------


def _mean_se(v) -> tuple[float, float]:
    v = torch.as_tensor(v, dtype=torch.float64).flatten()
    se = float(v.std()) / math.sqrt(v.numel()) if v.numel() > 1 else math.nan
    return float(v.mean()), se


class Judge:
    r"""The fixed yardsticks every decoded image is measured with.

    - ``confidence``: :math:`\max_k p(y = k \mid \hat x)` of a logistic regression (scikit-learn,
      default :math:`C = 1`) fitted to the grey training images; decoded pixel means are grey
      images too.
    - ``nearest``: RMS pixel distance :math:`\min_n \|\hat x - x_n\|_2 / \sqrt{D}` to the
      nearest grey training image.
    - ``elbo``: the judge VAE's ELBO (nats, ``elbo_samples`` draws from its q) of the decoded
      image binarised once, :math:`x_b \sim \mathrm{Bernoulli}(\hat x)` with a fixed seed, the
      way test images are binarised: a lower bound on the judge's :math:`\log p(x_b)`.
    """

    def __init__(self, train_grey, train_labels, judge_vae, *, elbo_samples: int, seed: int):
        from sklearn.linear_model import LogisticRegression

        self.train_grey = train_grey
        self.classifier = LogisticRegression(max_iter=2000).fit(train_grey.double().numpy(), train_labels.numpy())
        self.vae, self.elbo_samples, self.seed = judge_vae, elbo_samples, seed

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.classifier.predict_proba(images.double().numpy()))  # (N, 10)

    def confidence(self, images: torch.Tensor) -> torch.Tensor:
        return self.probabilities(images).max(1).values

    def nearest(self, images: torch.Tensor) -> torch.Tensor:
        d = torch.cat([torch.cdist(x.double(), self.train_grey.double()).min(1).values for x in images.split(1024)])
        return d / math.sqrt(images.shape[1])

    def elbo(self, images: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        binary = torch.bernoulli(images.clamp(0, 1), generator=gen)
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            return estimate_log_px(self.vae, binary, self.elbo_samples, diagnostics=False).elbo


def measure_reconstruction(models: dict, test_binary) -> dict:
    """MSE per pixel and BCE nats per image of decode(encode(x)) on the test split (as the runs score it)."""
    return {name: reconstruction_errors(run.model, test_binary.images) for name, run in models.items()}


def choose_pairs(labels: torch.Tensor, num_pairs: int, seed: int) -> list[tuple[int, int]]:
    """``num_pairs`` distinct pairs (i, j) of test images with different labels, uniformly at random."""
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    pairs: list[tuple[int, int]] = []
    while len(pairs) < num_pairs:
        i = int(rng.integers(len(y)))
        others = np.flatnonzero(y != y[i])
        j = int(others[rng.integers(len(others))])
        if (i, j) not in pairs and (j, i) not in pairs:
            pairs.append((i, j))
    return pairs


def _scores(images: torch.Tensor, judge: Judge) -> dict[str, torch.Tensor]:
    r"""Every yardstick of every image, ``(N,)`` each, the classifier's label, and the image's
    greyness :math:`\frac1D \sum_d \min(x_d, 1 - x_d)` (0 for a binary image; blur raises it), which
    is no verdict but explains some."""
    probs = judge.probabilities(images)
    return {"confidence": probs.max(1).values, "judge_elbo": judge.elbo(images), "nearest": judge.nearest(images),
            "label": probs.argmax(1), "greyness": torch.minimum(images, 1 - images).double().mean(1)}


def measure_interpolations(models: dict, test_binary, pairs, steps: int, judge: Judge, progress: bool) -> dict:
    r"""Per model: decoded lines ``(P, steps, D)`` and every yardstick at every step ``(P, steps)``,
    plus the *pair mass* :math:`p(y = a \mid \hat x) + p(y = b \mid \hat x)`, the classifier's
    probability that the image is one of the two digits at the ends of its line (added after
    the first full run, to measure the notes' "compromise of both images" directly)."""
    from tqdm import tqdm

    a, b = (test_binary.labels[[p[k] for p in pairs]] for k in (0, 1))  # (P,) labels of the ends
    out = {}
    for name, run in tqdm(models.items(), desc="between two codes", unit="model", disable=not progress):
        x = test_binary.images
        lines = torch.stack([interpolation(run.model, x[i], x[j], steps=steps)[0] for i, j in pairs])
        flat = lines.reshape(-1, lines.shape[-1])
        scores = _scores(flat, judge)
        probs = judge.probabilities(flat).reshape(len(pairs), steps, -1)  # (P, steps, classes)
        pair_mass = probs.gather(2, a[:, None, None].expand(-1, steps, 1))[..., 0] + \
            probs.gather(2, b[:, None, None].expand(-1, steps, 1))[..., 0]
        out[name] = {"images": lines, "pair_mass": pair_mass,
                     **{k: v.reshape(len(pairs), steps) for k, v in scores.items()}}
    return out


def measure_random_codes(models: dict, num_codes: int, judge: Judge, seed: int, progress: bool) -> dict:
    """Per model: ``num_codes`` decoded random codes and every yardstick of each."""
    from tqdm import tqdm

    out = {}
    for name, run in tqdm(models.items(), desc="far from the codes", unit="model", disable=not progress):
        torch.manual_seed(seed)
        images = sample_images(run.model, num_codes)
        out[name] = {"images": images, **_scores(images, judge)}
    return out


def calibration_images(test_grey, test_binary, pairs, seed: int) -> dict[str, torch.Tensor]:
    r"""Images whose nature is known by construction, to read the yardsticks against.

    Real digits (grey and binarised), real digits blurred by a 3x3 mean filter, the pixel
    average :math:`\tfrac12(x_i + x_j)` of the test pairs of different classes (a compromise
    of two digits, made without any model), the pixels of each test digit randomly permuted
    (garbage with a digit's ink), and Bernoulli noise with the mean ink of the test digits.
    """
    import torch.nn.functional as F

    x = test_grey.images
    h, w = test_grey.image_shape
    gen = torch.Generator().manual_seed(seed)
    return {
        "real test digits (grey)": x,
        "real test digits (binarised)": test_binary.images,
        "test digits blurred 3x3": F.avg_pool2d(x.reshape(-1, 1, h, w), 3, stride=1, padding=1,
                                                count_include_pad=False).reshape(x.shape),
        "pixel average of two test digits of different classes": torch.stack([0.5 * (x[i] + x[j]) for i, j in pairs]),
        "test digits, pixels permuted": torch.stack([v[torch.randperm(v.numel(), generator=gen)] for v in x]),
        "Bernoulli noise at the digits' mean ink": torch.bernoulli(x.mean().expand_as(x), generator=gen),
    }


def latent_grid(model, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    r"""An ``n x n`` grid of 2-D codes decoded, rows from top (high :math:`z_2`) to bottom.

    Equal-probability grid (Kingma & Welling 2013, Fig. 4):
    :math:`z_i = \mu + L\, \Phi^{-1}(u_i)` with :math:`u_i = (i + \tfrac12)/n`, :math:`\Phi` the
    standard normal CDF; :math:`\mu = 0, L = I` for the VAE's prior, the fitted Gaussian's mean and
    Cholesky factor for the autoencoder. Returns ``(images, codes)``.
    """
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    g = torch.distributions.Normal(0.0, 1.0).icdf(u)
    z2, z1 = torch.meshgrid(g.flip(0), g, indexing="ij")
    std = torch.stack([z1, z2], -1).reshape(-1, 2).float()  # (n*n, 2)
    if hasattr(model, "code_loc"):
        codes = model.code_loc + std @ model.code_scale_tril.T
    else:
        codes = std
    with torch.no_grad(), isolated_params():
        return model.decode(codes), codes


def knn_accuracy(train_codes, train_labels, test_codes, test_labels, k: int = 5) -> float:
    """How well the code map separates the digits: k-nearest-neighbour accuracy of test codes."""
    from sklearn.neighbors import KNeighborsClassifier

    knn = KNeighborsClassifier(n_neighbors=k).fit(train_codes.numpy(), train_labels.numpy())
    return float(knn.score(test_codes.numpy(), test_labels.numpy()))


# --- figures (matplotlib Figure API, torchvision grids) --------------------------------------------


def _figure(width: float, height: float):
    return figure(width, height, dpi=90)


def _save(fig, path: Path) -> None:
    """Save as a PNG of at most 128 colours: a few tens of KB, small enough to commit."""
    from PIL import Image

    fig.savefig(path)
    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=128, method=Image.Quantize.FASTOCTREE)
    small.save(path, optimize=True)


def _show_grid(ax, images: torch.Tensor, image_shape, nrow: int, title: str = "") -> None:
    from torchvision.utils import make_grid

    h, w = image_shape
    grid = make_grid(images.detach().float().clamp(0, 1).reshape(-1, 1, h, w).cpu(), nrow=nrow, padding=2,
                     pad_value=0.5)
    ax.imshow(grid[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def figure_reconstruction(s, recon, examples, models, image_shape, path: Path) -> None:
    fig = _figure(9, 5.2)
    gs = fig.add_gridspec(2, 2, height_ratios=[1, 1.05])
    for col, (metric, ylabel) in enumerate((("mse", "test MSE per pixel"), ("bce", "test BCE (nats per image)"))):
        ax = fig.add_subplot(gs[0, col])
        for kind in KINDS:
            ax.plot(s.sizes, [recon[f"{kind}-d{d}"][metric] for d in s.sizes], "o-", color=COLOR[kind],
                    label=LABEL[kind])
        for kind in ("ae", "vae"):
            ax.plot([s.main_size], [recon[f"{kind}-deep-d{s.main_size}"][metric]], "*", ms=11, color=COLOR[kind],
                    label=f"{LABEL[kind]} 784-{'-'.join(map(str, s.deep_dims))}-{s.main_size}")
        ax.set_xscale("log")
        ax.set_xticks(s.sizes, [str(d) for d in s.sizes])
        ax.set_xticks([], minor=True)
        ax.set_xlabel("code size")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if col == 0:
            ax.legend(fontsize=7)
    ax = fig.add_subplot(gs[1, :])
    rows = [examples] + [models[f"{k}-d{s.main_size}"] for k in KINDS]
    with torch.no_grad(), isolated_params():
        images = torch.cat([examples] + [r.model.decode(r.model.encode(examples)) for r in rows[1:]])
    _show_grid(ax, images, image_shape, nrow=examples.shape[0])
    h = image_shape[0] + 2
    ax.set_yticks([2 + h * (i + 0.5) for i in range(4)])
    ax.set_yticklabels(["test image"] + [f"{LABEL[k]} d={s.main_size}" for k in KINDS], fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def figure_interpolation(s, interp, pairs, test_binary, image_shape, path: Path) -> None:
    shown = list(range(min(s.shown_pairs, len(pairs))))
    grid_height = 7.6 * 2 * len(shown) / (s.steps + 2) + 0.3  # inches: the rows at the width of the figure
    fig = _figure(9, grid_height + 2.6)
    gs = fig.add_gridspec(2, 3, height_ratios=[grid_height, 2.6])
    ax = fig.add_subplot(gs[0, :])
    x = test_binary.images
    rows, labels, confs = [], [], []
    for p in shown:
        i, j = pairs[p]
        for kind in ("ae", "vae"):
            m = interp[f"{kind}-d{s.main_size}"]
            rows.append(torch.cat([x[i : i + 1], m["images"][p], x[j : j + 1]]))
            labels.append(f"{LABEL[kind]}: {int(test_binary.labels[i])}→{int(test_binary.labels[j])}")
            confs.append(m["confidence"][p])
    ncol = s.steps + 2
    _show_grid(ax, torch.cat(rows), image_shape, nrow=ncol)
    h, w = image_shape[0] + 2, image_shape[1] + 2
    ax.set_yticks([2 + h * (r + 0.5) for r in range(len(rows))])
    ax.set_yticklabels(labels, fontsize=8)
    for r, conf in enumerate(confs):
        for c, v in enumerate(conf.tolist()):
            ax.text(2 + w * (c + 1.5), 2 + h * (r + 1) - 1.5, f"{v:.2f}", ha="center", va="bottom", fontsize=5.5,
                    color="yellow" if v < 0.5 else "lime")
    ax.set_title(f"decoded along the line between two test codes (d={s.main_size}); number: classifier confidence",
                 fontsize=9)
    t = np.linspace(0, 1, s.steps)
    for col, (key, ylabel, _) in enumerate(YARDSTICKS):
        axc = fig.add_subplot(gs[1, col])
        for kind in KINDS:
            v = interp[f"{kind}-d{s.main_size}"][key].double()
            mean, se = v.mean(0).numpy(), (v.std(0) / math.sqrt(v.shape[0])).numpy()
            axc.plot(t, mean, "o-", ms=3, color=COLOR[kind], label=LABEL[kind])
            axc.fill_between(t, mean - se, mean + se, color=COLOR[kind], alpha=0.2)
        axc.set_xlabel(f"t (± s.e., {len(pairs)} pairs)", fontsize=8)
        axc.set_ylabel(ylabel, fontsize=8)
        axc.grid(alpha=0.3)
        if col == 0:
            axc.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def figure_random_codes(s, rand, image_shape, path: Path) -> None:
    fig = _figure(9, 5.6)
    gs = fig.add_gridspec(2, 3, height_ratios=[3, 1.6])
    n = min(36, s.num_codes)
    side = int(math.isqrt(n))
    for col, kind in enumerate(KINDS):
        m = rand[f"{kind}-d{s.main_size}"]
        ax = fig.add_subplot(gs[0, col])
        _show_grid(ax, m["images"][: side * side], image_shape, nrow=side,
                   title=f"{LABEL[kind]} d={s.main_size}: confidence {float(m['confidence'].mean()):.2f}\n"
                         f"second-VAE ELBO {float(m['judge_elbo'].mean()):.0f} nats")
    ax = fig.add_subplot(gs[1, :])
    width = 0.27
    for k, kind in enumerate(KINDS):
        counts = torch.bincount(rand[f"{kind}-d{s.main_size}"]["label"], minlength=10).numpy()
        ax.bar(np.arange(10) + (k - 1) * width, counts / counts.sum(), width, color=COLOR[kind], label=LABEL[kind])
    ax.axhline(0.1, color="black", lw=0.8, ls="--")
    ax.set_xticks(range(10))
    ax.set_xlabel(f"class the classifier gives the decoded random code ({s.num_codes} codes per model)")
    ax.set_ylabel("fraction")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    _save(fig, path)


def figure_map(s, maps, image_shape, path: Path) -> None:
    fig = _figure(9, 9)
    axes = fig.subplots(2, 2)
    for col, kind in enumerate(("vae", "ae")):
        m = maps[kind]
        what = "prior N(0, I)" if kind == "vae" else "Gaussian fitted to training codes"
        _show_grid(axes[0, col], m["grid"], image_shape, nrow=s.grid_size,
                   title=f"{LABEL[kind]} d=2: {s.grid_size}x{s.grid_size} grid through the inverse CDF\n"
                         f"of its {what}; confidence {m['grid_confidence']:.2f}")
        ax = axes[1, col]
        codes = m["test_codes"]
        sc = ax.scatter(codes[:, 0], codes[:, 1], c=m["test_labels"], cmap="tab10", s=6, alpha=0.8, vmin=-0.5,
                        vmax=9.5)
        box = m["grid_codes"]
        ax.plot(*_hull(box), color="black", lw=0.8, ls="--")
        ax.set_title(f"{LABEL[kind]} d=2: test codes by label ({m['knn_accuracy']:.2f} 5-NN accuracy)\n"
                     "dashed: the grid above", fontsize=9)
        ax.set_xlabel("z1")
        ax.set_ylabel("z2")
        fig.colorbar(sc, ax=ax, ticks=range(10), fraction=0.046)
    fig.tight_layout()
    _save(fig, path)


def _hull(grid_codes: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The outline of a (possibly sheared) square grid of codes, as a closed polyline."""
    n = int(math.isqrt(grid_codes.shape[0]))
    g = grid_codes.reshape(n, n, 2).numpy()
    corners = np.stack([g[0, 0], g[0, -1], g[-1, -1], g[-1, 0], g[0, 0]])
    return corners[:, 0], corners[:, 1]


# --- the report -------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list]) -> str:
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"
    lines = ["| " + " | ".join(header) + " |", rule]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def plus_minus(mean: float, se: float, digits: int = 3) -> str:
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def _verdict(diff: float, se: float, sign: int = 1) -> str:
    """Whether ``diff`` (VAE minus AE) went the predicted way (the VAE better: ``sign * diff > 0``),
    with its size in standard errors."""
    z = diff / se if se > 0 else math.copysign(math.inf, diff)
    if sign * diff > 0:
        return f"as predicted ({z:+.1f} s.e.)" if abs(z) >= 2 else f"as predicted, but within noise ({z:+.1f} s.e.)"
    return f"**not as predicted** ({z:+.1f} s.e.)"


def _mark(diff: float, se: float, sign: int) -> str:
    """A verdict cell: ✓ where the VAE did better by 2 s.e. or more, ✗ where worse by as much, ~ between."""
    z = sign * diff / se if se > 0 else math.copysign(math.inf, sign * diff)
    return f"{'✓' if z >= 2 else '✗' if z <= -2 else '~'} {z:+.1f}"


def _git_commit() -> str:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                           text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return r.stdout.strip() + (" (with uncommitted changes)" if dirty else "") if r.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _tags(s: StorySettings) -> list[tuple[str, str]]:
    """(run-name suffix, row label) of every setting where AE and VAE are compared."""
    deep = "784-" + "-".join(map(str, s.deep_dims)) + f"-{s.main_size}"
    return [(f"d{d}", str(d)) for d in s.sizes] + [(f"deep-d{s.main_size}", f"{s.main_size} ({deep})")]


def _finite(obj):
    """``obj`` with NaN and infinities as ``None``, so that results.json is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def run_story(s: StorySettings, out: Path, *, retrain: bool = False, progress: bool = True,
              command: str = "") -> dict:
    """Train (or reuse) every model, measure, draw and write ``out/report.md``; returns the numbers."""
    from tqdm import tqdm

    from pyrovae.marginal import active_units

    t_start = time.perf_counter()
    if 2 not in s.sizes or s.main_size not in s.sizes:
        raise ValueError(f"--sizes must include 2 (the map) and the main size {s.main_size} (got {s.sizes})")
    out.mkdir(parents=True, exist_ok=True)
    configs = _run_configs(s, out / "runs")
    models = {}
    for name, config in tqdm(configs.items(), desc="models", unit="run", disable=not progress):
        models[name] = _train_or_load(config, retrain, progress)
    judge_vae = models.pop("judge")
    train_grey = load_dataset(s.dataset, "train", data_dir=s.data_dir)
    test_grey = load_dataset(s.dataset, "test", data_dir=s.data_dir)
    if train_grey.labels is None or test_grey.labels is None:
        raise ValueError(f"{s.dataset} has no labels: the study scores images with a digit classifier")
    test_binary = static_binarized(test_grey)
    image_shape = train_grey.image_shape
    judge = Judge(train_grey.images, train_grey.labels, judge_vae.model, elbo_samples=s.elbo_samples, seed=s.seed)
    pairs = choose_pairs(test_binary.labels, s.num_pairs, s.seed)
    numbers: dict = {"settings": dataclasses.asdict(s), "command": command, "pairs": pairs}

    # the yardsticks, read on images whose nature is known
    accuracy = float((judge.probabilities(test_grey.images).argmax(1) == test_grey.labels).double().mean())
    calibration = {}
    for what, images in calibration_images(test_grey, test_binary, pairs, s.seed).items():
        scores = _scores(images, judge)
        calibration[what] = {k: _mean_se(scores[k]) for k in SHORT}
    numbers["classifier_accuracy"] = accuracy
    numbers["calibration"] = calibration

    # 1. reconstruction against code size
    numbers["reconstruction"] = measure_reconstruction(models, test_binary)
    numbers["vae_test_elbo"] = {name: json.loads((run.dir / "summary.json").read_text())["test"]["elbo"]
                                for name, run in models.items() if run.config.model == "vae"}
    numbers["vae_active_units"] = {name: active_units(run.model, test_binary.images)[0]
                                   for name, run in models.items() if run.config.model == "vae"}
    first_of_class = torch.tensor([int(torch.nonzero(test_binary.labels == c)[0]) for c in range(10)
                                   if bool((test_binary.labels == c).any())])
    figure_reconstruction(s, numbers["reconstruction"], test_binary.images[first_of_class], models, image_shape,
                          out / "reconstruction.png")

    # 2. between two codes
    interp = measure_interpolations(models, test_binary, pairs, s.steps, judge, progress)
    mid = s.steps // 2
    numbers["interpolation"], numbers["interpolation_vae_minus_ae"] = {}, {}
    for name, m in interp.items():
        row = {}
        for key, _, sign in YARDSTICKS:
            v = m[key].double()
            row[key] = [_mean_se(v[:, k]) for k in range(s.steps)]
            row[f"{key}_mid"] = _mean_se(v[:, mid])
            row[f"{key}_dip"] = _mean_se(sign * (v[:, [0, -1]].mean(1) - v[:, mid]))  # > 0: worse at t = 1/2
        row["greyness_mid"] = _mean_se(m["greyness"][:, mid])
        row["pair_mass_mid"] = _mean_se(m["pair_mass"][:, mid])
        numbers["interpolation"][name] = row
    for tag, _ in _tags(s):
        ae, vae = interp[f"ae-{tag}"], interp[f"vae-{tag}"]
        numbers["interpolation_vae_minus_ae"][tag] = {  # paired over the same pairs
            key: _mean_se(vae[key][:, mid].double() - ae[key][:, mid].double())
            for key in [y for y, _, _ in YARDSTICKS] + ["pair_mass"]}
    figure_interpolation(s, interp, pairs, test_binary, image_shape, out / "interpolation.png")
    save_image_grid(torch.cat([torch.cat([test_binary.images[i : i + 1], interp[f"{k}-d{s.main_size}"]["images"][p],
                                          test_binary.images[j : j + 1]])
                               for p, (i, j) in enumerate(pairs) for k in KINDS]),
                    image_shape, out / "interpolation_all_pairs.png", nrow=s.steps + 2)

    # 3. far from the codes
    rand = measure_random_codes(models, s.num_codes, judge, s.seed, progress)
    numbers["random_codes"] = {
        name: {**{key: _mean_se(m[key]) for key in SHORT},
               "class_counts": torch.bincount(m["label"], minlength=10).tolist()}
        for name, m in rand.items()}
    numbers["random_codes_vae_minus_ae"] = {}
    for tag, _ in _tags(s):
        row = {}
        for key, _, _ in YARDSTICKS:
            (a, sa), (v, sv) = _mean_se(rand[f"ae-{tag}"][key]), _mean_se(rand[f"vae-{tag}"][key])
            row[key] = (v - a, math.hypot(sa, sv))  # independent draws
        numbers["random_codes_vae_minus_ae"][tag] = row
    figure_random_codes(s, rand, image_shape, out / "random_codes.png")
    for name, m in rand.items():
        if name.endswith(f"-d{s.main_size}"):
            save_image_grid(m["images"][:100], image_shape, out / f"random_codes_{name}.png", nrow=10)

    # 4. the map
    train_binary = static_binarized(train_grey)
    maps = {}
    for kind in ("vae", "ae"):
        model = models[f"{kind}-d2"].model
        grid, grid_codes = latent_grid(model, s.grid_size)
        with torch.no_grad(), isolated_params():
            test_codes, train_codes = model.encode(test_binary.images), model.encode(train_binary.images)
        maps[kind] = {"grid": grid, "grid_codes": grid_codes, "grid_confidence": float(judge.confidence(grid).mean()),
                      "grid_judge_elbo": float(judge.elbo(grid).mean()),
                      "test_codes": test_codes, "test_labels": test_binary.labels,
                      "knn_accuracy": knn_accuracy(train_codes, train_binary.labels, test_codes, test_binary.labels)}
        save_image_grid(grid, image_shape, out / f"map_grid_{kind}.png", nrow=s.grid_size)
    numbers["map"] = {k: {key: m[key] for key in ("grid_confidence", "grid_judge_elbo", "knn_accuracy")}
                      for k, m in maps.items()}
    figure_map(s, maps, image_shape, out / "map.png")

    numbers["seconds"] = time.perf_counter() - t_start
    numbers["trained"] = {name: json.loads((run.dir / "summary.json").read_text()) for name, run in
                          {**models, "judge": judge_vae}.items()}
    numbers = _finite(numbers)
    (out / "results.json").write_text(json.dumps(numbers, indent=1) + "\n")
    (out / "report.md").write_text(write_report(s, numbers))
    return numbers


def write_report(s: StorySettings, n: dict) -> str:
    """The Markdown report of the numbers ``n`` of :func:`run_story`."""
    cal = n["calibration"]
    real, garbage = cal["real test digits (grey)"], cal["test digits, pixels permuted"]
    noise = cal["Bernoulli noise at the digits' mean ink"]
    blend = cal["pixel average of two test digits of different classes"]
    blur = cal["test digits blurred 3x3"]
    deep = "784-" + "-".join(map(str, s.deep_dims)) + f"-{s.main_size}"
    sweep = "784-" + "-".join(map(str, s.hidden_dims)) + "-d"
    trained = n["trained"]
    seconds = sum(v["seconds"] for v in trained.values())
    L = [
        "# The argument of the theory page, measured: PCA → deep autoencoder → VAE",
        "",
        f"Made by `{n['command']}` (pyrovae commit {_git_commit()}) on {s.dataset}. This call took "
        f"{n['seconds']:.0f} s; training its {len(trained)} runs took {seconds:.0f} s when they were trained "
        "(a rerun reuses them from `runs/`).",
        "",
        "## What was trained",
        "",
        f"- PCA (scikit-learn) and, with the same networks ({sweep}, softplus), a deterministic autoencoder "
        "(`--model ae`: point-mass guide, reconstruction loss only) and a VAE, at code sizes "
        f"{', '.join(map(str, s.sizes))}; plus an AE and a VAE with deeper {deep} networks"
        + (" (Hinton & Salakhutdinov 2006's architecture, trained here like the others: no RBM pretraining, "
           "4,000 images)." if deep == "784-1000-500-250-30" else "."),
        f"- Budget: {s.epochs} epochs per AE/VAE (Adam, learning rate 2e-3 cosine-decayed to 1e-4, batch 128, "
        "dynamic binarisation); the epoch with the best validation score is kept (table at the end). Seed "
        f"{s.seed}. Every model is a pyrovae run in `runs/`: `pyrovae evaluate runs/<name>` gives its "
        "reconstruction numbers below, `pyrovae sample|interpolate runs/<name>` its pictures.",
        "",
        "## The yardsticks, and what they give images of known nature",
        "",
        f"- **confidence**: max-probability of a logistic regression (scikit-learn, C = 1) fitted to the grey "
        f"training images (test accuracy {n['classifier_accuracy']:.3f}); decoded pixel means are grey images too.",
        f"- **second-VAE ELBO**: the ELBO (nats, {s.elbo_samples} draws from q) that a second, independently "
        f"trained VAE ({sweep}{s.judge_size}, trained with seed {s.judge_seed}: no model scores its own images) "
        "gives the image binarised once with a fixed seed, the way test images are: a lower bound on the second "
        "VAE's log p(x). It punishes blur, since binarising a grey pixel is a coin flip.",
        "- **nearest**: RMS pixel distance to the nearest grey training image.",
        "- not a yardstick, a description: **greyness**, the mean over pixels of min(x, 1 − x): 0 for a binary "
        "image, higher for a blurrier one.",
        "",
        "Means over examples ± one standard error. Read every number below against this table:",
        "",
        _table(["images (500, or the 50 pairs)", "confidence", "second-VAE ELBO", "nearest", "greyness"],
               [[what, plus_minus(*v["confidence"]), plus_minus(*v["judge_elbo"], 1), plus_minus(*v["nearest"]),
                 plus_minus(*v["greyness"])]
                for what, v in cal.items()]),
        "",
        "## 1. Reconstruction against code size",
        "",
        "decode(encode(x)) on the 500 statically binarised test images (as `pyrovae evaluate` scores them): "
        "mean squared error per pixel and binary cross-entropy in nats per image (lower is better); the "
        "VAE's test ELBO (10 samples; its bound on log p(x)) and its active units (Burda et al. 2015).",
        "",
    ]
    rec = n["reconstruction"]
    rows = []
    for d in s.sizes:
        tag = (f"**{d}** (784 → {d}{', H&S 2006' if d == 30 else ''})" if d == s.main_size else str(d))
        rows.append([tag] + [f"{rec[f'{k}-d{d}']['mse']:.4f}" for k in KINDS]
                    + [f"{rec[f'{k}-d{d}']['bce']:.1f}" for k in KINDS]
                    + [f"{n['vae_test_elbo'][f'vae-d{d}']:.1f}", n["vae_active_units"][f"vae-d{d}"]])
    name = f"-deep-d{s.main_size}"
    rows.append([f"{s.main_size}, {deep} networks", "", f"{rec['ae' + name]['mse']:.4f}",
                 f"{rec['vae' + name]['mse']:.4f}", "", f"{rec['ae' + name]['bce']:.1f}",
                 f"{rec['vae' + name]['bce']:.1f}", f"{n['vae_test_elbo']['vae' + name]:.1f}",
                 n["vae_active_units"]["vae" + name]])
    L += [_table(["code size", "PCA MSE", "AE MSE", "VAE MSE", "PCA BCE", "AE BCE", "VAE BCE", "VAE ELBO",
                  "VAE active units"], rows), "", "![reconstruction](reconstruction.png)", ""]

    ip = n["interpolation"]
    t = np.linspace(0, 1, s.steps)
    L += [
        "## 2. Between two codes",
        "",
        f"{s.num_pairs} pairs of test images with different labels, drawn uniformly at random (seed {s.seed}); "
        f"each line decoded at t = 0, {1 / (s.steps - 1):.1f}, …, 1 (t = 0 and 1 are the reconstructions). "
        f"The figure shows the first {s.shown_pairs} pairs of the draw, not chosen ones; "
        "`interpolation_all_pairs.png` shows every pair (rows PCA, AE, VAE).",
        "",
        f"Along the line, code size {s.main_size}:",
        "",
        _table(["t"] + [f"{LABEL[k]} {SHORT[y]}" for y, _, _ in YARDSTICKS for k in KINDS],
               [[f"{t[k]:.1f}"] + [plus_minus(*ip[f"{kind}-d{s.main_size}"][y][k], 1 if y == "judge_elbo" else 3)
                                   for y, _, _ in YARDSTICKS for kind in KINDS] for k in range(s.steps)]),
        "",
        "At the midpoint t = 1/2, every code size. *Dip*: how much worse the midpoint is than the mean of the two "
        "ends on that yardstick (positive = worse in the middle). The theory page predicts the VAE's midpoints "
        "better than the AE's; the verdicts are at the end. *Pair mass*, added after the first full run "
        "(post hoc): the classifier's probability that the midpoint is one of the two digits at the ends of "
        "its line: the theory page's \"compromise of the two\" (section 2) measured directly.",
        "",
    ]
    rows = []
    for tag, label in _tags(s):
        for y, _, _ in YARDSTICKS:
            d = 1 if y == "judge_elbo" else 3
            pca = ip.get(f"pca-{tag}")
            rows.append([label, SHORT[y], plus_minus(*pca[f"{y}_mid"], d) if pca else "",
                         plus_minus(*ip[f"ae-{tag}"][f"{y}_mid"], d), plus_minus(*ip[f"vae-{tag}"][f"{y}_mid"], d),
                         plus_minus(*ip[f"ae-{tag}"][f"{y}_dip"], d), plus_minus(*ip[f"vae-{tag}"][f"{y}_dip"], d)])
        for key in ("pair_mass", "greyness"):
            mids = [plus_minus(*ip[f"{k}-{tag}"][f"{key}_mid"]) if f"{k}-{tag}" in ip else "" for k in KINDS]
            rows.append([label, PAIR_MASS if key == "pair_mass" else SHORT[key], *mids, "", ""])
    L += [_table(["code size", "yardstick", "PCA mid", "AE mid", "VAE mid", "AE dip", "VAE dip"], rows), "",
          "![interpolation](interpolation.png)", ""]

    rc = n["random_codes"]
    L += [
        "## 3. Far from the codes",
        "",
        f"{s.num_codes} codes per model from its generative distribution (VAE: the prior N(0, I); AE: the "
        "Gaussian fitted to its training codes; PCA: N(0, diag of explained variances)), decoded to pixel "
        "means.",
        "",
    ]
    rows = []
    for tag, label in _tags(s):
        names = [f"{k}-{tag}" for k in KINDS]
        rows.append([label] + [plus_minus(*rc[x][y], 1 if y == "judge_elbo" else 3) if x in rc else ""
                               for y in SHORT for x in names])
    L += [_table(["code size"] + [f"{LABEL[k]} {SHORT[y]}" for y in SHORT for k in KINDS], rows), "",
          f"Classes the classifier gives the decoded random codes, code size {s.main_size} (counts of "
          f"{s.num_codes}; the test split has about {s.num_codes // 10} of each per {s.num_codes}):", "",
          _table(["model"] + [str(c) for c in range(10)],
                 [[LABEL[k]] + rc[f"{k}-d{s.main_size}"]["class_counts"] for k in KINDS]),
          "", "![random codes](random_codes.png)", ""]

    mp = n["map"]
    L += [
        "## 4. The map",
        "",
        f"Top: the 2-D VAE's code space decoded on a {s.grid_size} × {s.grid_size} grid equally spaced in "
        "probability (codes Φ⁻¹((i + ½)/n), Kingma & Welling 2013 Fig. 4), and the same grid through the 2-D "
        "AE's fitted Gaussian. Bottom: the test codes of the 2-D VAE and AE coloured by label, with the grid's "
        "outline.",
        "",
        _table(["2-D model", "grid confidence", "grid second-VAE ELBO", "5-NN accuracy of test codes"],
               [[LABEL[k], f"{mp[k]['grid_confidence']:.3f}", f"{mp[k]['grid_judge_elbo']:.1f}",
                 f"{mp[k]['knn_accuracy']:.3f}"] for k in ("vae", "ae")]),
        "",
        "![map](map.png)",
        "",
        "## Verdicts",
        "",
        "The theory page predicts that the VAE's random-code samples, and its interpolation midpoints, are better than "
        "the AE's. Each cell: ✓ the VAE better by at least 2 standard errors, ✗ worse by at least 2, ~ in "
        "between; the number is the VAE's advantage in standard errors (random codes: independent draws; "
        "midpoints: paired over the same pairs).",
        "",
    ]
    rows = []
    for tag, label in _tags(s):
        r, m = n["random_codes_vae_minus_ae"][tag], n["interpolation_vae_minus_ae"][tag]
        rows.append([label] + [_mark(*r[y], sign) for y, _, sign in YARDSTICKS]
                    + [_mark(*m[y], sign) for y, _, sign in YARDSTICKS] + [_mark(*m["pair_mass"], 1)])
    L += [_table(["code size"] + [f"random codes: {SHORT[y]}" for y, _, _ in YARDSTICKS]
                 + [f"midpoints: {SHORT[y]}" for y, _, _ in YARDSTICKS] + [f"midpoints: {PAIR_MASS}"], rows), ""]
    L += ["The theory page's two predictions, checked on the classifier's confidence:", ""]
    for what, key in (("VAE random-code samples more confident than the AE's", "random_codes_vae_minus_ae"),
                      ("AE interpolation midpoints less confident than the VAE's", "interpolation_vae_minus_ae")):
        cells = [(label, n[key][tag]["confidence"]) for tag, label in _tags(s)]
        L.append(f"- {what}: " + "; ".join(f"d={label}: {_verdict(*v)}" for label, v in cells) + ".")
    L += ["", "Where the confidence verdict does not hold, the other two yardsticks say:", ""]
    for what, key in (("random codes", "random_codes_vae_minus_ae"), ("midpoints", "interpolation_vae_minus_ae")):
        cells = []
        for tag, label in _tags(s):
            r = n[key][tag]
            if not _mark(*r["confidence"], 1).startswith("✓"):
                cells.append(f"d={label}: " + ", ".join(f"{SHORT[y]} {_mark(*r[y], sign)}"
                                                        for y, _, sign in YARDSTICKS[1:]))
        L.append(f"- {what}: " + ("; ".join(cells) if cells else "(it holds everywhere)") + ".")
    L += ["", "What the calibration table says about reading them: the classifier gives real digits "
          f"{real['confidence'][0]:.2f}, digits with their pixels permuted {garbage['confidence'][0]:.2f}, "
          f"noise {noise['confidence'][0]:.2f}, and the pixel average of two different digits (a compromise, "
          f"by construction) {blend['confidence'][0]:.2f}. Its confidence separates digits from garbage only "
          f"within {garbage['confidence'][0]:.2f}–{real['confidence'][0]:.2f}, and it puts a compromise of two "
          "digits, which is what the theory page wants from a VAE midpoint, "
          + ("nearer to garbage than to real digits." if abs(blend["confidence"][0] - garbage["confidence"][0])
             < abs(blend["confidence"][0] - real["confidence"][0]) else "nearer to real digits than to garbage.")
          + f" The second-VAE ELBO spreads the same images over {garbage['judge_elbo'][0]:.0f} to "
          f"{real['judge_elbo'][0]:.0f} nats, the distance to the nearest training image over "
          f"{real['nearest'][0]:.3f}–{garbage['nearest'][0]:.3f}. The two have opposite biases about blur: a 3x3 "
          f"blur costs real digits {real['judge_elbo'][0] - blur['judge_elbo'][0]:.0f} nats of second-VAE ELBO but "
          f"brings them nearer to the training images ({blur['nearest'][0]:.3f} against "
          f"{real['nearest'][0]:.3f}). Where both favour the VAE, blur does not explain the verdict: "
          + "; ".join(f"{what}: " + (", ".join(f"d={label}" for tag, label in _tags(s)
                                               if all(_mark(*n[key][tag][y], sign).startswith("✓")
                                                      for y, _, sign in YARDSTICKS[1:])) or "nowhere")
                      for what, key in (("random codes", "random_codes_vae_minus_ae"),
                                        ("midpoints", "interpolation_vae_minus_ae"))) + ".", ""]

    L += ["## Training runs", "",
          _table(["run", "epochs", "best epoch", "seconds", "test score"],
                 [[name, v["epochs_done"], v["best_epoch"], f"{v['seconds']:.0f}",
                   f"{v['test']['elbo']:.1f}" if v.get("test") and v["test"].get("elbo") is not None else ""]
                  for name, v in trained.items()]),
          "", "Test score: the VAE's ELBO, the AE's log p(x | m(x)) (minus its BCE); PCA on binary data has none."]
    return "\n".join(L) + "\n"


# --- command line -----------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    d = StorySettings()
    p = argparse.ArgumentParser(
        prog="experiments/story.py",
        description="The theory page's argument measured: PCA, a deep autoencoder and a VAE at code sizes "
                    f"{', '.join(map(str, d.sizes))}; reconstructions, decodes between two codes and far from "
                    "them, scored by a fixed digit classifier, the distance to the nearest training image and a "
                    "second VAE's ELBO; and the 2-D map. Writes OUT/report.md, OUT/results.json and PNGs; keeps "
                    "every trained run in OUT/runs/ and reuses it on the next call.",
        epilog="The full run trains 13 AEs/VAEs and 5 PCAs (41 minutes on 2 shared CPU cores with "
               "OMP_NUM_THREADS=1); --quick does every step on tiny settings in about 30 s.")
    p.add_argument("--dataset", default=d.dataset, help=f"(default: {d.dataset})")
    p.add_argument("--data-dir", default=d.data_dir,
                   help=f"folder of IDX files for mnist and kin (default: {d.data_dir})")
    p.add_argument("--out", help="results folder (default: results/story, or results/story-quick with --quick)")
    p.add_argument("--epochs", type=int,
                   help=f"epochs per AE/VAE (default: {d.epochs}; {QUICK['epochs']} with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny networks, code sizes 2 and 5, 2 epochs: a smoke run")
    p.add_argument("--retrain", action="store_true", help="train every run afresh instead of reusing OUT/runs/")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = StorySettings(dataset=args.dataset, data_dir=args.data_dir, **(QUICK if args.quick else {}))
    if args.epochs is not None:
        if args.epochs < 1:
            raise SystemExit(f"experiments/story.py: error: --epochs must be at least 1 (got {args.epochs})")
        settings = dataclasses.replace(settings, epochs=args.epochs)
    out = Path(args.out or ("results/story-quick" if args.quick else "results/story"))
    command = shlex.join(["python", "experiments/story.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        run_story(settings, out, retrain=args.retrain, progress=not args.quiet, command=command)
    except (ValueError, FileNotFoundError) as e:
        print(f"experiments/story.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(out / "report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
