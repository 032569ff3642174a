r"""LAQ and SLAQ: lazily aggregated quantized gradients (Sun, Chen, Giannakis & Yang, NeurIPS 2019).

Pure functions and state for the worker's skip rule and the server's innovation sum; :mod:`fl_compams.algorithm`
calls them when ``Algorithm.lazy`` is set (``algorithm = "laq"``). The objective is a *sum*
``f = sum_m f_m``; at iteration k worker m quantizes its gradient against its last upload (the b-bit quantizer
of :mod:`fl_compams.compressors.laq`)::

    dQ_m^k = Q_b( grad f_m(theta^k) - Q_m^prev )          R = ||grad - Q_prev||_inf, tau = 1 / (2^b - 1)
    Q_m^k  = Q_m^prev + dQ_m^k,   eps_m^k = Q_m^k - grad f_m(theta^k),   ||eps_m^k||_inf <= tau R

and **skips** the upload when both hold (eq. (7a), (7b))::

    (7a)  ||dQ_m^k||^2 <= (1 / (alpha^2 M^2)) sum_{d=1}^{D} xi_d ||theta^{k+1-d} - theta^{k-d}||^2
                          + 3 (||eps_m^k||^2 + ||eps_hat_m||^2)
    (7b)  clock_m < t_bar                                    (clock = iterations since the last upload)

with ``eps_hat_m`` the quantization error at its last upload and, as the authors' code does, ``xi_d = xi / n``
over the ``n = min(k, D)`` model changes that exist (``xi = 0.8`` there). The server keeps
``nabla^k = sum_m Q_m`` (every worker's last upload, stale for those that skipped) and steps
``theta^{k+1} = theta^k - alpha nabla^k`` (``server-opt = "sgd"``, no momentum, ``server-lr`` = alpha).

The grid has no point at 0, so every coordinate of a near-zero innovation costs an error of about ``tau R``:
``||eps||^2 ~ d (tau R)^2``. For a large d with a heavy-tailed gradient that term exceeds the innovation itself
(the digits CNN, d = 151,306, at b = 4: ``3 ||eps||^2 = 78`` against ``||grad||^2 = 1.7``) and (7a) then holds
every round, so workers upload only when (7b) forces them; b = 8 restores the rule there (0.14 against 1.7).

Departures, each for a reason:

- *The history term is computed by the server* and sent as one number (:class:`LazyInstruction`): the server
  holds the model changes, alpha and M, so a worker that missed rounds or restarted needs no history of its own.
- *The worker commits its upload when the server says it applied it* (acknowledged client state, design.md
  section 7): ``Q``, ``eps_hat`` and the clock change on ``APPLIED``; on anything else the upload counts as
  a skip (the clock advances). The client's ``Q`` is then exactly (bit for bit) the server's stored copy.
- *Forced upload at a worker's first round* (and after a reset): the clock starts at ``t_bar``. The paper does
  not say how iteration 0 is handled (algorithms.md section 4.7).
- *Expiry*: a worker that gives no reply (neither upload nor skip) for ``expire_rounds`` rounds is removed from
  the aggregate (its ``Q`` subtracted); its next instruction tells it to reset (``Q = 0``, ``eps_hat = 0``,
  forced upload).
- *SLAQ* (``stochastic``): minibatch gradients, and the authors' ``SLAQ.py`` threshold, which weights the error
  term by 0.5 and adds 0.2 (in neither the paper's (7a) nor its theory: a code-only deviation).
- The server recomputes ``nabla`` as the sum of the stored ``Q_m`` in label order each round instead of adding
  the innovations to the previous sum: the same value up to rounding, with no drift, and the invariant
  ``nabla = sum_m Q_m`` then holds exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

import torch

from fl_compams.compressors.laq import LAQPayload, LAQQuantizer
from fl_compams.nodes import label_sort_key

__all__ = [
    "SKIP_BITS",
    "LazyConfig",
    "LazyInstruction",
    "LazyServer",
    "LazyWorker",
    "fresh_worker",
    "history_term",
    "quantize_innovation",
    "server_expire",
    "server_init",
    "server_instruction",
    "server_receive",
    "server_record_change",
    "should_upload",
    "worker_instruct",
    "worker_resolve",
    "worker_step",
]

#: Theory bits of a skip: the 1-bit flag of algorithms.md section 4.5 (the paper counts 0).
SKIP_BITS = 1
#: SLAQ's threshold in the authors' code (``SLAQ.py``): ``0.5 * 3 (eps + eps_hat) + 0.2``.
SLAQ_ERROR_FACTOR = 0.5
SLAQ_CONSTANT = 0.2


@dataclass(frozen=True)
class LazyConfig:
    """LAQ's trigger and aggregator settings.

    ``xi`` (>= 0): total weight of the model-change history (``xi_d = xi / min(k, D)``); ``history`` = D (>= 1);
    ``max_skip`` = t_bar (>= 0), the most consecutive skips (0: never skip, i.e. quantized GD);
    ``expire_rounds`` (>= 1): rounds without a reply after which the server drops a worker from the aggregate;
    ``stochastic``: SLAQ (minibatches, the code's threshold). ``error_weight`` is the 3 of (7a) (times 0.5 for
    SLAQ) and ``constant`` SLAQ's 0.2; tests set both to 0 with ``xi = 0`` to get the zero threshold.
    """

    xi: float = 0.8
    history: int = 10
    max_skip: int = 100
    expire_rounds: int = 10
    stochastic: bool = False
    error_weight: float | None = None
    constant: float | None = None

    def __post_init__(self) -> None:
        if not (self.xi >= 0 and math.isfinite(self.xi)):
            raise ValueError(f"laq: xi must be a finite number >= 0, got {self.xi!r}")
        for name, least in (("history", 1), ("max_skip", 0), ("expire_rounds", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"laq: {name} must be an integer >= {least}, got {value!r}")
        if self.error_weight is None:
            object.__setattr__(self, "error_weight", 3.0 * (SLAQ_ERROR_FACTOR if self.stochastic else 1.0))
        if self.constant is None:
            object.__setattr__(self, "constant", SLAQ_CONSTANT if self.stochastic else 0.0)
        for name in ("error_weight", "constant"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"laq: {name} must be a finite number >= 0, got {value!r}")


class LazyInstruction(NamedTuple):
    """The LAQ part of an instruction: the history term of (7a) for this round, and whether to reset."""

    #: ``(1 / (alpha^2 M^2)) sum_d xi_d ||theta^{k+1-d} - theta^{k-d}||^2``.
    threshold: float = 0.0
    #: The server holds no ``Q`` for this worker (first contact, or expired): start from ``Q = 0``.
    reset: bool = False


class LazyWorker(NamedTuple):
    """A worker's LAQ state (WorkerState slot ``lazy``)."""

    #: Last upload the server applied, Q_m (None = zeros).
    q: torch.Tensor | None = None
    #: ``||eps_hat||^2``, the squared quantization error of that upload.
    eps_hat: float = 0.0
    #: Iterations since that upload (skips, and uploads that were not applied).
    clock: int = 0
    #: The history term of the current round's instruction.
    threshold: float = 0.0
    #: ``||eps||^2`` of the upload awaiting its status (committed to ``eps_hat`` when applied).
    sent_eps: float = 0.0


