"""The opened round (design.md section 7): pure worker and server steps over named state.

One round of COMP-AMS (Li, Karimi & Li, ICLR 2022, Algorithm 2) and of the baselines built from the same parts::

    server  instruction_for(state, client)          -> the statuses of the client's unacknowledged replies
    worker  worker_begin(algorithm, wstate, instr)  -> apply those statuses (commit, or fold back what was lost)
            (local training at theta_t gives the update u; H = 1: one minibatch gradient)
    worker  worker_end(algorithm, wstate, u, ...)   -> payload of C(u + e), e' = u + e - C(u + e), pending reply
    server  server_step(algorithm, state, replies)  -> bound, average, optimizer step; a status for every reply

**Acknowledged error feedback.** A worker subtracts C(p) from its residual when it replies, before the server has
decided anything. The server answers every reply with a :class:`Status` tagged by the reply's round, kept in the
(checkpointed) server state until the worker's next reply confirms it applied it; applying a status twice does
nothing. What the server never applied (invalid, timed out, never received, or a round below
``min-valid-replies``) is *lost* and folded back into the residual in full; what a server policy removed
(clipped to the reply bound, ``update-norm-bound``, or rejected by it) is reported and not folded back, so a
residual stays bounded.
Hence, per worker and with EF on, exactly (up to float rounding)::

    sum(applied on its behalf) + sum(removed by policy) + residual = sum(its updates)

**LAQ** (``Algorithm.lazy``, :mod:`fl_compams.laq`): the same four steps with a skip rule on the worker and the
innovation sum on the server (the section at the end of this module); an upload is committed on ``APPLIED``.

Flower glue (``clients/``, ``strategies/``) only moves these values in and out of records.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

import torch

from fl_compams import downlink as two_way
from fl_compams import laq
from fl_compams.aggregate import WEIGHTINGS, aggregation_weights
from fl_compams.client_opt import LocalAdam, LocalAdamState, MomentumState, NesterovMomentum
from fl_compams.codec import from_bytes, to_bytes
from fl_compams.compressors import Compressor
from fl_compams.error_feedback import ef_step
from fl_compams.laq import LazyConfig, LazyInstruction, LazyWorker
from fl_compams.nodes import label_sort_key
from fl_compams.payloads import Payload
from fl_compams.qsparse import LocalChange, Qsparse
from fl_compams.server import ServerState, apply_round
from fl_compams.server_opt import ServerOptimizer

__all__ = [
    "ALGORITHMS",
    "BOUND_MODES",
    "FLOWER_BASELINES",
    "Algorithm",
    "BeginReport",
    "Instruction",
    "Outcome",
    "Pending",
    "ReplyBound",
    "ServerReply",
    "Status",
    "StepReport",
    "WorkerReply",
    "WorkerState",
    "instruction_for",
    "server_step",
    "worker_begin",
    "worker_end",
]

WORKER_STATE_VERSION = 1


# ----------------------------------------------------------------------------------------------- statuses
class Outcome(enum.IntEnum):
    """What became of a reply; the value travels in instructions (never renumber)."""

    #: Applied with ``factor`` (1, or < 1 when the reply bound clipped it: the rest was removed by policy).
    APPLIED = 1
    #: Removed by a server policy (``update-norm-action = "reject"``): reported, not folded back.
    REJECTED = 2
    #: Never applied (invalid, timed out, never received, round not applied): folded back into the residual.
    LOST = 3


class Status(NamedTuple):
    """The server's answer about the reply a client sent in ``round``."""

    round: int
    outcome: Outcome
    #: Fraction of the reply that reached the model (1 applied, in (0, 1) clipped, 0 rejected or lost).
    factor: float = 1.0

    def removed_fraction(self) -> float:
        """Fraction removed by a server policy (not folded back)."""
        return 0.0 if self.outcome == Outcome.LOST else 1.0 - self.factor


