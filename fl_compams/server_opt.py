"""Server optimizers as pure updates over flat vectors, with NamedTuple state (optax style).

``update(g, state) -> (delta, new_state)`` returns the additive step: ``theta_{t+1} = theta_t + delta``. The step
count lives in the state, never in the round number. The default, :class:`AMSGrad`, is exactly Algorithm 2 of
Li, Karimi & Li (ICLR 2022)::

    m_t     = b1 m_{t-1} + (1 - b1) g_t
    v_t     = b2 v_{t-1} + (1 - b2) g_t^2          (g_t: the averaged compressed update)
    vhat_t  = max(vhat_{t-1}, v_t)
    theta  -= lr m_t / sqrt(vhat_t + eps)          (eps INSIDE the sqrt, no bias correction, m0=v0=vhat0=0)

Other variants are explicit and named: ``amsgrad-torch`` (torch.optim.Adam(amsgrad=True): bias correction,
eps outside the sqrt), ``adam`` (torch-style Adam) and ``sgd`` (heavy-ball or Nesterov momentum).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

__all__ = [
    "SERVER_OPTIMIZERS",
    "SGD",
    "AMSGrad",
    "AdamState",
    "SGDState",
    "ServerOptimizer",
    "TorchAMSGrad",
    "TorchAdam",
    "make_server_optimizer",
]


class AdamState(NamedTuple):
    """Moments of Adam-family optimizers. ``v_hat`` is the AMSGrad running max (unused by Adam)."""

    step: int
    m: torch.Tensor
    v: torch.Tensor
    v_hat: torch.Tensor


class SGDState(NamedTuple):
    """Momentum buffer of SGD."""

    step: int
    momentum: torch.Tensor


def _check_hparams(name: str, lr: float, betas: tuple[float, ...], eps: float | None) -> None:
    if not lr > 0:
        raise ValueError(f"{name}: lr must be > 0, got {lr!r}")
    for i, b in enumerate(betas):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{name}: beta{i + 1} must be in [0, 1), got {b!r}")
    if eps is not None and not eps > 0:
        raise ValueError(f"{name}: eps must be > 0, got {eps!r}")


class ServerOptimizer:
    """Base class: ``init(like) -> state`` and pure ``update(g, state) -> (delta, state)``."""

    name: ClassVar[str]

    def init(self, like: torch.Tensor):
        """Zero state shaped, typed and placed like the flat parameter vector."""
        raise NotImplementedError

    def update(self, g: torch.Tensor, state):
        """Return the additive step for the averaged update g and the new state."""
        raise NotImplementedError


@dataclass(frozen=True)
class AMSGrad(ServerOptimizer):
    """AMSGrad exactly as COMP-AMS Algorithm 2 (see the module docstring)."""

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    name: ClassVar[str] = "amsgrad"

    def __post_init__(self) -> None:
        _check_hparams(self.name, self.lr, (self.beta1, self.beta2), self.eps)

    def init(self, like: torch.Tensor) -> AdamState:
        """m0 = v0 = vhat0 = 0."""
        return AdamState(0, torch.zeros_like(like), torch.zeros_like(like), torch.zeros_like(like))

    def update(self, g: torch.Tensor, state: AdamState) -> tuple[torch.Tensor, AdamState]:
        """One AMSGrad step on the averaged update g."""
        m = state.m * self.beta1 + g * (1.0 - self.beta1)
        v = state.v * self.beta2 + g.square() * (1.0 - self.beta2)
        v_hat = torch.maximum(state.v_hat, v)
        delta = m.div(v_hat.add(self.eps).sqrt_()).mul_(-self.lr)
        return delta, AdamState(state.step + 1, m, v, v_hat)


@dataclass(frozen=True)
class TorchAMSGrad(AMSGrad):
    """``torch.optim.Adam(amsgrad=True)``: max of the raw v, bias correction, eps outside the sqrt."""

    name: ClassVar[str] = "amsgrad-torch"

    def update(self, g: torch.Tensor, state: AdamState) -> tuple[torch.Tensor, AdamState]:
        """``delta = -lr/bc1 * m / (sqrt(vhat)/sqrt(bc2) + eps)``, bc_i = 1 - beta_i^t."""
        t = state.step + 1
        m = state.m * self.beta1 + g * (1.0 - self.beta1)
        v = state.v * self.beta2 + g.square() * (1.0 - self.beta2)
        v_hat = torch.maximum(state.v_hat, v)
        bc1, bc2 = 1.0 - self.beta1**t, 1.0 - self.beta2**t
        denom = v_hat.sqrt().div_(math.sqrt(bc2)).add_(self.eps)
        return m.div(denom).mul_(-self.lr / bc1), AdamState(t, m, v, v_hat)


@dataclass(frozen=True)
class TorchAdam(AMSGrad):
    """``torch.optim.Adam``: bias correction, eps outside the sqrt, no max (``v_hat`` stays 0)."""

    name: ClassVar[str] = "adam"

    def update(self, g: torch.Tensor, state: AdamState) -> tuple[torch.Tensor, AdamState]:
        """``delta = -lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)``."""
        t = state.step + 1
        m = state.m * self.beta1 + g * (1.0 - self.beta1)
        v = state.v * self.beta2 + g.square() * (1.0 - self.beta2)
        bc1, bc2 = 1.0 - self.beta1**t, 1.0 - self.beta2**t
        denom = v.sqrt().div_(math.sqrt(bc2)).add_(self.eps)
        return m.div(denom).mul_(-self.lr / bc1), AdamState(t, m, v, state.v_hat)


@dataclass(frozen=True)
class SGD(ServerOptimizer):
    """SGD with momentum (torch convention): ``b = mu b + g``; step ``-lr (g + mu b)`` (Nesterov) or ``-lr b``."""

    lr: float = 1.0
    momentum: float = 0.0
    nesterov: bool = False
    name: ClassVar[str] = "sgd"

    def __post_init__(self) -> None:
        _check_hparams(self.name, self.lr, (self.momentum,), None)
        if self.nesterov and self.momentum == 0.0:
            raise ValueError("sgd: nesterov=True needs momentum > 0")

    def init(self, like: torch.Tensor) -> SGDState:
        """Zero momentum buffer."""
        return SGDState(0, torch.zeros_like(like))

    def update(self, g: torch.Tensor, state: SGDState) -> tuple[torch.Tensor, SGDState]:
        """One momentum-SGD step."""
        buf = state.momentum * self.momentum + g
        direction = g + buf * self.momentum if self.nesterov else buf
        return direction * -self.lr, SGDState(state.step + 1, buf)


#: The only map from names to server optimizers.
SERVER_OPTIMIZERS: dict[str, Callable[..., ServerOptimizer]] = {
    cls.name: cls for cls in (AMSGrad, TorchAMSGrad, TorchAdam, SGD)
}


def make_server_optimizer(name: str, **params) -> ServerOptimizer:
    """Build a server optimizer by registry name, e.g. ``make_server_optimizer("amsgrad", lr=1e-3)``."""
    try:
        factory = SERVER_OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown server optimizer {name!r}; known: {sorted(SERVER_OPTIMIZERS)}") from None
    return factory(**params)
