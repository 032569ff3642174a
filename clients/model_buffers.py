"""A client's side of model buffers (BatchNorm statistics), :mod:`fl_compams.buffers`.

``buffers = "average"``: after local training the model's buffers go into the reply, dense, as the ``buffers``
ArrayRecord: one float32 vector of the statistics and one int64 vector of the counters, in ParamSpec order
(:func:`fl_compams.buffers.pack`; Flower serialises them as ``.npy`` bytes without pickle).
``buffers = "local"`` (FedBN): the client trains with its own buffers, kept in ``context.state`` under
:data:`RECORD` (mirrored to disk with the rest of the state, reported as ``state-bytes-buffers``), and sends
none; before its first round it starts from the broadcast (the server's initial) buffers.
"""

from __future__ import annotations

import torch
from flwr.app import Array, ArrayRecord, Context

from fl_compams import buffers
from fl_compams.algorithm import FLOWER_BASELINES
from fl_compams.config import ExperimentConfig
from fl_compams.errors import PayloadError
from fl_compams.flat import ParamSpec

__all__ = ["RECORD", "after_training", "check_supported", "use_local"]

#: The ``context.state`` record of a client's own buffers (``buffers = "local"``).
RECORD = "buffers"


def check_supported(cfg: ExperimentConfig, spec: ParamSpec) -> None:
    """Raise ValueError if this run cannot carry the model's buffers (the server refuses it before round 1 too)."""
    if not spec.buffer_dim:
        return
    buffers.check_spec(spec)
    why = buffers.unsupported(cfg.algorithm, cfg.server.downlink_compressor, FLOWER_BASELINES)
    if why is not None:
        raise ValueError(f"the model has buffers (BatchNorm statistics), but {why}")


def use_local(context: Context, model: torch.nn.Module, spec: ParamSpec, cfg: ExperimentConfig) -> None:
    """``buffers = "local"``: load this client's own buffers into ``model`` (none stored yet: keep the broadcast)."""
    if not spec.buffer_dim or cfg.data.buffers != "local" or RECORD not in context.state:
        return
    own = {name: torch.from_numpy(arr.numpy().copy()) for name, arr in context.state[RECORD].items()}
    try:
        buffers.check(spec, own, "this client's stored buffers")
    except PayloadError as err:  # a state file of another model: never train on it
        raise ValueError(str(err)) from None
    model.load_state_dict(own, strict=False)


def after_training(
    context: Context, model: torch.nn.Module, spec: ParamSpec, cfg: ExperimentConfig
) -> tuple[ArrayRecord | None, int]:
    """The buffers after local training: ``(reply record, 0)`` to send, or ``(None, state bytes)`` kept local."""
    if not spec.buffer_dim:
        return None, 0
    state = model.state_dict()
    tensors = {name: state[name].detach().cpu().contiguous() for name in spec.buffer_names}
    if cfg.data.buffers == "local":
        context.state[RECORD] = ArrayRecord({name: Array(t.numpy()) for name, t in tensors.items()})
        return None, buffers.nbytes(tensors)
    packed = buffers.pack(spec, tensors)
    return ArrayRecord({dtype: Array(t.numpy()) for dtype, t in packed.items()}), 0