def fresh_worker(cfg: LazyConfig) -> LazyWorker:
    """``Q = 0``, ``eps_hat = 0`` and the clock at t_bar, so the first round uploads."""
    return LazyWorker(None, 0.0, cfg.max_skip, 0.0, 0.0)


def quantize_innovation(
    quantizer: LAQQuantizer, grad: torch.Tensor, q_prev: torch.Tensor | None
) -> tuple[LAQPayload, torch.Tensor, torch.Tensor]:
    """``(payload of dQ, dQ, Q = Q_prev + dQ)`` for the gradient ``grad`` and the last upload ``q_prev``."""
    prev = torch.zeros_like(grad) if q_prev is None else q_prev.to(grad.dtype)
    payload = quantizer.encode(grad - prev)
    dq = payload.decode().to(device=grad.device, dtype=grad.dtype)
    return payload, dq, prev + dq


def history_term(changes: Iterable[float], xi: float, lr: float, workers: int) -> float:
    """``(1 / (alpha^2 M^2)) sum_d (xi / n) ||theta^{k+1-d} - theta^{k-d}||^2`` over the n changes given."""
    changes = list(changes)
    if not changes or xi == 0:
        return 0.0
    return xi / len(changes) * math.fsum(changes) / (lr**2 * max(1, workers) ** 2)


def should_upload(cfg: LazyConfig, lazy: LazyWorker, dq_sq: float, err_sq: float) -> bool:
    """Upload unless (7a) and (7b) both hold: ``||dQ||^2 >= threshold`` or ``clock >= t_bar`` (as the code)."""
    rhs = lazy.threshold + cfg.error_weight * (err_sq + lazy.eps_hat) + cfg.constant
    return dq_sq >= rhs or lazy.clock >= cfg.max_skip


def worker_step(
    cfg: LazyConfig, quantizer: LAQQuantizer, lazy: LazyWorker, grad: torch.Tensor
) -> tuple[LAQPayload | None, LazyWorker]:
    """Quantize the innovation and apply the skip rule: ``(payload, state)`` to upload, ``(None, state)`` to skip.

    An upload changes nothing yet but ``sent_eps`` (committed by :func:`worker_resolve`); a skip advances the clock.
    """
    q_prev = lazy.q if lazy.q is not None and lazy.q.shape == grad.shape else None
    payload, dq, q_new = quantize_innovation(quantizer, grad, q_prev)
    dq_sq = float(torch.linalg.vector_norm(dq.double()) ** 2)
    err_sq = float(torch.linalg.vector_norm((q_new - grad).double()) ** 2)
    if should_upload(cfg, lazy, dq_sq, err_sq):
        return payload, lazy._replace(sent_eps=err_sq)
    return None, lazy._replace(clock=lazy.clock + 1)


