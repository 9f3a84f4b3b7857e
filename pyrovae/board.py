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
writes. Without the tensorboard package, one line says how to get it and training goes on.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

__all__ = ["Board", "SCALARS"]

#: metrics.jsonl column -> TensorBoard tag
SCALARS = {"train_elbo": "elbo/train", "val_elbo": "elbo/val", "train_recon": "recon/train", "val_recon": "recon/val",
           "train_kl": "kl/train", "val_kl": "kl/val", "lr": "lr", "kl_scale": "kl_scale",
           "epoch_seconds": "epoch_seconds", "val_components_used": "components_used/val"}
#: images per grid
_GRID = 64


class Board:
    """The TensorBoard writer of one run, or nothing (disabled, not rank 0, or no tensorboard)."""

    def __init__(self, run_dir: Path, *, enabled: bool, start_epoch: int, images_every: int, image_shape,
                 val_images: torch.Tensor | None, seed: int):
        self.writer = None
        self.images_every, self.image_shape = images_every, image_shape
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("pyrovae train: TensorBoard logging is off: the tensorboard package is not installed "
                  "(pip install 'pyrovae[tensorboard]'; --no-tensorboard silences this)", file=sys.stderr)
            return
        # purge_step: drop events of epochs after the checkpoint, written before a kill
        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=start_epoch + 1 if start_epoch else None)
        self.val = None if val_images is None else val_images[:8]
        self.codes_seed = seed

    def epoch(self, row: dict, model) -> None:
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
        if self.writer is not None:
            self.writer.close()
            self.writer = None