class Instruction(NamedTuple):
    """What a worker needs besides the dense model: the round and the statuses of its earlier replies."""

    round: int
    statuses: tuple[Status, ...] = ()
    #: Two-way compression: the broadcasts since the client's replica version, or a dense resync (None = one-way).
    downlink: two_way.DownInstruction | None = None
    #: LAQ: the round's history term and the reset flag (:mod:`fl_compams.laq`).
    lazy: LazyInstruction | None = None


# ----------------------------------------------------------------------------------------------- state
class Pending(NamedTuple):
    """The last reply of a worker, until the server says what became of it: its round and its wire bytes."""

    round: int
    payload: bytes


class WorkerState(NamedTuple):
    """Everything a worker keeps between rounds (every slot optional; ``None`` = not used by the algorithm)."""

    #: Error-feedback residual e (None when EF is off).
    residual: torch.Tensor | None = None
    #: The reply whose fate the worker does not know yet (with EF on).
    pending: Pending | None = None
    #: Local optimizer moments (QAdam's local Adam).
    local_opt: LocalAdamState | None = None
    #: Rounds this worker has trained.
    rounds: int = 0
    #: Asynchronous Qsparse-local-SGD: local work not sent yet (model units), see :mod:`fl_compams.qsparse`.
    local_change: LocalChange | None = None
    #: Two-way compression: the public model this worker holds (flat) and its version.
    replica: torch.Tensor | None = None
    replica_version: two_way.Version | None = None
    #: Nesterov momentum buffer (dist-EF-SGDM).
    momentum: MomentumState | None = None
    #: LAQ: last applied upload, its error, the clock (:class:`fl_compams.laq.LazyWorker`).
    lazy: LazyWorker | None = None


class BeginReport(NamedTuple):
    """What :func:`worker_begin` did with the statuses (reported in the reply's metrics)."""

    #: l2 norm of what was folded back into the residual (a lost reply).
    folded_norm: float = 0.0
    #: l2 norm of what a server policy removed from the worker's last reply (clip or reject).
    removed_norm: float = 0.0
    #: Highest round whose status the worker has applied (echoed so the server can forget it); -1 = none.
    acked: int = -1
    #: The status that resolved the pending reply, if any.
    resolved: Status | None = None


class WorkerReply(NamedTuple):
    """A worker's reply: the payload's wire bytes and the acknowledgement."""

    round: int
    payload: bytes
    acked: int
    #: LAQ: the worker skipped (``payload`` is empty).
    skip: bool = False


class ServerReply(NamedTuple):
    """A validated reply as the server sees it (the Flower glue checks records and decodes the payload).

    ``payload = None`` is a skip (LAQ); an algorithm that cannot skip counts it as lost.
    """

    label: str
    round: int
    payload: Payload | None
    num_examples: int
    acked: int = -1
    #: Two-way compression: the replica version the client trained at (echoed in its reply).
    replica: two_way.Version | None = None


class StepReport(NamedTuple):
    """What :func:`server_step` did: statuses per client label, whether the model moved, the applied mean."""

    statuses: Mapping[str, Status]
    applied: bool
    #: Weight each applied reply had in the mean (after clipping), by label.
    weights: Mapping[str, float]
    #: Decoded norm of each valid reply, by label.
    norms: Mapping[str, float]
    #: The reply bound in force this round (``inf`` = none).
    bound: float = math.inf
    #: LAQ: labels that skipped this round, and workers expired from the aggregate with the reason.
    skipped: tuple[str, ...] = ()
    expired: Mapping[str, str] = MappingProxyType({})


# ----------------------------------------------------------------------------------------------- parts
#: How replies are bounded (``update-norm-bound``): adapted to recent reply norms, a fixed norm, or not at all.
BOUND_MODES = ("adaptive", "fixed", "off")
#: Recent reply norms, one tuple per round with valid replies, oldest first (``ServerState.recent_norms``).
NormHistory = tuple[tuple[float, ...], ...]