def worker_resolve(lazy: LazyWorker, applied: torch.Tensor | None) -> LazyWorker:
    """Resolve the pending upload: ``applied`` = its decoded innovation if the server applied it, else None.

    Applied: ``Q += dQ`` (the server's own operation, so both copies stay equal), ``eps_hat = sent_eps``, clock 0.
    Not applied (lost, rejected, unknown to the server): nothing changes but the clock, as if the worker had skipped.
    """
    if applied is None:
        return lazy._replace(clock=lazy.clock + 1, sent_eps=0.0)
    q = applied.clone() if lazy.q is None else lazy.q + applied.to(lazy.q.dtype)
    return lazy._replace(q=q, eps_hat=lazy.sent_eps, clock=0, sent_eps=0.0)


def worker_instruct(cfg: LazyConfig, lazy: LazyWorker, instruction: LazyInstruction) -> LazyWorker:
    """Take the round's history term; reset to a fresh state when the server holds no ``Q`` for this worker."""
    if instruction.reset:
        lazy = fresh_worker(cfg)
    return lazy._replace(threshold=float(instruction.threshold))


# ----------------------------------------------------------------------------------------------- server
class LazyServer(NamedTuple):
    """The server's LAQ state (ServerState slot ``lazy``).

    ``nabla = sum_m q[m]`` (the aggregate); ``q``: each worker's last applied upload, by label (needed to expire
    it); ``contact``: the last round each worker replied (upload or skip); ``changes``: the last D values of
    ``||theta^{k+1} - theta^k||^2``, oldest first. Treat the mappings as immutable.
    """

    nabla: torch.Tensor
    q: Mapping[str, torch.Tensor] = MappingProxyType({})
    contact: Mapping[str, int] = MappingProxyType({})
    changes: tuple[float, ...] = ()


def server_init(theta: torch.Tensor) -> LazyServer:
    """Zero aggregate, no worker known."""
    return LazyServer(torch.zeros_like(theta))


def server_instruction(cfg: LazyConfig, lazy: LazyServer | None, label: str, lr: float) -> LazyInstruction:
    """The history term for this round (M = workers heard within the expiry window) and the reset flag."""
    if lazy is None:
        return LazyInstruction(0.0, True)
    threshold = history_term(lazy.changes, cfg.xi, lr, len(lazy.contact))
    return LazyInstruction(threshold, label not in lazy.q)


def _sum(q: Mapping[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    total = torch.zeros_like(like)
    for label in sorted(q, key=label_sort_key):  # label order: results do not depend on arrival order
        total = total + q[label].to(device=like.device, dtype=like.dtype)
    return total


def server_receive(
    lazy: LazyServer, round: int, uploads: Mapping[str, torch.Tensor], heard: Iterable[str]
) -> LazyServer:
    """Apply this round's innovations (``q[m] += dQ_m``), mark every worker heard, and recompute ``nabla``."""
    q = dict(lazy.q)
    for label, dq in uploads.items():
        q[label] = dq.clone() if label not in q else q[label] + dq.to(q[label].dtype)
    contact = {**lazy.contact, **{label: round for label in heard}}
    return LazyServer(_sum(q, lazy.nabla), q, contact, lazy.changes)


def stored_norm(lazy: LazyServer, label: str, dq: torch.Tensor) -> float:
    """``||Q_m + dQ_m||``: the norm of worker m's stored gradient if this upload were applied (float64)."""
    q = lazy.q.get(label)
    total = dq.double() if q is None else q.double() + dq.double()
    return float(torch.linalg.vector_norm(total))


def server_record_change(cfg: LazyConfig, lazy: LazyServer, delta: torch.Tensor) -> LazyServer:
    """Append ``||theta^{k+1} - theta^k||^2`` and keep the last D."""
    change = float(torch.linalg.vector_norm(delta.double()) ** 2)
    return lazy._replace(changes=(*lazy.changes, change)[-cfg.history :])


def server_expire(cfg: LazyConfig, lazy: LazyServer, round: int) -> tuple[LazyServer, dict[str, str]]:
    """Drop workers not heard from for ``expire_rounds`` rounds; returns the state and ``{label: reason}``."""
    gone = {
        label: f"no reply (upload or skip) since round {last}; its last upload is removed from the aggregate"
        for label, last in lazy.contact.items()
        if round - last >= cfg.expire_rounds
    }
    if not gone:
        return lazy, {}
    q = {k: v for k, v in lazy.q.items() if k not in gone}
    contact = {k: v for k, v in lazy.contact.items() if k not in gone}
    return LazyServer(_sum(q, lazy.nabla), q, contact, lazy.changes), gone
