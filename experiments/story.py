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
interpolation midpoints (:math:`t = 1/2`) a lower one than the VAE's.

Fair use of the autoencoder and PCA as generators: codes are drawn from the Gaussian fitted to
their training codes (full covariance for the AE, :math:`\mathcal{N}(0, \mathrm{diag}\,\lambda)`
for PCA, whose codes are uncorrelated), the best a Gaussian can do with their code spaces.

Every model is a pyrovae run (``pyrovae train --model pca|ae|vae``) kept under
``OUT/runs/``, so a rerun reuses them (``--retrain`` trains afresh) and every run can be
inspected with ``pyrovae evaluate|sample|reconstruct|interpolate``.

Usage::

    python experiments/story.py            # the full study (about an hour on 2 CPU cores)
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

from pyrovae import TrainConfig, load_dataset, load_run, train
from pyrovae.data import static_binarized
from pyrovae.marginal import estimate_log_px, isolated_params
from pyrovae.metrics import reconstruction_errors
from pyrovae.pictures import interpolation, sample_images
from pyrovae.plots import save_image_grid

KINDS = ("pca", "ae", "vae")
LABEL = {"pca": "PCA", "ae": "AE", "vae": "VAE"}
COLOR = {"pca": "tab:gray", "ae": "tab:red", "vae": "tab:blue"}


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
        configs[f"{kind}-deep-d{s.main_size}"] = TrainConfig(**base, model=kind, latent_dim=s.main_size,
                                                             hidden_dims=s.deep_dims, name=f"{kind}-deep-d{s.main_size}")
    configs["judge"] = TrainConfig(**{**base, "seed": s.judge_seed}, model="vae", latent_dim=s.judge_size,
                                   hidden_dims=s.hidden_dims, name=f"judge-vae-d{s.judge_size}")
    return configs


def _train_or_load(config: TrainConfig, retrain: bool, progress: bool):
    """The run of ``config``: reused when OUT/runs holds it finished with the same settings,
    continued when it was interrupted, trained otherwise."""
    run_dir = Path(config.out) / config.name
    if retrain and run_dir.exists():
        shutil.rmtree(run_dir)
    wanted = config.resolved().to_dict()
    if (run_dir / "config.json").is_file():
        stored = TrainConfig.load(run_dir / "config.json").to_dict()
        changed = sorted(k for k in wanted if k not in ("out", "name", "device") and stored.get(k) != wanted[k])
        if changed:
            raise ValueError(f"{run_dir} was trained with other settings ({', '.join(changed)}): "
                             "rerun with --retrain, or choose another --out")
    if (run_dir / "summary.json").is_file():
        return load_run(run_dir)
    if (run_dir / "last.pt").is_file():
        train(config, resume=run_dir, progress=progress)
    else:
        if run_dir.exists():  # killed before the first checkpoint: only what train() writes first
            if {p.name for p in run_dir.iterdir()} - {"config.json", "metrics.jsonl"}:
                raise ValueError(f"{run_dir} holds files that are not a pyrovae run: remove it or choose another --out")
            shutil.rmtree(run_dir)
        train(config, progress=progress)
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


def measure_interpolations(models: dict, test_binary, pairs, steps: int, judge: Judge, progress: bool) -> dict:
    """Per model: decoded lines ``(P, steps, D)``, classifier confidence and nearest-training
    distance at every step ``(P, steps)``."""
    from tqdm import tqdm

    out = {}
    for name, run in tqdm(models.items(), desc="between two codes", unit="model", disable=not progress):
        x = test_binary.images
        lines = torch.stack([interpolation(run.model, x[i], x[j], steps=steps)[0] for i, j in pairs])
        flat = lines.reshape(-1, lines.shape[-1])
        out[name] = {"images": lines, "confidence": judge.confidence(flat).reshape(len(pairs), steps),
                     "nearest": judge.nearest(flat).reshape(len(pairs), steps)}
    return out


