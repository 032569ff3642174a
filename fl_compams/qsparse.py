r"""Qsparse-local-SGD (Basu, Data, Karakus & Diggavi, NeurIPS 2019): the worker part of ``algorithm = "qsparse"``.

Synchronous (algorithms.md section 5.2), one Flower round = one sync with H = ``local-steps`` local SGD steps::

    worker  x_hat = H SGD steps with rate eta from x_t
            g     = QComp(m + x_t - x_hat)                 # memory and net local change in MODEL units
            m'    = m + x_t - x_hat - g
    server  x_{t+1} = x_t - mean(g)                        # sgd, lr 1, no momentum (fixed by the composition)

``tasks.training.local_update`` returns the mean local gradient ``u = (x_t - x_hat) / (eta H)``; this part
turns it back into the net change ``eta H u`` before error feedback, so the memory is in model units as in the
paper and per-client periods (the asynchronous variant) need no per-client server rescaling.

Asynchronous (section 5.3): client r has its own period H_r (``qsparse-periods``) and its own reference model,
the global model it received at its last contact. On contact it sends ``QComp(m + x_{t_r} - x_hat)`` for the
work it did since then (the :class:`LocalChange` slot ``local_change`` of its
:class:`~fl_compams.algorithm.WorkerState`), and keeps the H_r steps it now does from the current model for its
next contact. A reply therefore carries work ``staleness`` rounds old; the first contact has none and sends
``QComp(m + 0)``, a zero update (it counts in the round's mean like any reply: with full participation the
paper's ``x <- x - (1/R) sum g``). Acknowledged error feedback is unchanged: per client,
``sum(applied) + sum(removed by policy) + m + local_change = sum of all its local work (eta x gradients)``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from fl_compams.compressors import Compressor
from fl_compams.errors import ConfigError

__all__ = ["LocalChange", "Qsparse", "Work", "check_compressor", "parse_periods"]

UNIFORM = "uniform"


class LocalChange(NamedTuple):
    """Asynchronous Qsparse: local work not sent yet, in model units (``x_{t_r} - x_hat``).

    ``round`` is the round whose model it started from; ``steps`` the local SGD steps it took.
    """

    round: int
    steps: int
    change: torch.Tensor


class Work(NamedTuple):
    """What a worker sends this contact, and what it keeps."""

    #: The net local change to compress with the memory (model units).
    send: torch.Tensor
    #: The new ``local_change`` slot (None in the synchronous variant).
    keep: LocalChange | None
    #: Local steps behind ``send`` (0: the first asynchronous contact, which has no work yet).
    steps: int
    #: Rounds between the model ``send`` started from and this round (0 when synchronous or empty).
    staleness: int


def parse_periods(text: str) -> str | tuple[int, ...]:
    """``qsparse-periods``: ``""`` (every client H), ``"uniform"`` or a comma-separated list of integers >= 1."""
    text = text.strip()
    if text in ("", UNIFORM):
        return text
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise ConfigError(
            f"config key 'qsparse-periods': expected '', 'uniform' or a comma-separated list of integers >= 1 "
            f"(one per partition id), got {text!r}"
        )
    return tuple(int(p) for p in parts)


def check_compressor(compressor: Compressor) -> None:
    """Qsparse needs a gamma-compression (a biased contraction) or the identity; refuse unbiased operators.

    QSGD, MVSS and scaled Rand-k are unbiased with variance above ||x||^2, not contractions: error feedback does
    not bound their memory (Basu et al. compose QSGD with Top-k and scale it: ``qsgd-topk``).
    """
    if compressor.unbiased:
        raise ConfigError(
            f"config key 'compressor': algorithm 'qsparse' needs a contracting compressor (topk, signtopk, "
            f"qsgd-topk, randk unscaled, blocksign) or identity; {compressor.name!r} is unbiased and not a "
            "contraction (use qsgd-topk for QSGD o Top-k)"
        )


@dataclass(frozen=True)
class Qsparse:
    """Qsparse-local-SGD's worker part: local rate eta, H, the variant and the per-client periods.

    ``periods``: ``""`` = every client does H = ``steps``; ``"uniform"`` = client r does H_r drawn uniformly in
    [1, H] from (``seed``, r); a tuple = H_r = ``periods[r]`` for partition id r (asynchronous variant only).
    """

    lr: float
    steps: int = 1
    asynchronous: bool = False
    periods: str | tuple[int, ...] = ""
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"config key 'local-lr': qsparse needs a local rate > 0, got {self.lr!r}")
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise ConfigError(f"config key 'local-steps': H must be an integer >= 1, got {self.steps!r}")
        if isinstance(self.periods, str):
            parse_periods(self.periods)
        elif not self.periods or not all(isinstance(p, int) and p >= 1 for p in self.periods):
            raise ConfigError(
                f"config key 'qsparse-periods': periods must be integers >= 1, got {self.periods!r}"
            )
        if self.periods not in ("", ()) and not self.asynchronous:
            raise ConfigError(
                "config key 'qsparse-periods': per-client periods belong to the asynchronous variant; set "
                "qsparse-async = true, or drop qsparse-periods (the synchronous variant uses local-steps)"
            )

    def period(self, client: int) -> int:
        """Local SGD steps H_r of the client whose seed id (partition id) is ``client``."""
        if self.periods == "":
            return self.steps
        if self.periods == UNIFORM:
            digest = hashlib.sha256(f"qsparse-period/{self.seed}/{client}".encode()).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            return int(torch.randint(1, self.steps + 1, (1,), generator=gen))
        if not 0 <= client < len(self.periods):
            raise ConfigError(
                f"config key 'qsparse-periods': lists {len(self.periods)} periods (one per partition id), but "
                f"this node's partition id is {client}; use qsparse-periods = 'uniform' for nodes without one"
            )
        return self.periods[client]

    def check_clients(self, labels: Iterable[str]) -> None:
        """A period list must have one entry per node, and the nodes must be partitions 0..n-1."""
        if not isinstance(self.periods, tuple):
            return
        labels = sorted(labels)
        expected = sorted(f"partition-{i}" for i in range(len(self.periods)))
        if labels != expected:
            raise ConfigError(
                f"config key 'qsparse-periods': lists {len(self.periods)} periods (one per partition id "
                f"0..{len(self.periods) - 1}), but the federation's {len(labels)} nodes are "
                f"{labels[:5]}{' ...' if len(labels) > 5 else ''}; give one period per node, or 'uniform'"
            )

    def work(self, kept: LocalChange | None, update: torch.Tensor, *, round: int, steps: int) -> Work:
        """The net change to send at this contact and the slot to keep, from the mean gradient of ``steps`` steps.

        Synchronous: send ``eta steps u`` now. Asynchronous: send ``kept`` (zero on first contact) and keep
        ``eta steps u``, the work done from this round's model.
        """
        change = update * (self.lr * steps)
        sent_steps, staleness = self.age(kept, update.shape, round=round, steps=steps)
        if not self.asynchronous:
            return Work(change, None, sent_steps, staleness)
        fresh = LocalChange(round, steps, change)
        if not sent_steps:
            return Work(torch.zeros_like(update), fresh, 0, 0)
        return Work(kept.change.to(update.dtype), fresh, sent_steps, staleness)

    def age(self, kept: LocalChange | None, shape: torch.Size, *, round: int, steps: int) -> tuple[int, int]:
        """(local steps behind this contact's reply, its staleness in rounds); (0, 0) = nothing to send yet."""
        if not self.asynchronous:
            return steps, 0
        if kept is None or kept.change.shape != shape:
            return 0, 0
        return kept.steps, round - kept.round
