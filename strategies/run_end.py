"""The end of a run: one query to every connected node, which removes the run's client state files (or keeps them).

Sent by the ServerApp only at the true end of a run, after the last round's results, checkpoint and model are
written (a run that fails or is stopped sends nothing, so its nodes keep their state for ``resume``). A node with
``keep-state = true`` in its node config keeps its files (a run that will be resumed with more rounds later); a
node that does not answer (disconnected, restarting) keeps them too. The node's side: ``clients.state_io.end_of_run``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fl_compams import protocol

log = logging.getLogger("flwr").getChild(__name__)

__all__ = ["end_run"]


def _count(content: RecordDict) -> tuple[int, int] | None:
    """``(removed, kept)`` of a node's reply, or ``None`` when the reply is malformed."""
    info = content.get(protocol.END_INFO) if hasattr(content, "get") else None
    if not isinstance(info, ConfigRecord):
        return None
    removed, kept = info.get(protocol.REMOVED), info.get(protocol.KEPT)
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 2 for v in (removed, kept)):
        return None
    return removed, kept


def end_run(grid: Grid, labels: Mapping[int, str], timeout: float) -> dict[str, str]:
    """Tell every connected node that the run has ended; per node label, what it did (also logged, one line)."""
    node_ids = list(grid.get_node_ids())
    messages = [
        Message(content=RecordDict(), message_type=protocol.END_MESSAGE_TYPE, dst_node_id=n) for n in node_ids
    ]
    outcome = {labels.get(n, f"node-{n}"): "no answer (keeps its state files)" for n in node_ids}
    try:
        replies = grid.send_and_receive(messages, timeout=timeout) if messages else []
    except Exception as err:  # the results are written: a failed goodbye must not fail the run
        log.warning("run ended, but the end-of-run query failed (%s): nodes keep their state files", err)
        return outcome
    for reply in replies:
        label = labels.get(reply.metadata.src_node_id, f"node-{reply.metadata.src_node_id}")
        if reply.has_error():
            outcome[label] = f"failed: {reply.error.reason}"
        elif (counts := _count(reply.content)) is None:
            outcome[label] = "malformed answer"
        else:
            outcome[label] = f"removed {counts[0]}, kept {counts[1]} state file(s)"
    log.info(
        "run ended: %s", "; ".join(f"{k}: {v}" for k, v in sorted(outcome.items())) or "no nodes connected"
    )
    return outcome