@dataclass(frozen=True)
class ReplyBound:
    """A per-reply l2 norm bound: clip a decoded reply to it or reject the reply (``update-norm-action``).

    ``mode = "adaptive"`` (the default), in the spirit of TensorFlow Federated's robust aggregators
    (``tff.learning.robust_aggregator`` adapts its clipping and zeroing norms to quantiles of recent norms): the
    bound of a round is ``multiplier`` x the larger of two ``quantile``-quantiles of positive norms, that of
    ``history`` (the last ``window`` rounds with valid replies) together with this round's replies, and that of
    this round's replies alone when there are at least two. A quantile is a value of the sample (the
    ``floor((n - 1) q)``-th smallest), so outliers move neither unless they are more than ``1 - quantile`` of
    the values: one outlier among two or more replies is bounded even in round 1; a single reply with no history
    is not (there is nothing to compare it with). The 0.75-quantile, not the median, because honest norms are
    heavy-tailed near convergence (one round of dense gradients on digits spanned 0.002 to 3.1); this
    round's own quantile follows honest norms that rise faster than the window (error feedback's residuals grow
    over the first rounds). Each round adds its norms to the history capped at the round's bound, so an outlier
    counts at most as the bound. ``"fixed"``: ``max_norm``. ``"off"``: no bound (Li et al.'s Algorithm 2).
    """

    mode: str = "adaptive"
    max_norm: float = 0.0
    multiplier: float = 10.0
    window: int = 10
    action: str = "clip"
    quantile: float = 0.75

    def __post_init__(self) -> None:
        if self.mode not in BOUND_MODES:
            raise ValueError(f"reply bound: mode must be one of {list(BOUND_MODES)}, got {self.mode!r}")
        if not (self.max_norm >= 0 and math.isfinite(self.max_norm)):
            raise ValueError(f"reply bound: max_norm must be a finite number >= 0, got {self.max_norm!r}")
        if (self.mode == "fixed") != (self.max_norm > 0):
            raise ValueError(
                f"reply bound: max_norm > 0 goes with mode 'fixed' only, got mode {self.mode!r} and max_norm "
                f"{self.max_norm!r}"
            )
        if not (self.multiplier >= 1 and math.isfinite(self.multiplier)):
            raise ValueError(f"reply bound: multiplier must be a finite number >= 1, got {self.multiplier!r}")
        if self.window < 1:
            raise ValueError(f"reply bound: window must be >= 1, got {self.window!r}")
        if self.action not in ("clip", "reject"):
            raise ValueError(f"reply bound: action must be 'clip' or 'reject', got {self.action!r}")
        if not 0 < self.quantile <= 1:
            raise ValueError(f"reply bound: quantile must be in (0, 1], got {self.quantile!r}")

    def limit(self, history: NormHistory, norms: Sequence[float]) -> float:
        """The bound for a round whose valid replies have these norms (``inf`` = none)."""
        if self.mode == "fixed":
            return self.max_norm
        if self.mode == "off":
            return math.inf
        now = [n for n in norms if n > 0]
        ref = _quantile([*(n for r in history for n in r if n > 0), *now], self.quantile)
        if len(now) >= 2:
            ref = max(ref, _quantile(now, self.quantile))
        return self.multiplier * ref if ref > 0 else math.inf

    def factor(self, norm: float, limit: float) -> float:
        """Fraction of a reply of this norm that is applied: 1, ``limit / norm`` (clip) or 0 (reject)."""
        if norm <= limit:
            return 1.0
        return 0.0 if self.action == "reject" else limit / norm

    def observe(self, history: NormHistory, norms: Sequence[float], limit: float) -> NormHistory:
        """``history`` with this round's norms (capped at ``limit``) added and rounds beyond ``window`` dropped."""
        if self.mode != "adaptive" or not norms:
            return history
        return (*history, tuple(min(n, limit) for n in norms))[-self.window :]


def _quantile(values: list[float], q: float) -> float:
    """The ``floor((n - 1) q)``-th smallest value, a value of the sample (0 for none)."""
    return sorted(values)[math.floor((len(values) - 1) * q)] if values else 0.0


