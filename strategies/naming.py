"""Stable node names for a whole run: learnt by a hello query when a node is first seen, kept across restarts.

Flower gives a SuperNode a new node id every time it starts. Everything keyed by client (result rows, the
statuses of its unacknowledged replies, the order replies are summed in) uses the node's *label* instead: its
``partition-id``, else its ``node-name`` (:func:`fl_compams.nodes.node_label`). The server asks every node it has
not named yet for its claim, at start and again before any round in which a new node id has appeared, so a
restarted node continues under its label, and gets the statuses of the replies it sent before the restart.

With SuperNode authentication (docs/deployment.md section 16) a node registered with ``flwr supernode register
--name NAME`` is named ``node-NAME`` from its registration, which the SuperLink ties to the node's key; its own
claim is not asked for. Without it a claim is only a label: among connected nodes the first claim (in node id
order) wins and a later duplicate is named ``node-<node id>``, logged; a claim on a label whose node is no longer
connected is that node's return.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fl_compams import protocol
from fl_compams.errors import PayloadError
from fl_compams.nodes import node_label
from strategies import validate

log = logging.getLogger("flwr").getChild(__name__)

__all__ = ["NodeNames"]


class NodeNames:
    """Node id -> label for every node the run has met (old ids of restarted nodes keep their label)."""

    def __init__(self) -> None:
        self.labels: dict[int, str] = {}

    def label(self, node_id: int) -> str:
        """The node's label, or ``node-<node id>`` for a node not named (yet)."""
        return self.labels.get(node_id, f"node-{node_id}")

    def learn(self, grid: Grid, node_ids: Iterable[int], timeout: float) -> None:
        """Name the nodes among ``node_ids`` that have no label yet: by registration, else by their claim."""
        new = sorted(n for n in node_ids if n not in self.labels)
        if not new:
            return
        registered = _registered_names(grid, new)
        messages = [
            Message(content=RecordDict(), message_type=protocol.HELLO_MESSAGE_TYPE, dst_node_id=n)
            for n in new
            if n not in registered
        ]
        claims: dict[int, tuple[int, str]] = {}
        for reply in grid.send_and_receive(messages, timeout=timeout) if messages else ():
            node = reply.metadata.src_node_id
            if node not in new:
                log.warning("hello: ignored a reply from node %d, which was not asked", node)
            elif reply.has_error():
                log.warning(
                    "hello: node %d did not answer (%s); it is named by its node id", node, reply.error.reason
                )
            else:
                try:
                    claims[node] = validate.node_claim(reply.content)
                except PayloadError as err:
                    log.warning("hello: node %d: %s; it is named by its node id", node, err)
        connected = set(grid.get_node_ids())
        for node in new:
            if node in registered:
                label = f"node-{registered[node]}"
            else:
                label = node_label(*claims[node], node) if node in claims else f"node-{node}"
            holders = [n for n, held in self.labels.items() if held == label]
            if any(h in connected for h in holders):
                log.warning(
                    "hello: node %d claims %r, already held by connected node %d; it is named 'node-%d'",
                    node,
                    label,
                    holders[0],
                    node,
                )
                label = f"node-{node}"
            elif holders:
                log.info(
                    "hello: %s is back as node %d (was node %s)", label, node, ", ".join(map(str, holders))
                )
            self.labels[node] = label


def _registered_names(grid: Grid, node_ids: list[int]) -> dict[int, str]:
    """Names the SuperLink holds from ``flwr supernode register --name`` (none in simulation or without auth)."""
    wanted = set(node_ids)
    names = {}
    try:
        nodes = list(grid.get_nodes())
    except (AttributeError, NotImplementedError):  # grids without node information (tests, older Flower)
        return {}
    for info in nodes:
        node, name = getattr(info, "node_id", None), getattr(info, "name", "")
        if node not in wanted or not isinstance(name, str) or not name:
            continue
        try:
            validate.check_node_name(name, "registered name")
        except PayloadError as err:
            log.warning("node %d: %s; its claim is asked for instead", node, err)
            continue
        names[node] = name
    return names
