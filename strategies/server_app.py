"""The COMP-AMS ServerApp: validate the config, run the CompAMS strategy, evaluate centrally, write results.

Results go to ``<out-dir>/<run-name>/`` (default ``runs/<timestamp>`` under the working directory of the
process, which for ``flwr run .`` is where the local SuperLink was started; the README command passes an
absolute ``out-dir``): ``config.json``, ``metrics.jsonl`` (one line per round, round 0 = the initial model),
``partitions.json`` and ``model.npz``. ``run-name`` is a plain name inside ``out-dir``; a fresh run refuses a
directory that already holds anything (an earlier run's results are never overwritten), ``resume = true``
continues one from its newest usable checkpoint. Everything a client sends is checked by
:mod:`strategies.validate` before it is used.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flwr
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg

from fl_compams import buffers, protocol
from fl_compams.algorithm import FLOWER_BASELINES
from fl_compams.checkpoint import CheckpointError, latest_checkpoint, save_checkpoint
from fl_compams.config import build_algorithm, parse_config
from fl_compams.downlink import init_downlink
from fl_compams.errors import ConfigError, PayloadError
from fl_compams.flat import ParamSpec, flatten
from fl_compams.nodes import label_sort_key
from fl_compams.server import init_server_state
from strategies import validate
from strategies.comp_ams import CompAMS
from strategies.naming import NodeNames
from strategies.results import ResultsDir, check_fresh, resolve_run_dir
from strategies.run_end import end_run
from strategies.traffic import RoundTraffic, sorted_by_label, traffic_row
from strategies.wire import wire_bytes
from tasks.partition import partition_stats
from tasks.task import load_data, make_model, partitions, resolve_device
from tasks.training import evaluate

log = logging.getLogger("flwr").getChild(__name__)  # shown in the `flwr run` stream beside Flower's own lines
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run``: the run config comes from pyproject plus ``--run-config``."""
    run_server(grid, dict(context.run_config))


def run_server(
    grid: Grid, run_config: Mapping[str, Any], on_round: Callable[[dict], None] | None = None
) -> Path:
    """Run one experiment on ``grid``; return the results directory.

    ``on_round`` is called with every row written to ``metrics.jsonl`` (progress bars, live monitoring).
    """
    cfg = parse_config(run_config)  # a bad key or value stops here, before any round
    baseline = cfg.algorithm in FLOWER_BASELINES
    if baseline and (cfg.output.checkpoint_every or cfg.output.resume):
        raise ConfigError("checkpoint-every and resume apply to the algorithm layer's algorithms only")
    run_dir = resolve_run_dir(cfg.output.out_dir, cfg.output.run_name)
    if not cfg.output.resume:
        check_fresh(run_dir)  # never overwrite an earlier run's results; refuse before any message
    timeout = cfg.server.round_timeout
    device = resolve_device(cfg.train.device, deterministic=cfg.train.deterministic)
    bundle = load_data(cfg.data, seed=cfg.seed)
    model = make_model(cfg.data, bundle, cfg.seed).to(device)
    spec = ParamSpec.from_module(model)
    if spec.buffer_dim:  # BatchNorm statistics: refuse what cannot carry them before any message
        buffers.check_spec(spec)
        why = buffers.unsupported(cfg.algorithm, cfg.server.downlink_compressor, FLOWER_BASELINES)
        if why is not None:
            raise ConfigError(f"model {type(model).__name__} has buffers (BatchNorm statistics), but {why}")
    algorithm = build_algorithm(cfg, spec.block_sizes)
    names = discover_nodes(grid, cfg, max(timeout, 120.0))  # first contact may include client start-up
    if algorithm.qsparse is not None:  # a qsparse-periods list names every node's period
        algorithm.qsparse.check_clients(names.labels.values())
    labels = names.labels  # one dict, updated when a node first appears (or returns) during the run

    checkpoints = run_dir / "checkpoints"
    two_way = algorithm.downlink is not None
    initial_buffers = flatten(model.state_dict(), spec, trainable=False) if spec.buffer_dim else None
    public = cfg.train.state_dtype  # two-way: the public model is kept representable in the replicas' dtype
    state = init_server_state(
        flatten(model.state_dict(), spec),
        algorithm.server_opt,
        two_way=two_way,
        buffers=initial_buffers,
        public_dtype=public,
    )
    totals = {"up": 0, "down": 0, "probe": 0}
    done = 0
    if cfg.output.resume:
        state, totals, done = _resume(run_dir, cfg, spec, device, state, totals)
    results = ResultsDir(
        run_dir, keep_rounds_upto=done if cfg.output.resume else None, tensorboard=cfg.output.tensorboard
    )
    strategy = CompAMS(cfg, spec, algorithm, state, names=names, round_offset=done)
    run_grid = StableOrderGrid(grid, labels)
    traffic = strategy.traffic
    if baseline:
        run_grid = MeasuringGrid(grid, labels, cfg, spec)
        traffic = run_grid.traffic
    if not done:
        _write_run_info(results, cfg, labels, model, spec, device, bundle)

    started = time.perf_counter()
    hooks = [
        evaluation_hook(model, bundle, device),
        lambda rnd, arrays, row: row.update(traffic_row(traffic.get(rnd), totals)),
        probe_hook(grid, strategy, labels, totals),
        lambda rnd, arrays, row: row.update(wall_s=round(time.perf_counter() - started, 3)),
        writer_hook(results, on_round),
        checkpoint_hook(checkpoints, strategy, spec, cfg, totals),
    ]

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        rnd = server_round + done
        row: dict[str, Any] = {"round": rnd}
        if server_round == 0 and done:  # the resumed model was already evaluated and written in its own round
            hooks[0](rnd, arrays, row)
        else:
            for hook in hooks:
                hook(rnd, arrays, row)
            log.debug("round %d: accuracy %.4f loss %.4f", rnd, row["accuracy"], row["loss"])
        return MetricRecord({"accuracy": row["accuracy"], "loss": row["loss"]})

    remaining = cfg.server.num_server_rounds - done
    start = {"num_rounds": remaining, "timeout": timeout, "evaluate_fn": evaluate_fn}
    if baseline:
        result = flower_baseline(cfg).start(
            run_grid, initial_arrays=strategy.current_arrays(), train_config=strategy.client_config(), **start
        )
        results.save_model(result.arrays.to_torch_state_dict())
        return results.path
    if remaining > 0:
        strategy.start(
            run_grid, initial_arrays=strategy.current_arrays(), train_config=ConfigRecord(), **start
        )
    results.save_model(strategy.model_tensors())  # the model clients hold, with its buffers
    end_run(
        grid, labels, min(timeout, 60.0)
    )  # the true end: nodes remove the run's state files (or keep them)
    return results.path


