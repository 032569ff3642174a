"""scripts/make_node_keys.py: key pairs that Flower 1.42's CLI and SuperNode accept, private keys kept private."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.cli.supernode.register import try_load_public_key
from flwr.supercore.primitives.asymmetric import public_key_to_bytes

ROOT = Path(__file__).resolve().parents[2]


def make(out: Path, *names: str) -> subprocess.CompletedProcess:
    script = ROOT / "scripts" / "make_node_keys.py"
    return subprocess.run([sys.executable, str(script), str(out), *names], capture_output=True, text=True)


def test_key_pairs_are_what_flower_reads_and_private_keys_are_mode_600(tmp_path):
    proc = make(tmp_path / "keys", "edge-0", "edge-1")
    assert proc.returncode == 0, proc.stderr
    publics = set()
    for name in ("edge-0", "edge-1"):
        private_path, public_path = tmp_path / "keys" / f"{name}.key", tmp_path / "keys" / f"{name}.pub"
        assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
        # What flower-supernode --auth-supernode-private-key does with the file (OpenSSH format, no password).
        private = serialization.load_ssh_private_key(private_path.read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        # What `flwr supernode register` sends: the same public key as the private key's.
        registered = try_load_public_key(public_path)
        assert registered == public_key_to_bytes(private.public_key())
        assert public_path.read_text().endswith(f" {name}\n")  # the name as the key's comment
        publics.add(registered)
    assert len(publics) == 2  # a fresh key per node


def test_existing_keys_and_bad_names_are_refused_and_nothing_is_written(tmp_path):
    out = tmp_path / "keys"
    assert make(out, "edge-0").returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = make(out, "edge-1", "edge-0")  # edge-0 exists: neither pair is written
    assert proc.returncode == 1 and "edge-0.key exists" in proc.stderr and "edge-0.pub exists" in proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    for bad in ("../x", ".hidden", "a b", ""):
        proc = make(out, bad)
        assert proc.returncode == 1 and "node name" in proc.stderr, (bad, proc.stderr)
    proc = make(out, "edge-2", "edge-2")
    assert proc.returncode != 0 and "twice" in proc.stderr
    assert {p.name for p in out.iterdir()} == set(before)