@dataclass(frozen=True)
class Algorithm:
    """A federated optimizer as a composition of parts (design.md section 7).

    ``local_opt`` transforms the local update before compression (QAdam's local Adam, dist-EF-SGDM's Nesterov
    momentum); ``compressor`` with ``error_feedback`` is the uplink; ``bound``, ``weighting`` and
    ``min_valid_replies`` shape the aggregate; ``server_opt`` steps the global model with the mean of the decoded
    replies; ``downlink`` (None = the dense model) compresses the broadcast with server error feedback.
    ``qsparse`` (Qsparse-local-SGD) compresses the net local change in model units, now (synchronous) or at the
    next contact (asynchronous).
    """

    name: str
    compressor: Compressor
    server_opt: ServerOptimizer
    error_feedback: bool = True
    local_opt: LocalAdam | NesterovMomentum | None = None
    weighting: str = "uniform"
    bound: ReplyBound = ReplyBound()
    min_valid_replies: int = 1
    qsparse: Qsparse | None = None
    downlink: two_way.DownlinkPart | None = None
    #: LAQ's trigger and innovation-sum aggregator (None: every worker replies, the server averages).
    lazy: LazyConfig | None = None

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"algorithm: weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.min_valid_replies < 1:
            raise ValueError(f"algorithm: min_valid_replies must be >= 1, got {self.min_valid_replies}")
        if self.lazy is not None:
            _check_lazy(self)


#: Named compositions: the settings each one fixes (config keys and values, or a tuple of the values allowed, the
#: first by default). ``parse_config`` fills them in and refuses an explicit conflicting value; ``compams`` fixes
#: nothing (every part comes from the config).
ALGORITHMS: dict[str, Mapping[str, Any]] = {
    # COMP-AMS (Li et al., Algorithm 2): compressor + EF on the uplink, AMSGrad on the server.
    "compams": {},
    # QAdam (Chen et al.): local Adam steps, compressed with EF; the server applies the mean step (sgd, lr 1).
    "qadam": {"client-opt": "adam", "server-opt": "sgd", "server-lr": 1.0, "server-momentum": 0.0},
    # MVSS (Wangni et al.): unbiased sparsification without error feedback, AMSGrad server as in COMP-AMS's runs.
    "mvss": {"compressor": "mvss", "error-feedback": False},
    # Compressed SGD with server momentum: the compressor + EF uplink of COMP-AMS, SGD momentum 0.9 on the server.
    "sgdm": {"server-opt": "sgd", "server-momentum": 0.9},
    # dist-EF-SGDM (Zheng, Huang & Kwok, NeurIPS 2019): Nesterov momentum on the worker (client-momentum = 0:
    # dist-EF-SGD), per-layer Block-Sign both ways (or the one-scale sign) with worker and server EF, and the
    # server's plain step x <- x - lr mean_i Delta_i. A tuple lists the values allowed (the first one by default).
    "ef-sgdm": {
        "compressor": ("blocksign", "sign"),
        "downlink-compressor": ("blocksign", "sign"),
        "error-feedback": True,
        "client-opt": "nesterov",
        "server-opt": "sgd",
        "server-momentum": 0.0,
        "nesterov": False,
    },
    # LAQ / SLAQ (Sun et al.): b-bit innovations, skip rule, the server's innovation sum with a plain step.
    "laq": {
        "compressor": "laq",
        "error-feedback": False,
        "server-opt": "sgd",
        "server-momentum": 0.0,
        "update-norm-action": "reject",
        "downlink-compressor": "identity",
    },
    # Qsparse-local-SGD (Basu et al.): H local SGD steps, QComp (the compressor) of memory + net local change in
    # model units, the server applies the mean (sgd, lr 1); qsparse-async = true: the asynchronous variant.
    "qsparse": {
        "server-opt": "sgd",
        "server-lr": 1.0,
        "server-momentum": 0.0,
        "error-feedback": True,
        "client-opt": "none",
    },
    # Flower's own FedAvg / FedAdam on dense models (run by Flower's strategies, not by server_step).
    "flower-fedavg": {"compressor": "identity", "client-opt": "none"},
    "flower-fedadam": {"compressor": "identity", "client-opt": "none"},
}
#: Compositions that Flower's own strategies run (dense models, no server_step).
FLOWER_BASELINES = ("flower-fedavg", "flower-fedadam")