#: A round hook adds its columns to the round's ``metrics.jsonl`` row (or acts on it: write, checkpoint).
RoundHook = Callable[[int, ArrayRecord, dict], None]


def evaluation_hook(model: torch.nn.Module, bundle, device: torch.device) -> RoundHook:
    """Central evaluation of the global model: ``accuracy`` and ``loss`` on the test set.

    With ``validation-fraction`` > 0 also ``val_accuracy`` and ``val_loss`` on the held-out validation split
    (tune on these, never on test).
    """
    test_x, test_y = bundle.test_x.to(device), bundle.test_y.to(device)
    val_x, val_y = bundle.val_x.to(device), bundle.val_y.to(device)

    def hook(rnd: int, arrays: ArrayRecord, row: dict) -> None:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = evaluate(model, test_x, test_y)
        row.update(accuracy=accuracy, loss=loss)
        if val_y.numel():
            val_loss, val_accuracy = evaluate(model, val_x, val_y)
            row.update(val_accuracy=val_accuracy, val_loss=val_loss)

    return hook


def probe_hook(grid: Grid, strategy: CompAMS, labels: Mapping[int, str], totals: dict[str, int]) -> RoundHook:
    """The sigma_g^2 probe every ``probe-every`` rounds; its traffic is counted apart from training traffic."""
    every = strategy.config.output.probe_every
    timeout = strategy.config.server.round_timeout

    def hook(rnd: int, arrays: ArrayRecord, row: dict) -> None:
        if every and rnd and rnd % every == 0:
            row.update(probe_heterogeneity(grid, arrays, strategy.client_config(), timeout, labels))
            totals["probe"] += row["probe_bytes"]
        row["probe_bytes_cum"] = totals["probe"]

    return hook


def writer_hook(results: ResultsDir, on_round: Callable[[dict], None] | None) -> RoundHook:
    """Append the row to ``metrics.jsonl`` and hand it to ``on_round``."""

    def hook(rnd: int, arrays: ArrayRecord, row: dict) -> None:
        results.append_metrics(row)
        if on_round is not None:
            on_round(row)

    return hook


