"""Client-side optimizers: QAdam's local Adam and dist-EF-SGDM's Nesterov momentum (:class:`NesterovMomentum`).

QAdam (Chen, Shen, Huang & Liu, "Quantized Adam with Error Feedback"): each worker keeps its own Adam moments
and sends its compressed *local Adam step*; the server averages the steps and applies them
(``x <- x - mean_i Delta_i``; in this project: the ``sgd`` server optimizer with lr 1).
COMP-AMS (Li et al., section 3.2) describes it as compressing "m/v as a whole", with error feedback on the step.

The paper's exact choices are not confirmed (algorithms.md section 2), so they are explicit options with these
defaults: the learning rate is applied before compression (the error lives in model units, as in the
Efficient-Adam reference code), eps is outside the square root, no bias correction::

    m = b1 m + (1 - b1) g
    v = b2 v + (1 - b2) g^2
    delta = lr * m / (sqrt(v) + eps)              # eps_inside_sqrt: lr * m / sqrt(v + eps)
                                                  # bias_correction:  m / (1 - b1^t), v / (1 - b2^t)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = ["LocalAdam", "LocalAdamState", "MomentumState", "NesterovMomentum"]


class LocalAdamState(NamedTuple):
    """A worker's Adam moments and step count."""

    step: int
    m: torch.Tensor
    v: torch.Tensor


@dataclass(frozen=True)
class LocalAdam:
    """The QAdam worker's local Adam step (see the module docstring for the equations and options)."""

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    eps_inside_sqrt: bool = False
    bias_correction: bool = False

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"local adam: lr must be > 0, got {self.lr!r}")
        for i, b in enumerate((self.beta1, self.beta2)):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"local adam: beta{i + 1} must be in [0, 1), got {b!r}")
        if not self.eps > 0:
            raise ValueError(f"local adam: eps must be > 0, got {self.eps!r}")

    def init(self, like: torch.Tensor) -> LocalAdamState:
        """Zero moments."""
        return LocalAdamState(0, torch.zeros_like(like), torch.zeros_like(like))

    def step(self, g: torch.Tensor, state: LocalAdamState) -> tuple[torch.Tensor, LocalAdamState]:
        """Return the local step delta (to be compressed and sent; the server subtracts the mean) and the state."""
        t = state.step + 1
        m = state.m * self.beta1 + g * (1.0 - self.beta1)
        v = state.v * self.beta2 + g.square() * (1.0 - self.beta2)
        m_hat, v_hat = m, v
        if self.bias_correction:
            m_hat = m / (1.0 - self.beta1**t)
            v_hat = v / (1.0 - self.beta2**t)
        denom = v_hat.add(self.eps).sqrt() if self.eps_inside_sqrt else v_hat.sqrt().add(self.eps)
        return m_hat.div(denom).mul_(self.lr), LocalAdamState(t, m, v)


class MomentumState(NamedTuple):
    """A worker's momentum buffer (``WorkerState.momentum``)."""

    m: torch.Tensor


@dataclass(frozen=True)
class NesterovMomentum:
    """The dist-EF-SGDM worker's Nesterov momentum (Zheng, Huang & Kwok, NeurIPS 2019, Algorithm 2).

    ::

        m = mu m + g
        p = mu m + g        # sent (with the EF residual added) and compressed; the server steps -lr mean_i C(.)

    ``momentum = 0`` gives ``p = g``: dist-EF-SGD. The paper's rescale of the residual by ``eta_{t-1} / eta_t``
    is 1 here: the server learning rate is constant (no schedule exists in this code base), and with a varying
    rate the same algorithm is obtained by keeping the residual in model units (``E_t = eta_{t-1} e_t``), which
    the server's downlink residual already is (:mod:`fl_compams.downlink`).
    """

    momentum: float = 0.9

    def __post_init__(self) -> None:
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"nesterov momentum: momentum must be in [0, 1), got {self.momentum!r}")

    def init(self, like: torch.Tensor) -> MomentumState:
        """Zero buffer."""
        return MomentumState(torch.zeros_like(like))

    def step(self, g: torch.Tensor, state: MomentumState) -> tuple[torch.Tensor, MomentumState]:
        """Return ``p = mu m' + g`` with ``m' = mu m + g``, and the new buffer."""
        m = state.m * self.momentum + g
        return m * self.momentum + g, MomentumState(m)
