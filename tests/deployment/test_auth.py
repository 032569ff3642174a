"""SuperNode authentication on a real deployment (Flower 1.42; docs/deployment.md, section 16).

A TLS SuperLink with ``--enable-supernode-auth``; node keys from ``scripts/make_node_keys.py``; a node registered
with ``flwr supernode register <key>.pub --name``. Checked: the registered node joins under the node id of its
registration (also after a restart) and trains; a node without a key and a node with an unregistered key are
refused and exit, and never appear among the SuperLink's nodes or in the run's results. The Control API shares
the SuperLink's port without authentication (so anyone who reaches the port can register a key), and the
Fleet-only proxy ``scripts/fleet_proxy.nginx.conf`` lets SuperNodes through while refusing the Control API.
"""

from __future__ import annotations

import getpass
import http.client
import json
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from strategies.results import read_metrics

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

#: Partition 0 of 2 of the default digits split (seed 0) has this many training examples.
PARTITION_0_EXAMPLES = 851


def make_keys(out: Path, *names: str) -> dict[str, tuple[Path, Path]]:
    """``{name: (private key, public key)}``, made by the documented script."""
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_node_keys.py"), str(out), *names],
        check=True,
        capture_output=True,
    )
    return {n: (out / f"{n}.key", out / f"{n}.pub") for n in names}


def register(dep, public_key: Path, name: str, home: Path | None = None) -> dict:
    """``flwr supernode register <public key> --name <name>``: its JSON answer."""
    return dep.flwr_json("supernode", "register", str(public_key), "--name", name, home=home)


def listed_nodes(dep) -> dict[int, str]:
    """``{node id: status}`` of every node the SuperLink knows (``flwr supernode list``)."""
    out = dep.flwr_json("supernode", "list")
    assert out["success"], out
    return {int(n["node-id"]): n["status"] for n in out["nodes"]}


def run_to_end(dep, out_dir: Path, run_name: str, rounds: int) -> tuple[dict, list[dict], dict]:
    """``flwr run`` with one node: the run's ``flwr ls`` entry, its metrics rows and its config.json."""
    run_config = (
        f"num-server-rounds={rounds} min-train-nodes=1 seed=0 out-dir='{out_dir}' run-name='{run_name}'"
    )
    dep.start_run(run_config).popen.wait(400)
    (run,) = dep.runs()
    assert run["status"] == "finished:completed", dep.diagnostics()
    run_dir = out_dir / run_name
    return run, read_metrics(run_dir), json.loads((run_dir / "config.json").read_text())


def assert_only_one_node_trained(rows: list[dict], config: dict, rounds: int) -> None:
    """Every round, exactly the one registered node (partition 0) replied; nobody else is in the results."""
    assert [r["round"] for r in rows] == list(range(rounds + 1))
    assert config["num_nodes"] == 1 and len(config["nodes"]) == 1, config["nodes"]
    for r in rows[1:]:
        assert r["clients_ok"] == 1 and r["clients_failed"] == 0, r
        assert list(r["clients"]) == config["nodes"], r["clients"]
        (client,) = r["clients"].values()
        assert client["num_examples"] == PARTITION_0_EXAMPLES


def test_registered_supernode_trains_and_unknown_supernodes_are_refused(deployment, tmp_path, certs):
    dep = deployment(certs, supernode_auth=True)
    keys = make_keys(tmp_path / "keys", "edge-0", "stranger")
    answer = register(dep, keys["edge-0"][1], "edge-0")
    assert answer["success"], answer
    node_id = int(answer["node-id"])
    node_config = "partition-id=0 num-partitions=2 node-name='edge-0'"
    assert dep.start_supernode("edge-0", node_config, key=keys["edge-0"][0]) == node_id

    # A node without a key asks the Fleet API to register it: refused, registration is the CLI's job now.
    code, text = dep.refused_supernode("keyless", "partition-id=1 num-partitions=2 node-name='keyless'")
    assert code != 0 and "[code: 2001]" in text and "must be registered via the CLI" in text, text
    # A node with a key nobody registered: its activation is refused.
    code, text = dep.refused_supernode(
        "stranger", "partition-id=1 num-partitions=2 node-name='stranger'", key=keys["stranger"][0]
    )
    assert code != 0 and "[code: 2004]" in text and "Failed to activate SuperNode" in text, text
    assert listed_nodes(dep) == {node_id: "online"}

    started = time.monotonic()
    _, rows, config = run_to_end(dep, tmp_path / "runs", "auth", rounds=2)
    print(f"authenticated deployment run: {time.monotonic() - started:.1f} s")
    assert_only_one_node_trained(rows, config, rounds=2)

    # The node id comes from the registration: a restarted node keeps it (without authentication it is new).
    dep.stop_supernode("edge-0")
    assert dep.start_supernode("edge-0", node_config, key=keys["edge-0"][0]) == node_id

    # Flower 1.42 serves the Control API on this same port, without authentication: a CLI that has nothing but
    # the CA certificate (which every SuperNode has) registers its own key. Hence the Fleet-only proxy of the
    # guide. If this starts failing, Flower has changed: update docs/deployment.md, section 16.
    outsider = tmp_path / "outsider-home"
    dep.write_cli_config(outsider, f"127.0.0.1:{dep.port}")
    assert register(dep, keys["stranger"][1], "intruder", home=outsider)["success"]


