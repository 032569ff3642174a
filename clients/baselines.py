"""Flower's own FedAvg / FedAdam (``algorithm = "flower-*"``) on the same ClientApp.

The client replies with its trained model as a dense ArrayRecord, the message shape Flower's strategies expect.
(QAdam's local Adam is a part of :mod:`fl_compams.algorithm`, its moments a slot of the worker state.)
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fl_compams import protocol
from fl_compams.flat import ParamSpec, unflatten


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
