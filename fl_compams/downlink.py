"""Two-way compression (design.md section 7): a compressed broadcast with server EF, a log, client replicas.

The server's compressed broadcast with server error feedback, the log of recent broadcasts, and the clients'
replicas of the public model.

The server's optimizer steps theta as in one-way runs. What clients hold is the *public* model; each round that
moves theta the server broadcasts, in model units (Zheng, Huang & Kwok, NeurIPS 2019, dist-EF-SGD(M), server
side; Tang et al., DoubleSqueeze, ICML 2019)::

    p_t         = (theta_{t+1} - theta_t) + e_s
    Delta_t     = C_s(p_t)                     (decoded from the very bytes the clients get)
    e_s        <- p_t - Delta_t
    public_{t+1} = public_t + Delta_t

so ``public + e_s = theta`` at every round (up to float rounding), ``sum_t Delta_t + e_s = sum_t (theta_{t+1} -
theta_t)``, and ``e_s = 0`` whenever C_s is lossless. With the paper's gradient-unit residual ``e~`` and a
learning rate eta_t, ``e_s = -eta_{t-1} e~``: the paper's rescale ``eta_{t-1} / eta_t`` is what keeping the
residual in model units does by itself (and the rate is constant in this code base).

**Versions and the log.** A public model is named by a :class:`Version`: the round that produced it and 16 hex
digits of the SHA-256 of its float32 bytes. The server keeps the last ``log_size`` broadcasts (source version,
target version, wire bytes) and, per client label, the version of the replica the client last echoed. A client's
instruction (:func:`instruction_for`) is the chain of broadcasts from that version to the current one, or, when
the version is unknown, older than the log or never echoed, or when the chain would outweigh the model itself,
the dense public model (a *resync*). The client
(:func:`receive`) finds its own version in the chain, applies the rest in order, and checks the digest of the
result against the target; any mismatch raises :class:`ReplicaMismatch` (the client then asks for a resync and
does not train on a model it cannot vouch for).

**Compact replicas** (``state-dtype`` float16 / bfloat16, :mod:`fl_compams.precision`): the public model is kept
representable in that dtype, ``public_{t+1} = round(public_t + Delta_t)`` on the server and on every client alike
(the same float32 sum, rounded the same way), and the rounding joins e_s (``e_s <- p_t - (public_{t+1} -
public_t)``), so ``public + e_s = theta`` still holds and a client stores its replica in 2 bytes per parameter
exactly. float32 (the default) rounds nothing and is bit for bit the scheme above.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

import torch

from fl_compams.codec import from_bytes, to_bytes
from fl_compams.compressors import Compressor
from fl_compams.precision import round_to

__all__ = [
    "Broadcast",
    "DownInstruction",
    "Downlink",
    "DownlinkPart",
    "ReplicaMismatch",
    "Version",
    "broadcast",
    "forget",
    "init_downlink",
    "instruction_for",
    "model_digest",
    "observe",
    "parse_version",
    "receive",
]

_DIGEST_HEX = 16
_VERSION = re.compile(r"^(\d{1,12}):([0-9a-f]{16})$")


class Version(NamedTuple):
    """Name of a public model: the round that produced it (0 = the initial model) and a digest of its bytes."""

    round: int
    digest: str

    def __str__(self) -> str:
        return f"{self.round}:{self.digest}"


def model_digest(vector: torch.Tensor) -> str:
    """16 hex digits of the SHA-256 of the vector's float32 bytes (device independent)."""
    data = vector.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:_DIGEST_HEX]


def parse_version(text: object) -> Version:
    """A version from its wire form ``"<round>:<16 hex digits>"``; raise ValueError naming what is wrong."""
    match = _VERSION.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        shown = repr(text)[:60]
        raise ValueError(f"a replica version must be '<round>:<16 lower-case hex digits>', got {shown}")
    return Version(int(match.group(1)), match.group(2))


class Broadcast(NamedTuple):
    """One compressed broadcast: applied to the public model of ``source`` it gives that of ``target``."""

    source: Version
    target: Version
    payload: bytes


class Downlink(NamedTuple):
    """The server's downlink state (``ServerState.downlink``; checkpointed with it).

    ``public``: the model clients hold; ``residual``: the server's error-feedback residual e_s (model units);
    ``version``: the public model's version; ``log``: the last broadcasts, oldest first; ``replicas``: per client
    label, the replica version its last valid reply echoed.
    """

    public: torch.Tensor
    residual: torch.Tensor
    version: Version
    log: tuple[Broadcast, ...] = ()
    replicas: Mapping[str, Version] = MappingProxyType({})


@dataclass(frozen=True)
class DownlinkPart:
    """The algorithm part (``Algorithm.downlink``): the server compressor C_s, the log length K, a seed, a dtype.

    ``seed`` seeds the generator of a randomised C_s (per round); deterministic compressors ignore it. ``dtype``
    (``state-dtype``): the public model is kept representable in it (see the module docstring).
    """

    compressor: Compressor
    log_size: int = 8
    seed: int = 0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.log_size < 1:
            raise ValueError(f"downlink: log_size must be >= 1, got {self.log_size!r}")


