"""Make SuperNode authentication keys: one EC P-384 key pair per node, in the OpenSSH formats Flower 1.42 reads.

    python scripts/make_node_keys.py OUT_DIR NAME [NAME ...]

Writes ``OUT_DIR/NAME.key`` (the private key, mode 600; it stays on that SuperNode and is given to
``flower-supernode --auth-supernode-private-key``) and ``OUT_DIR/NAME.pub`` (the public key, for
``flwr supernode register OUT_DIR/NAME.pub <connection> --name NAME`` on the SuperLink side). The same as
``ssh-keygen -t ecdsa -b 384 -N "" -C NAME -f OUT_DIR/NAME`` (which names the private key ``NAME``); Flower accepts
only unencrypted OpenSSH-format ECDSA keys on NIST curves (not Ed25519, not PEM). Uses the ``cryptography``
package, a Flower dependency, so it runs wherever ``flower-supernode`` does: best run on the node itself, so that
the private key never leaves it. Existing files are never overwritten. See docs/deployment.md, section 16.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Annotated

import typer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simulations.cli_base import UserError, new_app, run_app

#: A plain file name: the key files are named after the node.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def problems(out_dir: Path, name: str) -> list[str]:
    """Why ``name``'s key pair cannot be written under ``out_dir`` (empty: it can)."""
    if not NAME.fullmatch(name):
        return [
            f"node name {name!r}: use 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        ]
    paths = (out_dir / f"{name}.key", out_dir / f"{name}.pub")
    return [f"{path} exists; remove the old key pair first" for path in paths if path.exists()]


def write_key_pair(out_dir: Path, name: str) -> tuple[Path, Path]:
    """Write ``name.key`` and ``name.pub`` under ``out_dir``; refuse bad names and existing files."""
    if found := problems(out_dir, name):
        raise ValueError("; ".join(found))
    private_path, public_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    out_dir.mkdir(parents=True, exist_ok=True)
    # O_EXCL: never replace a key that appeared meanwhile; 0o600 from the start, never readable by others.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    with open(public_path, "xb") as f:
        f.write(public + f" {name}\n".encode())
    return private_path, public_path


app = new_app(__doc__.split("\n\n")[0])


@app.command()
def make_node_keys(
    out_dir: Annotated[Path, typer.Argument(show_default=False)],
    names: Annotated[list[str], typer.Argument(metavar="NAME...", show_default=False)],
) -> int:
    """Write OUT_DIR/NAME.key and OUT_DIR/NAME.pub for every NAME (node names, also the file names)."""
    if len(set(names)) != len(names):
        raise UserError("a node name is listed twice")
    found = [p for name in names for p in problems(out_dir, name)]
    if found:  # check every pair first: write all of them or none
        print("\n".join(found), file=sys.stderr)
        return 1
    for name in names:
        private_path, public_path = write_key_pair(out_dir, name)
        print(
            f"{name}: private key {private_path} (mode 600, for that SuperNode only), public key {public_path}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and write one key pair per name; the exit code."""
    return run_app(app, argv, "make_node_keys.py")


if __name__ == "__main__":
    sys.exit(main())
