r"""Weight averaging: an exponential moving average of a model's parameters (``--ema DECAY``).

After every optimiser step :math:`t = 1, 2, \dots` the average moves towards the weights :math:`w_t`,

.. math::

    \bar w_t = d_t\, \bar w_{t-1} + (1 - d_t)\, w_t, \qquad
    d_t = \min\Big(d, \frac{1 + t}{10 + t}\Big), \qquad \bar w_0 = w_0,

with the decay :math:`d` of ``--ema``. The second term of the minimum lets the average forget the
network's random start within the first few hundred steps instead of the :math:`1/(1-d)` it would
take at the full decay (0.1 at the first step, 0.5 at the eighth, 0.9 at the 80th; the ``num_updates``
form of TensorFlow's ``ExponentialMovingAverage``). NVAE and VDVAE evaluate their averaged weights the same way.

Only parameters are averaged; buffers (a mixture prior's ``fitted`` flag, an autoencoder's code
distribution) are the model's own. :meth:`WeightAverage.swapped` puts the averaged values into the
parameters in place (the same tensors, so Pyro's param store and the optimiser keep their references),
and puts the raw ones back afterwards.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["WeightAverage"]

#: the averaged weights' key in a checkpoint, beside the raw ones under "model"
CHECKPOINT_KEY = "ema"


class WeightAverage:
    """The moving average of ``model``'s parameters with decay ``decay`` in [0, 1)."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0 <= decay < 1:
            raise ValueError(f"--ema must lie in [0, 1) (got {decay})")
        self.decay = float(decay)
        self._names = [n for n, _ in model.named_parameters()]
        self._params = [p for _, p in model.named_parameters()]
        self.average = [p.detach().clone() for p in self._params]
        self.steps = 0

    def current_decay(self) -> float:
        r""":math:`d_t` of the next update."""
        t = self.steps + 1
        return min(self.decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average towards the parameters' present values."""
        d = self.current_decay()
        torch._foreach_lerp_(self.average, [p.detach() for p in self._params], 1.0 - d)
        self.steps += 1

    @contextlib.contextmanager
    def swapped(self):
        """Within this block the model's parameters hold the averaged weights."""
        with torch.no_grad():
            raw = [p.detach().clone() for p in self._params]
            for p, a in zip(self._params, self.average):
                p.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, r in zip(self._params, raw):
                    p.copy_(r)

    def state_dict(self) -> dict:
        """``{"steps": t, "params": {name: averaged tensor (on the CPU)}}`` for a checkpoint."""
        return {"steps": self.steps, "params": {n: a.detach().cpu() for n, a in zip(self._names, self.average)}}

    def load_state_dict(self, state: dict) -> None:
        params = state["params"]
        if list(params) != self._names:
            raise ValueError("the checkpoint's averaged weights are for another model: resume the run it came from")
        with torch.no_grad():
            for a, n in zip(self.average, self._names):
                a.copy_(params[n])
        self.steps = int(state["steps"])


def averaged_state(state: dict) -> dict:
    """A checkpoint's model state with its averaged weights in place of the raw ones (unchanged when the
    checkpoint holds none)."""
    ema = state.get(CHECKPOINT_KEY)
    if not ema:
        return state["model"]
    return {**state["model"], **ema["params"]}