def measure_random_codes(models: dict, num_codes: int, judge: Judge, seed: int, progress: bool) -> dict:
    """Per model: ``num_codes`` decoded random codes, their confidence, predicted class,
    nearest-training distance and judge ELBO."""
    from tqdm import tqdm

    out = {}
    for name, run in tqdm(models.items(), desc="far from the codes", unit="model", disable=not progress):
        torch.manual_seed(seed)
        images = sample_images(run.model, num_codes)
        probs = judge.probabilities(images)
        out[name] = {"images": images, "confidence": probs.max(1).values, "label": probs.argmax(1),
                     "nearest": judge.nearest(images), "elbo": judge.elbo(images)}
    return out


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
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=90)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    """Save as a PNG of at most 64 colours: a few tens of KB, small enough to commit."""
    from PIL import Image

    fig.savefig(path)
    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=64)
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
    gs = fig.add_gridspec(2, 2, height_ratios=[grid_height, 2.6])
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
    for col, (key, ylabel) in enumerate((("confidence", "classifier confidence"),
                                         ("nearest", "RMS distance to nearest\ntraining image"))):
        axc = fig.add_subplot(gs[1, col])
        for kind in KINDS:
            v = interp[f"{kind}-d{s.main_size}"][key].double()
            mean, se = v.mean(0).numpy(), (v.std(0) / math.sqrt(v.shape[0])).numpy()
            axc.plot(t, mean, "o-", ms=3, color=COLOR[kind], label=LABEL[kind])
            axc.fill_between(t, mean - se, mean + se, color=COLOR[kind], alpha=0.2)
        axc.set_xlabel(f"t (mean ± s.e. over {len(pairs)} pairs)")
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
                         f"judge ELBO {float(m['elbo'].mean()):.0f} nats")
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
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _pm(mean: float, se: float, digits: int = 3) -> str:
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def _verdict(diff: float, se: float, predicted_positive: bool = True) -> str:
    """The sign of ``diff`` (VAE minus AE) against the prediction, with its size in standard errors."""
    z = diff / se if se > 0 else math.inf * (1 if diff > 0 else -1)
    if (diff > 0) == predicted_positive:
        return f"as predicted ({z:+.1f} s.e.)" if abs(z) >= 2 else f"as predicted, but within noise ({z:+.1f} s.e.)"
    return f"**not as predicted** ({z:+.1f} s.e.)"