# ----------------------------------------------------------------------------------------------- worker
def worker_begin(
    algorithm: Algorithm,
    state: WorkerState,
    instruction: Instruction,
    *,
    dim: int,
    device: torch.device | str = "cpu",
) -> tuple[WorkerState, BeginReport]:
    """Apply the statuses of the worker's earlier replies.

    The pending reply (if any) is resolved by the status of its round: applied or removed by policy -> commit
    (the residual already lacks C(p)); lost -> fold C(p) back, ``e <- e + C(p)``. A pending reply with no status
    in an instruction of a later round is unknown to the server (it never arrived, or the server restarted from
    an older state) and is folded back too. Statuses of other rounds are ignored, so applying one twice is
    harmless.
    """
    if algorithm.lazy is not None:
        return _lazy_begin(algorithm, state, instruction, dim=dim, device=device)
    acked = max((s.round for s in instruction.statuses), default=-1)
    pending = state.pending
    if pending is None or state.residual is None:
        return state._replace(pending=None), BeginReport(acked=acked)
    status = next((s for s in instruction.statuses if s.round == pending.round), None)
    if status is None and instruction.round <= pending.round:
        raise ValueError(
            f"instruction for round {instruction.round} arrived while the reply of round {pending.round} is "
            "pending and no status for it was sent"
        )
    if status is not None and status.outcome == Outcome.APPLIED and status.factor == 1.0:
        return state._replace(pending=None), BeginReport(acked=acked, resolved=status)  # the common case
    sent = from_bytes(pending.payload, dim, device=state.residual.device).decode().to(state.residual.dtype)
    if status is None or status.outcome == Outcome.LOST:
        residual = state.residual + sent
        report = BeginReport(folded_norm=float(sent.norm()), acked=acked, resolved=status)
    else:
        residual = state.residual
        report = BeginReport(
            removed_norm=status.removed_fraction() * float(sent.norm()), acked=acked, resolved=status
        )
    return state._replace(residual=residual, pending=None), report


def worker_end(
    algorithm: Algorithm,
    state: WorkerState,
    update: torch.Tensor,
    *,
    round: int,
    rng: torch.Generator | None = None,
    acked: int = -1,
    steps: int | None = None,
) -> tuple[WorkerReply, WorkerState]:
    """Compress the local update with error feedback and remember the reply until its status arrives.

    ``x = local_opt(u)`` (u itself without a local optimizer); ``payload = C(x + e)``;
    ``e' = x + e - C(x + e)`` (Li et al., Algorithm 2, lines 5-6); with EF off, ``payload = C(x)`` and no memory.
    Qsparse: x is the net local change ``eta steps u`` (``steps`` local SGD steps behind u; default H), or,
    asynchronously, the one kept from the last contact (:meth:`fl_compams.qsparse.Qsparse.work`).
    """
    if algorithm.lazy is not None:
        return _lazy_end(algorithm, state, update, round=round, acked=acked)
    x = update
    kept = state.local_change
    if algorithm.qsparse is not None:
        work = algorithm.qsparse.work(
            kept, update, round=round, steps=algorithm.qsparse.steps if steps is None else steps
        )
        x, kept = work.send, work.keep
    local, momentum = state.local_opt, state.momentum
    if isinstance(algorithm.local_opt, NesterovMomentum):  # its buffer lives in its own slot
        if momentum is None or momentum.m.shape != x.shape:
            momentum = algorithm.local_opt.init(x)
        x, momentum = algorithm.local_opt.step(x, momentum)
    elif algorithm.local_opt is not None:
        if local is None or local.m.shape != update.shape:
            local = algorithm.local_opt.init(update)
        x, local = algorithm.local_opt.step(update, local)
    residual = state.residual
    if algorithm.error_feedback and (residual is None or residual.shape != x.shape):
        residual = torch.zeros_like(x)
    payload, residual = ef_step(algorithm.compressor, x, residual if algorithm.error_feedback else None, rng)
    data = to_bytes(payload)
    pending = Pending(round, data) if residual is not None else None
    new_state = state._replace(
        residual=residual,
        pending=pending,
        local_opt=local,
        momentum=momentum,
        rounds=state.rounds + 1,
        local_change=kept,
    )
    return WorkerReply(round, data, acked), new_state