def start_fleet_proxy(dep, tmp: Path) -> tuple[int, Path]:
    """nginx with the guide's server block, its three marked values pointed at ``dep``; (its port, access log)."""
    port, conf = dep.free_port(), (ROOT / "scripts" / "fleet_proxy.nginx.conf").read_text()
    for documented, here, count in (
        ("10.0.0.5:9093", f"127.0.0.1:{port}", 1),
        ("/etc/fl-compams/certs", str(dep.certs), 3),
        ("https://127.0.0.1:9093", f"https://127.0.0.1:{dep.port}", 1),
    ):
        assert conf.count(documented) == count, f"scripts/fleet_proxy.nginx.conf no longer has {documented!r}"
        conf = conf.replace(documented, here)
    tmp.mkdir()
    (tmp / "fleet_proxy.conf").write_text(conf)
    temp_paths = "".join(
        f"    {k}_temp_path {tmp / k};\n" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (tmp / "nginx.conf").write_text(
        # Workers run as this user (started as root, nginx would switch to `nobody`, who cannot use tmp).
        f"daemon off;\nuser {getpass.getuser()};\npid {tmp / 'nginx.pid'};\nerror_log {tmp / 'error.log'};\n"
        "events {}\n"
        f"http {{\n    access_log {tmp / 'access.log'};\n{temp_paths}    include {tmp / 'fleet_proxy.conf'};\n}}\n"
    )
    args = [
        shutil.which("nginx"),
        "-p",
        str(tmp),
        "-c",
        str(tmp / "nginx.conf"),
        "-e",
        str(tmp / "error.log"),
    ]
    proc = dep.start_helper("nginx", args)
    deadline = time.monotonic() + 30
    while status(port, dep.certs, "GET", "/health") is None:
        if not proc.running() or time.monotonic() > deadline:
            raise RuntimeError(f"nginx did not start:\n{proc.text()}")
        time.sleep(0.2)
    return port, tmp / "access.log"


def status(port: int, certs: Path, method: str, path: str) -> int | None:
    """The HTTP status of ``method path`` (sent as is, not normalised) over TLS; ``None`` if nothing answers."""
    context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    try:
        conn.request(method, path, body=b"" if method == "POST" else None)
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


@pytest.mark.skipif(shutil.which("nginx") is None, reason="needs nginx on PATH")
def test_fleet_only_proxy_lets_supernodes_in_and_keeps_the_control_api_out(deployment, tmp_path, certs):
    dep = deployment(certs, supernode_auth=True)
    port, access_log = start_fleet_proxy(dep, tmp_path / "nginx")
    for method, path in [
        ("GET", "/health"),
        ("GET", "/docs"),
        ("POST", "/v1/control/list-runs"),
        ("POST", "/v1/control/register-node"),
        ("POST", "/v1/runtime/get-nodes"),
        ("POST", "/v1/fleet/../control/list-runs"),
        ("POST", "/v1/fleet/%2e%2e/control/list-runs"),
    ]:
        assert status(port, certs, method, path) == 403, path
    assert status(dep.port, certs, "POST", "/v1/control/list-runs") != 403  # the SuperLink itself answers

    keys = make_keys(tmp_path / "keys", "edge-0", "outsider")
    answer = register(dep, keys["edge-0"][1], "edge-0")  # on the management side: 127.0.0.1
    assert answer["success"], answer
    node_config = "partition-id=0 num-partitions=2 node-name='edge-0'"
    node = dep.start_supernode("edge-0", node_config, key=keys["edge-0"][0], superlink=f"127.0.0.1:{port}")
    assert node == int(answer["node-id"])

    # The CLI pointed at the proxy (what an edge machine reaches) cannot register keys or list runs.
    outsider = tmp_path / "outsider-home"
    dep.write_cli_config(outsider, f"127.0.0.1:{port}")
    refused = register(dep, keys["outsider"][1], "intruder", home=outsider)
    assert not refused["success"] and "403" in refused["error-message"], refused
    listing = dep.flwr_json("ls", home=outsider)
    assert not listing["success"] and "403" in listing["error-message"], listing
    assert set(listed_nodes(dep)) == {node}

    _, rows, config = run_to_end(dep, tmp_path / "runs", "proxy", rounds=1)
    assert_only_one_node_trained(rows, config, rounds=1)
    # The node's traffic went through the proxy: messages pulled, replies and their objects pushed.
    log = access_log.read_text()
    for call in ("activate-node", "pull-messages", "push-messages", "push-object", "pull-object"):
        assert f'POST /v1/fleet/{call} HTTP/1.1" 200' in log, call
