"""Per-process cache of what a node derives, read-only, from the run config and its node config (design.md §7).

Every message used to rebuild a node's set-up: parse the config, load its examples onto the device, build and
seed the model (about 1 ms of a digits client's few). A Ray worker or a SuperNode's ClientApp process serves many
messages, of many nodes and possibly of several runs, so this module keeps, per process:

* one **run** entry per (Flower run id, the client keys of the instruction's config record): the parsed
  :class:`~fl_compams.config.ExperimentConfig`, the seeded initial weights of the model, and one model
  *skeleton* per (thread, device);
* one **node** entry per (run entry, node id, node config, device): the node's examples on the device
  (:func:`tasks.local_data.node_data`). A ``data-file`` node's key holds the file's size, modification time and
  inode, so a replaced file is read again.

Both are least-recently-used and bounded (:data:`MAX_RUNS`; :data:`MAX_NODES` entries and :data:`MAX_NODE_BYTES`
of tensors), so 1,000 virtual nodes served by one worker keep at most that many partitions and one model per
thread, never one model per node.

Only read-only, derived data lives here; client *state* (residual, replica, moments) lives in ``context.state``
and its on-disk mirror, never here. The skeleton is shared by every node of a run served by one thread (a
thread serves one message at a time) and carries nothing from one message to the next: :func:`setup` loads
every tensor of its state dict from the message (or, when the message carries no model, the seeded initial
weights a fresh model would have), drops its gradients and puts it in training mode, so a message gets exactly
the model a freshly built one would be (tested: replies bit-identical to the uncached path). A model with
buffers outside its state dict (non-persistent buffers, which a load would not overwrite) is never cached. A
node's cached example tensors are shared by all its messages: handlers read them and never modify them in place.

``enabled = False`` (or the environment variable ``FL_COMPAMS_NODE_CACHE=0`` when the process starts) turns the
cache off: every message then builds everything afresh, as before the cache existed.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fl_compams import protocol
from fl_compams.config import ExperimentConfig, parse_config
from tasks.local_data import DATA_FILE_KEY, NodeData, node_data
from tasks.task import model_for_task, resolve_device, task_shape

__all__ = [
    "LRU",
    "MAX_NODES",
    "MAX_NODE_BYTES",
    "MAX_RUNS",
    "MAX_SKELETONS",
    "NodeSetup",
    "clear",
    "enabled",
    "setup",
    "stats",
]

#: Run entries kept (runs x configs one process serves at once; each holds one initial model and one skeleton
#: per thread and device).
MAX_RUNS = 4
#: Node entries kept, and the bytes of their tensors: a worker serving more nodes than this rebuilds the
#: partitions of the least recently served ones (from the data set cached in :mod:`tasks.task`).
MAX_NODES = 1024
MAX_NODE_BYTES = 512 * 2**20

#: Skeletons kept per run entry (one per thread and device; the oldest goes first).
MAX_SKELETONS = 8

#: Off: every message builds its set-up afresh.
enabled = os.environ.get("FL_COMPAMS_NODE_CACHE", "1") != "0"


class LRU:
    """A thread-safe least-recently-used map with at most ``max_entries`` entries and ``max_bytes`` of values.

    ``put`` takes the entry's size in bytes; the oldest entries are evicted until both bounds hold (a single
    entry larger than ``max_bytes`` is not kept at all).
    """

    def __init__(self, max_entries: int, max_bytes: int | None = None) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = self.misses = 0
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any | None:
        """The value under ``key`` (now the most recently used), or None."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self.hits += 1
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: Hashable, value: Any, nbytes: int = 0) -> None:
        """Keep ``value`` under ``key``, evicting the least recently used entries beyond the bounds."""
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.nbytes -= old[1]
            if self.max_bytes is not None and nbytes > self.max_bytes:
                return
            self._items[key] = (value, nbytes)
            self.nbytes += nbytes
            while len(self._items) > self.max_entries or (
                self.max_bytes is not None and self.nbytes > self.max_bytes
            ):
                _, (_, size) = self._items.popitem(last=False)
                self.nbytes -= size

    def clear(self) -> None:
        """Drop every entry and reset the counts."""
        with self._lock:
            self._items.clear()
            self.nbytes = self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)


@dataclass(eq=False)
class _Run:
    """What every node of one run and config derives alike (the model's skeletons are per thread and device)."""

    cfg: ExperimentConfig
    input_shape: tuple[int, ...]
    num_classes: int
    initial: (
        dict[str, torch.Tensor] | None
    )  # the seeded initial weights (CPU); None: the model is not cacheable
    skeletons: dict[tuple[int, str], torch.nn.Module] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True, eq=False)
class NodeSetup:
    """A message's set-up: the config, the device, the node's examples and the model holding the message's weights."""

    cfg: ExperimentConfig
    device: torch.device
    data: NodeData
    model: torch.nn.Module


_runs = LRU(MAX_RUNS)
_nodes = LRU(MAX_NODES, MAX_NODE_BYTES)


def clear() -> None:
    """Forget every entry (tests; a process that wants its memory back)."""
    _runs.clear()
    _nodes.clear()