def checkpoint_hook(checkpoints: Path, strategy: CompAMS, spec: ParamSpec, cfg, totals: dict) -> RoundHook:
    """Write the whole server state every ``checkpoint-every`` rounds (after the round's row is written)."""
    every = cfg.output.checkpoint_every

    def hook(rnd: int, arrays: ArrayRecord, row: dict) -> None:
        if every and rnd and rnd % every == 0:
            extra = {"totals": totals, "config": cfg.to_flat(), "dim": spec.dim}
            save_checkpoint(checkpoints, strategy.state._replace(round=rnd), extra)

    return hook


def _write_run_info(results: ResultsDir, cfg, labels, model, spec: ParamSpec, device, bundle) -> None:
    """``config.json`` and ``partitions.json`` of a fresh run."""
    results.write_json(
        "config.json",
        {
            "config": cfg.to_flat(),
            "num_nodes": len(labels),
            "nodes": sorted(labels.values()),
            "model": type(model).__name__,
            "dim": spec.dim,
            "param_spec": spec.to_dict(),
            "device": str(device),
            "versions": {"flwr": flwr.__version__, "torch": torch.__version__},
        },
    )
    parts = partitions(cfg.data, len(labels), cfg.seed) if labels else ()
    results.write_json(
        "partitions.json", partition_stats(bundle.train_y.numpy(), list(parts), bundle.num_classes)
    )


def flower_baseline(cfg):
    """Flower's own FedAvg or FedAdam, unmodified (the ``flower-*`` algorithms), with central evaluation only."""
    common = {
        "fraction_train": cfg.server.fraction_train,
        "fraction_evaluate": 0.0,
        "min_train_nodes": cfg.server.min_train_nodes,
        "min_available_nodes": cfg.server.min_train_nodes,
    }
    if cfg.algorithm == "flower-fedavg":
        return FedAvg(**common)
    return FedAdam(
        eta=cfg.server.server_lr,
        eta_l=cfg.train.local_lr,
        beta_1=cfg.server.beta1,
        beta_2=cfg.server.beta2,
        tau=cfg.server.eps,
        **common,
    )


#: Keys that may differ between a run and its resumption (everything else must match the checkpoint).
_RESUMABLE = {
    "num-server-rounds",
    "resume",
    "round-timeout",
    "checkpoint-every",
    "probe-every",
    "tensorboard",
}


def _resume(run_dir: Path, cfg, spec: ParamSpec, device, state, totals):
    """State, byte totals and rounds done from the newest usable checkpoint of ``run_dir``.

    A checkpoint whose tensors do not fit this model, or whose run counters are malformed, is skipped like a
    corrupt one. With no usable checkpoint the run starts at round 1, unless the directory already holds
    results, which a fresh start would overwrite: then it refuses.
    """
    checkpoints = run_dir / "checkpoints"
    found = latest_checkpoint(
        checkpoints, device, dim=spec.dim, check=lambda st, extra: _check_extra(st, extra, spec.buffer_dim)
    )
    if found is None:
        if run_dir.is_dir() and any(run_dir.iterdir()):
            raise ConfigError(
                f"resume: no usable checkpoint in {checkpoints} (see the warnings), but {run_dir} holds an "
                "earlier run's results, which a fresh start would overwrite; move them away or choose another "
                "run-name (resume needs checkpoints: checkpoint-every > 0)"
            )
        log.warning("resume: no valid checkpoint in %s; starting from round 1", checkpoints)
        return state, totals, 0
    saved, extra, path = found
    now = cfg.to_flat()
    changed = sorted(k for k, v in extra["config"].items() if k not in _RESUMABLE and now.get(k) != v)
    if changed:
        raise ConfigError(
            f"resume: {path} was written with different settings for {changed}; resume with the same "
            "config (only " + ", ".join(sorted(_RESUMABLE)) + " may change)"
        )
    log.info("resume: continuing after round %d from %s", saved.round, path)
    if (saved.downlink is None) != (state.downlink is None):  # a checkpoint of a one-way run (version <= 3)
        if state.downlink is None:
            raise ConfigError(f"resume: {path} is of a two-way run; resume it with its downlink-compressor")
        down = init_downlink(saved.theta, cfg.train.state_dtype)  # every client gets the dense model first
        saved = saved._replace(downlink=down)
    return saved, dict(extra["totals"]), saved.round


