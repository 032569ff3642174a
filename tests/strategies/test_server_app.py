"""ServerApp checks that fail before round 1."""

import pytest
from flwr.supercore.task_identity import TaskIdentity

from fl_compams import ConfigError, parse_config
from strategies.server_app import StableOrderGrid, discover_nodes, run_server


class FakeGrid:
    def __init__(self, nodes):
        self.nodes = nodes
        self.sent = 0

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout):
        self.sent += 1
        return []


def test_bad_run_config_stops_before_any_message():
    grid = FakeGrid([1, 2])
    with pytest.raises(ConfigError, match="'beta2'"):
        run_server(grid, {"beta2": 1.0})
    assert grid.sent == 0


def test_more_required_nodes_than_connected_is_an_error():
    with pytest.raises(ConfigError, match="min-train-nodes = 5 but only 2 nodes are connected"):
        discover_nodes(FakeGrid([1, 2]), parse_config({"min-train-nodes": 5}), timeout=1.0, wait_s=0.2)


def test_min_valid_replies_above_the_sample_is_an_error():
    cfg = parse_config({"min-valid-replies": 4, "fraction-train": 0.5})
    with pytest.raises(ConfigError, match="min-valid-replies = 4 exceeds the 2 clients sampled per round"):
        discover_nodes(FakeGrid([1, 2, 3, 4]), cfg, timeout=1.0)


def test_unanswered_hello_falls_back_to_node_ids_and_stable_order():
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = 1
    labels = discover_nodes(FakeGrid([30, 10, 20]), parse_config(), timeout=1.0)
    assert labels == {30: "node-30", 10: "node-10", 20: "node-20"}
    grid = StableOrderGrid(FakeGrid([7, 5, 6]), {7: "partition-0", 6: "partition-10", 5: "partition-2"})
    assert grid.get_node_ids() == [7, 5, 6]
