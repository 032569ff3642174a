"""Node identity in one place: a node's stable label in results, its state key, its seed id, and label order.

Flower gives a node a new random node id every time it (re)starts, so nothing that must survive a restart or be
reproducible is keyed by it. A node is named by its ``partition-id`` (simulations and partitioned deployments),
else by its ``node-name`` node-config key, else, as a last resort, by its node id.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping
from typing import Any

__all__ = [
    "DATA_FILE_KEY",
    "NODE_NAME_KEY",
    "PARTITION_ID_KEY",
    "label_of_config",
    "label_sort_key",
    "node_label",
    "seed_id",
]

#: Node-config keys (``flower-supernode --node-config "partition-id=0 num-partitions=10"``).
PARTITION_ID_KEY = "partition-id"
NODE_NAME_KEY = "node-name"
DATA_FILE_KEY = "data-file"


def node_label(partition_id: int, node_name: str, node_id: int) -> str:
    """Stable name of a node: ``partition-<id>``, else ``node-<name>``, else ``node-<node id>``."""
    if partition_id >= 0:
        return f"partition-{partition_id}"
    return f"node-{node_name}" if node_name else f"node-{node_id}"


def label_of_config(node_config: Mapping[str, Any], node_id: int) -> str:
    """:func:`node_label` from a node config: the key a node's state is stored under and its results label."""
    pid = int(node_config[PARTITION_ID_KEY]) if PARTITION_ID_KEY in node_config else -1
    return node_label(pid, str(node_config.get(NODE_NAME_KEY, "")), node_id)


def seed_id(node_config: Mapping[str, Any]) -> int:
    """The integer that seeds a node's randomness: its ``partition-id``, else a CRC-32 of its name or data file.

    CRC-32 is stable across processes and restarts, unlike Python's ``hash``.
    """
    if PARTITION_ID_KEY in node_config:
        return int(node_config[PARTITION_ID_KEY])
    name = str(node_config.get(NODE_NAME_KEY) or node_config.get(DATA_FILE_KEY) or "")
    return zlib.crc32(name.encode("utf-8"))


def label_sort_key(label: str) -> list:
    """Natural order of labels: ``partition-2`` before ``partition-10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", label)]