def stats() -> dict[str, int]:
    """Entries, tensor bytes, hits and misses of both caches (benchmarks, tests)."""
    return {
        "runs": len(_runs),
        "run_hits": _runs.hits,
        "run_misses": _runs.misses,
        "nodes": len(_nodes),
        "node_bytes": _nodes.nbytes,
        "node_hits": _nodes.hits,
        "node_misses": _nodes.misses,
    }


def _hashable(value: Any) -> Hashable:
    return tuple(value) if isinstance(value, list) else value


def _config_key(record: Mapping[str, Any]) -> tuple:
    """The client keys of the instruction's config record, as sent: everything :func:`parse_config` reads."""
    return tuple((k, _hashable(record[k])) for k in protocol.CLIENT_KEYS if k in record)


def _node_key(context) -> tuple | None:
    """The node's identity and config; for a ``data-file`` node also the file's identity (None: unreadable)."""
    items = tuple(sorted((str(k), _hashable(v)) for k, v in context.node_config.items()))
    data_file = context.node_config.get(DATA_FILE_KEY)
    if not data_file:
        return (context.node_id, items)
    try:
        st = os.stat(os.path.expanduser(str(data_file)))
    except OSError:
        return None  # node_data raises the error that names the problem
    return (context.node_id, items, st.st_size, st.st_mtime_ns, st.st_ino)


def _new_run(record: Mapping[str, Any]) -> _Run:
    cfg = parse_config({k: record[k] for k in protocol.CLIENT_KEYS if k in record})
    input_shape, num_classes = task_shape(cfg.data)
    model = model_for_task(cfg.data, cfg.seed)
    state = model.state_dict()
    cacheable = sum(1 for _ in model.buffers()) + sum(1 for _ in model.parameters()) == len(state)
    initial = {k: v.detach().clone() for k, v in state.items()} if cacheable else None
    return _Run(cfg, tuple(input_shape), num_classes, initial)


def _skeleton(run: _Run, device: torch.device) -> torch.nn.Module:
    """The model skeleton of the run for the calling thread on ``device`` (built once)."""
    key = (threading.get_ident(), str(device))
    with run.lock:
        model = run.skeletons.get(key)
        if model is None:
            model = model_for_task(run.cfg.data, run.cfg.seed).to(device)
            run.skeletons[key] = model
            while len(run.skeletons) > MAX_SKELETONS:  # threads that came and went
                del run.skeletons[next(iter(run.skeletons))]
    return model


def _fresh(record: Mapping[str, Any], context, weights) -> NodeSetup:
    """The set-up built afresh, as every message did before the cache (and still does with the cache off)."""
    cfg = parse_config({k: record[k] for k in protocol.CLIENT_KEYS if k in record})
    device = resolve_device(cfg.train.device, deterministic=cfg.train.deterministic)
    input_shape, num_classes = task_shape(cfg.data)
    data = node_data(cfg.data, context.node_config, cfg.seed, device, input_shape, num_classes)
    model = model_for_task(cfg.data, cfg.seed)
    if weights is not None:
        model.load_state_dict(weights)
    return NodeSetup(cfg, device, data, model.to(device))


def setup(record: Mapping[str, Any], context, weights: Mapping[str, torch.Tensor] | None) -> NodeSetup:
    """A message's config, device, node data and model, the model holding ``weights``.

    Parameters
    ----------
    record
        The instruction's config record (:data:`fl_compams.protocol.CONFIG`): the client keys of the run config.
    context
        The Flower ``Context`` of the node: ``run_id``, ``node_id`` and ``node_config`` key the cache.
    weights
        The model's state dict from the message, or None (two-way compression between resyncs: the caller
        loads the replica): the model then holds the seeded initial weights, as a freshly built one does.

    Raises what :func:`parse_config`, :func:`tasks.task.resolve_device` and :func:`tasks.local_data.node_data`
    raise on bad input (nothing is cached then).
    """
    if not enabled:
        return _fresh(record, context, weights)
    config = _config_key(record)
    run_key = (context.run_id, config)
    run = _runs.get(run_key)
    if run is None:
        run = _new_run(record)
        _runs.put(run_key, run)
    cfg = run.cfg
    # re-applied per message: the determinism switch is process-wide and another run may have changed it
    device = resolve_device(cfg.train.device, deterministic=cfg.train.deterministic)
    node = _node_key(context)
    data_key = None if node is None else (run_key, node, str(device))
    data = None if data_key is None else _nodes.get(data_key)
    if data is None:
        data = node_data(cfg.data, context.node_config, cfg.seed, device, run.input_shape, run.num_classes)
        if data_key is not None:
            _nodes.put(data_key, data, data.x.nbytes + data.y.nbytes)
    if run.initial is None:  # not cacheable: a fresh model, as without the cache
        model = model_for_task(cfg.data, cfg.seed)
        if weights is not None:
            model.load_state_dict(weights)
        return NodeSetup(cfg, device, data, model.to(device))
    model = _skeleton(run, device)
    # every tensor of the state dict overwritten (strict load), no gradient, training mode: a fresh model's state
    model.load_state_dict(run.initial if weights is None else weights)
    model.zero_grad(set_to_none=True)
    model.train()
    return NodeSetup(cfg, device, data, model)
