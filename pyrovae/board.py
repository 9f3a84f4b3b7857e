"""TensorBoard event files of a training run (``pip install 'pyrovae[tensorboard]'``).

Every run writes its events into its own run directory, so ``tensorboard --logdir runs``
shows all runs side by side:

- per epoch (step = epoch): ``elbo/train``, ``elbo/val``, ``recon/train``, ``recon/val``,
  ``kl/train``, ``kl/val``, ``lr``, ``kl_scale`` (KL warm-up), ``epoch_seconds``, and for a
  mixture prior ``components_used/val``; the same numbers as ``metrics.jsonl``, which stays
  the source of truth;
- every ``--tensorboard-images-every`` epochs: a grid of images decoded from prior samples
  (the same codes each time) and of reconstructions of fixed validation images;
- at the end: the run's settings and final scores as hparams.

A resumed run continues the same run: events from epochs after the checkpoint (written
before a kill) are purged, so each epoch appears once. Only rank 0 of a data-parallel run
writes. Without the tensorboard package training goes on without events, and ``pyrovae train``'s
summary says how to get them.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["Board", "SCALARS"]

#: metrics.jsonl column -> TensorBoard tag
SCALARS = {"train_elbo": "elbo/train", "val_elbo": "elbo/val", "train_recon": "recon/train", "val_recon": "recon/val",
           "train_kl": "kl/train", "val_kl": "kl/val", "lr": "lr", "kl_scale": "kl_scale",
           "epoch_seconds": "epoch_seconds", "val_components_used": "components_used/val", "val_iwae": "iwae/val"}
#: images per grid
_GRID = 64


class Board:
    """The TensorBoard writer of one run, or nothing (disabled, not rank 0, or no tensorboard)."""

    def __init__(self, run_dir: Path, *, enabled: bool, start_epoch: int, images_every: int, image_shape,
                 val_images: torch.Tensor | None, seed: int):
        self.writer = self._open = None
        self.images_every, self.image_shape = images_every, image_shape
        self.val = None if val_images is None else val_images[:8]
        self.codes_seed = seed
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # said once, in the run's summary (pyrovae.cli), not as a warning here
            return

        # opened at the first finished epoch, so that a resume that fails earlier changes nothing;
        # purge_step drops events of epochs after the checkpoint, written before a kill
        def open_writer():
            return SummaryWriter(log_dir=str(run_dir), purge_step=start_epoch + 1 if start_epoch else None)

        self._open = open_writer

    def epoch(self, row: dict, model) -> None:
        if self.writer is None and self._open is not None:
            self.writer, self._open = self._open(), None
        if self.writer is None:
            return
        step = row["epoch"]
        for key, tag in SCALARS.items():
            if row.get(key) is not None:
                self.writer.add_scalar(tag, row[key], step)
        if self.images_every and step % self.images_every == 0 and hasattr(model, "decode"):
            self._images(model, step)
        self.writer.flush()

    @torch.no_grad()
    def _images(self, model, step: int) -> None:
        from torchvision.utils import make_grid

        from .marginal import isolated_params

        h, w = self.image_shape
        was_training = model.training
        model.eval()
        try:
            device = self.val.device if self.val is not None else torch.device("cpu")
            with isolated_params(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(self.codes_seed)  # the same codes at every step
                samples = model.decode(model.sample_codes(_GRID))
                grid = make_grid(samples.float().clamp(0, 1).reshape(-1, 1, h, w).cpu(), nrow=8, pad_value=0.5)
                self.writer.add_image("samples", grid, step)
                if self.val is not None:
                    rec = model.decode(model.encode(self.val))
                    both = torch.cat([self.val, rec]).float().clamp(0, 1).reshape(-1, 1, h, w).cpu()
                    self.writer.add_image("reconstructions", make_grid(both, nrow=self.val.shape[0], pad_value=0.5),
                                          step)
        finally:
            model.train(was_training)

    def finish(self, settings: dict, scores: dict) -> None:
        if self.writer is None:
            return
        hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in settings.items()
                   if v is not None}
        metrics = {f"hparam/{k}": float(v) for k, v in scores.items() if isinstance(v, (int, float))}
        self.writer.add_hparams(hparams, metrics, run_name=".")
        self.close()

    def close(self) -> None:
        self._open = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def render(run_dirs: list, path, names: list[str] | None = None) -> Path:
    """A PNG of what ``tensorboard --logdir`` shows for ``run_dirs``, drawn from their event
    files: validation and training ELBO, KL and learning rate per epoch for every run, and the
    last grids of samples and reconstructions of the first run."""
    import io

    from PIL import Image
    from tensorboard.backend.event_processing import event_accumulator

    from .files import write_atomic
    from .plots import figure

    names = names or [Path(r).name for r in run_dirs]
    accs = []
    for r in run_dirs:
        ea = event_accumulator.EventAccumulator(str(r), size_guidance={"images": 0, "scalars": 0})
        ea.Reload()
        accs.append(ea)
    fig = figure(13, 7)
    grid = fig.add_gridspec(2, 3)
    panels = [("elbo/val", "validation ELBO (nats)"), ("kl/val", "validation KL (nats)"), ("lr", "learning rate")]
    for i, (tag, label) in enumerate(panels):
        ax = fig.add_subplot(grid[0, i])
        for name, ea in zip(names, accs):
            if tag in ea.Tags()["scalars"]:
                events = ea.Scalars(tag)
                ax.plot([e.step for e in events], [e.value for e in events], label=name)
            if tag == "elbo/val" and "elbo/train" in ea.Tags()["scalars"]:
                events = ea.Scalars("elbo/train")
                ax.plot([e.step for e in events], [e.value for e in events], ls=":", color=ax.lines[-1].get_color())
        ax.set_title(tag, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        if tag == "elbo/val":
            values = [v for line in ax.lines for v in line.get_ydata()]
            if values:
                lo = sorted(values)[len(values) // 10]
                ax.set_ylim(bottom=lo - 0.3 * (max(values) - lo + 1e-9))
            ax.legend(fontsize=7, title="dotted: training", title_fontsize=7)
    for j, tag in enumerate(("samples", "reconstructions")):
        ax = fig.add_subplot(grid[1, j if j == 0 else slice(1, 3)])
        ax.axis("off")
        if tag in accs[0].Tags()["images"]:
            event = accs[0].Images(tag)[-1]
            ax.imshow(Image.open(io.BytesIO(event.encoded_image_string)), cmap="gray")
            ax.set_title(f"{names[0]}: {tag}, epoch {event.step}", fontsize=9)
    fig.tight_layout()
    return write_atomic(path, lambda f: fig.savefig(f, format="png"))
