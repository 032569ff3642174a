"""Run a typer app (the library Flower's own CLI uses) the way every command of the project does.

User mistakes (an unknown preset, a bad option value, a bad config key) are answered with one line on stderr,
``<prog>: error: <what is wrong>``, and exit code 2, never a traceback; a command's own return value is its exit
code. Anything else (a bug) still raises. Imports only typer and click, so ``scripts/`` can use it too.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click
import typer

__all__ = ["USAGE_ERROR", "UserError", "new_app", "run_app"]

#: Exit code of a user mistake (the convention of click, argparse and the shell builtins).
USAGE_ERROR = 2


class UserError(click.UsageError):
    """A mistake of the person at the keyboard found after parsing (a config error, a file that does not parse).

    Commands raise it from the project's own exceptions (``fl_compams.ConfigError``); this module does not import
    the project, so that a script on a node pays only for typer.
    """


def new_app(help_text: str, **kwargs) -> typer.Typer:
    """A typer app with the project's settings: no shell-completion options, plain (not rich-markup) help."""
    return typer.Typer(
        help=help_text,
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
        **kwargs,
    )


def one_line(message: str) -> str:
    """``message`` on a single line (config errors and click messages may span several)."""
    return "; ".join(part.strip() for part in message.strip().splitlines() if part.strip())


def run_app(app: typer.Typer, argv: Sequence[str] | None, prog_name: str) -> int:
    """Run ``app`` on ``argv`` (default ``sys.argv[1:]``); return the exit code instead of exiting."""
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:  # the bare command: show what it can do
        print(e.ctx.get_help() if e.ctx else e.format_message(), file=sys.stderr)
        return USAGE_ERROR
    except click.UsageError as e:  # bad option or argument, unknown command, UserError
        hint = f" (see {prog_name} --help)" if not isinstance(e, UserError) else ""
        print(f"{prog_name}: error: {one_line(e.format_message())}{hint}", file=sys.stderr)
        return USAGE_ERROR
    except click.ClickException as e:  # raised by a command with its own exit code
        print(f"{prog_name}: error: {one_line(e.format_message())}", file=sys.stderr)
        return e.exit_code
    except click.Abort:  # Ctrl-C or EOF at a prompt
        print(f"{prog_name}: aborted", file=sys.stderr)
        return 130
    return int(result or 0)
