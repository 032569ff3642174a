"""A ClientApp wrapper that gives every virtual node what a deployed node has: the run config and node config.

``flwr run`` hands every ClientApp the run's config (``context.run_config``) and a SuperNode its
``--node-config``; Flower's ``run_simulation`` gives neither beyond ``partition-id`` and ``num-partitions``. The
in-process runner wraps its ClientApp in :class:`WithContext` so that clients see the same context in both
(the client state key comes from the run config, ``state-dir`` from the node config; see
:mod:`clients.state_io`). Imported lazily by :mod:`simulations.runner`, after it has quietened Flower and Ray.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

__all__ = ["WithContext"]


class WithContext(ClientApp):
    """``app``, handed each message with a context that has ``run_config`` and ``node_config`` entries added.

    Entries the context already has win (Flower's ``partition-id`` and ``num-partitions``). The wrapped app gets
    a copy of the context that shares its ``state``: Flower refuses a context whose run config was changed.
    """

    def __init__(self, app: ClientApp, run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> None:
        super().__init__()
        self.app = app
        self.run_config = dict(run_config)
        self.node_config = dict(node_config)

    def __call__(self, message: Message, context: Context) -> Message:
        """Let the wrapped ClientApp handle the message in the completed context."""
        completed = dataclasses.replace(
            context,
            run_config={**self.run_config, **context.run_config},
            node_config={**self.node_config, **context.node_config},
        )
        try:
            return self.app(message, completed)
        finally:
            context.state = completed.state  # the same object, unless the app replaced it