def _git_commit() -> str:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                           text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return r.stdout.strip() + (" (with uncommitted changes)" if dirty else "") if r.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_story(s: StorySettings, out: Path, *, retrain: bool = False, progress: bool = True,
              command: str = "") -> dict:
    """Train (or reuse) every model, measure, draw and write ``out/report.md``; returns the numbers."""
    from tqdm import tqdm

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
    test_binary = static_binarized(test_grey)
    if train_grey.labels is None:
        raise ValueError(f"{s.dataset} has no labels: the study scores images with a digit classifier")
    image_shape = train_grey.image_shape
    judge = Judge(train_grey.images, train_grey.labels, judge_vae.model, elbo_samples=s.elbo_samples, seed=s.seed)
    numbers: dict = {"settings": dataclasses.asdict(s), "command": command}

    # reference: real test images
    with torch.no_grad():
        ref_conf_grey = judge.confidence(test_grey.images)
        ref = {
            "classifier_accuracy": float((judge.probabilities(test_grey.images).argmax(1) == test_grey.labels)
                                         .double().mean()),
            "confidence_grey": _mean_se(ref_conf_grey),
            "confidence_binary": _mean_se(judge.confidence(test_binary.images)),
            "nearest_grey": _mean_se(judge.nearest(test_grey.images)),
            "judge_elbo_test": _mean_se(judge.elbo(test_binary.images)),  # binary already: binarising keeps them
        }
    numbers["reference"] = ref

    # 1-2. reconstruction against code size
    recon = measure_reconstruction(models, test_binary)
    numbers["reconstruction"] = recon
    numbers["vae_test_elbo"] = {name: json.loads((run.dir / "summary.json").read_text())["test"]["elbo"]
                                for name, run in models.items() if run.config.model == "vae"}
    first_of_class = torch.tensor([int(torch.nonzero(test_binary.labels == c)[0]) for c in range(10)
                                   if bool((test_binary.labels == c).any())])
    figure_reconstruction(s, recon, test_binary.images[first_of_class], models, image_shape,
                          out / "reconstruction.png")

    # 3. between two codes
    pairs = choose_pairs(test_binary.labels, s.num_pairs, s.seed)
    interp = measure_interpolations(models, test_binary, pairs, s.steps, judge, progress)
    mid = s.steps // 2
    numbers["pairs"] = pairs
    numbers["interpolation"] = {
        name: {"confidence": [_mean_se(m["confidence"][:, k]) for k in range(s.steps)],
               "nearest": [_mean_se(m["nearest"][:, k]) for k in range(s.steps)],
               "midpoint_confidence": _mean_se(m["confidence"][:, mid]),
               "endpoint_confidence": _mean_se(m["confidence"][:, [0, -1]].mean(1)),
               "dip": _mean_se(m["confidence"][:, [0, -1]].mean(1) - m["confidence"][:, mid]),
               "midpoint_nearest": _mean_se(m["nearest"][:, mid])}
        for name, m in interp.items()}
    numbers["interpolation_vae_minus_ae"] = {}
    for tag in [f"d{d}" for d in s.sizes] + [f"deep-d{s.main_size}"]:
        diff = interp[f"vae-{tag}"]["confidence"][:, mid] - interp[f"ae-{tag}"]["confidence"][:, mid]
        numbers["interpolation_vae_minus_ae"][tag] = _mean_se(diff)  # paired over the same pairs
    figure_interpolation(s, interp, pairs, test_binary, image_shape, out / "interpolation.png")
    save_image_grid(torch.cat([torch.cat([test_binary.images[i : i + 1], interp[f"{k}-d{s.main_size}"]["images"][p],
                                          test_binary.images[j : j + 1]])
                               for p, (i, j) in enumerate(pairs) for k in KINDS]),
                    image_shape, out / "interpolation_all_pairs.png", nrow=s.steps + 2)

    # 4. far from the codes
    rand = measure_random_codes(models, s.num_codes, judge, s.seed, progress)
    numbers["random_codes"] = {
        name: {"confidence": _mean_se(m["confidence"]),
               "class_counts": torch.bincount(m["label"], minlength=10).tolist(),
               "nearest": _mean_se(m["nearest"]),
               "judge_elbo": _mean_se(m["elbo"])}
        for name, m in rand.items()}
    numbers["random_codes_vae_minus_ae"] = {}
    for tag in [f"d{d}" for d in s.sizes] + [f"deep-d{s.main_size}"]:
        (a, sa), (v, sv) = _mean_se(rand[f"ae-{tag}"]["confidence"]), _mean_se(rand[f"vae-{tag}"]["confidence"])
        numbers["random_codes_vae_minus_ae"][tag] = (v - a, math.hypot(sa, sv))  # independent draws
    figure_random_codes(s, rand, image_shape, out / "random_codes.png")
    for name, m in rand.items():
        if name.endswith(f"-d{s.main_size}"):
            save_image_grid(m["images"][:100], image_shape, out / f"random_codes_{name}.png", nrow=10)

    # the map
    train_binary = static_binarized(train_grey)
    maps = {}
    for kind in ("vae", "ae"):
        model = models[f"{kind}-d2"].model
        grid, grid_codes = latent_grid(model, s.grid_size)
        with torch.no_grad(), isolated_params():
            test_codes, train_codes = model.encode(test_binary.images), model.encode(train_binary.images)
        maps[kind] = {"grid": grid, "grid_codes": grid_codes, "grid_confidence": float(judge.confidence(grid).mean()),
                      "test_codes": test_codes, "test_labels": test_binary.labels,
                      "knn_accuracy": knn_accuracy(train_codes, train_binary.labels, test_codes, test_binary.labels)}
        save_image_grid(grid, image_shape, out / f"map_grid_{kind}.png", nrow=s.grid_size)
    numbers["map"] = {k: {"grid_confidence": m["grid_confidence"], "knn_accuracy": m["knn_accuracy"]}
                      for k, m in maps.items()}
    figure_map(s, maps, image_shape, out / "map.png")

    numbers["seconds"] = time.perf_counter() - t_start
    numbers["trained"] = {name: json.loads((run.dir / "summary.json").read_text()) for name, run in
                          {**models, "judge": judge_vae}.items()}
    (out / "results.json").write_text(json.dumps(numbers, indent=1) + "\n")
    (out / "report.md").write_text(write_report(s, numbers, out))
    return numbers