# ----------------------------------------------------------------------------------------------- server
def instruction_for(
    state: ServerState, label: str, round: int, algorithm: Algorithm | None = None
) -> Instruction:
    """The statuses a client has not acknowledged yet, for the instruction of ``round``.

    With two-way compression also the broadcasts since its replica version, or a dense resync
    (:func:`fl_compams.downlink.instruction_for`); with LAQ its part of the skip rule.
    """
    down = two_way.instruction_for(state.downlink, label) if state.downlink is not None else None
    instruction = Instruction(round, tuple(state.unacked.get(label, ())), down)
    if algorithm is not None and algorithm.lazy is not None:
        instruction = instruction._replace(lazy=_lazy_instruction(algorithm, state, label))
    return instruction


def server_step(
    algorithm: Algorithm,
    state: ServerState,
    round: int,
    replies: Sequence[ServerReply],
    lost: Sequence[str] = (),
) -> tuple[ServerState, StepReport]:
    """One server round: acknowledge, bound, average, step, and answer every reply with a status.

    ``replies`` are the valid replies of ``round``; ``lost`` the labels of clients that were sent an instruction
    but gave no valid reply. ``g_bar = sum_i w_i f_i decode(p_i)`` over the replies that survive the bound
    (``f_i`` = clip factor, ``w_i`` = uniform or by examples; an adaptive bound reads and extends
    ``state.recent_norms``); ``theta_{t+1} = theta_t + delta(g_bar)`` (AMSGrad by default). Below
    ``min_valid_replies`` surviving replies the model and the optimizer state do not change and the replies
    count as lost (their workers fold them back).
    """
    replies = sorted(replies, key=lambda r: label_sort_key(r.label))  # summation order: labels, not arrival
    if algorithm.lazy is not None:
        return _lazy_step(algorithm, state, round, replies, lost)
    skips = [r.label for r in replies if r.payload is None]  # cannot skip: counts as lost (validate drops it)
    replies = [r for r in replies if r.payload is not None]
    lost = [*lost, *skips]
    theta_before = state.theta
    unacked = acknowledge(state, replies)
    norms = {r.label: _norm(r.payload) for r in replies}
    bound = algorithm.bound.limit(state.recent_norms, tuple(norms.values()))
    factors = {r.label: algorithm.bound.factor(norms[r.label], bound) for r in replies}
    statuses: dict[str, Status] = {}
    survivors = [r for r in replies if factors[r.label] > 0]
    for r in replies:
        if factors[r.label] == 0:
            statuses[r.label] = Status(round, Outcome.REJECTED, 0.0)
    applied = len(survivors) >= algorithm.min_valid_replies
    weights: dict[str, float] = {}
    if applied:
        base = aggregation_weights(algorithm.weighting, [r.num_examples for r in survivors])
        weights = {r.label: w * factors[r.label] for r, w in zip(survivors, base, strict=True)}
        state, _ = apply_round(
            state, [r.payload for r in survivors], [weights[r.label] for r in survivors], algorithm.server_opt
        )
        for r in survivors:
            statuses[r.label] = Status(round, Outcome.APPLIED, factors[r.label])
    else:
        for r in survivors:
            statuses[r.label] = Status(round, Outcome.LOST, 0.0)
    for label in lost:
        statuses.setdefault(label, Status(round, Outcome.LOST, 0.0))
    for label, status in statuses.items():
        unacked[label] = (*unacked.get(label, ()), status)
    recent = algorithm.bound.observe(state.recent_norms, tuple(norms.values()), bound)
    state = state._replace(round=round, unacked=unacked, recent_norms=recent)
    if algorithm.downlink is not None and state.downlink is not None:  # two-way: echoes, then the broadcast
        down = two_way.observe(
            state.downlink, ((r.label, r.replica) for r in replies if r.replica is not None)
        )
        if applied:
            down = two_way.broadcast(algorithm.downlink, down, theta_before, state.theta, round)
        state = state._replace(downlink=down)
    return state, StepReport(statuses, applied, weights, norms, bound)


