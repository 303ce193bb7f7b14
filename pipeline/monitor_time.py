"""The monitor of a recurrent net (recurrent.RecurrentNet): monitor.Monitor's per-layer statistics
of its three weight layers, plus statistics through time, every step.

Per weight layer (L00 input U, L01 recurrent W, L02 classifier V): ||dL/dW|| and the update ratio
as for an MLP; backprop_norm is the error reaching the layer's output over the whole sequence
(L00: dL/d(U x_t + b_ih) over every t; L01: dL/d(W h_t-1 + b_hh) over every t; L02: dL/dlogits);
act is the saturated or dead fraction of what the state's squashing receives, over the time points
(both U and W feed those units).

Per time point t (TIME_POINTS of the sequence's steps, evenly spaced, the first and last included:
all 28 rows, 28 of 784 pixels): ||dL/dh_t||, the state's mean square, and that fraction at t. At the
histogram steps: the recurrent W's largest singular value and (a square W: the RNN) its spectral
radius. The instruments of a feed-forward net (signal, jacobian, gsnr) are not taken.
"""

from __future__ import annotations

import numpy as np
import torch

from .monitor import INSTRUMENTS, Monitor, activation_statistic
from .recurrent import RecurrentNet
from .results import LAYER_STATS, TIME_STATS

TIME_POINTS = 28
RECURRENT_INSTRUMENTS = frozenset({"zero_fraction"})
SPECTRUM = ("spectral_radius", "sv_max")


def time_points(steps: int, points: int = TIME_POINTS) -> np.ndarray:
    """The time steps whose statistics are kept: at most `points`, evenly spaced, first and last."""
    return np.unique(np.linspace(0, steps - 1, min(points, steps)).round().astype(np.int64))


class RecurrentMonitor(Monitor):
    def __init__(self, model: RecurrentNet, activation: str, total_steps: int, chunk_steps: int = 64,
                 full: bool = True, instruments: frozenset[str] = INSTRUMENTS):
        self.times = time_points(model.steps)
        self._slot_of = {int(t): k for k, t in enumerate(self.times)}
        super().__init__(model, activation, total_steps, chunk_steps, full, instruments & RECURRENT_INSTRUMENTS)
        device, dtype = self._per_step.device, self._per_step.dtype
        self._per_time = torch.full((len(TIME_STATS), chunk_steps, len(self.times), self.members), float("nan"),
                                    device=device, dtype=dtype)
        self._time_grads: list[torch.Tensor | None] = [None] * len(self.times)
        self._state_sq: list[torch.Tensor] = []
        self._recurrent_grads: list[torch.Tensor] = []  # ||dL/d(W h_t-1 + b_hh)|| of every t, per member
        self._spectrum = torch.full((len(self.hist_steps), len(SPECTRUM), self.members), float("nan"), device=device,
                                    dtype=dtype)

    def _install(self, model: RecurrentNet) -> None:
        model.observer = self

    def _norm(self, grad: torch.Tensor) -> torch.Tensor:
        """Each member's L2 norm of a gradient (members, ...), at least fp32."""
        return torch.linalg.vector_norm(grad.detach().reshape(self.members, -1), dim=1,
                                        dtype=torch.promote_types(grad.dtype, torch.float32))

    # -- recurrent.Observer: called during the forward pass --------------------------------------------

    def sequence(self, projected: torch.Tensor) -> None:
        if projected.requires_grad:
            projected.register_hook(lambda g: self._backprop.__setitem__(0, self._norm(g)))

    def state(self, t: int, h: torch.Tensor, u: torch.Tensor, recurrent: torch.Tensor) -> None:
        if not h.requires_grad:
            return
        recurrent.register_hook(lambda g: self._recurrent_grads.append(self._norm(g)))
        slot = self._slot_of.get(t)
        if slot is None:
            return
        h.register_hook(lambda g: self._time_grads.__setitem__(slot, self._norm(g)))
        with torch.no_grad():
            self._state_sq.append(h.detach().float().pow(2).mean(dim=(1, 2)))
            self._hidden.append(u.detach())

    def output(self, logits: torch.Tensor) -> None:
        if logits.requires_grad:
            logits.register_hook(lambda g: self._backprop.__setitem__(2, self._norm(g)))

    # -- monitor.Monitor's extension points ------------------------------------------------------------

    def _record_activity(self, row: int, loss_scale: float) -> None:
        self._backprop[1] = torch.linalg.vector_norm(torch.stack(self._recurrent_grads), dim=0)
        self._per_layer[LAYER_STATS.index("backprop_norm"), row] = torch.stack(self._backprop) / loss_scale
        act = activation_statistic(torch.stack(self._hidden), self.activation, in_place=True)  # (time points, members)
        self._per_layer[LAYER_STATS.index("act"), row, :2] = act.mean(dim=0)
        self._per_time[TIME_STATS.index("grad_norm"), row] = torch.stack(self._time_grads) / loss_scale
        self._per_time[TIME_STATS.index("state_sq"), row] = torch.stack(self._state_sq)
        self._per_time[TIME_STATS.index("act"), row] = act
        slot = self._slots.get(self.step)
        if slot is not None:
            self._spectrum[slot] = recurrent_spectrum(self.model.recurrent_weight.detach())
        self._hidden, self._state_sq, self._recurrent_grads = [], [], []
        self._time_grads = [None] * len(self.times)

    def _flush_time(self, n: int) -> list[dict[str, np.ndarray]]:
        host = self._per_time[:, :n].cpu().numpy()  # on a CPU, the buffer itself: copied before it is reset
        chunks = [{name: host[i, :, :, e].copy() for i, name in enumerate(TIME_STATS)} for e in range(self.members)]
        self._per_time.fill_(float("nan"))
        return chunks

    def spectrum(self, member: int, last_step: int) -> dict[str, np.ndarray]:
        """The recurrent W's spectral radius and largest singular value at the histogram steps reached."""
        taken = self._taken(last_step)
        if not self.full or not taken:
            return {}
        values = self._spectrum[taken, :, member].cpu().numpy()
        return {"steps": np.array([self.hist_steps[i] for i in taken]),
                **{name: values[:, i] for i, name in enumerate(SPECTRUM)}}


def recurrent_spectrum(weight: torch.Tensor) -> torch.Tensor:
    """(2, members): the spectral radius (max |eigenvalue|; NaN unless W is square) and the largest
    singular value of each member's recurrent W (members, G x H, H); NaN where W is not finite."""
    w = weight.double()
    finite = torch.isfinite(w).flatten(1).all(dim=1)
    out = torch.full((2, w.shape[0]), float("nan"), dtype=w.dtype, device=w.device)
    if finite.any():
        good = w[finite]
        out[1, finite] = torch.linalg.matrix_norm(good, ord=2)
        if w.shape[1] == w.shape[2]:
            out[0, finite] = torch.linalg.eigvals(good).abs().amax(dim=1)
    return out