def write_report(s: StorySettings, n: dict, out: Path) -> str:
    ref = n["reference"]
    deep = "784-" + "-".join(map(str, s.deep_dims)) + f"-{s.main_size}"
    sweep = "784-" + "-".join(map(str, s.hidden_dims)) + "-d"
    trained = n["trained"]
    seconds = sum(v["seconds"] for v in trained.values())
    L = [
        "# The notes' argument, measured: PCA → deep autoencoder → VAE",
        "",
        f"Made by `{n['command']}` (pyrovae commit {_git_commit()}); "
        f"dataset {s.dataset}; {n['seconds']:.0f} s in all, of which training {seconds:.0f} s "
        "(0 when every run was reused from `runs/`).",
        "",
        "## What was trained",
        "",
        f"- PCA (scikit-learn) and, with the same networks ({sweep}, softplus), a deterministic autoencoder "
        "(`--model ae`: point-mass guide, reconstruction loss only) and a VAE, at code sizes "
        f"{', '.join(map(str, s.sizes))}; plus an AE and a VAE with deeper {deep} networks"
        + (" (Hinton & Salakhutdinov 2006's architecture, trained here like the others: no RBM pretraining, "
           "4,000 images)." if deep == "784-1000-500-250-30" else "."),
        f"- Budget: {s.epochs} epochs per AE/VAE (Adam, learning rate 2e-3 cosine-decayed to 1e-4, batch 128, "
        "dynamic binarisation); the epoch with the best validation score is kept. Seed "
        f"{s.seed}. Every model is a pyrovae run in `runs/` (`pyrovae evaluate runs/<name>` reproduces its "
        "reconstruction numbers).",
        f"- The judge: a VAE {sweep}{s.judge_size} trained with seed {s.judge_seed} (no model judges its own "
        f"images). It gives real test images an ELBO of {_pm(*ref['judge_elbo_test'], 1)} nats.",
        f"- The classifier: logistic regression (scikit-learn, C = 1) on the grey training images; test accuracy "
        f"{ref['classifier_accuracy']:.3f}, mean confidence (max probability) {_pm(*ref['confidence_grey'])} on "
        f"grey test images and {_pm(*ref['confidence_binary'])} on the binarised ones. Grey test images lie "
        f"{_pm(*ref['nearest_grey'])} (RMS per pixel) from their nearest training image.",
        "",
        "Means are over examples, ± one standard error.",
        "",
        "## 1. Reconstruction against code size",
        "",
        "decode(encode(x)) on the 500 statically binarised test images (as `pyrovae evaluate` scores them): "
        "mean squared error per pixel and binary cross-entropy in nats per image (lower is better). "
        "The VAE's test ELBO (10 samples) is its bound on log p(x), for reference.",
        "",
    ]
    rec = n["reconstruction"]
    rows = []
    for d in s.sizes:
        tag = (f"**{d}** (784 → {d}{', H&S 2006' if d == 30 else ''})" if d == s.main_size else str(d))
        rows.append([tag] + [f"{rec[f'{k}-d{d}']['mse']:.4f}" for k in KINDS]
                    + [f"{rec[f'{k}-d{d}']['bce']:.1f}" for k in KINDS] + [f"{n['vae_test_elbo'][f'vae-d{d}']:.1f}"])
    rows.append([f"{s.main_size}, {deep} networks", "", f"{rec[f'ae-deep-d{s.main_size}']['mse']:.4f}",
                 f"{rec[f'vae-deep-d{s.main_size}']['mse']:.4f}", "",
                 f"{rec[f'ae-deep-d{s.main_size}']['bce']:.1f}", f"{rec[f'vae-deep-d{s.main_size}']['bce']:.1f}",
                 f"{n['vae_test_elbo'][f'vae-deep-d{s.main_size}']:.1f}"])
    L += [_table(["code size", "PCA MSE", "AE MSE", "VAE MSE", "PCA BCE", "AE BCE", "VAE BCE", "VAE ELBO"], rows),
          "", "![reconstruction](reconstruction.png)", ""]

    # between two codes
    ip = n["interpolation"]
    L += [
        "## 2. Between two codes",
        "",
        f"{s.num_pairs} pairs of test images with different labels, drawn uniformly at random (seed {s.seed}); "
        f"each line decoded at t = 0, {1 / (s.steps - 1):.1f}, …, 1 (t = 0 and 1 are the reconstructions). "
        f"The figure shows the first {s.shown_pairs} pairs of the draw, not chosen ones; "
        "`interpolation_all_pairs.png` shows every pair (rows PCA, AE, VAE).",
        "",
        f"Classifier confidence along the line, code size {s.main_size}:",
        "",
    ]
    t = np.linspace(0, 1, s.steps)
    L.append(_table(["t"] + [f"{LABEL[k]} confidence" for k in KINDS] + [f"{LABEL[k]} nearest" for k in KINDS],
                    [[f"{t[k]:.1f}"] + [_pm(*ip[f"{kind}-d{s.main_size}"]["confidence"][k]) for kind in KINDS]
                     + [_pm(*ip[f"{kind}-d{s.main_size}"]["nearest"][k]) for kind in KINDS]
                     for k in range(s.steps)]))
    L += ["", "Midpoint (t = 1/2) at every code size; *dip* = mean endpoint confidence minus midpoint "
          "confidence; the verdict tests the notes' prediction that the VAE's midpoint confidence is higher "
          "(difference paired over the same pairs):", ""]
    rows = []
    for tag, label in [(f"d{d}", str(d)) for d in s.sizes] + [(f"deep-d{s.main_size}", f"{s.main_size} ({deep})")]:
        pca = ip.get(f"pca-{tag}")
        diff = n["interpolation_vae_minus_ae"][tag]
        rows.append([label, _pm(*pca["midpoint_confidence"]) if pca else "",
                     _pm(*ip[f"ae-{tag}"]["midpoint_confidence"]), _pm(*ip[f"vae-{tag}"]["midpoint_confidence"]),
                     _pm(*ip[f"ae-{tag}"]["dip"]), _pm(*ip[f"vae-{tag}"]["dip"]),
                     _pm(*ip[f"ae-{tag}"]["midpoint_nearest"]), _pm(*ip[f"vae-{tag}"]["midpoint_nearest"]),
                     _pm(*diff), _verdict(*diff)])
    L.append(_table(["code size", "PCA mid", "AE mid", "VAE mid", "AE dip", "VAE dip", "AE mid nearest",
                     "VAE mid nearest", "VAE − AE", "verdict"], rows))
    L += ["", "![interpolation](interpolation.png)", ""]

    # far from the codes
    rc = n["random_codes"]
    L += [
        "## 3. Far from the codes",
        "",
        f"{s.num_codes} codes per model from its generative distribution (VAE: the prior N(0, I); AE: the "
        "Gaussian fitted to its training codes; PCA: N(0, diag of explained variances)), decoded to pixel "
        "means. Confidence of the classifier; judge ELBO of the decoded image binarised once; RMS distance "
        "to the nearest training image. The verdict tests the notes' prediction that the VAE's samples get "
        "the higher confidence.",
        "",
    ]
    rows = []
    for tag, label in [(f"d{d}", str(d)) for d in s.sizes] + [(f"deep-d{s.main_size}", f"{s.main_size} ({deep})")]:
        names = [f"{k}-{tag}" for k in KINDS]
        diff = n["random_codes_vae_minus_ae"][tag]
        rows.append([label] + [_pm(*rc[x]["confidence"]) if x in rc else "" for x in names]
                    + [_pm(*rc[x]["judge_elbo"], 1) if x in rc else "" for x in names]
                    + [_pm(*rc[x]["nearest"]) if x in rc else "" for x in names] + [_verdict(*diff)])
    L.append(_table(["code size", "PCA conf.", "AE conf.", "VAE conf.", "PCA judge ELBO", "AE judge ELBO",
                     "VAE judge ELBO", "PCA nearest", "AE nearest", "VAE nearest", "verdict"], rows))
    L += ["", f"Real test images for comparison: confidence {_pm(*ref['confidence_grey'])}, judge ELBO "
          f"{_pm(*ref['judge_elbo_test'], 1)}, nearest {_pm(*ref['nearest_grey'])}.", "",
          f"Classes the classifier gives the decoded random codes, code size {s.main_size} (counts of "
          f"{s.num_codes}; a digit-like generator of this data set gives about {s.num_codes // 10} each):", ""]
    L.append(_table(["model"] + [str(c) for c in range(10)],
                    [[LABEL[k]] + rc[f"{k}-d{s.main_size}"]["class_counts"] for k in KINDS]))
    L += ["", "![random codes](random_codes.png)", ""]

    # the map
    mp = n["map"]
    L += [
        "## 4. The map",
        "",
        f"Top: the 2-D VAE's code space decoded on a {s.grid_size} × {s.grid_size} grid, equally spaced in "
        "probability (codes Φ⁻¹((i + ½)/n), Kingma & Welling 2013 Fig. 4), and the same grid through the 2-D "
        "AE's fitted Gaussian. Bottom: the test codes of the 2-D VAE and AE coloured by label.",
        "",
        _table(["2-D model", "grid confidence", "5-NN accuracy of test codes"],
               [[LABEL[k], f"{mp[k]['grid_confidence']:.3f}", f"{mp[k]['knn_accuracy']:.3f}"] for k in ("vae", "ae")]),
        "",
        "![map](map.png)",
        "",
        "## Verdicts",
        "",
    ]
    for what, key, d in (("random-code samples: VAE confidence above AE's", "random_codes_vae_minus_ae", None),
                         ("interpolation midpoints: VAE confidence above AE's", "interpolation_vae_minus_ae", None)):
        tags = list(n[key])
        held = [tg for tg in tags if n[key][tg][0] > 0]
        L.append(f"- {what}: holds at {len(held)} of {len(tags)} settings "
                 f"({', '.join(f'{tg}: {_pm(*n[key][tg])}' for tg in tags)}).")
    L += ["", "Training runs (epochs done, best epoch, seconds):", ""]
    L.append(_table(["run", "epochs", "best epoch", "seconds", "test score"],
                    [[name, v["epochs_done"], v["best_epoch"], f"{v['seconds']:.0f}",
                      f"{v['test']['elbo']:.1f}" if v.get("test") and v["test"].get("elbo") is not None else ""]
                     for name, v in trained.items()]))
    return "\n".join(L) + "\n"


# --- command line -----------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    d = StorySettings()
    p = argparse.ArgumentParser(
        prog="experiments/story.py",
        description="The notes' argument measured: PCA, a deep autoencoder and a VAE at code sizes "
                    f"{', '.join(map(str, d.sizes))}; reconstructions, decodes between two codes and far from "
                    "them, scored by a fixed digit classifier, the distance to the nearest training image and a "
                    "judge VAE's ELBO; and the 2-D map. Writes OUT/report.md, OUT/results.json and PNGs; keeps "
                    "every trained run in OUT/runs/ and reuses it on the next call.",
        epilog="The full run trains 13 AEs/VAEs and 5 PCAs (about an hour on 2 CPU cores with "
               "OMP_NUM_THREADS=1); --quick does every step on tiny settings in well under a minute.")
    p.add_argument("--dataset", default=d.dataset, help=f"(default: {d.dataset})")
    p.add_argument("--data-dir", default=d.data_dir, help=f"folder of IDX files for mnist and kin (default: {d.data_dir})")
    p.add_argument("--out", help="results folder (default: results/story, or results/story-quick with --quick)")
    p.add_argument("--epochs", type=int, help=f"epochs per AE/VAE (default: {d.epochs}; {QUICK['epochs']} with --quick)")
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