def acknowledge(state: ServerState, replies: Sequence[ServerReply]) -> dict[str, tuple[Status, ...]]:
    """``state.unacked`` without the statuses each reply confirms it applied (``acked``)."""
    unacked = {label: tuple(s) for label, s in state.unacked.items()}
    for r in replies:
        kept = tuple(s for s in unacked.get(r.label, ()) if s.round > r.acked)
        if kept:
            unacked[r.label] = kept
        else:
            unacked.pop(r.label, None)
    return unacked


def _norm(payload: Payload) -> float:
    """The decoded l2 norm, in float64 when float32 overflows (finite values near 3.4e38 have a finite norm)."""
    norm = payload.norm()
    if math.isfinite(norm):
        return norm
    return float(torch.linalg.vector_norm(payload.decode().double()))


# ----------------------------------------------------------------------------------------------- LAQ
# The glue between the round's steps and fl_compams.laq (Sun et al., NeurIPS 2019): the worker commits an
# upload when its status says APPLIED, the server keeps the innovation sum and takes a plain step.
def _check_lazy(algorithm: Algorithm) -> None:
    if not isinstance(algorithm.compressor, laq.LAQQuantizer):
        raise ValueError(f"algorithm: LAQ needs the laq quantizer, got {type(algorithm.compressor).__name__}")
    if algorithm.error_feedback or algorithm.local_opt is not None:
        raise ValueError(
            "algorithm: LAQ sends quantized gradient innovations, without error feedback or local Adam"
        )


def _lazy_begin(
    algorithm: Algorithm, state: WorkerState, instruction: Instruction, *, dim: int, device
) -> tuple[WorkerState, BeginReport]:
    """Commit the pending upload if the server applied it (else count it as a skip), then take the LAQ part."""
    cfg = algorithm.lazy
    acked = max((s.round for s in instruction.statuses), default=-1)
    lazy = state.lazy if state.lazy is not None else laq.fresh_worker(cfg)
    pending, report = state.pending, BeginReport(acked=acked)
    if pending is not None:
        status = next((s for s in instruction.statuses if s.round == pending.round), None)
        if status is None and instruction.round <= pending.round:
            raise ValueError(
                f"instruction for round {instruction.round} arrived while the reply of round {pending.round} "
                "is pending and no status for it was sent"
            )
        sent = from_bytes(pending.payload, dim, device=device).decode()
        if status is not None and status.outcome == Outcome.APPLIED and status.factor == 1.0:
            lazy = laq.worker_resolve(lazy, sent)
        else:  # lost, rejected or unknown to the server: Q stays the last applied upload
            lazy = laq.worker_resolve(lazy, None)
            report = report._replace(folded_norm=float(sent.norm()))
        report = report._replace(resolved=status)
    lazy = laq.worker_instruct(cfg, lazy, instruction.lazy or laq.LazyInstruction())
    return state._replace(lazy=lazy, pending=None), report


