"""Client-side pieces of the baselines that run on the same ClientApp.

* QAdam (``client-opt = "adam"``): the local Adam moments live in ``context.state`` next to the EF residual;
  the update sent (after error feedback and compression) is the local Adam step.
* Flower's own FedAvg / FedAdam (``algorithm = "flower-*"``): the client replies with its trained model as a
  dense ArrayRecord, the message shape Flower's strategies expect.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fl_compams import protocol
from fl_compams.client_opt import LocalAdam, LocalAdamState
from fl_compams.flat import ParamSpec, unflatten

ADAM_RECORD = "qadam"


def local_adam_step(state: RecordDict, gradient: torch.Tensor, adam: LocalAdam) -> torch.Tensor:
    """QAdam's worker step: update this node's Adam moments with the gradient and return the local step."""
    moments = adam.init(gradient)
    if ADAM_RECORD in state:
        rec = state[ADAM_RECORD]
        m, v = rec["m"].numpy(), rec["v"].numpy()
        if m.shape == tuple(gradient.shape):
            step = int(rec["step"].numpy()[0])
            as_tensor = lambda a: torch.from_numpy(a.astype(np.float32)).to(gradient.device)  # noqa: E731
            moments = LocalAdamState(step, as_tensor(m), as_tensor(v))
    delta, moments = adam.step(gradient, moments)
    state[ADAM_RECORD] = ArrayRecord(
        {
            "m": Array(moments.m.detach().cpu().numpy()),
            "v": Array(moments.v.detach().cpu().numpy()),
            "step": Array(np.array([moments.step], dtype=np.int64)),
        }
    )
    return delta


def dense_model_reply(
    msg: Message,
    spec: ParamSpec,
    theta0: torch.Tensor,
    update: torch.Tensor,
    lr_times_steps: float,
    metrics: dict,
) -> Message:
    """Reply with the locally trained model ``theta0 - lr * H * u`` (u = the average local gradient)."""
    trained = unflatten((theta0 - lr_times_steps * update).cpu(), spec)
    content = RecordDict(
        {
            protocol.ARRAYS: ArrayRecord({k: v.contiguous() for k, v in trained.items()}),
            protocol.METRICS: MetricRecord(metrics),
        }
    )
    return Message(content, reply_to=msg)