class DownInstruction(NamedTuple):
    """What a client needs to hold the public model of ``target``: the broadcasts since its version, or dense."""

    target: Version
    steps: tuple[Broadcast, ...] = ()
    dense: bool = False


class ReplicaMismatch(ValueError):
    """A client cannot reach the instruction's target from its replica (it needs a dense resync)."""


def init_downlink(theta: torch.Tensor, dtype: str = "float32") -> Downlink:
    """Before round 1: the public model is theta, e_s = 0, no broadcast yet, no client holds a replica.

    With a compact ``dtype`` the public model is theta rounded to it and e_s the rounding (theta - public).
    """
    public = round_to(theta.detach(), dtype).clone()  # float32: theta itself, so e_s = 0
    return Downlink(public, theta.detach() - public, Version(0, model_digest(public)))


def broadcast(
    part: DownlinkPart, state: Downlink, theta_before: torch.Tensor, theta_after: torch.Tensor, round: int
) -> Downlink:
    """One broadcast: compress the model change plus e_s, move the public model, log the wire bytes."""
    p = (theta_after - theta_before) + state.residual
    rng = None
    if part.compressor.randomized:
        rng = torch.Generator(device=p.device).manual_seed((part.seed * 1_000_003 + round) % (1 << 63))
    data = to_bytes(part.compressor.encode(p, rng))
    sent = from_bytes(data, p.numel(), device=p.device).decode().to(p.dtype)  # exactly what the clients apply
    public = state.public + sent
    residual = p - sent
    if part.dtype != "float32":  # keep the public model representable; the rounding joins e_s
        public = round_to(public, part.dtype)
        residual = p - (public - state.public)
    version = Version(round, model_digest(public))
    log = (*state.log, Broadcast(state.version, version, data))[-part.log_size :]
    return state._replace(public=public, residual=residual, version=version, log=log)


def instruction_for(state: Downlink, label: str) -> DownInstruction:
    """The broadcasts since the version ``label`` last echoed, or a dense resync.

    Dense when that version is not in the log (unknown, never echoed, older than the log), and also when the
    broadcasts would take at least as many bytes as the float32 model itself.
    """
    have = state.replicas.get(label)
    if have == state.version:
        return DownInstruction(state.version)
    for i, entry in enumerate(state.log):
        if entry.source == have:
            steps = state.log[i:]
            if sum(len(s.payload) for s in steps) < 4 * state.public.numel():
                return DownInstruction(state.version, steps)
            break
    return DownInstruction(state.version, dense=True)


def observe(state: Downlink, echoes: Iterable[tuple[str, Version]]) -> Downlink:
    """Record the replica versions clients echoed in their valid replies."""
    replicas = dict(state.replicas)
    replicas.update(echoes)
    return state._replace(replicas=MappingProxyType(replicas))


def forget(state: Downlink, labels: Iterable[str]) -> Downlink:
    """Forget the replicas of clients that asked for a resync: they get the dense model next time."""
    replicas = {k: v for k, v in state.replicas.items() if k not in set(labels)}
    return state._replace(replicas=MappingProxyType(replicas))


def receive(
    replica: torch.Tensor | None,
    version: Version | None,
    instruction: DownInstruction,
    dense: torch.Tensor | None = None,
    *,
    dim: int,
    block_sizes: tuple[int, ...] | None = None,
    dtype: str = "float32",
) -> tuple[torch.Tensor, Version]:
    """Bring a client's replica to ``instruction.target``; return (replica, version).

    ``dtype`` is the run's ``state-dtype``: each broadcast's sum is rounded to it, as the server rounds the
    public model (:func:`broadcast`); a dense model is rounded too (it is representable already: no change).

    Dense: the model sent (``dense``). Else the broadcasts after the replica's own version in the chain, in
    order (a replica already ahead of the server's idea of it, after a lost reply, skips what it has). The
    result must have the target's digest. Raises :class:`ReplicaMismatch` when the replica is missing, not in the
    chain, or ends at another digest; raises ``PayloadError`` for a malformed broadcast.
    """
    target = instruction.target
    if instruction.dense:
        if dense is None or dense.shape != (dim,):
            raise ReplicaMismatch(f"a dense resync to {target} came without a model of {dim} parameters")
        replica = round_to(dense.detach().to(torch.float32).clone(), dtype)
    else:
        if replica is None or version is None or replica.shape != (dim,):
            raise ReplicaMismatch(f"no replica to apply the broadcasts to {target} to")
        chain = [step.source for step in instruction.steps] + [target]
        if version not in chain:
            raise ReplicaMismatch(
                f"replica version {version} is not among the instruction's ({', '.join(map(str, chain))})"
            )
        for step in instruction.steps[chain.index(version) :]:
            delta = from_bytes(step.payload, dim, block_sizes=block_sizes, device=replica.device).decode()
            replica = round_to(replica + delta.to(replica.dtype), dtype)
    if model_digest(replica) != target.digest:
        raise ReplicaMismatch(f"the replica's digest {model_digest(replica)} is not the target's {target}")
    return replica, target
