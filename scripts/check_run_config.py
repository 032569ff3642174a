"""Check the run config ``flwr run`` would get, before Flower starts: one line and exit code 2 if it is bad.

    python scripts/check_run_config.py PROJECT_DIR [FLWR RUN ARGUMENTS ...]

Takes ``PROJECT_DIR/pyproject.toml``'s ``[tool.flwr.app.config]``, applies every ``--run-config`` / ``-c`` value
found among the arguments the way ``flwr run`` does (flwr's own parser: ``key=value`` strings, later ones win, or
one ``.toml`` file) and validates the result with the project's parser, ``fl_compams.config.parse_config``, the
one the ServerApp and ClientApp use. Other arguments are ignored. ``scripts/run_local.sh`` runs it first, so a
bad key fails in about two seconds (importing torch) with the parser's message instead of after the SuperLink
started and the run failed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import tomllib
from flwr.common.config import parse_config_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fl_compams.config import parse_config
from fl_compams.errors import ConfigError

PROG = "check_run_config.py"
OPTIONS = ("--run-config", "-c")


def run_config_values(args: list[str]) -> list[str]:
    """The values of every ``--run-config`` / ``-c`` (also ``--run-config=VALUE``) in ``flwr run`` arguments."""
    values, it = [], iter(args)
    for arg in it:
        if arg in OPTIONS:
            values.append(next(it, ""))
        elif arg.startswith("--run-config="):
            values.append(arg.partition("=")[2])
    return values


def check(project_dir: Path, args: list[str]) -> None:
    """Raise ``ConfigError`` (or flwr's ``ClickException`` / ``ValueError`` for a bad string) if the config is bad."""
    pyproject = project_dir / "pyproject.toml"
    try:
        table = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"].get("config", {})
    except (OSError, tomllib.TOMLDecodeError, KeyError) as e:
        raise ConfigError(f"{pyproject}: no [tool.flwr.app] table ({type(e).__name__}: {e})") from None
    try:
        parse_config(table)
    except ConfigError as e:
        raise ConfigError(f"{pyproject} [tool.flwr.app.config]: {e}") from None
    values = run_config_values(args)
    parse_config({**table, **parse_config_args(values)} if values else table)


def main(argv: list[str] | None = None) -> int:
    """The exit code: 0 if the config is valid, 2 (one line on stderr) if not."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(f"{PROG}: error: usage: {PROG} PROJECT_DIR [FLWR RUN ARGUMENTS ...]", file=sys.stderr)
        return 2
    try:
        check(Path(argv[0]), argv[1:])
    except (ConfigError, ValueError, OSError) as e:  # ValueError: flwr refuses a .toml among key=value
        message = " ".join(str(e).split())
    except click.ClickException as e:  # flwr's parser: a string that is not key=value TOML
        message = " ".join(e.format_message().split())
    else:
        return 0
    print(f"{PROG}: error: run config: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