def _check_extra(state, extra: dict, buffer_dim: int = 0) -> None:
    """What the ServerApp adds to a checkpoint (``checkpoint_hook``): the config and the byte totals.

    Also the model's buffers: ``buffer_dim`` values when the model has any, none otherwise.
    """
    held = 0 if state.buffers is None else state.buffers.numel()
    if held != buffer_dim:
        raise CheckpointError(f"the checkpoint holds {held} buffer values, the model has {buffer_dim}")
    if not isinstance(extra.get("config"), dict):
        raise CheckpointError(
            f"'config' must be a table of settings, got {type(extra.get('config')).__name__}"
        )
    totals = extra.get("totals")
    if not isinstance(totals, dict) or not {"up", "down", "probe"} <= set(totals):
        raise CheckpointError(f"'totals' must hold the byte counters up, down, probe, got {totals!r}")
    for name, value in totals.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CheckpointError(f"byte counter totals[{name!r}] must be an integer >= 0, got {value!r}")


class StableOrderGrid:
    """A view of a Flower ``Grid`` that lists node ids in the order of their stable labels.

    Flower samples ``random.sample(grid.get_node_ids(), k)``; node ids are random per run, so ordering them
    by label (``partition-0``, ``partition-1``, ...) makes the sample depend on the seed alone.
    """

    def __init__(self, grid: Grid, labels: Mapping[int, str]) -> None:
        self._grid = grid
        self._labels = labels

    def get_node_ids(self):
        """Node ids sorted by label (unknown nodes last, by id)."""
        ids = list(self._grid.get_node_ids())
        return sorted(ids, key=lambda n: (n not in self._labels, label_sort_key(self._labels.get(n, "")), n))

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


class MeasuringGrid(StableOrderGrid):
    """A stable-order grid that measures and checks every training message (for Flower's own strategies).

    CompAMS measures its traffic itself; Flower's FedAvg and FedAdam do not, so their runs go through this view:
    each ``send_and_receive`` of TRAIN messages is one round, with the serialised size of every instruction and
    reply, and error replies or missing replies counted as failures. Flower's strategies trust their replies,
    so each one is checked here first (:func:`strategies.validate.dense_model_reply`: the model's tensors,
    finite; ``num-examples`` > 0 and capped; a finite loss): a bad one is counted as a failure and not handed
    on, and a good one is handed on with only the metrics Flower needs.
    """

    def __init__(self, grid: Grid, labels: Mapping[int, str], cfg, spec: ParamSpec) -> None:
        super().__init__(grid, labels)
        self.cfg = cfg
        self.dim = spec.dim
        self.shapes = dict(zip(spec.names, spec.shapes, strict=True))
        self.traffic: dict[int, RoundTraffic] = {}

    def send_and_receive(self, messages, timeout=None):
        """Forward to the real grid, measuring TRAIN rounds and passing on only valid replies."""
        messages = list(messages)
        if not messages or messages[0].metadata.message_type != MessageType.TRAIN:
            return self._grid.send_and_receive(messages, timeout=timeout)
        label = lambda node: self._labels.get(node, f"node-{node}")  # noqa: E731
        traffic = RoundTraffic()
        traffic.record_instructions(messages, label)
        rnd = len(self.traffic) + 1
        passed, losses, weights = [], [], []
        for r in self._grid.send_and_receive(messages, timeout=timeout):
            name = label(r.metadata.src_node_id)
            if not traffic.record_reply(name, r):
                passed.append(r)  # an error reply: Flower logs and skips it
                continue
            try:
                metrics = validate.dense_model_reply(
                    r.content, self.shapes, max_num_examples=self.cfg.server.max_num_examples
                )
            except PayloadError as err:
                traffic.failures[name] = str(err)
                log.warning("round %d: dropped the reply of %s: %s", rnd, name, err)
                traffic.per_client[name] = {"uplink_bytes": traffic.uplink_bytes[name], "failure": str(err)}
                continue
            r.content[protocol.METRICS] = MetricRecord(metrics.values)  # what Flower's averaging reads
            passed.append(r)
            traffic.ok.append(name)
            traffic.per_client[name] = {"uplink_bytes": traffic.uplink_bytes[name]}
            losses.append(float(metrics.values[protocol.TRAIN_LOSS]))
            weights.append(float(metrics.values[protocol.NUM_EXAMPLES]))
        traffic.record_missing(self.cfg.server.round_timeout)
        if losses:  # Flower weights clients by num-examples; report the train loss the same way
            traffic.train_loss = sum(w * x for w, x in zip(weights, losses, strict=True)) / sum(weights)
            traffic.applied = True
        traffic.ok.sort(key=label_sort_key)
        traffic.per_client = sorted_by_label(traffic.per_client)
        traffic.uplink_theory_bits = 32.0 * self.dim * len(traffic.ok)  # dense float32 models
        self.traffic[rnd] = traffic
        return passed


