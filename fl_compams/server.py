"""The server's whole state as one value, and one pure round of COMP-AMS aggregation.

``ServerState`` holds everything that changes across rounds (step count, the flat model theta, the
optimizer's moments, the clients' unacknowledged statuses and the recent reply norms); ``server_round`` is
Algorithm 2's server part: average the decoded payloads, take one optimizer step. Flower glue keeps nothing
else that affects the model, so a checkpoint of this value is a checkpoint of the run's optimisation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

import torch

from fl_compams.aggregate import weighted_mean
from fl_compams.downlink import Downlink, init_downlink
from fl_compams.payloads import Payload
from fl_compams.server_opt import ServerOptimizer

__all__ = ["ServerState", "apply_round", "init_server_state"]


class ServerState(NamedTuple):
    """Round counter, flat model, optimizer state, the statuses clients have not acknowledged yet, recent norms.

    ``unacked`` maps a client label to the statuses (:class:`fl_compams.algorithm.Status`) of its replies that
    the client has not confirmed; they are resent with its next instruction (design.md section 7). Treat it as
    immutable: steps build a new mapping. ``recent_norms`` holds the reply norms the adaptive reply bound
    (:class:`fl_compams.algorithm.ReplyBound`) is computed from, one tuple per recent round, oldest first.
    """

    round: int
    theta: torch.Tensor
    opt_state: Any
    unacked: Mapping[str, tuple] = MappingProxyType({})
    recent_norms: tuple[tuple[float, ...], ...] = ()
    #: Two-way compression: public model, server residual, broadcast log, client replica versions (None = one-way).
    downlink: Downlink | None = None
    #: LAQ's aggregate, per-client last uploads and contacts, recent model changes (:class:`fl_compams.laq.LazyServer`).
    lazy: Any = None
    #: The model's non-trainable buffers, flat float32 in ParamSpec buffer order (None = the model has none).
    buffers: torch.Tensor | None = None


def init_server_state(
    theta: torch.Tensor,
    optimizer: ServerOptimizer,
    *,
    two_way: bool = False,
    buffers: torch.Tensor | None = None,
    public_dtype: str = "float32",
) -> ServerState:
    """State before round 1: theta_1 and zero moments (with ``two_way``, the public model theta_1 and e_s = 0).

    ``buffers``: the initial model's buffers (:mod:`fl_compams.buffers`); the optimizer never sees them.
    ``public_dtype`` (``state-dtype``): the public model is theta_1 rounded to it (:func:`init_downlink`).
    """
    return ServerState(
        0,
        theta.clone(),
        optimizer.init(theta),
        downlink=init_downlink(theta, public_dtype) if two_way else None,
        buffers=None if buffers is None else buffers.clone(),
    )


def apply_round(
    state: ServerState,
    payloads: Sequence[Payload],
    weights: Sequence[float],
    optimizer: ServerOptimizer,
) -> tuple[ServerState, torch.Tensor]:
    """``g_bar = sum_i w_i decode(p_i)``; ``theta_{t+1} = theta_t + delta(g_bar)``. Returns (state, g_bar)."""
    g_bar = weighted_mean(
        payloads, weights, state.theta.numel(), device=state.theta.device, dtype=state.theta.dtype
    )
    delta, opt_state = optimizer.update(g_bar, state.opt_state)
    return state._replace(round=state.round + 1, theta=state.theta + delta, opt_state=opt_state), g_bar