def _lazy_end(
    algorithm: Algorithm, state: WorkerState, update: torch.Tensor, *, round: int, acked: int
) -> tuple[WorkerReply, WorkerState]:
    """The skip rule on the quantized innovation of the gradient ``update``: a payload, or a skip."""
    lazy = state.lazy if state.lazy is not None else laq.fresh_worker(algorithm.lazy)
    payload, lazy = laq.worker_step(algorithm.lazy, algorithm.compressor, lazy, update)
    state = state._replace(lazy=lazy, pending=None, rounds=state.rounds + 1)
    if payload is None:
        return WorkerReply(round, b"", acked, skip=True), state
    data = to_bytes(payload)
    return WorkerReply(round, data, acked), state._replace(pending=Pending(round, data))


def _lazy_instruction(algorithm: Algorithm, state: ServerState, label: str) -> laq.LazyInstruction:
    lr = getattr(algorithm.server_opt, "lr", 1.0)
    return laq.server_instruction(algorithm.lazy, state.lazy, label, lr)


def _lazy_step(
    algorithm: Algorithm,
    state: ServerState,
    round: int,
    replies: Sequence[ServerReply],
    lost: Sequence[str],
) -> tuple[ServerState, StepReport]:
    """LAQ's server: ``nabla = sum_m Q_m`` with this round's innovations, ``theta -= alpha nabla``; expiry.

    The model steps when at least ``min_valid_replies`` workers replied (uploads and skips); otherwise the
    uploads count as lost. The reply bound applies to what an upload would make the worker's stored gradient,
    ``||Q_m + dQ_m||``, against the stored gradients of every worker in the sum (innovations shrink as workers
    converge and a forced upload is large, so a bound on innovations would reject honest uploads; gradients
    do not jump tenfold). An upload above it is rejected whatever ``update-norm-action`` says (a clipped
    innovation would leave the worker's and the server's copies of Q apart): the worker keeps its Q.
    """
    cfg = algorithm.lazy
    unacked = acknowledge(state, replies)
    uploads = [r for r in replies if r.payload is not None]
    skipped = tuple(r.label for r in replies if r.payload is None)
    lazy = state.lazy if state.lazy is not None else laq.server_init(state.theta)
    statuses: dict[str, Status] = {}
    applied = len(replies) >= algorithm.min_valid_replies
    dqs = {r.label: r.payload.decode().to(device=state.theta.device) for r in uploads}
    norms = {label: laq.stored_norm(lazy, label, dq) for label, dq in dqs.items()}
    others = tuple(float(torch.linalg.vector_norm(q)) for label, q in lazy.q.items() if label not in norms)
    bound = algorithm.bound.limit(state.recent_norms, (*norms.values(), *others))
    rejected = {label for label, n in norms.items() if algorithm.bound.factor(n, bound) < 1.0}
    if applied:
        kept = {label: dq for label, dq in dqs.items() if label not in rejected}
        lazy = laq.server_receive(lazy, round, kept, [r.label for r in replies])
        delta, opt_state = algorithm.server_opt.update(lazy.nabla.to(state.theta.dtype), state.opt_state)
        state = state._replace(theta=state.theta + delta, opt_state=opt_state)
        lazy = laq.server_record_change(cfg, lazy, delta)
    for r in uploads:
        if r.label in rejected:
            statuses[r.label] = Status(round, Outcome.REJECTED, 0.0)
        else:
            statuses[r.label] = (
                Status(round, Outcome.APPLIED, 1.0) if applied else Status(round, Outcome.LOST, 0.0)
            )
    for label in lost:
        statuses.setdefault(label, Status(round, Outcome.LOST, 0.0))
    for label, status in statuses.items():
        unacked[label] = (*unacked.get(label, ()), status)
    lazy, expired = laq.server_expire(cfg, lazy, round)
    recent = algorithm.bound.observe(state.recent_norms, tuple(norms.values()), bound)
    state = state._replace(round=round, unacked=unacked, lazy=lazy, recent_norms=recent)
    weights = {r.label: 1.0 for r in uploads if r.label not in rejected} if applied else {}
    return state, StepReport(statuses, applied, weights, norms, bound, skipped, expired)