def discover_nodes(grid: Grid, cfg, timeout: float, wait_s: float = 30.0) -> NodeNames:
    """Wait for enough nodes, ask each for its stable name, and check the sampling settings can be met.

    A claimed name is a label only (:class:`strategies.naming.NodeNames`): a node whose hello reply is missing or
    malformed, or that claims a label an earlier node (by node id) holds, is named ``node-<node id>``, logged; the
    run goes on.
    """
    deadline = time.monotonic() + wait_s
    while len(node_ids := list(grid.get_node_ids())) < cfg.server.min_train_nodes:
        if time.monotonic() > deadline:
            raise ConfigError(
                f"min-train-nodes = {cfg.server.min_train_nodes} but only {len(node_ids)} nodes are connected "
                f"after {wait_s:.0f} s; lower min-train-nodes or start more SuperNodes"
            )
        time.sleep(1.0)
    sample = max(int(len(node_ids) * cfg.server.fraction_train), cfg.server.min_train_nodes)
    if cfg.server.min_valid_replies > sample:
        raise ConfigError(
            f"min-valid-replies = {cfg.server.min_valid_replies} exceeds the {sample} clients sampled per round "
            f"({len(node_ids)} nodes x fraction-train {cfg.server.fraction_train}); lower it"
        )
    names = NodeNames()
    names.learn(grid, node_ids, timeout)
    return names


def probe_heterogeneity(
    grid: Grid,
    arrays: ArrayRecord,
    client_config: ConfigRecord,
    timeout: float,
    labels: Mapping[int, str] | None = None,
) -> dict[str, Any]:
    """Ask every node for its full local gradient at the current model; report sigma_g^2 and sigma^2.

    ``sigma_g2 = (1/n) sum_i ||grad f_i - grad f||^2`` with ``grad f = (1/n) sum_i grad f_i`` (the
    heterogeneity term of Li et al.'s Theorem 1) and ``sigma2`` = the mean local minibatch variance, over the
    nodes whose reply passes :func:`strategies.validate.probe_reply` (a gradient of the model's length, finite;
    a finite variance >= 0); the others are left out and logged. Probe traffic is reported separately from
    training traffic.
    """
    content = RecordDict({protocol.ARRAYS: arrays, protocol.CONFIG: client_config})
    messages = [
        Message(content=content, message_type=protocol.PROBE_MESSAGE_TYPE, dst_node_id=nid)
        for nid in grid.get_node_ids()
    ]
    probe_bytes = wire_bytes(content) * len(messages)
    grads, variances = [], []
    labels = labels or {}
    replies = sorted(  # a fixed summation order, whatever order the replies arrive in
        grid.send_and_receive(messages, timeout=timeout),
        key=lambda r: label_sort_key(labels.get(r.metadata.src_node_id, f"node-{r.metadata.src_node_id}")),
    )
    dim = sum(math.prod(a.shape) for a in arrays.values())
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("probe: node %d failed: %s", node, reply.error.reason)
            continue
        probe_bytes += wire_bytes(reply.content)
        try:
            grad, variance = validate.probe_reply(reply.content, dim)
        except PayloadError as err:
            log.warning("probe: left out node %d (%s): %s", node, labels.get(node, f"node-{node}"), err)
            continue
        grads.append(grad)
        variances.append(variance)
    if not grads:
        return {"sigma_g2": None, "sigma2": None, "probe_clients": 0, "probe_bytes": probe_bytes}
    stacked = torch.stack(grads)
    mean = stacked.mean(0)
    sigma_g2 = float(((stacked - mean) ** 2).sum(1).mean())
    return {
        "sigma_g2": sigma_g2,
        "sigma2": sum(variances) / len(variances),
        "grad_norm2": float(mean.square().sum()),
        "probe_clients": len(grads),
        "probe_bytes": probe_bytes,
    }
